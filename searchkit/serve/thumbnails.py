"""Thumbnails: made from the indexed file (EXIF orientation applied, JPEG draft-decoded), kept
in a least-recently-used cache bounded in bytes. Callers run `make` in a worker thread."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

FORMATS = {"jpeg": "image/jpeg", "webp": "image/webp"}


def render(data: bytes, size: int, fmt: str) -> bytes:
    """Encoded image bytes -> a thumbnail that fits in size x size, as JPEG or WebP."""
    from PIL import Image

    from ..images import decode_image

    img = decode_image(data, draft_size=size)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "webp":
        img.save(out, "WEBP", quality=80, method=4)
    else:
        img.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails by key, least recently used first out once `max_bytes` is passed."""

    def __init__(self, max_bytes: int = 64 * 1024**2):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, gone = self._items.popitem(last=False)
                self._bytes -= len(gone)

    @property
    def size_bytes(self) -> int:
        return self._bytes
