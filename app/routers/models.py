"""``/v1/models``: every served model, with its modality, tasks and readiness."""

from fastapi import APIRouter, Depends, Request

from app.backends.base import Backend
from app.errors import ModelNotFoundError
from app.routers.responses import ERRORS
from app.schemas.models import ModelCard, ModelList
from app.security import require_api_key

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)], responses=ERRORS)


def _card(backend: Backend) -> ModelCard:
    e = backend.entry
    return ModelCard(id=e.id, created=backend.created, modality=e.modality, tasks=e.tasks,
                     ready=backend.ready(), backend=e.backend,
                     context_length=backend.describe().get("context_length"))


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(b) for b in request.app.state.manager.backends.values()])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    backend = request.app.state.manager.backends.get(model_id)
    if backend is None:
        raise ModelNotFoundError(f"The model '{model_id}' does not exist.", param="model")
    return _card(backend)
