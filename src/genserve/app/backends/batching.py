"""Dynamic batching: requests that arrive close together share one call of the model.

A ``DynamicBatcher`` owns a queue bounded in requests (a request's inputs are its items) and one
worker task. The worker takes the first waiting item, waits up to ``max_wait_ms`` for more (up to
``max_batch_size`` that are compatible, by ``key``), runs ``fn`` on the batch in a thread, and
resolves every item's future; when ``fn`` fails, each item is run alone, so only the item at fault
fails. Items whose caller went away are dropped before the model sees them. Batching is a property
of the runner: ``fn`` knows nothing of queues, and each item must give the same result alone or
batched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from genserve.app.backends.base import STALL_SECONDS, Backend
from genserve.app.errors import RateLimitError, UnavailableError
from genserve.app.metrics import Metrics
from genserve.app.registry import ModelEntry
from genserve.models.common.loading import load_family, resolve_device

log = logging.getLogger(__name__)
# How long the device probe of a model on a GPU may take before the model counts as not ready.
DEVICE_PROBE_SECONDS = 10.0


def probe_device(device: Any) -> None:
    """A small computation on ``device`` (a CUDA device), on a stream of its own so that it does not wait
    behind a running batch; raises if the device is lost or in a sticky error state, hangs if it hangs."""
    import torch

    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        x = torch.ones(8, device=device)
        if float((x + x).sum()) != 16.0:
            raise RuntimeError(f"{device} computed 8 * (1 + 1) wrong")

T = TypeVar("T")
R = TypeVar("R")


class BatchAbandoned(Exception):
    """Raised by a model between steps when ``DynamicBatcher.beat`` says nobody waits for its batch."""


@dataclass(eq=False)  # items are compared by identity: a queue may hold 100,000 of them
class _Item(Generic[T]):
    value: T
    future: asyncio.Future
    request: int  # the items of one submit share it: the queue's limit counts requests, not items
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch_size: int, max_wait_ms: float,
                 max_waiting: int, key: Callable[[T], Hashable] = lambda _: None,
                 on_batch: Callable[[int, list[float]], None] | None = None) -> None:
        self.fn, self.key, self.on_batch = fn, key, on_batch
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.max_waiting = max_waiting
        self._waiting: list[_Item[T]] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        self._task: asyncio.Task | None = None
        self._busy_since: float | None = None  # perf_counter time the running batch last made progress
        self._running: list[_Item[T]] = []  # the batch in the model now
        self._requests = 0  # submits so far: each one's items share its number
        self._queued: dict[int, int] = {}  # request number -> its items still in the queue (the limit counts keys)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def fail_waiting(self) -> None:
        """Callers still queued get a 503 now rather than waiting for their deadline."""
        _fail(self._waiting)
        self._waiting, self._queued = [], {}

    async def close(self) -> None:
        self.fail_waiting()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def beat(self) -> bool:
        """Called by the model between steps of the running batch (from its thread): the batch made
        progress, so it is not stalled however long it runs. Returns whether any caller still waits for
        it; when none does, the model stops (``BatchAbandoned``) instead of finishing work nobody reads."""
        self._busy_since = time.perf_counter()
        return any(not i.future.done() for i in self._running)

    def stalled(self, seconds: float) -> bool:
        """True when a batch has run without progress (its start or last ``beat``), or an item has waited
        with no batch running, for ``seconds``."""
        now = time.perf_counter()
        if self._busy_since is not None:
            return now - self._busy_since > seconds
        return bool(self._waiting) and now - self._waiting[0].enqueued > seconds

    async def submit_many(self, values: list[T]) -> list[R]:
        """Queues all of ``values`` as one request, or none (429 when ``max_waiting`` requests wait)."""
        items = self._enqueue(values)
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            self._leave(items)

    async def submit_stream(self, values: list[T]) -> AsyncGenerator[R, None]:
        """Queues all of ``values`` or none, as ``submit_many``, and yields each result in order as
        soon as it and those before it are ready; items not yet run are dropped if the caller stops."""
        items = self._enqueue(values)
        try:
            for item in items:
                yield await item.future
        finally:
            self._leave(items)

    def check_room(self) -> None:
        """429 while ``max_waiting`` requests wait."""
        if len(self._queued) >= self.max_waiting:
            raise RateLimitError(f"Too many requests waiting for this model ({len(self._queued)} queued, limit "
                                 f"{self.max_waiting}); retry shortly.", headers={"Retry-After": "1"})

    def _enqueue(self, values: list[T]) -> list[_Item[T]]:
        self.check_room()
        loop = asyncio.get_running_loop()
        self._requests += 1
        items = [_Item(v, loop.create_future(), self._requests) for v in values]
        self._queued[self._requests] = len(items)
        self._waiting.extend(items)
        self._wakeup.set()
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            done = [i for i in self._waiting if i.future.done()]
            if done:
                self._dequeue(done)
                self._waiting = [i for i in self._waiting if not i.future.done()]
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._waiting[0].enqueued + self.max_wait
            while len(self._compatible()) < self.max_batch_size and (delay := deadline - time.perf_counter()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
            batch = self._compatible()[: self.max_batch_size]
            if not batch:
                continue
            self._dequeue(batch)
            taken = set(map(id, batch))
            self._waiting = [i for i in self._waiting if id(i) not in taken]
            now = time.perf_counter()
            if self.on_batch:
                self.on_batch(len(batch), [now - i.enqueued for i in batch])
            self._busy_since, self._running = now, batch
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [i.value for i in batch])
            except asyncio.CancelledError:  # closing: the running batch's callers must not hang
                _fail(batch)
                raise
            finally:
                self._busy_since, self._running = None, []
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _run_batch(self, values: list[T]) -> Sequence[R | BaseException]:
        """``fn`` over the batch; when it fails, each item whose caller still waits alone, so that one
        bad item fails only its own request (items give the same result alone as batched, so the
        others lose nothing)."""
        try:
            return self.fn(values)
        except Exception as exc:
            failure = exc
        items = list(self._running)
        if len(values) == 1 or isinstance(failure, BatchAbandoned) or len(items) != len(values):
            return [failure] * len(values)  # nothing to tell apart, or nobody waits any more
        results: list[R | BaseException] = []
        for item, value in zip(items, values, strict=True):
            if item.future.done():  # its caller left: not redone
                results.append(failure)
                continue
            try:
                results.extend(self.fn([value]))
            except Exception as exc:
                results.append(exc)
        return results

    def _dequeue(self, items: list[_Item[T]]) -> None:
        """``items`` leave the queue: a request with none left there no longer counts against the limit."""
        for item in items:
            left = self._queued.get(item.request)
            if left is None:
                continue
            if left <= 1:
                del self._queued[item.request]
            else:
                self._queued[item.request] = left - 1

    def _leave(self, items: list[_Item[T]]) -> None:
        """The caller of ``items`` is done with them (answered, or gone): what was not run is abandoned."""
        for item in items:
            item.future.cancel()  # no-op when done; marks the rest as abandoned
        if items:
            self._queued.pop(items[0].request, None)

    def _compatible(self) -> list[_Item[T]]:
        live = [i for i in self._waiting if not i.future.done()]
        if not live:
            return []
        first = self.key(live[0].value)
        return [i for i in live if self.key(i.value) == first]


def _fail(items: list[_Item]) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(UnavailableError("The server is shutting down.",
                                                       headers={"Retry-After": "5"}))


class BatchedBackend(Backend):
    """A backend whose model runs behind one ``DynamicBatcher`` (``start_batcher`` in ``start``):
    ready while the batcher's worker lives and is not stuck; draining fails the queue; closing stops
    the worker. ``setup`` loads the entry's model with ``load_model``."""

    batcher: DynamicBatcher | None = None
    _probe: asyncio.Future[None] | None = None

    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.metrics = metrics
        self.model: Any = None

    def load_model(self) -> Any:
        e = self.entry
        return load_family(e.family or "", Path(e.resolved_source or e.source or ""), e.device, e.dtype)

    def start_batcher(self, fn: Callable[[list], Sequence], key: Callable[[Any], Hashable] = lambda _: None,
                      max_batch_size: int | None = None) -> DynamicBatcher:
        """The entry's batcher around ``fn``, started, observing batch sizes and queue times."""
        e, m = self.entry, self.metrics

        def on_batch(size: int, waits: list[float]) -> None:
            m.batch_size.labels(e.id).observe(size)
            for w in waits:
                m.request_queue_time.labels(e.id).observe(w)

        self.batcher = DynamicBatcher(fn, max_batch_size=max_batch_size or e.max_batch_size,
                                      max_wait_ms=e.max_wait_ms, max_waiting=e.max_waiting, key=key,
                                      on_batch=on_batch)
        self.batcher.start()
        return self.batcher

    def ready(self) -> bool:
        b = self.batcher
        return self.loaded and b is not None and b.alive() and not b.stalled(STALL_SECONDS)

    async def check_ready(self) -> bool:
        """``ready``, and for a model on a GPU the GPU answering ``probe_device`` within
        ``DEVICE_PROBE_SECONDS``: a GPU lost or in a sticky error state fails every batch while the
        batcher's thread lives on. (The text engine's GPU is its child process's: a hung step stalls it.)
        One probe at a time, shared by callers: a probe that hangs keeps the model not ready and piles no
        threads up."""
        if not self.ready():
            return False
        device = resolve_device(self.entry.device)
        if device.type != "cuda":
            return True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(asyncio.to_thread(probe_device, device))
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), DEVICE_PROBE_SECONDS)
        except Exception as exc:
            log.warning("model %s: its device %s failed its probe: %s", self.entry.id, device,
                        f"no answer in {DEVICE_PROBE_SECONDS:g} s" if isinstance(exc, TimeoutError) else exc)
            return False
        return True

    def check_room(self, task: str) -> None:
        if self.batcher is not None:
            self.batcher.check_room()

    def stepped(self, what: str) -> None:
        """Called by the model between steps of the running batch (from its thread): the batch made
        progress (``DynamicBatcher.beat``); once every caller of it has gone, stops it
        (``BatchAbandoned``) instead of finishing work nobody reads. ``what`` names the batch's items."""
        if self.batcher is not None and not self.batcher.beat():
            raise BatchAbandoned(f"every caller of a batch of {what} has gone")

    def drain(self) -> None:
        if self.batcher is not None:
            self.batcher.fail_waiting()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
