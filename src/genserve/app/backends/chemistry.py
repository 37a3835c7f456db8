"""RDKit work off the event loop, in two places.

**The caller's own molecules** (``/v1/molecules/properties``, which describes SMILES strings with no
model behind them) are described in worker processes, ``ChemistryWorkers``, a ``pebble`` process
pool. Untrusted input reaches RDKit's C++ there, so a native crash (a segfault, a stack overflow that
the size caps of ``models.molecule.chem`` missed) kills one worker, not the gateway: the pool starts
another, the request gets a 500 in OpenAI's body (code ``worker_crashed``) and the others carry on.
A request's molecules go to the workers in tasks of ``TASK_MOLECULES``, one task at a time, so the
tasks of a large request take turns with those of other requests instead of filling the queue ahead
of them. Each task has ``TASK_TIMEOUT_S`` from the moment a worker takes it (the worker's start and
the queue do not count), after which pebble kills the worker and the request gets a 504
(``DeadlineError``). The slowest legitimate molecules measured (190-atom sugar chains, with
properties, alerts and drawing) take about 75 ms each, so a task of 16 takes about 1.2 s: the
timeout leaves room eight-fold. The request as a whole, queue included, is bounded by its own
deadline (serving's ``Deadline``); when it passes, or the client leaves, the awaiting coroutine is
cancelled, and so is the task: pebble kills the worker that runs it and starts another.

Workers start from a ``forkserver`` (never a ``fork`` of the gateway, whose threads may hold locks)
that imports this module, and so RDKit, once; a new worker is a fork of it, warmed by describing one
molecule (RDKit's filter catalogs and the SA-score table load on first use). Like any child of
``spawn`` or ``forkserver``, a worker also runs the parent's main script again as ``__mp_main__``
(the ``genserve`` console script: a few imports; under Ray, Ray's worker script). The pool starts on
the first request, in a thread, off the event loop: about 0.6 s measured, forkserver included; a
replacement worker is ready in about 0.3 s. Starting is outside the task timeout (pebble's clock
starts when a worker takes the task).

**Generated molecules** (the molecule backends: analysing sampled strings, describing interpolation
paths) stay in a thread pool, ``chemistry_pool``: they are the model's strings, bounded by its
length, and analysed one at a time as they finish while the engine samples the rest, where a
process hop per molecule (pickling it there and its properties and drawing back) would cost
throughput for no protection the size caps do not already give. RDKit's C++ releases the GIL for
much of that work. (A caller's own molecules other than these, an interpolation's ``start`` and
``end`` and the ``similar_to`` and ``substructure`` constraints, are still parsed in the gateway's
threads, under the size caps.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import resource
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pebble import ProcessExpired, ProcessFuture, ProcessPool
from pebble.common.types import RemoteTraceback

from genserve.app.errors import DeadlineError, GenserveError, UnavailableError
from genserve.models.molecule import chem

log = logging.getLogger(__name__)
T = TypeVar("T")

# Properties is no hot path; a worker's RSS is about 150 MB, most of it shared with the forkserver.
WORKERS = min(2, max(1, (os.cpu_count() or 2) - 1))
TASK_MOLECULES = 16  # molecules per task
TASK_TIMEOUT_S = 10.0  # per task, from when a worker takes it
JOIN_TIMEOUT_S = 10.0  # longest a close waits for the stopped pool to end
START_METHOD = "forkserver"
_WARM_SMILES = "CC(=O)Oc1ccccc1C(=O)O"


@functools.cache
def chemistry_pool() -> ThreadPoolExecutor:
    """The threads that analyse generated molecules (see the module's docstring)."""
    return ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="chemistry")


class ChemistryWorkers:
    """The worker processes that run RDKit on the caller's molecules (see the module's docstring). One
    per app, owned by its ``ModelManager``; started on first use, stopped by ``close``."""

    def __init__(self, workers: int = WORKERS, timeout_s: float = TASK_TIMEOUT_S) -> None:
        self.workers, self.timeout_s = workers, timeout_s
        self._pool: ProcessPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._futures: set[ProcessFuture] = set()

    async def describe_smiles(self, smiles: list[str], include: list[str]) -> list[dict[str, Any]]:
        """Each SMILES string as ``/v1/molecules/properties`` reports it (the item's fields)."""
        items: list[dict[str, Any]] = []
        for start in range(0, len(smiles), TASK_MOLECULES):
            part = smiles[start:start + TASK_MOLECULES]
            items += await self.run(_describe_all, part, include, start,
                                    what=f"smiles[{start}:{start + len(part)}]")
        return items

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None, what: str = "the task") -> T:
        """``fn(*args)`` in a worker (``fn`` and its arguments must pickle; ``fn`` importable there),
        within ``timeout_s`` (``self.timeout_s`` by default) of a worker taking it. A timeout is a 504,
        a worker that dies a 500 (``worker_crashed``), both in OpenAI's body; ``what`` names the work
        in their messages. Cancelling the caller cancels the task (its worker is killed and replaced)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        pool = self._pool
        if pool is None or not pool.active or self._closed:
            pool = await asyncio.to_thread(self._started)
        try:
            future = pool.schedule(fn, args, timeout=timeout)
        except RuntimeError:  # the pool broke since the check above
            future = (await asyncio.to_thread(self._started)).schedule(fn, args, timeout=timeout)
        self._futures.add(future)
        try:
            return await asyncio.wrap_future(future)
        except TimeoutError as exc:
            if isinstance(exc.__cause__, RemoteTraceback):  # raised by ``fn`` itself: a bug, a 500
                raise
            log.warning("chemistry worker stopped: %s ran past its %g s", what, timeout)
            raise DeadlineError(f"Describing {what} took longer than {timeout:g} s; the work was stopped.") from None
        except ProcessExpired as exc:
            cause = _exit_cause(exc.exitcode)
            log.error("chemistry worker %s died (%s) while working on %s; a new one takes its place",
                      exc.pid, cause, what)
            raise GenserveError(f"The worker describing {what} died ({cause}); RDKit may have crashed on one of "
                                "these molecules. Other requests are not affected.", code="worker_crashed") from None
        except concurrent.futures.BrokenExecutor as exc:  # pebble gave up on the pool; the next call starts one
            log.error("chemistry pool broken (%s) while working on %s", exc, what)
            raise UnavailableError("The chemistry workers failed; retry.", code="worker_crashed",
                                   headers={"Retry-After": "1"}) from None
        finally:
            future.cancel()  # cancelled or failed: pebble kills the worker still running it; done: no-op
            self._futures.discard(future)

    def _started(self) -> ProcessPool:
        """The running pool, started now if there is none, or none that pebble still runs: pebble gives
        up on a pool whose idle worker died (nothing to blame it on). Blocks while workers start."""
        with self._lock:
            if self._closed:
                raise UnavailableError("The server is shutting down.", headers={"Retry-After": "5"})
            if self._pool is not None and not self._pool.active:
                log.warning("chemistry pool no longer running; starting another")
                _stop(self._pool)
                self._pool = None
            if self._pool is None:
                context = multiprocessing.get_context(START_METHOD)
                context.set_forkserver_preload([__name__])  # no effect if the forkserver already runs
                pool = ProcessPool(max_workers=self.workers, initializer=_warm, context=context)
                _ = pool.active  # starts the workers here, in this thread
                self._pool = pool
            return self._pool

    def close(self) -> None:
        """Stops the workers, killing any still at work (what awaits them is cancelled). Blocks until
        they are gone: tens of milliseconds, as SIGTERM ends a worker at once, even in RDKit's C++."""
        with self._lock:
            self._closed = True  # a request in flight or after this starts no new pool
            pool, self._pool = self._pool, None
            for future in list(self._futures):
                future.cancel()
            if pool is not None:
                _stop(pool)


def _stop(pool: ProcessPool) -> None:
    """Stops ``pool`` (its workers are killed) and waits up to ``JOIN_TIMEOUT_S`` for its threads and
    processes to end: pebble's ``join`` of a stopped pool ignores its own timeout, so it runs in a thread
    of its own that the caller does not wait for beyond that."""
    pool.stop()

    def join() -> None:
        try:
            pool.join()
        except Exception:  # a pool that broke on its own may fail to join; its workers are gone or killed
            log.exception("stopping the chemistry pool")

    joiner = threading.Thread(target=join, name="chemistry-join", daemon=True)
    joiner.start()
    joiner.join(JOIN_TIMEOUT_S)
    if joiner.is_alive():
        log.error("the chemistry pool did not stop within %.0f s; left to end with the process", JOIN_TIMEOUT_S)


def _exit_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            pass
    return f"exit code {exitcode}"


# --- in the workers -------------------------------------------------------------------------------

def _warm() -> None:
    """A new worker's initializer. SIGTERM, which pebble sends to stop a worker (a task past its
    timeout, a cancelled one), ends it at once, as the kernel's default action: pebble's own handler is
    Python, which cannot run while RDKit's C++ holds the GIL, so a worker stuck there lived on until
    pebble's SIGKILL 3 s later, and pebble holds the workers' channel all that while, so no other worker
    could take a task either (measured: the 504 after 3.5 s instead of 0.7 s for a 0.5 s timeout, and
    another request held up 2.8 s). Then what RDKit builds on first use (filter catalogs, the SA-score
    table) is built before the worker takes a task, so no task's timeout pays for it. A worker that
    crashes leaves no core file: a caller who can crash workers at will must not fill the disk."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _describe(0, _WARM_SMILES, ["properties", "alerts", "svg"])


def _describe_all(smiles: list[str], include: list[str], first: int = 0) -> list[dict[str, Any]]:
    return [_describe(first + i, s, include) for i, s in enumerate(smiles)]


def _describe(index: int, smiles: str, include: list[str]) -> dict[str, Any]:
    mol = chem.mol_from_smiles(smiles) if smiles.strip() else None
    if mol is None:
        return {"index": index, "input": smiles, "valid": False,
                "error": "not a valid SMILES string (RDKit could not parse it)"}
    return {"index": index, "input": smiles, "valid": True, "smiles": chem.canonical_smiles(smiles),
            "properties": chem.properties(mol) if "properties" in include else None,
            "alerts": chem.alerts(mol) if "alerts" in include else None,
            "svg": chem.svg(mol) if "svg" in include else None}
