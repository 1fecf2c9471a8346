"""searchkit: cross-modal search over photos and text with CLIP-style dual encoders.

    import searchkit
    with searchkit.open_index("photos", create=True) as idx:
        idx.add(["./images"])
    idx = searchkit.open_index("photos")
    for r in idx.search("a cat on a sofa", k=5):
        print(r.rank, r.score, r.path)

Heavy dependencies (torch, open_clip, faiss) load on first use, not on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import errors
from .results import AddSummary, ClassifyResult, SearchResult

__version__ = "0.1.0"

__all__ = [
    "open_index",
    "Index",
    "get_encoder",
    "Encoder",
    "classify_images",
    "SearchResult",
    "ClassifyResult",
    "AddSummary",
    "errors",
    "__version__",
]

if TYPE_CHECKING:
    from .encoders import Encoder, get_encoder
    from .index import Index, open_index
    from .query import classify_images

_LAZY = {
    "open_index": ".index",
    "Index": ".index",
    "classify_images": ".query",
    "get_encoder": ".encoders",
    "Encoder": ".encoders",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'searchkit' has no attribute {name!r}")
