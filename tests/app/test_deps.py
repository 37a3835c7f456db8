"""Routes get their services through the typed dependencies of ``app/deps.py``, never from ``app.state``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI

import genserve.app
from genserve.app.deps import services_of

APP_DIR = Path(genserve.app.__file__).parent


def test_only_deps_and_main_touch_app_state() -> None:
    users = sorted(str(p.relative_to(APP_DIR)) for p in APP_DIR.rglob("*.py") if "app.state" in p.read_text())
    assert users == ["deps.py", "main.py"]


def test_an_app_not_built_by_create_app_is_named() -> None:
    with pytest.raises(RuntimeError, match="create_app"):
        services_of(FastAPI())
