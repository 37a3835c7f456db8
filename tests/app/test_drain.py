"""Shutdown's grace for running requests: ``ModelManager.drain`` brings every running request's
deadline forward to the grace's end (less a second to answer), where it ends with a 503, not a 504."""

from __future__ import annotations

import asyncio

import pytest

from genserve.app.backends.manager import ANSWER_MARGIN_S, ModelManager
from genserve.app.errors import DeadlineError, UnavailableError
from genserve.app.metrics import Metrics
from genserve.app.serving.common import Deadline
from genserve.app.settings import Settings


def test_drain_cuts_running_requests_at_the_grace_with_a_503_and_a_second_signal_changes_nothing() -> None:
    async def main() -> None:
        manager = ModelManager([], Settings(shutdown_grace_s=ANSWER_MARGIN_S + 0.2), Metrics())
        loop = asyncio.get_running_loop()
        manager._loop = loop
        with pytest.raises(DeadlineError):  # a request that timed out before the signal ...
            await Deadline.start(0.01, manager).run(asyncio.sleep(5))
        assert not manager._timeouts  # ... leaves nothing behind for drain to trip on
        running = asyncio.ensure_future(Deadline.start(300, manager).run(asyncio.sleep(60)))
        await asyncio.sleep(0.05)
        manager.drain()
        grace = manager.grace_ends
        assert grace is not None and abs(grace - (loop.time() + 0.2)) < 0.1
        manager.drain()  # a second SIGTERM
        assert manager.grace_ends == grace
        with pytest.raises(UnavailableError, match="shutting down"):
            await asyncio.wait_for(running, 5)
        assert loop.time() >= grace

    asyncio.run(main())
