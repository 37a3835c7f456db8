"""``/docs`` (Swagger UI) and ``/redoc``, with their assets served by genserve itself from the
``fastapi-offline`` package, so the pages work offline and load nothing from a CDN; their
Content-Security-Policy holds them to this origin. A key pasted into Authorize lives as long as the
page: Swagger UI is told not to keep it in the browser's local storage.

Swagger UI must be 5.x or newer: FastAPI emits OpenAPI 3.1, which 4.x cannot render.
"""

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from genserve.app.security import content_security_policy

STATIC_PREFIX = "/static/docs"
STATIC_DIR = str(files("fastapi_offline") / "static")
router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger(request: Request) -> HTMLResponse:
    return _with_csp(get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title="genserve API",
        swagger_js_url=f"{STATIC_PREFIX}/swagger-ui-bundle.js", swagger_css_url=f"{STATIC_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_PREFIX}/favicon.png",
        # validatorUrl: null stops the page from calling the public Swagger validator.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False, "tryItOutEnabled": True}))


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return _with_csp(get_redoc_html(openapi_url=request.app.openapi_url, title="genserve API",
                                    redoc_js_url=f"{STATIC_PREFIX}/redoc.standalone.js",
                                    redoc_favicon_url=f"{STATIC_PREFIX}/favicon.png", with_google_fonts=False))


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = content_security_policy(bytes(page.body).decode(), inline_styles=True)
    return page
