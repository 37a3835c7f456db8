"""What every serving module needs: request ids, deadlines, and cancelling work whose client left."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

from app.errors import DeadlineError
from app.registry import ModelEntry
from app.settings import Settings

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever seen in metrics


def request_id(raw: Request) -> str:
    return raw.scope.get("state", {}).get("request_id", "")


def deadline_for(entry: ModelEntry, settings: Settings) -> float:
    """The event-loop time by which the request must be done."""
    return asyncio.get_running_loop().time() + (entry.request_timeout_s or settings.request_timeout_s)


def timeout_error(entry: ModelEntry, settings: Settings) -> DeadlineError:
    limit = entry.request_timeout_s or settings.request_timeout_s
    return DeadlineError(f"The request did not finish within {limit:g} s.")


async def with_deadline(stream: AsyncIterator[T], deadline: float, error: DeadlineError) -> AsyncIterator[T]:
    """``stream``, raising ``error`` once ``deadline`` passes (and closing ``stream``)."""
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise error from None
            yield item
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


async def unless_disconnected(raw: Request, work: Awaitable[T]) -> T | Response:
    """Awaits ``work``, cancelling it if the client disconnects first (the body is already read,
    so the next ASGI message can only be ``http.disconnect``)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return Response(status_code=CLIENT_CLOSED)
        raise
    finally:
        watcher.cancel()


def now() -> int:
    return int(time.time())
