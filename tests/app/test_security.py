"""The key check denies by default and judges the path routing sees, also under a root_path."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from genserve.app.main import create_app
from genserve.app.settings import Settings

KEY = {"Authorization": "Bearer k"}


@pytest.mark.parametrize("root", ["", "/api"])
def test_protected_and_open_paths(root: str) -> None:
    app = create_app(Settings(api_keys=["k"]), entries=[])

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, root_path=root)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for path in ("/v1/models", "/v1", "/v1/completions", "/anything-new"):
                assert (await c.get(root + path)).status_code == 401, path
            assert (await c.get(root + "/v1/models", headers=KEY)).status_code == 200
            for path in ("/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json",
                         "/static/docs/swagger-ui.css"):
                assert (await c.get(root + path)).status_code == 200, path

    asyncio.run(main())


def test_the_document_locks_exactly_what_the_key_check_guards() -> None:
    """Every operation names the key's scheme unless the middleware lets it through without a key, and
    the open ones answer without a key (the guarded ones' 401 is above)."""
    app = create_app(Settings(api_keys=["k"]), entries=[])
    doc = app.openapi()
    assert doc["components"]["securitySchemes"]["APIKey"] == {
        "type": "http", "scheme": "bearer", "description": "A key from GENSERVE_API_KEYS or GENSERVE_API_KEYS_FILE."}
    locked = {path: [op.get("security") for op in ops.values()] for path, ops in doc["paths"].items()}
    assert {p for p, s in locked.items() if s == [None] * len(s)} == {
        "/health/live", "/health/ready", "/metrics", "/v1/images/files/{file_id}"}
    assert all(s == [[{"APIKey": []}]] * len(s) for p, s in locked.items() if p.startswith("/v1/")
               and p != "/v1/images/files/{file_id}")

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            for path in ("/health/live", "/health/ready", "/metrics"):
                assert (await c.get(path)).status_code == 200, path
            assert (await c.get("/v1/images/files/nothing-here")).status_code == 404  # judged, not refused

    asyncio.run(main())
