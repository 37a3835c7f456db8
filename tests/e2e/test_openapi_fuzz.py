"""The OpenAPI document against the server, with schemathesis: every operation, on the server set that
serves its models, in all of schemathesis's phases (the document's examples, boundary and negative
cases, random cases, and stateful sequences through the document's links), with every check: no
server error, no undocumented status code or content type, no response off its schema, invalid
requests refused and valid ones accepted (tests/e2e/schemathesis.toml lists the constraints a document
for every model cannot state).

Seeded and bounded (``EXAMPLES`` per operation and phase), so a run is the same each time and takes
seconds; schemathesis's report is the failure message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, ServerSets

pytest.importorskip("schemathesis")

UPSTREAM_SETS = ("text", "image", "audio", "molecule")  # launched with the session's other servers
CONFIG = Path(__file__).with_name("schemathesis.toml")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 10
SEED = 1
# The operations each set's models serve (the others would only answer 404 there).
OPERATIONS = {
    "text": r"^/(v1/(completions|chat/completions|embeddings|moderations|models.*|provenance/verify)"
            r"|health/.*|metrics)$",
    "image": r"^/v1/images/",
    "audio": r"^/v1/audio/",
    "molecule": r"^/v1/molecules/",
}


# The operations whose valid cases name the server's own models (tests/e2e/schemathesis_hooks.py), by the
# task their models serve. Text only: a valid image, audio or molecule request with generated knobs can
# take minutes of CPU (200 denoising steps of 8 images); theirs come from the document's examples.
MODEL_TASKS = {"/v1/completions": "completion", "/v1/chat/completions": "chat", "/v1/embeddings": "embedding",
               "/v1/moderations": "moderation"}


def served_models(url: str) -> dict[str, list[str]]:
    """Each operation of ``MODEL_TASKS`` with the ids of the server's models that serve it."""
    cards = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()["data"]
    found = {path: sorted(c["id"] for c in cards if task in c["tasks"]) for path, task in MODEL_TASKS.items()}
    return {path: ids for path, ids in found.items() if ids}


def schemathesis_run(url: str, operations: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    st = Path(sys.executable).with_name("st")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks",
           "GENSERVE_FUZZ_MODELS": json.dumps(served_models(url)),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [str(st), "--no-color", "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "--url", url,
         "-H", f"Authorization: Bearer {API_KEY}", "--checks", "all", "--include-path-regex", operations,
         "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--request-timeout", "60",
         "--suppress-health-check", "too_slow"],
        capture_output=True, text=True, timeout=400, cwd=cwd, env=env)  # its cache (.schemathesis/) goes there


def test_every_operation_keeps_to_the_openapi_document(server_sets: ServerSets, tmp_path: Path) -> None:
    """The four sets at once (each run waits mostly on its own server, and a server on its models)."""
    servers = {name: server_sets.get(name) for name in OPERATIONS}
    with ThreadPoolExecutor(len(servers)) as pool:
        runs = dict(zip(servers, pool.map(lambda n: schemathesis_run(servers[n].url, OPERATIONS[n], tmp_path), servers),
                        strict=True))
    failed = {name: run.stdout + run.stderr for name, run in runs.items() if run.returncode != 0}
    assert not failed, "\n\n".join(f"=== {name} ===\n{report[-12000:]}" for name, report in failed.items())
    tested = [int(re.search(r"Tested: (\d+)", run.stdout).group(1)) for run in runs.values()]  # type: ignore[union-attr]
    assert sum(tested) == 19, tested  # every operation of the document, once
