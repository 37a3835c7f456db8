"""API keys: ``Authorization: Bearer <key>`` on every ``/v1`` route, checked in constant time.

Keys are kept as SHA-256 digests and every digest is compared, so neither the key's length nor
which key matched shows in the timing. With no keys configured the API is open; the CLI refuses
that on a non-loopback address unless ``--allow-unauthenticated`` is given.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import AuthenticationError

bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="A key from GENSERVE_API_KEYS or GENSERVE_API_KEYS_FILE.")


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, token: str | None) -> None:
        if not self._digests:
            return
        if not token:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.",
                                      headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.encode()).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    request.app.state.api_keys.check(credentials.credentials if credentials else None)
