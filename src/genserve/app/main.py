"""``create_app``: wiring only. Settings in, a FastAPI app out; nothing here reads the environment."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from genserve import __version__
from genserve.app.backends.manager import ModelManager
from genserve.app.deps import Services
from genserve.app.errors import install_error_handlers
from genserve.app.metrics import Metrics
from genserve.app.middleware import BodyLimitMiddleware, MetricsMiddleware, RequestIdMiddleware
from genserve.app.moderation.service import ModerationService
from genserve.app.openapi import openapi_document
from genserve.app.provenance.service import ProvenanceService
from genserve.app.registry import ModelEntry, load_registry
from genserve.app.routers import (
    audio,
    docs,
    embeddings,
    images,
    models,
    moderations,
    molecules,
    ops,
    playground,
    provenance,
    text,
)
from genserve.app.security import ApiKeyMiddleware
from genserve.app.serving.audio import AudioServing
from genserve.app.serving.embeddings import EmbeddingServing
from genserve.app.serving.images import ImageServing
from genserve.app.serving.models import ModelsServing
from genserve.app.serving.moderations import ModerationServing
from genserve.app.serving.molecules import MoleculeServing
from genserve.app.serving.text import TextServing
from genserve.app.settings import Settings
from genserve.app.tenancy import Tenancy

RAY_LOAD_WAIT_S = 120.0
DESCRIPTION = """One HTTP API for generative models. OpenAI-compatible where OpenAI has an endpoint:
point the official SDKs at `/v1`. Press **Authorize** and paste an API key to try the endpoints."""


def create_app(settings: Settings, entries: list[ModelEntry] | None = None,
               handles: dict[str, object] | None = None) -> FastAPI:
    """``handles``: Ray Serve deployment handles of the models served by deployments (app/ray_app.py)."""
    entries = load_registry(settings.config) if entries is None else entries
    metrics = Metrics()
    manager = ModelManager(entries, settings, metrics, handles)
    moderation = ModerationService(settings.moderation, entries, metrics, manager)
    provenance_service = ProvenanceService(settings, manager)
    tenancy = Tenancy(settings.api_keys, settings.api_keys_file, metrics, settings.redis_url,
                      check_moderation=moderation.check_patch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tenancy.loop = asyncio.get_running_loop()
        provenance_service.start()
        # Before any model loads: the classifiers import and build parts of transformers and torch that the
        # loaders' threads import too, and imports racing in threads can see a half-made module
        # ("cannot import name 'AutoModel'"); the semantic tier's encoder takes about 3.6 s on a CPU.
        await asyncio.to_thread(moderation.warm_up)
        await manager.start()
        if handles:  # a Ray Serve gateway replica: ready, and given traffic, once its models answer
            await manager.wait_loaded(RAY_LOAD_WAIT_S)
        manager.freeze_heap_when_loaded()
        yield
        await manager.close()
        moderation.close()
        await tenancy.close()

    app = FastAPI(title="genserve", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.services = Services(
        metrics=metrics, manager=manager, moderation=moderation, tenancy=tenancy, provenance=provenance_service,
        models=ModelsServing(manager), text=TextServing(manager, metrics, settings, moderation, provenance_service),
        embeddings=EmbeddingServing(manager, metrics, settings),
        images=ImageServing(manager, metrics, settings, moderation, provenance_service),
        audio=AudioServing(manager, metrics, settings, moderation, provenance_service),
        molecules=MoleculeServing(manager, metrics, settings, moderation),
        moderations=ModerationServing(manager, moderation))

    app.openapi = functools.partial(openapi_document, app)  # type: ignore[method-assign]
    install_error_handlers(app)
    for router in (text.router, embeddings.router, images.router, images.files_router, audio.router,
                   molecules.router, moderations.router, provenance.router, models.router, ops.router, docs.router,
                   playground.router):
        app.include_router(router)
    app.mount(docs.STATIC_PREFIX, StaticFiles(directory=docs.STATIC_DIR), name="docs-assets")
    app.mount(playground.STATIC_PREFIX, StaticFiles(directory=playground.STATIC_DIR), name="playground-assets")
    # Added innermost first: request id, then metrics (401s and early 413s count under the route
    # "unmatched": they are answered before routing), then the key check, then the body cap, so
    # nothing is read for a caller without a key.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       upload_paths={"/v1/images/edits": settings.max_upload_bytes,
                                     provenance.PATH: settings.max_upload_bytes})
    app.add_middleware(ApiKeyMiddleware, tenancy=tenancy)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app
