"""``/v1/models``: every served model, with its modality, tasks and readiness."""

from typing import Annotated

from fastapi import APIRouter, Header

from genserve.app.backends.remote import PROBE_HEADER
from genserve.app.deps import ModelsServingDep
from genserve.app.routers.responses import ERRORS
from genserve.app.schemas.models import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"], responses=ERRORS)


@router.get("/models", response_model=ModelList)
async def list_models(models: ModelsServingDep,
                      probe: Annotated[str | None, Header(alias=PROBE_HEADER, include_in_schema=False)] = None,
                      ) -> ModelList:
    """Every served model. A gateway's readiness probe (``x-genserve-probe``) gets the states as last
    seen, so a gateway whose remote entries lead back here does not make this server probe them again."""
    return await models.list(probe=probe is not None)


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, models: ModelsServingDep) -> ModelCard:
    return await models.get(model_id)
