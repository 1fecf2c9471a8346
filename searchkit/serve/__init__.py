"""`searchkit serve`: a web gallery and a JSON API over index bundles.

    from searchkit.serve import create_app
    app = create_app(["photos"], token="s3cret")     # an ASGI app (FastAPI); serve it with uvicorn

Layout: `app.py` builds the app; `views/` holds one module per kind of endpoint (status, search,
items, classify, page); `bundles.py` the served bundles and `state.py` what one server holds;
`batching.py` the micro-batching of concurrent text queries; `safety.py` tokens, the upload cap
and file serving; `errors.py` errors as JSON with their status; `thumbnails.py` the thumbnail
cache; `static/` the page (one HTML, one JS, one CSS file; no build step).
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'searchkit.serve' has no attribute {name!r}")
