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
