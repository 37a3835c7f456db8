"""``/docs``: Swagger UI from the ``swagger-ui-bundle`` package, served by genserve itself, so the
page works offline and loads nothing from a CDN."""

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

STATIC_PREFIX = "/static/swagger-ui"
router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title="genserve API",
        swagger_js_url=f"{STATIC_PREFIX}/swagger-ui-bundle.js", swagger_css_url=f"{STATIC_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_PREFIX}/favicon-32x32.png",
        # validatorUrl: null stops the page from calling the public Swagger validator.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True,
                               "tryItOutEnabled": True})
