"""Health and metrics, open without a key (for probes and Prometheus)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from genserve.app.deps import ManagerDep, MetricsDep

router = APIRouter(tags=["operations"])
READINESS = {"description": "`status` (`ready` or `not_ready`) and each model's readiness",
             "content": {"application/json": {"schema": {
                 "type": "object", "required": ["status", "models"],
                 "properties": {"status": {"type": "string", "enum": ["ready", "not_ready"]},
                                "models": {"type": "object", "additionalProperties": {"type": "boolean"}}}}}}}


@router.get("/health/live")
async def live() -> dict:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/health/ready", response_class=JSONResponse,
            responses={200: READINESS, 503: {**READINESS, "description": "A model is not ready (or the server "
                                                                           "is shutting down)"}})
async def ready(manager: ManagerDep) -> JSONResponse:
    """200 when every configured model is loaded and its runner is making progress, else 503."""
    states = await manager.readiness()
    ok = all(states.values())
    return JSONResponse({"status": "ready" if ok else "not_ready", "models": states},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus's text exposition format",
                             "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(app_metrics: MetricsDep) -> Response:
    """Prometheus text format, rendered off the event loop (scrapes at once share one render)."""
    return Response(await app_metrics.render_shared(), media_type=CONTENT_TYPE_LATEST)
