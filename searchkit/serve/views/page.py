"""`/`: the gallery page, and `/static/`: its script and style sheet (shipped in the package).
The page is a client of the same JSON API as everyone else."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
#: the page loads nothing from elsewhere and runs no inline script
CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})



def install(app) -> None:
    """The page's route and its static files (StaticFiles refuses paths outside the folder)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
