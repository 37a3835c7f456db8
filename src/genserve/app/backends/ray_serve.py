"""A model served by a Ray Serve deployment (``genserve serve --ray``), as the gateway sees it:
``RayBackend`` speaks to the model's replicas (``ray_app.ModelReplica``, which holds its local backend)
through a deployment handle.

The replica runs exactly what ``genserve serve`` runs in process (the batcher, the text engine in its
child process) and hands the Protocol's events back as they come: Ray pickles the same dataclasses
(``base.py``). Everything else stays in the gateway, for every backend alike: auth, limits, moderation,
provenance marks, wire formats. So a request's params carry the watermark key the gateway chose, and
the images a replica makes are marked and signed by the gateway.

Nothing is lost when a replica dies (``docs/deploy.md``): a unary call is retried once, and Ray
routes the retry to a live replica; a stream is retried only if nothing of it has arrived yet (a retry
later would repeat or reorder what the client has), otherwise it ends with a 503, which serving sends
as the stream's error event. A full queue is Ray's ``BackPressureError``: a 429 with ``Retry-After``.
A client that leaves cancels the call, and Ray cancels it inside the replica, where the backend's
generator is closed as it is in process (the engine sequence aborted, the batch slot freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from genserve.app.backends.base import Backend, ModelFacts
from genserve.app.errors import (
    GenserveError,
    InvalidRequestError,
    RateLimitError,
    UnavailableError,
    UpstreamError,
    WorkerLostError,
)
from genserve.app.metrics import Metrics
from genserve.app.registry import ModelEntry
from genserve.models.errors import InputError

log = logging.getLogger(__name__)
READY_CACHE_SECONDS = 5.0
START_TRIES, START_RETRY_S = 12, 5.0  # a minute for a failing deployment's replicas to come back
RETRY_AFTER_S = "1"
# What a replica may be asked: the Protocol methods of base.py, by how they answer.
UNARY = frozenset({"embed", "compose", "interpolate", "decode", "token_ids", "describe", "check_ready", "collect"})
STREAMED = frozenset({"generate", "interpolate", "speak"})


class ReplicaError(Exception):
    """A ``GenserveError`` raised in a replica, as plain values (status, OpenAI body, headers), so that it
    crosses Ray's pickling whatever its class's constructor takes."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(status, body, headers)
        self.status, self.body, self.headers = status, body, headers

    @classmethod
    def of(cls, exc: GenserveError) -> ReplicaError:
        return cls(exc.status, exc.body(), exc.headers)

    def error(self) -> GenserveError:
        err = UpstreamError(self.status, self.body)
        err.headers = self.headers
        return err


def _cause(exc: BaseException) -> BaseException:
    """What a handle raised, unwrapped: Ray wraps an error raised in a replica in a ``RayTaskError``."""
    from ray.exceptions import RayTaskError

    return exc.cause if isinstance(exc, RayTaskError) else exc


def _died(exc: BaseException) -> bool:
    """Whether a handle call failed because its replica (or the replica's node) died: the call may be
    retried on another replica. Ray raises these bare or as the cause of a ``RayTaskError``."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(_cause(exc), (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError,
                              NodeDiedError))


def _translate(exc: BaseException) -> BaseException:
    """What a handle raised, as genserve's error: the replica's own error, 429 for a full queue, 503 for a
    deployment with no replica; anything else unchanged."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = _cause(exc)
    if isinstance(cause, ReplicaError):
        return cause.error()
    if isinstance(cause, InputError):
        return InvalidRequestError(cause.message, param=cause.param)
    if isinstance(cause, BackPressureError):
        return RateLimitError("The model's replicas are busy and its queue is full; retry shortly.",
                              headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(cause, DeploymentUnavailableError):
        return UnavailableError("The model's deployment has no replica to serve it; retry shortly.",
                                headers={"Retry-After": "5"})
    if _died(exc):
        return UnavailableError("The model's replica died while serving the request.")
    return exc


def _cancel(response: Any) -> None:
    """Cancels a handle call (best effort, as Ray's ``cancel`` is): it re-raises the call's own error when
    the call had already failed, which is not news to a caller that is leaving."""
    with contextlib.suppress(Exception):
        response.cancel()


class RayBackend(Backend):
    """A model served by a Ray Serve deployment: every Protocol of ``base.py`` by forwarding to it."""

    def __init__(self, entry: ModelEntry, handle: Any, metrics: Metrics, retry: bool = True,
                 meters_tokens: bool = False) -> None:
        """``meters_tokens``: the replicas' backend counts tokens and finish reasons itself (the text
        engine); their series reach the gateway's /metrics (app/ray_app.py), so serving must not count
        them again."""
        super().__init__(entry)
        self.handle, self.metrics = handle, metrics
        self.meters_tokens = meters_tokens
        self.attempts = (0, 1) if retry else (1,)  # the last attempt's failure is the caller's
        self._facts = ModelFacts()
        self._ready = False
        self._ready_at = 0.0

    # lifecycle --------------------------------------------------------------------------------
    def setup(self) -> None:
        pass  # nothing loads here; ``start`` waits for a replica

    async def start(self) -> None:
        """Waits for a replica to describe the model. A replica that fails while the deployment starts (or
        a deployment still without one) is asked again, for up to ``START_TRIES`` tries: one failure must
        not leave the model unserved in this gateway replica for its whole life."""
        for attempt in range(START_TRIES):
            try:
                self._facts = await self._call("describe")
                break
            except Exception:
                if attempt == START_TRIES - 1:
                    raise
                log.warning("model %s: no replica answered yet; asking again", self.entry.id)
                await asyncio.sleep(START_RETRY_S)
        self.loaded = self._ready = True
        self._ready_at = time.monotonic()

    def ready(self) -> bool:
        return self.loaded and self._ready

    async def check_ready(self) -> bool:
        """A replica's answer, at most once per ``READY_CACHE_SECONDS``."""
        if not self.loaded or time.monotonic() - self._ready_at <= READY_CACHE_SECONDS:
            return self.ready()
        try:
            self._ready = bool(await asyncio.wait_for(self._call("check_ready"), 5.0))
        except Exception:  # no replica answers, or its probe failed: not ready (and /health/ready says so)
            self._ready = False
        self._ready_at = time.monotonic()
        return self._ready

    def describe(self) -> ModelFacts:
        return self._facts

    # forwarding -------------------------------------------------------------------------------
    async def _call(self, method: str, *args: Any) -> Any:
        return await self._retried(lambda: self.handle.call.remote(method, *args))

    async def _retried(self, send: Callable[[], Any]) -> Any:
        for attempt in self.attempts:
            response = send()
            try:
                return await response
            except asyncio.CancelledError:
                _cancel(response)  # the caller left or its deadline passed: the replica stops too
                raise
            except Exception as exc:
                if attempt or not _died(exc):
                    raise _translate(exc) from None
                _cancel(response)  # "unavailable" may be a replica cut off for a while, still running it
                self.metrics.replica_retries.labels(self.entry.id, "call").inc()
                log.warning("model %s: a replica died during a call; retrying once", self.entry.id)
        raise AssertionError("unreachable")

    async def _stream(self, method: str, *args: Any) -> AsyncGenerator[Any, None]:
        for attempt in self.attempts:
            gen = self.handle.options(stream=True).stream.remote(method, *args)
            started = False
            try:
                async for event in gen:
                    started = True
                    yield event
                return
            except (asyncio.CancelledError, GeneratorExit):
                _cancel(gen)  # a stream closed early (a client that left) stops in the replica too
                raise
            except Exception as exc:
                if started and _died(exc):
                    lost = WorkerLostError if attempt == 0 else UnavailableError  # serving may run it again
                    raise lost("The model's replica died in the middle of this stream.") from None
                if attempt or not _died(exc):
                    raise _translate(exc) from None
                _cancel(gen)
                self.metrics.replica_retries.labels(self.entry.id, "call").inc()
                log.warning("model %s: a replica died before a stream began; retrying once", self.entry.id)

    async def _collected(self, method: str, *args: Any) -> AsyncGenerator[Any, None]:
        """A stream its caller wants whole: made whole in the replica, so that it is one call, retried
        whole on another replica if its replica dies."""
        for event in await self._call("collect", method, *args):
            yield event

    # the Protocols of base.py -------------------------------------------------------------------
    def generate(self, params: Any) -> AsyncGenerator[Any, None]:
        """Streamed only where the client reads it as it comes (text with ``stream``, images with progress
        events); the rest (and every molecule request) is made whole in the replica."""
        streamed = {"text": getattr(params, "streamed", False), "image": getattr(params, "stream", False)}
        if streamed.get(self.entry.modality, False):
            return self._stream("generate", params)
        return self._collected("generate", params)

    def interpolate(self, params: Any) -> Any:
        """Images' frames come whole; molecules answer with the path's points."""
        if self.entry.modality == "image":
            return self._collected("interpolate", params)
        return self._call("interpolate", params)

    def speak(self, params: Any) -> AsyncGenerator[Any, None]:
        return self._stream("speak", params)

    async def compose(self, params: Any) -> Any:
        return await self._call("compose", params)

    async def embed(self, inputs: Any, dimensions: int | None) -> Any:
        return await self._call("embed", inputs, dimensions)

    def stop_choice(self, request_id: str, index: int) -> bool:
        """One choice cannot be stopped alone: the request's replica is not addressable through the handle,
        so serving closes the stream once it wants none of its choices (as with an OpenAI upstream)."""
        return False

    async def decode(self, ids: list[int]) -> str | None:
        return await self._call("decode", ids)

    async def token_ids(self, text: str) -> tuple[list[int], int] | None:
        return await self._call("token_ids", text)

