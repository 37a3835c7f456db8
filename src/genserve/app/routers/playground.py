"""``GET /playground``: one page to try every model of the server, a tab per modality.

The page is plain HTML, CSS and JavaScript in ``app/playground/``, served by genserve itself: no CDN,
no build step, nothing fetched from outside (its Content-Security-Policy lets the browser load and
connect to this origin only). It calls the public API like any client, with the key the user
types kept in the tab's session storage, so it needs no privilege of its own and is open like
``/docs``.
"""

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from genserve.app.security import content_security_policy

STATIC_PREFIX = "/static/playground"
STATIC_DIR = str(files("genserve.app") / "playground")
router = APIRouter(include_in_schema=False)


@router.api_route("/playground", methods=["GET", "HEAD"])
async def playground() -> HTMLResponse:
    html, policy = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})


@cache
def _page() -> tuple[str, str]:
    """The page and its policy, read once: the file ships inside the package."""
    html = (files("genserve.app") / "playground" / "index.html").read_text(encoding="utf-8")
    return html, content_security_policy(html)
