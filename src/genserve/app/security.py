"""API keys: ``Authorization: Bearer <key>`` on every ``/v1`` route, checked in constant time.

``ApiKeyMiddleware`` enforces the key before the request body is read, so an unauthenticated
caller cannot make the server parse anything. It denies by default: only probes, metrics, the docs
and the playground page (which asks its user for a key) are open, judged on the path the router sees
(``root_path`` removed), so a new route is protected without anyone remembering to protect it. The
``bearer`` scheme is what the routers declare, so that OpenAPI shows the lock and the docs page its
Authorize button.

Keys are kept as SHA-256 digests and every digest is compared, so neither the key's length nor
which key matched shows in the timing. With no keys configured the API is open; the CLI refuses
that on a non-loopback address unless ``--allow-unauthenticated`` is given.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from genserve.app.errors import AuthenticationError
from genserve.app.middleware import route_path, send_json

OPEN_PATHS = {"/health/live", "/health/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/playground",
              "/playground/"}  # the last is redirected to /playground
OPEN_PREFIXES = ("/static/", "/v1/images/files/")  # image URLs: the unguessable id is the credential
bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="A key from GENSERVE_API_KEYS or GENSERVE_API_KEYS_FILE.")


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def check(self, token: str | None) -> str | None:
        """Raises unless ``token`` is a known key; returns the key's id (the first 12 hex digits of its
        SHA-256, for logs: never the key), or None when the API is open."""
        if not self._digests:
            return None
        if not token:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.",
                                      headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.encode()).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.", headers={"WWW-Authenticate": "Bearer"})
        return digest.hex()[:12]


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_open(route_path(scope)):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            try:
                key_id = self.keys.check(token.strip() if scheme.lower() == "bearer" else None)
            except AuthenticationError as err:
                return await send_json(send, err)
            scope.setdefault("state", {})["key_id"] = key_id
        await self.app(scope, receive, send)


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
