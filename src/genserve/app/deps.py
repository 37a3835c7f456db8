"""Typed FastAPI dependencies: each route names the services it uses in its signature.

``create_app`` builds one ``Services`` and keeps it on ``app.state``; nothing else reads
``app.state``. Routes take a part of it through the ``...Dep`` aliases below (FastAPI's
bigger-applications style), so mypy checks every call a route makes, and a test can replace any
part with ``app.dependency_overrides[get_text_serving] = ...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from genserve.app.backends.manager import ModelManager
from genserve.app.metrics import Metrics
from genserve.app.moderation.service import ModerationService
from genserve.app.provenance.service import ProvenanceService
from genserve.app.serving.audio import AudioServing
from genserve.app.serving.embeddings import EmbeddingServing
from genserve.app.serving.images import ImageServing
from genserve.app.serving.models import ModelsServing
from genserve.app.serving.moderations import ModerationServing
from genserve.app.serving.molecules import MoleculeServing
from genserve.app.serving.text import TextServing
from genserve.app.tenancy import Tenancy


@dataclass(frozen=True)
class Services:
    """Everything a request may use; one per app, built by ``create_app``."""

    metrics: Metrics
    manager: ModelManager
    moderation: ModerationService
    tenancy: Tenancy
    provenance: ProvenanceService
    models: ModelsServing
    text: TextServing
    embeddings: EmbeddingServing
    images: ImageServing
    audio: AudioServing
    molecules: MoleculeServing
    moderations: ModerationServing


def services_of(app: FastAPI) -> Services:
    """The app's services (for code outside a request, such as the CLI's shutdown hook)."""
    services = getattr(app.state, "services", None)
    if not isinstance(services, Services):
        raise RuntimeError(f"app.state.services is {type(services).__name__}, not Services: "
                           "build the app with genserve.app.main.create_app")
    return services


# Every dependency is ``async def`` (FastAPI runs a plain ``def`` dependency in its thread pool, a hop
# per dependency per request) and reads the request itself: a dependency of a dependency costs FastAPI
# a second solve per request (measured in-process: docs/benchmarks.md, "Trivial requests").
async def get_metrics(request: Request) -> Metrics:
    return services_of(request.app).metrics


async def get_manager(request: Request) -> ModelManager:
    return services_of(request.app).manager


async def get_models_serving(request: Request) -> ModelsServing:
    return services_of(request.app).models


async def get_text_serving(request: Request) -> TextServing:
    return services_of(request.app).text


async def get_embedding_serving(request: Request) -> EmbeddingServing:
    return services_of(request.app).embeddings


async def get_image_serving(request: Request) -> ImageServing:
    return services_of(request.app).images


async def get_audio_serving(request: Request) -> AudioServing:
    return services_of(request.app).audio


async def get_molecule_serving(request: Request) -> MoleculeServing:
    return services_of(request.app).molecules


async def get_moderation_serving(request: Request) -> ModerationServing:
    return services_of(request.app).moderations


async def get_provenance(request: Request) -> ProvenanceService:
    return services_of(request.app).provenance


MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
ModelsServingDep = Annotated[ModelsServing, Depends(get_models_serving)]
TextServingDep = Annotated[TextServing, Depends(get_text_serving)]
EmbeddingServingDep = Annotated[EmbeddingServing, Depends(get_embedding_serving)]
ImageServingDep = Annotated[ImageServing, Depends(get_image_serving)]
AudioServingDep = Annotated[AudioServing, Depends(get_audio_serving)]
MoleculeServingDep = Annotated[MoleculeServing, Depends(get_molecule_serving)]
ModerationServingDep = Annotated[ModerationServing, Depends(get_moderation_serving)]
ProvenanceDep = Annotated[ProvenanceService, Depends(get_provenance)]
