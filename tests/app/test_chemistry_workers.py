"""The chemistry workers (``app/backends/chemistry.py``): RDKit on the caller's molecules runs in worker
processes that may crash, run past their timeout or be cancelled without harm to the gateway or to the
other requests. Real processes throughout, no stand-ins: a crash is a worker's own SIGSEGV, a hang a
worker stuck in C code that holds the GIL (as RDKit's C++ would be). The functions the workers run are
in ``chemistry_tasks``, which a worker imports by name (this module would bring the whole app)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from genserve.app.backends.chemistry import ChemistryWorkers
from genserve.app.errors import DeadlineError, GenserveError, error_response
from genserve.app.main import create_app
from genserve.app.settings import Settings
from tests.app.chemistry_tasks import crash, stuck

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


# --- helpers --------------------------------------------------------------------------------------

def gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether process ``pid`` is gone (reaped) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def pid_in(pid_file: Path, within_s: float = 5.0) -> int:
    deadline = time.monotonic() + within_s
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the worker never started the task"
        time.sleep(0.01)
    return int(pid_file.read_text())


@pytest.fixture(scope="module")
def two_workers() -> Iterator[ChemistryWorkers]:
    w = ChemistryWorkers(workers=2, timeout_s=0.5)
    yield w
    w.close()


@pytest.fixture
def one_worker() -> Iterator[ChemistryWorkers]:
    w = ChemistryWorkers(workers=1, timeout_s=0.5)
    yield w
    w.close()


@pytest.fixture(params=["one_worker", "two_workers"])
def workers(request: pytest.FixtureRequest) -> ChemistryWorkers:
    return request.getfixturevalue(request.param)


# --- tests ----------------------------------------------------------------------------------------

def test_a_worker_that_crashes_is_a_500_in_openais_body_and_is_replaced(workers: ChemistryWorkers,
                                                                        tmp_path: Path) -> None:
    """With one worker, the work beside the crash and after it needs the replacement; with two, the
    other worker goes on meanwhile."""
    pid_file = tmp_path / "pid"

    async def main() -> tuple[BaseException | list, BaseException | list, list, int]:
        await workers.describe_smiles(["CCO"], ["properties"])  # started and warm
        crashed, beside = await asyncio.gather(workers.run(crash, str(pid_file), what="the crash"),
                                               workers.describe_smiles([ASPIRIN] * 40, ["properties", "svg"]),
                                               return_exceptions=True)
        after = await workers.describe_smiles([ASPIRIN], ["properties", "alerts"])
        return crashed, beside, after, await workers.run(os.getpid)

    crashed, beside, after, pid_after = asyncio.run(main())
    assert isinstance(crashed, GenserveError)
    response = error_response(crashed)
    assert response.status_code == 500
    body = json.loads(bytes(response.body))
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "worker_crashed"
    assert "SIGSEGV" in body["error"]["message"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(beside, list) and len(beside) == 40 and all(item["valid"] for item in beside)
    assert [item["index"] for item in beside] == list(range(40))  # in order across the tasks of 16
    assert after[0]["valid"] and after[0]["properties"]["mw"] > 0
    dead = int(pid_file.read_text())
    assert gone(dead) and pid_after != dead


def test_a_task_past_its_timeout_is_killed_at_once_and_is_a_504(two_workers: ChemistryWorkers,
                                                                  tmp_path: Path) -> None:
    """Pebble stops a worker with SIGTERM and kills it 3 s later; the workers let SIGTERM end them at once,
    even in C code (where pebble's Python handler cannot run)."""
    pid_file = tmp_path / "pid"

    async def main() -> tuple[DeadlineError, float, list]:
        await two_workers.describe_smiles(["CCO"], ["properties"])
        started = time.monotonic()
        with pytest.raises(DeadlineError) as err:
            await two_workers.run(stuck, str(pid_file), what="the stuck task")
        took = time.monotonic() - started
        return err.value, took, await two_workers.describe_smiles([ASPIRIN], ["properties"])

    err, took, after = asyncio.run(main())
    assert 0.5 <= took < 2.0, took
    assert err.status == 504 and err.body()["error"]["type"] == "timeout"
    assert "the stuck task took longer than 0.5 s" in err.message
    assert gone(pid_in(pid_file), within_s=1.0)
    assert after[0]["valid"]


def test_cancelling_the_caller_kills_the_workers_task(two_workers: ChemistryWorkers, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def main() -> list:
        task = asyncio.ensure_future(two_workers.run(stuck, str(pid_file), timeout_s=60))
        pid = await asyncio.to_thread(pid_in, pid_file)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(gone, pid, 2.0), "the cancelled task's worker still runs"
        return await two_workers.describe_smiles([ASPIRIN], ["properties"])

    assert asyncio.run(main())[0]["valid"]


def test_the_apps_workers_serve_properties_and_stop_with_the_app() -> None:
    app = create_app(Settings(api_keys=["k"]), entries=[])
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        started = time.monotonic()
        r = client.post("/v1/molecules/properties", json={"smiles": [ASPIRIN, "C1CC"]}, headers=auth)
        first = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert [item["valid"] for item in r.json()["data"]] == [True, False]
        assert first < 10, f"the first request, which starts the workers, took {first:.1f} s"
        pid = asyncio.run(app.state.services.manager.chemistry.run(os.getpid))
        assert pid != os.getpid()
    assert gone(pid, within_s=2.0), "a chemistry worker outlived its app"


def test_closing_waits_for_a_stopped_pool_no_longer_than_its_bound(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """pebble's ``join`` of a stopped pool ignores its timeout; a close bounds the wait itself (a pool whose
    join hangs does not hold a server's shutdown), and says so."""
    from pebble import ProcessPool

    from genserve.app.backends import chemistry

    w = ChemistryWorkers(workers=1, timeout_s=5)
    assert asyncio.run(w.run(len, [ASPIRIN])) == 1  # the pool runs
    real_join = ProcessPool.join
    monkeypatch.setattr(ProcessPool, "join", lambda self, timeout=None: time.sleep(3))
    monkeypatch.setattr(chemistry, "JOIN_TIMEOUT_S", 0.2)
    start = time.monotonic()
    with caplog.at_level("ERROR", logger=chemistry.__name__):
        w.close()
    assert time.monotonic() - start < 1.5
    assert "did not stop within" in caplog.text
    monkeypatch.setattr(ProcessPool, "join", real_join)
