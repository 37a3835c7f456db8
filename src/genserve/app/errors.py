"""Every error leaves genserve in OpenAI's body, produced here and only here:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Raise a ``GenserveError`` subclass anywhere below the routers; ``install_error_handlers`` turns it,
FastAPI's validation errors, unknown routes and unexpected exceptions into that body. Unexpected
exceptions are logged with their traceback by ``RequestIdMiddleware`` and reach the client as a
bare 500 (``internal_error``) with the request id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.models.errors import InputError

log = logging.getLogger(__name__)


class GenserveError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        # A message quoting a caller's text must still encode as JSON: a lone surrogate is escaped.
        self.message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(GenserveError):
    status, type = 400, "invalid_request_error"


class AuthenticationError(GenserveError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFoundError(GenserveError):
    status, type = 404, "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class PayloadTooLargeError(GenserveError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimitError(GenserveError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class UnavailableError(GenserveError):
    status, type, code = 503, "server_error", "model_not_ready"


class WorkerLostError(UnavailableError):
    """The worker that ran a request died (a Ray replica or its node) after it had begun to answer: what
    it made is gone. Serving runs the request again, once, where nothing of it has reached the client."""

    code = "worker_lost"


class DeadlineError(GenserveError):
    status, type, code = 504, "timeout", "request_timeout"


class UpstreamError(GenserveError):
    """An error answered by a remote backend, passed on with its own status and body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        raw = body.get("error")
        err: dict[str, Any] = raw if isinstance(raw, dict) else {}
        code, param = err.get("code"), err.get("param")
        # OpenAI's code and param are strings; some servers (vLLM) put the HTTP status in code.
        super().__init__(str(err.get("message", "upstream error")), param=param if isinstance(param, str) else None,
                         code=code if isinstance(code, str) else None)
        self.status = status
        self.type = err.get("type") or ("invalid_request_error" if status < 500 else "server_error")


def error_response(err: GenserveError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_BUILTIN_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "json-or-python"}


def _is_type_tag(part: str) -> bool:
    """Union members pydantic adds to ``loc``: builtin names, generics, and model class names."""
    return part in _BUILTIN_TAGS or "[" in part or part[:1].isupper()


def param_path(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` → ``"messages[0].content"``.

    Pydantic adds the member type of a union to ``loc`` ("str", "list[int]", class names); those are
    not parameters, so they are dropped.
    """
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        return InvalidRequestError("The request body is not valid JSON: " + str(first.get("ctx", {})
                                   .get("error", "parse error")), code="invalid_json")
    param = param_path(tuple(first.get("loc", ())))
    if param is None:  # the body as a whole: not JSON (curl -d sends a form) or not an object
        return InvalidRequestError("The request body must be a JSON object, sent with "
                                   "'Content-Type: application/json'.", code="invalid_body")
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                                   code="missing_required_parameter")
    got = first.get("input")
    shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
    return InvalidRequestError(f"Invalid value for '{param}': {msg} (got {shown}).", param=param,
                               code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GenserveError)
    async def _genserve(request: Request, exc: GenserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return error_response(InvalidRequestError(exc.message, param=exc.param))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: AuthenticationError, 404: NotFoundError, 413: PayloadTooLargeError}.get(
            exc.status_code, InvalidRequestError if exc.status_code < 500 else GenserveError)
        err = kind(str(exc.detail))
        err.status = exc.status_code
        err.headers = dict(exc.headers or {})
        return error_response(err)


def internal_error(request_id: str) -> GenserveError:
    """What the client sees of a bug: no traceback, no path, just the id to find it in the log."""
    return GenserveError(f"Internal server error (request id {request_id}).", code="internal_error")
