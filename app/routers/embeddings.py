"""``/v1/embeddings``."""

from fastapi import APIRouter, Depends, Request

from app.routers.responses import ERRORS
from app.schemas.embeddings import EmbeddingRequest, EmbeddingResponse
from app.security import require_api_key

router = APIRouter(prefix="/v1", tags=["embeddings"], dependencies=[Depends(require_api_key)],
                   responses=ERRORS)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    """Embeds texts (OpenAI's embeddings API)."""
    return await request.app.state.embeddings.embeddings(body, request)
