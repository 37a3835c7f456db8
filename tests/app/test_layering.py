"""Serving knows a backend only through its modality's Protocol and ``describe()``: no ``isinstance``
on backend or runner classes, no reaching into a backend's runner, batcher or model, and no model
code beyond the request params (and the seed convention)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import genserve.app.serving

SERVING = Path(genserve.app.serving.__file__).parent
ALLOWED_MODEL_IMPORTS = {"genserve.models.params", "genserve.models.text.sampling", "genserve.models.seeding"}
BACKEND_CLASS = re.compile(r"^(Local\w*Backend|RemoteBackend|\w*Runner|BatchedBackend|DynamicBatcher)$")
PRIVATE_ATTRIBUTES = {"runner", "batcher", "model"}


def _modules() -> list[Path]:
    return sorted(SERVING.glob("*.py"))


def _names(node: ast.expr) -> list[str]:
    """The class names an ``isinstance`` second argument mentions (``A``, ``m.A``, ``(A, B)``, ``A | B``)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.Tuple):
        return [n for e in node.elts for n in _names(e)]
    if isinstance(node, ast.BinOp):
        return _names(node.left) + _names(node.right)
    return []


def _is_backend(node: ast.expr) -> bool:
    """``backend``, ``self.backend``, ``call.backend``: what serving names a backend."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "backend" in name


def _violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
                and len(node.args) == 2:
            found += [f"line {node.lineno}: isinstance(..., {n})" for n in _names(node.args[1])
                      if BACKEND_CLASS.match(n)]
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES and (
                node.attr != "model" or _is_backend(node.value)):  # ``body.model`` is the request's model id
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("genserve.models") and node.module not in ALLOWED_MODEL_IMPORTS:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            if node.module.startswith("genserve.app.backends.") and node.module.rsplit(".", 1)[1].startswith(
                    ("local_", "remote", "batching")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith("genserve.models") and a.name not in ALLOWED_MODEL_IMPORTS]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "backend":
            found.append(f"line {node.lineno}: {node.func.id}(backend, ...)")
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_serving_reaches_backends_only_through_their_protocols(path: Path):
    assert _violations(ast.parse(path.read_text(), str(path))) == []


def test_the_checker_finds_what_it_forbids():
    bad = """
from genserve.models.molecule import chem
from genserve.app.backends.local_image import LocalImageBackend
import genserve.models.music
def f(backend):
    isinstance(backend.runner, LatentRunner)
    isinstance(backend, (LocalImageBackend, RemoteBackend))
    backend.batcher.submit_many([])
    backend.model.sample_rate
    getattr(backend, "sample_rate")
    body.model  # the request's model id: allowed
"""
    found = _violations(ast.parse(bad))
    assert len(found) == 10, found
