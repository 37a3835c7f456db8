"""The dynamic batcher: grouping, the bounded queue, abandoned items and errors."""

from __future__ import annotations

import asyncio

import pytest

from app.backends.batching import DynamicBatcher
from app.errors import RateLimitError


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
        b = DynamicBatcher(lambda xs: xs, max_batch_size=2, max_wait_ms=1000, max_waiting=3)
        waiting = asyncio.ensure_future(b.submit_many([1, 2]))  # the worker is not started: they stay queued
        await asyncio.sleep(0)
        with pytest.raises(RateLimitError):
            await b.submit_many([3, 4])
        assert b.waiting == 2
        waiting.cancel()

    run(main())


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
    assert seen == [[1, 2]]
