"""`/api/items/{id}`: an item's metadata, thumbnail, original file and similar items.

Ids are integers matched by the route itself (anything else is a 404 there) and looked up in
the bundle named by `index`; files are reached only through that lookup (see safety.py)."""

from __future__ import annotations

import dataclasses
import mimetypes
import os
import time
from typing import Literal, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...errors import DecodeError
from ..bundles import ItemNotFound, ServedBundle
from ..safety import open_item_file, read_fd
from ..thumbnails import FORMATS, render
from .common import AUTH, MAX_K, Kind, bundle_param, filter_params, item_urls, iso_time, result_dict, server

router = APIRouter(dependencies=AUTH, tags=["items"])
CHUNK = 256 * 1024


@router.get("/api/items/{item_id:int}")
async def item(request: Request, item_id: int, bundle: ServedBundle = Depends(bundle_param)) -> dict:
    """The item's metadata: kind, file path, size and modification time, text and source."""
    row = await run_in_threadpool(bundle.item, item_id)
    out = {"index": bundle.name, "id": row["id"], "kind": row["kind"], "path": row["path"], "size": row["size"], "modified": iso_time(row["mtime_ns"])}
    if row["kind"] == "text":
        out.update(text=row["text"], source=f"{row['path']}:{row['locator']}")
    return {**out, **item_urls(request, bundle, row["id"], row["kind"])}


def _thumbnail(row: dict, size: int, fmt: str) -> bytes:
    fd, st = open_item_file(row)
    data = read_fd(fd, st.st_size)
    try:
        return render(data, size, fmt)
    except DecodeError as e:  # it decoded when indexed; now it does not
        raise ItemNotFound(f"the file of item {row['id']} cannot be decoded any more: {e}") from None


@router.get("/api/items/{item_id:int}/thumbnail", response_class=Response, responses={200: {"content": {"image/jpeg": {}, "image/webp": {}}}})
async def thumbnail(
    request: Request,
    item_id: int,
    size: int = Query(256, ge=16, le=1024, description="Longest side in pixels."),
    format: Literal["jpeg", "webp"] = Query("jpeg"),
    bundle: ServedBundle = Depends(bundle_param),
) -> Response:
    """A JPEG or WebP thumbnail, EXIF orientation applied; cached in memory."""
    row = await run_in_threadpool(bundle.item, item_id)
    etag = f'"{bundle.name}-{item_id}-{row["mtime_ns"]}-{row["size"]}-{size}-{format}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    cache = server(request).thumbnails
    key = (bundle.name, item_id, row["mtime_ns"], row["size"], size, format)
    data = cache.get(key)
    if data is None:
        data = await run_in_threadpool(_thumbnail, row, size, format)
        cache.put(key, data)
    return Response(data, media_type=FORMATS[format], headers=headers)


@router.get("/api/items/{item_id:int}/file", response_class=Response, responses={200: {"content": {"image/*": {}}}})
async def original(item_id: int, bundle: ServedBundle = Depends(bundle_param)) -> Response:
    """The original image file, exactly as indexed."""
    row = await run_in_threadpool(bundle.item, item_id)
    fd, st = await run_in_threadpool(open_item_file, row)
    f = os.fdopen(fd, "rb")  # a file object: closed when dropped, even if never streamed

    def chunks():
        with f:
            while block := f.read(CHUNK):
                yield block

    media = mimetypes.guess_type(row["path"])[0] or "application/octet-stream"
    name = os.path.basename(row["path"]).replace('"', "")
    headers = {"Content-Length": str(st.st_size), "Content-Disposition": f'inline; filename="{name}"', "X-Content-Type-Options": "nosniff"}
    return StreamingResponse(chunks(), media_type=media, headers=headers)


def _similar(bundle: ServedBundle, item_id: int, k: int, kind: Optional[str], where):
    with bundle.lock:
        idx = bundle.index
        row = idx.store.item(item_id)
        if row is None:
            raise ItemNotFound(f"no item {item_id} in index '{bundle.name}'")
        emb = idx.store.vectors_by_ids([item_id], idx.dim)  # stored: nothing is re-encoded
        found = idx.search(emb, k + 1, kind or row["kind"], where=where)
    found = [r for r in found if r.id != item_id][:k]
    return [dataclasses.replace(r, rank=i + 1) for i, r in enumerate(found)]


@router.get("/api/items/{item_id:int}/similar")
async def similar(
    request: Request,
    item_id: int,
    k: int = Query(10, ge=1, le=MAX_K),
    kind: Optional[Kind] = Query(None, description="What to return. [default: the item's own kind]"),
    bundle: ServedBundle = Depends(bundle_param),
    where=Depends(filter_params),
) -> dict:
    """More like this: the nearest items to the item's stored embedding, itself left out."""
    t0 = time.perf_counter()
    results = await run_in_threadpool(_similar, bundle, item_id, k, kind, where)
    return {"results": [result_dict(request, bundle, r) for r in results], "took_ms": round((time.perf_counter() - t0) * 1000, 2)}
