"""The bundles a server answers from: opened read-only, looked up by name, one lock each.

A served bundle is an `Index` opened for reading (no writer lock is ever taken). `Index` keeps
one SQLite connection and loads its encoder and vector indexes lazily, so every use of it goes
through the bundle's lock; the slow parts that need no index (decoding an upload, making a
thumbnail) run outside it. Metadata reads (items, counts, info) go through a second reader of
the same bundle with its own lock, so they never wait for a model to load or a search to run. A concurrent `searchkit index` run is picked up without a restart:
each search compares meta.db's generation counter with the one its vectors reflect (one indexed
SQLite read) and catches up from meta.db when they differ, which is what `Index.vectors` does.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import IndexNotFoundError, UsageError
from .batching import TextBatcher

LOG = logging.getLogger(__name__)


class ItemNotFound(IndexNotFoundError):
    """No such item in the bundle asked for (or it cannot be served)."""


class ServedBundle:
    """One read-only bundle, its lock and its text-query batcher."""

    def __init__(self, name: str, index):
        import searchkit

        self.name = name
        self.index = index  # searches, under `lock`
        self.lock = threading.RLock()
        self.meta = searchkit.open_index(index.path)  # metadata reads, under `meta_lock`
        self.meta_lock = threading.Lock()
        self.batcher = TextBatcher(self)

    def item(self, item_id: int) -> dict:
        """The item's row (with its file's path, size and mtime), or ItemNotFound."""
        with self.meta_lock:
            row = self.meta.store.item(item_id)
        if row is None:
            raise ItemNotFound(f"no item {item_id} in index '{self.name}'")
        return row

    def summary(self) -> dict[str, Any]:
        with self.meta_lock:
            idx = self.meta
            counts = idx.store.counts()
            return {
                "name": self.name,
                "path": str(idx.path),
                "model": idx.spec,
                "counts": {**counts, "files": idx.store.file_count()},
                "generation": idx.store.generation,
            }

    def info(self) -> dict:
        """As `searchkit info --json`."""
        with self.meta_lock:
            return self.meta.info()

    def warm_up(self) -> None:
        """Load the text tower and the vector indexes (what the first query would do)."""
        try:
            self.batcher.search("warm up", 1, "image", None).result()
        except Exception as e:  # an empty bundle, say: the first real query reports it
            LOG.info("index '%s': nothing to warm up (%s)", self.name, e)

    def close(self) -> None:
        self.batcher.close()
        with self.lock:
            self.index.close()
        with self.meta_lock:
            self.meta.close()


class Bundles:
    """The served bundles by name; the first is the default."""

    def __init__(self, bundles: list[ServedBundle]):
        if not bundles:
            raise UsageError("no index to serve")
        self._by_name = {b.name: b for b in bundles}
        self.default = bundles[0]

    def __iter__(self):
        return iter(self._by_name.values())

    def get(self, name: str | None) -> ServedBundle:
        if name is None or name == "":
            return self.default
        try:
            return self._by_name[name]
        except KeyError:
            raise IndexNotFoundError(f"index '{name}' is not served here; see /api/indexes") from None

    def close(self) -> None:
        for b in self:
            b.close()


def open_bundles(indexes: Iterable[Any]) -> Bundles:
    """Open each index (a name, a bundle folder, or an already open `Index`) for reading.
    Two bundles with the same folder name are told apart by a numeric suffix."""
    import searchkit

    served: list[ServedBundle] = []
    names: set[str] = set()
    try:
        for spec in indexes:
            idx = spec if hasattr(spec, "search") else searchkit.open_index(spec)
            name, n = idx.name, 2
            while name in names:
                name, n = f"{idx.name}-{n}", n + 1
            names.add(name)
            served.append(ServedBundle(name, idx))
    except BaseException:
        for b in served:
            b.close()
        raise
    return Bundles(served)


def bundles_under(home: str | os.PathLike) -> list[Path]:
    """Every bundle folder (one holding meta.db) directly under `home`, sorted by name."""
    root = Path(home)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "meta.db").is_file())
