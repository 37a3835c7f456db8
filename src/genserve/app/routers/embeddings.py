"""``/v1/embeddings``."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genserve.app.deps import EmbeddingServingDep
from genserve.app.routers.responses import ERRORS
from genserve.app.schemas.embeddings import EmbeddingRequest, EmbeddingResponse

router = APIRouter(prefix="/v1", tags=["embeddings"], responses=ERRORS)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request,
                            embeddings: EmbeddingServingDep) -> EmbeddingResponse | Response:
    """Embeds texts (OpenAI's embeddings API)."""
    return await embeddings.embeddings(body, request)
