"""API keys: ``Authorization: Bearer <key>`` on every ``/v1`` route, checked in constant time.

``ApiKeyMiddleware`` enforces the key before the request body is read, so an unauthenticated
caller cannot make the server parse anything. It denies by default: only probes, metrics, the docs
and the playground page (which asks its user for a key) are open, judged on the path the router sees
(``root_path`` removed), so a new route is protected without anyone remembering to protect it. The
OpenAPI document names ``SECURITY_SCHEME`` on every operation the same rule guards (``openapi.py``),
which gives the docs page its Authorize button.

Keys, their scopes and their limits are ``app/tenancy.py``'s. With no keys configured the API is open;
the CLI refuses that on a non-loopback address unless ``--allow-unauthenticated`` is given.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genserve.app.errors import GenserveError
from genserve.app.middleware import route_path, send_json
from genserve.app.tenancy import CURRENT, Tenancy, Usage

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health/live", "/health/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/playground",
              "/playground/"}  # the last is redirected to /playground
OPEN_PREFIXES = ("/static/", "/v1/images/files/")  # image URLs: the unguessable id is the credential
SECURITY_SCHEME = {"APIKey": {"type": "http", "scheme": "bearer",
                              "description": "A key from GENSERVE_API_KEYS or GENSERVE_API_KEYS_FILE."}}


class ApiKeyMiddleware:
    """Authenticates, counts the request against its key's request limits, and makes the key's ``Usage``
    the request's (``tenancy.CURRENT``): the rate-limit headers go on the response, and what the request
    made is charged when its last byte is sent (before it, so the caller's next request sees the count)."""

    def __init__(self, app: ASGIApp, tenancy: Tenancy) -> None:
        self.app, self.tenancy = app, tenancy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(route_path(scope)):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        try:
            key = self.tenancy.authenticate(token.strip() if scheme.lower() == "bearer" else None)
            if key is None:
                return await self.app(scope, receive, send)
            scope.setdefault("state", {})["key_id"] = key.name
            usage = await self.tenancy.admit_request(key)
        except GenserveError as err:
            return await send_json(send, err)

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":  # a 429 from a model's unit has them already
                have = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *((k.encode(), v.encode()) for k, v in
                                                                     usage.headers.items() if k.encode() not in have)]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await self._charge(usage)
            await send(message)

        reset = CURRENT.set(usage)
        try:
            await self.app(scope, receive, send_counted)
        finally:
            CURRENT.reset(reset)
            usage.closed = True  # what is noted from now on is charged as it is noted
            await self._charge(usage)  # the client left, or the app failed: what was made still counts

    async def _charge(self, usage: Usage) -> None:
        """Charges in a task of its own, so a cancelled request (its client left) is still charged; most
        requests have nothing to charge beyond the request itself, and no task is made for them."""
        if usage.unbilled() and (task := self.tenancy.charge_soon(usage)) is not None:
            with contextlib.suppress(Exception):  # logged by the task; the response goes out regardless
                await asyncio.shield(task)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def content_security_policy(html: str = "", *, inline_styles: bool = False) -> str:
    """A Content-Security-Policy for a page genserve serves: everything from this origin only, the
    inline scripts of ``html`` allowed by their hashes (never 'unsafe-inline' for scripts), ``data:``
    and ``blob:`` for the images, audio and workers a page makes itself, no frames, plugins or form
    posts. ``inline_styles``: Swagger UI and ReDoc set style attributes from script."""
    scripts = ["'self'"] + [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                            for body in _INLINE_SCRIPT.findall(html)]
    styles = ["'self'"] + (["'unsafe-inline'"] if inline_styles else [])
    return (f"default-src 'self'; script-src {' '.join(scripts)}; style-src {' '.join(styles)}; "
            "img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self' blob:; "
            "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
            "form-action 'none'")
