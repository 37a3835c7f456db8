"""``/v1/models``: every served model, with its modality, tasks and readiness."""

from fastapi import APIRouter, Depends

from genserve.app.deps import ModelsServingDep
from genserve.app.routers.responses import ERRORS
from genserve.app.schemas.models import ModelCard, ModelList
from genserve.app.security import bearer

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(bearer)], responses=ERRORS)


@router.get("/models", response_model=ModelList)
async def list_models(models: ModelsServingDep) -> ModelList:
    return await models.list()


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, models: ModelsServingDep) -> ModelCard:
    return await models.get(model_id)
