"""What every serving module needs: request ids, deadlines, and cancelling work whose client left."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from genserve.app.backends.manager import ModelManager
from genserve.app.errors import DeadlineError, GenserveError, UnavailableError
from genserve.models.seeding import seed_or_random  # noqa: F401  (the serving modules take it from here)

T = TypeVar("T")
SSE_PING_SECONDS = 15
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever seen in metrics


def request_id(raw: Request) -> str:
    return raw.scope.get("state", {}).get("request_id", "")


def response_id(prefix: str) -> str:
    """A fresh id for a response object (never the caller's x-request-id, which need not be unique)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class Deadline:
    """The moment by which a request must be done; past it the work is cancelled and a 504 raised. Once
    shutdown begins (``manager.drain``) the moment is the grace period's end at the latest, and
    passing it is a 503: the server is going away, the request was fine."""

    seconds: float
    at: float
    manager: ModelManager | None = None

    @classmethod
    def start(cls, seconds: float, manager: ModelManager | None = None) -> Deadline:
        return cls(seconds, asyncio.get_running_loop().time() + seconds, manager)

    def error(self) -> GenserveError:
        grace = self.manager.grace_ends if self.manager is not None else None
        if grace is not None and grace <= self.at and asyncio.get_running_loop().time() >= grace:
            return UnavailableError("The server is shutting down and its grace period ended before this "
                                    "request finished; retry on another replica.", headers={"Retry-After": "5"})
        return DeadlineError(f"The request did not finish within {self.seconds:g} s.")

    async def run(self, work: Awaitable[T]) -> T:
        grace = self.manager.grace_ends if self.manager is not None else None
        try:
            async with asyncio.timeout_at(self.at if grace is None else min(self.at, grace)) as timeout:
                if self.manager is not None:
                    self.manager.watch(timeout)
                try:
                    return await work
                finally:
                    if self.manager is not None:
                        self.manager.unwatch(timeout)
        except TimeoutError:
            raise self.error() from None

    async def stream(self, items: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """``items``, raising the deadline error once it passes (and closing ``items``)."""
        try:
            while True:
                try:
                    item = await self.run(anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            with contextlib.suppress(Exception):
                await items.aclose()


def event_stream(events: AsyncGenerator[str, None], grace_s: float, sep: str | None = None) -> EventSourceResponse:
    """The SSE response of a stream. sse-starlette ends streams the moment SIGTERM arrives unless given a
    grace: they run on, and the request's ``Deadline`` ends what is left at the grace's end with an
    error event."""
    return EventSourceResponse(events, ping=SSE_PING_SECONDS, shutdown_grace_period=grace_s, sep=sep)


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
