"""All served models: building their backends, loading them in the background, and finding the
one a request names; and the chemistry workers, which describe the caller's molecules with no model
behind them (``/v1/molecules/properties``), started on first use and stopped with the models."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import TypeVar, cast

from genserve.app.backends.base import (
    Backend,
    EmbeddingBackend,
    ImageBackend,
    ModerationBackend,
    MoleculeBackend,
    MoleculeInterpolationBackend,
    MusicBackend,
    ServedModel,
    SpeechBackend,
    TextBackend,
)
from genserve.app.backends.chemistry import ChemistryWorkers
from genserve.app.backends.local_audio import LocalMusicBackend, LocalSpeechBackend
from genserve.app.backends.local_embedding import LocalEmbeddingBackend
from genserve.app.backends.local_image import LocalImageBackend
from genserve.app.backends.local_molecule import LocalMoleculeBackend, LocalMolVAEBackend
from genserve.app.backends.local_text import LocalTextBackend
from genserve.app.backends.remote import REMOTE_BACKENDS
from genserve.app.errors import InvalidRequestError, ModelNotFoundError, UnavailableError
from genserve.app.metrics import Metrics
from genserve.app.registry import ConfigError, ModelEntry
from genserve.app.settings import Settings
from genserve.app.tenancy import admit_model, check_scope
from genserve.models.registry import FAMILIES

log = logging.getLogger(__name__)
ANSWER_MARGIN_S = 1.0  # of the shutdown grace, kept to send the answers of work cut at its end
B = TypeVar("B", bound=ServedModel)

# The Protocol a model's backend serves a task through, by the model's modality.
KINDS: dict[tuple[str, str], type[ServedModel]] = {
    ("text", "completion"): TextBackend, ("text", "chat"): TextBackend,
    ("embedding", "embedding"): EmbeddingBackend,
    ("image", "generation"): ImageBackend, ("image", "edit"): ImageBackend, ("image", "interpolation"): ImageBackend,
    ("audio", "speech"): SpeechBackend, ("audio", "music"): MusicBackend,
    ("molecule", "generation"): MoleculeBackend, ("molecule", "interpolation"): MoleculeInterpolationBackend,
    ("moderation", "moderation"): ModerationBackend,
}

# The backend class of each backend kind of the family table (models/registry.py).
LOCAL_BACKENDS: dict[str, type] = {"text": LocalTextBackend, "embedding": LocalEmbeddingBackend,
                                   "molecule": LocalMoleculeBackend, "mol-vae": LocalMolVAEBackend,
                                   "speech": LocalSpeechBackend, "music": LocalMusicBackend,
                                   "image": LocalImageBackend}


def build_backend(entry: ModelEntry, settings: Settings, metrics: Metrics, handle: object | None = None) -> Backend:
    """The backend of ``entry``: a Ray Serve deployment's when ``handle`` (its deployment handle) is given,
    else by its kind (moderation, remote, or its family's local backend)."""
    if handle is not None:
        from genserve.app.backends.ray_serve import RayBackend

        family = FAMILIES.get(entry.family or "")
        meters = family is not None and bool(getattr(LOCAL_BACKENDS[family.backend], "meters_tokens", False))
        return RayBackend(entry, handle, metrics, retry=settings.ray_retry, meters_tokens=meters)
    if entry.modality == "moderation":
        from genserve.app.moderation.backend import build_moderation_backend

        return build_moderation_backend(entry, metrics, entry.timeout_s(settings.request_timeout_s))
    if entry.backend == "remote":
        remote = REMOTE_BACKENDS.get(entry.modality)
        if remote is None:
            raise ConfigError(f"model {entry.id!r}: no remote backend serves {entry.modality} models; "
                              f"remote modalities: {', '.join(REMOTE_BACKENDS)}")
        return remote(entry, entry.timeout_s(settings.request_timeout_s))
    family = FAMILIES.get(entry.family or "")
    if family is None:
        raise ConfigError(f"model {entry.id!r}: unknown family {entry.family!r}; known: "
                          f"{', '.join(sorted(FAMILIES))}")
    if family.modality != entry.modality:
        raise ConfigError(f"model {entry.id!r}: family {entry.family!r} serves {family.modality}, "
                          f"not {entry.modality}")
    return LOCAL_BACKENDS[family.backend](entry, metrics)


class ModelManager:
    def __init__(self, entries: list[ModelEntry], settings: Settings, metrics: Metrics,
                 handles: dict[str, object] | None = None) -> None:
        """``handles``: the Ray Serve deployment handles of the models that run as deployments, by id."""
        self.settings, self.metrics = settings, metrics
        handles = handles or {}
        self.backends: dict[str, Backend] = {e.id: build_backend(e, settings, metrics, handles.get(e.id))
                                             for e in entries}
        self._tasks: list[asyncio.Task] = []
        self._loads: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.grace_ends: float | None = None  # once draining: the loop time by which running work answers
        self._timeouts: set[asyncio.Timeout] = set()  # the deadlines of running requests (``watch``)
        self.chemistry = ChemistryWorkers()

    async def start(self) -> None:
        """Loads every model in the background; requests for one still loading get a 503."""
        self._loop = asyncio.get_running_loop()
        lock = asyncio.Lock()  # one at a time: bounded memory and CPU, no concurrent first imports
        self._loads = [asyncio.create_task(self._load(backend, lock)) for backend in self.backends.values()]
        self._tasks += [*self._loads, asyncio.create_task(self._announce(self._loads, time.monotonic()))]

    async def wait_loaded(self, timeout_s: float) -> None:
        """Waits until every model has loaded (or failed), at most ``timeout_s``: a Ray Serve gateway replica
        is given traffic once its start-up returns, so it returns when it can serve."""
        _, pending = await asyncio.wait(self._loads, timeout=timeout_s)
        if pending:
            log.warning("%d models still loading after %.0f s; serving the others", len(pending), timeout_s)

    def freeze_heap_when_loaded(self) -> None:
        """Once every model has loaded: what the models and libraries loaded stays for the process's
        life, so it goes out of the cyclic collector's sight (``gc.freeze``), and a full collection
        scans only what requests make. It scanned millions of objects, stopping the event loop about
        220 ms at a time (benchmarks/loop_latency.py). Call it when the other start-up work (moderation's
        warm-up) is done; ``close`` unfreezes."""
        async def freeze() -> None:
            await asyncio.gather(*self._loads, return_exceptions=True)
            gc.collect()
            gc.freeze()

        self._tasks.append(asyncio.create_task(freeze()))

    async def _announce(self, loads: list[asyncio.Task], started: float) -> None:
        """One line once every model has loaded (or failed): where to go, what is served, how long it took."""
        await asyncio.gather(*loads, return_exceptions=True)
        took, base = time.monotonic() - started, self.settings.base_url()
        failed = [mid for mid, b in self.backends.items() if b.load_error]
        served = [mid for mid in self.backends if mid not in failed]
        if failed:
            log.error("%d of %d models failed to load (%s; their errors are above); serving %s at %s in %.1f s",
                      len(failed), len(self.backends), ", ".join(failed), ", ".join(served) or "nothing", base, took)
            return
        log.info("ready in %.1f s: %d model%s (%s) at %s/v1 | docs %s/docs | playground %s/playground",
                 took, len(served), "" if len(served) == 1 else "s", ", ".join(served), base, base, base)

    async def _load(self, backend: Backend, lock: asyncio.Lock) -> None:
        mid = backend.entry.id
        try:
            async with lock:
                await asyncio.to_thread(backend.setup)
            await backend.start()
            log.info("model %s ready", mid)
        except Exception as exc:
            backend.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model %s failed to load", mid)
        self.metrics.model_ready.labels(mid).set(1 if backend.ready() else 0)

    def drain(self) -> None:
        """Shutdown has begun: new requests and queued ones get 503; running ones may finish within the
        grace period, less a second to answer: what runs then ends with a 503 (an SSE error event in
        a stream), before the server closes its connections."""
        first = not self.draining
        self.draining = True
        for backend in self.backends.values():
            backend.drain()
        if not first:  # a second signal: the grace already runs
            return
        loop = self._loop or asyncio.get_event_loop()
        self.grace_ends = grace = loop.time() + max(0.0, self.settings.shutdown_grace_s - ANSWER_MARGIN_S)
        for timeout in list(self._timeouts):
            when = timeout.when()
            if not timeout.expired() and (when is None or when > grace):
                with contextlib.suppress(RuntimeError):  # one that has just fired or ended
                    timeout.reschedule(grace)

    def watch(self, timeout: asyncio.Timeout) -> None:
        """A running request's deadline, to be brought forward to the grace's end if shutdown begins
        (until ``unwatch``)."""
        self._timeouts.add(timeout)

    def unwatch(self, timeout: asyncio.Timeout) -> None:
        self._timeouts.discard(timeout)

    def drain_threadsafe(self) -> None:
        """``drain`` from a signal handler or another thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.drain)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(b.close() for b in self.backends.values()), asyncio.to_thread(self.chemistry.close),
                             return_exceptions=True)
        gc.unfreeze()  # what was frozen may be collected again (a process that goes on, as a test's)

    def get(self, model_id: str, task: str, kind: type[B]) -> B:
        """The backend of ``model_id`` for ``task``, as the Protocol ``kind`` the endpoint needs: 404 for
        an unknown model, 400 ``model_not_supported`` for one that does not do this, 503 while it cannot."""
        backend = self.backends.get(model_id)
        if backend is None:
            raise ModelNotFoundError(f"The model '{model_id}' does not exist; GET /v1/models lists the "
                                     "served ones.", param="model")
        if task not in backend.entry.tasks:
            raise InvalidRequestError(f"The model '{model_id}' does not support {task} (it does: "
                                      f"{', '.join(backend.entry.tasks)}).", param="model",
                                      code="model_not_supported")
        if KINDS.get((backend.entry.modality, task)) is not kind:
            raise InvalidRequestError(f"The model '{model_id}' is a {backend.entry.modality} model; it does not serve "
                                      "this endpoint.", param="model", code="model_not_supported")
        if self.draining:
            raise UnavailableError("The server is shutting down; retry on another replica.",
                                   headers={"Retry-After": "5"})
        if backend.load_error:
            raise UnavailableError(f"The model '{model_id}' failed to load; see the server log.")
        if not backend.loaded:
            raise UnavailableError(f"The model '{model_id}' is still loading; retry shortly.",
                                   headers={"Retry-After": "5"})
        return cast(B, backend)

    async def acquire(self, model_id: str, task: str, kind: type[B]) -> B:
        """``get`` for the model a request names: also 403 unless the request's API key may use it, 429
        while the key has used up its allowance of the model's unit (app/tenancy.py), and 429 at once
        while the model's queue is full."""
        if (known := self.backends.get(model_id)) is not None:
            check_scope(known.entry)  # before its tasks or state say anything about it
        backend = self.get(model_id, task, kind)
        await admit_model(backend.entry)
        self.backends[backend.entry.id].check_room(task)
        return backend

    def known_readiness(self) -> dict[str, bool]:
        """Each model's state as last checked, without asking any upstream."""
        return {mid: b.ready() for mid, b in self.backends.items()}

    async def readiness(self) -> dict[str, bool]:
        states = await asyncio.gather(*(b.check_ready() for b in self.backends.values()))
        for mid, ok in zip(self.backends, states, strict=True):
            self.metrics.model_ready.labels(mid).set(1 if ok else 0)
        return dict(zip(self.backends, states, strict=True))
