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


# Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a hop
# per dependency per request (two or three, about a third of a trivial request's time).
async def get_services(request: Request) -> Services:
    return services_of(request.app)


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_metrics(services: ServicesDep) -> Metrics:
    return services.metrics


async def get_manager(services: ServicesDep) -> ModelManager:
    return services.manager


async def get_models_serving(services: ServicesDep) -> ModelsServing:
    return services.models


async def get_text_serving(services: ServicesDep) -> TextServing:
    return services.text


async def get_embedding_serving(services: ServicesDep) -> EmbeddingServing:
    return services.embeddings


async def get_image_serving(services: ServicesDep) -> ImageServing:
    return services.images


async def get_audio_serving(services: ServicesDep) -> AudioServing:
    return services.audio


async def get_molecule_serving(services: ServicesDep) -> MoleculeServing:
    return services.molecules


async def get_moderation_serving(services: ServicesDep) -> ModerationServing:
    return services.moderations


async def get_provenance(services: ServicesDep) -> ProvenanceService:
    return services.provenance


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
