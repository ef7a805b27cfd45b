"""The operator dashboard: static HTML/CSS/JS served by the control plane itself.

No build step and no framework, so the control plane stays one Python process: the page at
`/` talks to the same JSON API (`/api/v1`) with the token the operator logs in with. Its
assets live under `/ui/`; the plotting library (uPlot) is vendored into `static/vendor/` at
install time by `scripts/vendor-web.sh`, and the page says so clearly when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import fastapi
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PREFIX = "/ui"

# The page is tiny and changes with every upgrade: always revalidate it (and its assets, which
# carry no version in their names).
_NO_CACHE = {"Cache-Control": "no-cache"}


class _RevalidatedStaticFiles(StaticFiles):
    """StaticFiles whose responses browsers revalidate (ETag/Last-Modified) on every use."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update(_NO_CACHE)
        return response


async def _index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_NO_CACHE)


def mount_dashboard(app: fastapi.FastAPI) -> None:
    """Serve the dashboard page at `/` and its assets under `/ui/`."""
    app.add_api_route("/", _index, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(ASSETS_PREFIX, _RevalidatedStaticFiles(directory=STATIC_DIR), name="dashboard")
