"""`/healthz`, `/api/indexes` and `/api/info`: what is served, as `searchkit info --json`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..bundles import ServedBundle
from .common import AUTH, bundle_param, server

router = APIRouter()
api = APIRouter(dependencies=AUTH)


@router.get("/healthz", tags=["status"])
async def healthz() -> dict:
    return {"status": "ok"}


@api.get("/api/indexes", tags=["status"])
async def indexes(request: Request) -> dict:
    """The served bundles with their counts; the first is the default."""
    state = server(request)
    return {"default": state.bundles.default.name, "indexes": [await run_in_threadpool(b.summary) for b in state.bundles]}


@api.get("/api/info", tags=["status"])
async def info(bundle: ServedBundle = Depends(bundle_param)) -> dict:
    """`searchkit info --json`: manifest, counts, vector indexes and recorded failures."""
    return await run_in_threadpool(bundle.info)


router.include_router(api)
