"""Health and metrics, open without a key (for probes and Prometheus)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from genserve.app.deps import ManagerDep, MetricsDep

router = APIRouter(tags=["operations"])


@router.get("/health/live")
async def live() -> dict:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(manager: ManagerDep) -> JSONResponse:
    """200 when every configured model is loaded and its runner is making progress, else 503."""
    states = await manager.readiness()
    ok = all(states.values())
    return JSONResponse({"status": "ready" if ok else "not_ready", "models": states},
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(app_metrics: MetricsDep) -> Response:
    """Prometheus text format, rendered off the event loop (scrapes at once share one render)."""
    return Response(await app_metrics.render_shared(), media_type=CONTENT_TYPE_LATEST)
