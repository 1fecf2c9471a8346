"""`/api/search`: text (GET) or an uploaded image (POST) -> the nearest images or text items."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import UsageError
from ..bundles import ServedBundle
from ..safety import decode_upload
from .common import AUTH, MAX_K, Kind, bundle_param, filter_params, make_filter, result_dict, server

router = APIRouter(dependencies=AUTH, tags=["search"])


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


@router.get("/api/search")
async def search_text(
    request: Request,
    q: str = Query(..., max_length=2000, description="Query text."),
    k: int = Query(10, ge=1, le=MAX_K),
    kind: Kind = Query("image", description="What to return: images or text items."),
    bundle: ServedBundle = Depends(bundle_param),
    where=Depends(filter_params),
) -> dict:
    """Text -> image (or text with kind=text); results as `searchkit query --json` plus URLs."""
    if not q.strip():
        raise UsageError("empty query text")
    t0 = time.perf_counter()
    results = await asyncio.wrap_future(bundle.batcher.search(q, k, kind, where))
    # a Response is sent as it is: FastAPI's validation and encoding of a returned dict cost
    # about as much CPU as the FAISS scan under load
    return JSONResponse({"results": [result_dict(request, bundle, r) for r in results], "took_ms": _ms(t0)})


def _search_image(bundle: ServedBundle, img, k: int, kind: str, where):
    with bundle.lock:
        return bundle.index.search(img, k, kind, where=where)


@router.post("/api/search")
async def search_image(
    request: Request,
    image: UploadFile = File(..., description="The query image."),
    k: int = Form(10, ge=1, le=MAX_K),
    kind: Kind = Form("image"),
    index: Optional[str] = Form(None),
    where_path: Optional[str] = Form(None),
    min_size: Optional[str] = Form(None),
    max_size: Optional[str] = Form(None),
    after: Optional[str] = Form(None),
    before: Optional[str] = Form(None),
) -> dict:
    """Image -> image (or image -> text with kind=text). The upload is decoded in memory."""
    bundle = server(request).bundles.get(index or request.query_params.get("index"))
    where = make_filter(where_path, min_size, max_size, after, before)
    t0 = time.perf_counter()
    img = await run_in_threadpool(decode_upload, await image.read())
    results = await run_in_threadpool(_search_image, bundle, img, k, kind, where)
    return {"results": [result_dict(request, bundle, r) for r in results], "took_ms": _ms(t0)}
