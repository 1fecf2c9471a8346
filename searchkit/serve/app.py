"""The ASGI app: served bundles, token, upload cap and thumbnail cache on `app.state.searchkit`,
JSON errors, and the routes of `views/`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ..filters import parse_size
from .bundles import Bundles, open_bundles
from .safety import BodyLimit
from .state import ServerState
from .thumbnails import ThumbnailCache

LOG = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = "20M"


def create_app(
    indexes: Iterable[Any] | Bundles,
    *,
    token: str | None = None,
    max_upload: int | str = DEFAULT_MAX_UPLOAD,
    thumbnail_cache: int | str = "64M",
    warm: bool = False,
) -> FastAPI:
    """An ASGI app serving `indexes` (names, bundle folders or open `Index` objects; the first
    is the default). The bundles are opened read-only now, so a missing one fails here, and
    closed when the app shuts down. `token`: every /api call then needs `Authorization: Bearer
    TOKEN`. `max_upload`: the largest request body (bytes or '20M'). `warm`: load the models
    in a background thread at start-up instead of on the first query."""
    from .. import __version__
    from . import errors
    from .views import classify, items, page, search, status

    upload_cap = parse_size(max_upload, what="upload limit")
    bundles = indexes if isinstance(indexes, Bundles) else open_bundles(indexes)
    state = ServerState(bundles, token or None, upload_cap, ThumbnailCache(parse_size(thumbnail_cache, what="thumbnail cache size")))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm:  # the port is open meanwhile; queries simply wait for the bundle's lock
            for b in bundles:
                threading.Thread(target=b.warm_up, name=f"searchkit-warm-{b.name}", daemon=True).start()
        yield
        state.close()

    app = FastAPI(
        title="searchkit",
        version=__version__,
        description="Cross-modal search over searchkit index bundles. Errors are `{\"error\": \"...\"}`.",
        lifespan=lifespan,
    )
    app.state.searchkit = state
    errors.install(app)
    for view in (status, search, items, classify):
        app.include_router(view.router)
    page.install(app)
    app.add_middleware(BodyLimit, max_bytes=upload_cap)
    return app
