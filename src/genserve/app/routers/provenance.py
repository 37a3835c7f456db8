"""``/v1/provenance/verify`` (genserve): is this output genserve's?"""

from fastapi import APIRouter, Depends

from genserve.app.deps import ProvenanceDep
from genserve.app.routers.responses import ERRORS
from genserve.app.schemas.provenance import VerifyResponse, VerifyTextRequest
from genserve.app.security import bearer

router = APIRouter(prefix="/v1", tags=["provenance"], dependencies=[Depends(bearer)], responses=ERRORS)


@router.post("/provenance/verify", response_model=VerifyResponse)
async def verify(body: VerifyTextRequest, provenance: ProvenanceDep) -> VerifyResponse:
    """Checks a text for the watermark of each watermarked text model this server runs (or of `model`):
    `detected` when its green-token z-score passes the threshold. A verdict needs about 50 tokens or
    more (docs/provenance.md gives the rates). Images and audio are not checked yet."""
    return await provenance.verify_text(body)
