"""README.md's example outputs are what genserve answers: ``scripts/readme_examples.py --check``
against the session's servers, which run the built-in entries of the examples' models (text and
embeddings: the ``text`` set; molecules: the ``molecule`` set)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from genserve.models.common.loading import resolve_device, resolve_dtype
from tests.conftest import API_KEY, ROOT, TEXT_DIR, ServerSets

UPSTREAM_SETS = ("text", "molecule")  # launched with the session's servers
DEVICE = resolve_device("auto")

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cpu" or resolve_dtype("auto", DEVICE, TEXT_DIR) != torch.float32,
    reason="README.md shows what a float32 CPU server samples; here the models compute in another arithmetic")


@pytest.fixture(scope="module")
def urls(server_sets: ServerSets) -> list[str]:
    return ["--url", server_sets.get("text").url, "--url", f"molecule={server_sets.get('molecule').url}"]


def test_readme_outputs_are_the_servers(urls: list[str]) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_examples.py"), "--check", "--api-key", API_KEY,
                        *urls], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"README.md differs from what the servers answer (--write):\n{r.stdout}{r.stderr}"
