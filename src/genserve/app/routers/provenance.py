"""``/v1/provenance/verify`` (genserve): is this output genserve's?"""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from genserve.app.deps import ProvenanceDep
from genserve.app.errors import InvalidRequestError
from genserve.app.routers.responses import ERRORS
from genserve.app.schemas.provenance import VERIFY_EXAMPLE, VerifyResponse, VerifyTextRequest

router = APIRouter(prefix="/v1", tags=["provenance"], responses=ERRORS)
PATH = "/v1/provenance/verify"

# One route, two bodies: a JSON text, or a multipart file. FastAPI cannot declare both, so the
# schema is given here and the body is read by content type.
REQUEST_BODY: dict[str, Any] = {"required": True, "content": {
    "application/json": {"schema": VerifyTextRequest.model_json_schema(), "example": VERIFY_EXAMPLE},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "an image (PNG, JPEG, WebP, GIF) or audio file (WAV, FLAC, MP3)"}}}}}}


@router.post("/provenance/verify", response_model=VerifyResponse, openapi_extra={"requestBody": REQUEST_BODY})
async def verify(request: Request, provenance: ProvenanceDep) -> VerifyResponse:
    """Checks a file's C2PA content credentials (its manifest, whether it is intact, and whether this
    server trusts its signer), or a text for the watermark of each watermarked text model this server
    runs (or of `model`): `detected` when its green-token z-score passes the threshold. A text verdict
    needs about 50 tokens or more (docs/provenance.md gives the rates)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=1) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidRequestError("Send the file in the multipart field 'file'.", param="file")
            return await provenance.verify_file(await upload.read())
    try:
        body = VerifyTextRequest.model_validate_json(await request.body())
    except ValidationError as err:
        raise RequestValidationError(err.errors(), body=None) from None
    return await provenance.verify_text(body)
