"""``GET /``: the playground, one static HTML page (no build step, nothing fetched from
elsewhere) that drives the native API from a browser. It is public even with API keys on:
the page holds no data and asks for the key itself."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse

_PAGE = Path(__file__).resolve().parent / "static" / "playground.html"

router = APIRouter()


@cache
def page() -> str:
    """The page's text, read once per process."""
    return _PAGE.read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(
        page(),
        headers={
            "Cache-Control": "no-cache",
            # Nothing but this origin: the page must work offline and load nothing else.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'",
        },
    )


def install(app: FastAPI) -> None:
    """Serve the playground at ``/``."""
    app.include_router(router)
