"""`/api/classify`: zero-shot labels of an uploaded image, as `searchkit classify --json`."""

from __future__ import annotations

from typing import List, Optional

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from ..bundles import ServedBundle
from ..safety import decode_upload
from .common import AUTH, server

router = APIRouter(dependencies=AUTH, tags=["classify"])


def _classify(bundle: ServedBundle, img, labels: str, templates):
    with bundle.lock:
        return bundle.index.classify([img], labels, templates or None)[0]


@router.post("/api/classify")
async def classify(
    request: Request,
    image: UploadFile = File(...),
    labels: str = Form(..., max_length=10_000, description='Comma-separated labels, e.g. "cat,dog,car".'),
    templates: Optional[List[str]] = Form(None, description="Prompt templates with {} (repeat the field). [default: the built-in ensemble]"),
    index: Optional[str] = Form(None, description="Whose model to use. [default: the first index]"),
) -> dict:
    """`{"path", "label", "score", "scores": {label: probability}}` with the bundle's model."""
    bundle = server(request).bundles.get(index or request.query_params.get("index"))
    img = await run_in_threadpool(decode_upload, await image.read())
    img.filename = image.filename or "upload"
    result = await run_in_threadpool(_classify, bundle, img, labels, templates)
    return result.to_dict()
