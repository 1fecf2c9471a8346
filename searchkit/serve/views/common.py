"""What the views share: the server state, the token check, the index parameter, filters, and
the JSON shape of a result."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal, Optional
from urllib.parse import quote

from fastapi import Depends, Header, Query, Request

from ...filters import Filter
from ...results import SearchResult
from ..state import ServerState
from ..bundles import ServedBundle
from ..safety import check_token

MAX_K = 200
Kind = Literal["image", "text"]


def server(request: Request) -> ServerState:
    return request.app.state.searchkit


# The dependencies are `async def` although they never await: FastAPI runs a plain `def`
# dependency in its thread pool, and three thread hops per request cost more than the work.
async def require_token(request: Request, authorization: Optional[str] = Header(None)) -> None:
    check_token(server(request).token, authorization)


#: every /api router depends on this
AUTH = [Depends(require_token)]


async def bundle_param(request: Request, index: Optional[str] = Query(None, description="Served index name (see /api/indexes). [default: the first]")) -> ServedBundle:
    return server(request).bundles.get(index)


def make_filter(where_path=None, min_size=None, max_size=None, after=None, before=None) -> Filter | None:
    """The CLI's filters; a bad size or date is refused now (400), before any work."""
    where = Filter.of(
        path=where_path or None, min_size=min_size or None, max_size=max_size or None, after=after or None, before=before or None
    )
    if where is not None:
        where.sql()
    return where


async def filter_params(
    where_path: Optional[str] = Query(None, description="Folder/file prefix or glob, as `searchkit query --where-path`."),
    min_size: Optional[str] = Query(None, description="Smallest file size: bytes, 500K, 2M..."),
    max_size: Optional[str] = Query(None, description="Largest file size."),
    after: Optional[str] = Query(None, description="Modified at or after this ISO date/datetime (server's local time)."),
    before: Optional[str] = Query(None, description="Modified before this ISO date/datetime."),
) -> Filter | None:
    return make_filter(where_path, min_size, max_size, after, before)


def item_urls(request: Request, bundle: ServedBundle, item_id: int, kind: str) -> dict:
    base = f"{request.scope.get('root_path', '')}/api/items/{item_id}"
    q = f"?index={quote(bundle.name, safe='')}"
    urls = {"item": base + q}
    if kind == "image":
        urls.update(thumbnail=f"{base}/thumbnail{q}", file=f"{base}/file{q}", similar=f"{base}/similar{q}")
    return urls


def result_dict(request: Request, bundle: ServedBundle, r: SearchResult) -> dict:
    """`searchkit query --json`'s object plus the item's URLs (thumbnail and similar for images)."""
    return {**r.to_dict(), **item_urls(request, bundle, r.id, r.kind)}


def iso_time(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="seconds")
