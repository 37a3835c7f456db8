"""``/v1/moderations`` (OpenAI)."""

from fastapi import APIRouter, Request

from genserve.app.deps import ModerationServingDep
from genserve.app.routers.responses import ERRORS
from genserve.app.schemas.moderations import ModerationRequest, ModerationResponse

router = APIRouter(prefix="/v1", tags=["moderations"], responses=ERRORS)


@router.post("/moderations", response_model=ModerationResponse)
async def create_moderation(body: ModerationRequest, request: Request,
                            moderations: ModerationServingDep) -> ModerationResponse:
    """Classifies texts and images in OpenAI's 13 categories (OpenAI's moderation API), with the moderation
    model `model` or the default one. Results come in input order: each text, each image."""
    return await moderations.create(body, request)
