"""The error responses every API route documents."""

from typing import Any

from genserve.app.schemas.base import ErrorResponse

# FastAPI's `responses` type: OpenAPI response objects by status code.
Responses = dict[int | str, dict[str, Any]]

ERRORS: Responses = {code: {"model": ErrorResponse, "description": desc} for code, desc in {
    400: "Invalid request: the message names the parameter",
    401: "Missing or incorrect API key",
    404: "Unknown model",
    413: "Request body too large",
    429: "The model's queue is full; retry after the Retry-After header",
    500: "An internal failure the body names (a chemistry worker that crashed: worker_crashed)",
    503: "The model is loading or its upstream is unreachable",
    504: "The request did not finish within its deadline",
}.items()}
# A file in the body: Swagger UI offers it as a download.
BINARY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
STREAM: Responses = {200: {"content": {"text/event-stream": {}},
                "description": "JSON, or with `stream: true` server-sent events ending in `data: [DONE]`"}}
