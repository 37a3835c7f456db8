"""``GET /playground``: one page to try every model of the server, a tab per modality.

The page is plain HTML, CSS and JavaScript in ``app/playground/``, served by genserve itself: no CDN,
no build step, nothing fetched from outside (the Content-Security-Policy below lets the browser load
and connect to this origin only). It calls the public API like any client, with the key the user
types kept in the tab's session storage, so it needs no privilege of its own and is open like
``/docs``.
"""

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

STATIC_PREFIX = "/static/playground"
STATIC_DIR = str(files("genserve.app") / "playground")
# What the page may load and call: this origin, and the data:/blob: URLs it makes of results
# (generated images, audio and molecule drawings). No inline script, no other origin.
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
       "connect-src 'self' blob:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'none'")
router = APIRouter(include_in_schema=False)


@router.api_route("/playground", methods=["GET", "HEAD"])
async def playground() -> HTMLResponse:
    html = (files("genserve.app") / "playground" / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
