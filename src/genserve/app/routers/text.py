"""``/v1/completions`` and ``/v1/chat/completions``."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genserve.app.deps import TextServingDep
from genserve.app.routers.responses import ERRORS, STREAM
from genserve.app.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from genserve.app.schemas.completions import CompletionRequest, CompletionResponse

router = APIRouter(prefix="/v1", tags=["text"], responses=ERRORS)


@router.post("/completions", response_model=CompletionResponse, responses=STREAM)
async def create_completion(body: CompletionRequest, request: Request,
                            text: TextServingDep) -> CompletionResponse | Response:
    """Continues a prompt (OpenAI's completions API)."""
    return await text.completions(body, request)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAM)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 text: TextServingDep) -> ChatCompletionResponse | Response:
    """Answers a conversation (OpenAI's chat completions API)."""
    return await text.chat(body, request)
