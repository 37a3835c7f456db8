"""The dynamic batcher: grouping, the bounded queue, abandoned items and errors; a batched backend's
readiness probe of its GPU."""

from __future__ import annotations

import asyncio
import threading

import pytest

from genserve.app.backends import batching
from genserve.app.backends.batching import BatchAbandoned, BatchedBackend, DynamicBatcher
from genserve.app.errors import RateLimitError
from genserve.app.metrics import Metrics
from genserve.app.registry import ModelEntry


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_a_batch_and_keep_their_results() -> None:
    batches: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        batches.append(items)
        return [x * 10 for x in items]

    async def main() -> list[list[int]]:
        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=50, max_waiting=100)
        b.start()
        try:
            return await asyncio.gather(*(b.submit_many([i]) for i in range(6)))
        finally:
            await b.close()

    assert run(main()) == [[0], [10], [20], [30], [40], [50]]
    assert [len(x) for x in batches] == [4, 2]


def test_key_keeps_incompatible_items_apart() -> None:
    batches: list[list[str]] = []

    def fn(items: list[str]) -> list[str]:
        batches.append(items)
        return items

    async def main() -> None:
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=30, max_waiting=100, key=len)
        b.start()
        await asyncio.gather(*(b.submit_many([s]) for s in ["a", "bb", "c", "dd", "e"]))
        await b.close()

    run(main())
    assert sorted(map(sorted, batches)) == [["a", "c", "e"], ["bb", "dd"]]


def test_full_queue_raises_429_and_takes_nothing() -> None:
    async def main() -> None:
        b = DynamicBatcher(lambda xs: xs, max_batch_size=2, max_wait_ms=1000, max_waiting=2)
        # The worker is not started: they stay queued. Two requests of 3 and 1 items fill the queue.
        waiting = [asyncio.ensure_future(b.submit_many(v)) for v in ([1, 2, 3], [4])]
        await asyncio.sleep(0)
        with pytest.raises(RateLimitError) as caught:
            await b.submit_many([5])
        assert caught.value.headers["Retry-After"] == "1"
        assert b.waiting == 4
        for w in waiting:
            w.cancel()

    run(main())


def test_the_queue_counts_requests_not_their_inputs() -> None:
    """An idle model took no embeddings request of more than max_waiting inputs (the queue counted
    inputs); the documented limit is on queued requests."""
    async def main() -> list[int]:
        b = DynamicBatcher(lambda xs: [x + 1 for x in xs], max_batch_size=32, max_wait_ms=0, max_waiting=4)
        b.start()
        try:
            return await b.submit_many(list(range(100)))
        finally:
            await b.close()

    assert run(main()) == list(range(1, 101))


def test_a_failing_item_fails_only_its_own_request() -> None:
    """The batch fails; each item is then run alone, so the bad one fails and the others get their results."""
    seen: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        seen.append(items)
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [x * 10 for x in items]

    async def main() -> list:
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50, max_waiting=100)
        b.start()
        try:
            return await asyncio.gather(*(b.submit_many([x]) for x in (1, -1, 2)), return_exceptions=True)
        finally:
            await b.close()

    first, bad, second = run(main())
    assert (first, second) == ([10], [20]) and isinstance(bad, ValueError)
    assert seen == [[1, -1, 2], [1], [-1], [2]]


def test_errors_reach_every_caller_and_cancelled_items_are_skipped() -> None:
    seen: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        seen.append(items)
        raise ValueError("boom")

    async def main() -> None:
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50, max_waiting=100)
        b.start()
        gone = asyncio.ensure_future(b.submit_many([99]))
        await asyncio.sleep(0)
        gone.cancel()
        results = await asyncio.gather(b.submit_many([1]), b.submit_many([2]), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        await b.close()

    run(main())
    assert seen == [[1, 2], [1], [2]]  # the batch, then each item alone: the cancelled 99 never runs


def test_submit_stream_yields_in_order_as_batches_finish_and_drops_the_rest_when_left() -> None:
    batches: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        batches.append(items)
        return [x * 10 for x in items]

    async def main() -> tuple[list[int], list[int]]:
        b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=0, max_waiting=100)
        b.start()
        whole = [x async for x in b.submit_stream([1, 2, 3, 4, 5])]
        stream = b.submit_stream([6, 7, 8, 9, 10, 11])
        first = await anext(stream)
        await stream.aclose()  # the caller leaves after its first result
        await asyncio.sleep(0.05)
        await b.close()
        return whole, [first]

    whole, first = run(main())
    assert whole == [10, 20, 30, 40, 50] and first == [60]
    assert all(len(x) <= 2 for x in batches)
    ran = [x for batch in batches for x in batch]
    assert ran[:5] == [1, 2, 3, 4, 5] and 11 not in ran, "items of a stream that was left must not run"


def test_a_batch_that_steps_is_not_stalled_and_one_nobody_waits_for_stops() -> None:
    """Readiness called a batch stalled once it had run 60 s, however it progressed (a valid 81 s image
    request took a replica out of rotation); now a stall is that long without a step. A batch whose
    callers all left is told so at its next step."""
    stepped, go = threading.Event(), threading.Event()
    answers: list[bool] = []
    batcher: DynamicBatcher

    def fn(items: list[int]) -> list[int]:
        threading.Event().wait(0.6)  # a long first step
        answers.append(batcher.beat())
        stepped.set()
        go.wait(5)
        answers.append(batcher.beat())  # the next step
        if not answers[-1]:
            raise BatchAbandoned("nobody waits")
        return items

    async def main() -> bool:
        nonlocal batcher
        batcher = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_waiting=10)
        batcher.start()
        try:
            work = asyncio.ensure_future(batcher.submit_many([1]))
            await asyncio.get_running_loop().run_in_executor(None, stepped.wait, 5)
            stalled = batcher.stalled(0.4)  # 0.6 s into the batch, just after a step
            work.cancel()  # the caller leaves
            await asyncio.sleep(0)
            go.set()
            while batcher._running:
                await asyncio.sleep(0.01)
            return stalled
        finally:
            await batcher.close()

    assert run(main()) is False
    assert answers == [True, False]


def test_after_a_failed_batch_only_items_still_awaited_are_run_again() -> None:
    """An item whose caller left during the failed batch is not redone alone (with images, a whole
    denoising run for nobody)."""
    seen: list[list[int]] = []
    started = threading.Event()
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        seen.append(items)
        if len(items) > 1:
            started.set()
            release.wait(5)
            raise ValueError("the batch failed")
        return [x * 10 for x in items]

    async def main() -> list:
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50, max_waiting=100)
        b.start()
        try:
            left, stays = (asyncio.ensure_future(b.submit_many([x])) for x in (1, 2))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
            left.cancel()  # its caller goes away while the batch runs
            await asyncio.sleep(0)
            release.set()
            return await stays
        finally:
            await b.close()

    assert run(main()) == [20]
    assert seen == [[1, 2], [2]]


def started_backend(device: str) -> BatchedBackend:
    entry = ModelEntry.model_validate({"id": "g", "modality": "image", "backend": "local", "family": "gan",
                                       "source": "x", "device": device})
    backend = BatchedBackend(entry, Metrics())
    backend.start_batcher(lambda items: items)
    backend.loaded = True
    return backend


def test_a_gpu_models_readiness_probes_its_device_one_probe_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, ``check_ready`` runs a small computation on the device: a probe that raises (a sticky CUDA
    error) or hangs (a GPU off the bus) makes the model not ready, while the batcher thread is alive; a
    hung probe is waited on again, never started twice; on a CPU nothing is probed."""
    calls: list[str] = []
    release = threading.Event()
    mode = {"now": "hang"}

    def probe(device) -> None:
        calls.append(str(device))
        if mode["now"] == "hang":
            release.wait(10)
        elif mode["now"] == "fail":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(batching, "probe_device", probe)
    monkeypatch.setattr(batching, "DEVICE_PROBE_SECONDS", 0.2)

    async def scenario() -> list[bool]:
        gpu, cpu = started_backend("cuda:0"), started_backend("cpu")
        try:
            assert gpu.ready()  # the batcher lives: only the probe can tell
            hung = [await gpu.check_ready(), await gpu.check_ready()]
            assert calls == ["cuda:0"]  # the second check waited on the same hung probe
            release.set()
            mode["now"] = "ok"
            await asyncio.sleep(0.1)
            answered = await gpu.check_ready()
            mode["now"] = "fail"
            failed = await gpu.check_ready()
            on_cpu = await cpu.check_ready()
            return [*hung, answered, failed, on_cpu]
        finally:
            for b in (gpu, cpu):
                await b.close()

    assert run(scenario()) == [False, False, True, False, True]
    assert calls == ["cuda:0", "cuda:0", "cuda:0"]  # the hung one, then one per check; none for the CPU
