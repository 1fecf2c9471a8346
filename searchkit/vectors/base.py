"""The contract every vector index kind honours (`Vectors`: add, remove, search over an optional
set of allowed ids, ids, save, load), `create` and `load` by kind, and the id-map base the flat
and HNSW kinds share. The kinds live in flat.py, hnsw.py and ivfpq.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptIndexError, UsageError
from ..fsutil import atomic_write, fsync_file
from .faissutil import load_faiss, no_results, on_disk_lists, prep_queries, quiet_stdout, threads_for, topk_rows, trim_columns
from .plan import estimate_bytes

#: searches of fewer queries than this run on one FAISS thread
SEARCH_THREADS_MIN_QUERIES = 16
#: a filter matching fewer ids than this (or than 2% of the index) is answered exactly over
#: the matches instead of through the approximate structure
EXACT_FILTER_MAX = 20_000

Fetch = Callable[[np.ndarray], np.ndarray]
Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


class Vectors:
    """One FAISS index over int64 ids. Subclasses: FlatVectors, HNSWVectors, IVFPQVectors.

    `search_params` are the tuned query-time parameters (nprobe, efSearch, rerank); `fetch`
    (ids -> exact float32 vectors), when set, lets approximate kinds re-rank exactly.
    """

    kind = "?"
    #: every kind by name, filled as each kind's module defines its class (`create`, `load`)
    kinds: dict[str, type[Vectors]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Vectors.kinds[cls.kind] = cls

    @classmethod
    def holds(cls, index) -> bool:
        """Whether `index` (a FAISS structure read from a file, downcast) is this kind's."""
        return False

    def __init__(self, dim: int, index, params: dict | None = None, search_params: dict | None = None, fetch: Fetch | None = None):
        self.dim = dim
        self.index = index
        self.params = dict(params or {})
        self.search_params = {**self.default_search_params(), **(search_params or {})}
        self.fetch = fetch
        self.dirty = False  # changed since loaded or saved
        self.mmapped = False  # IVF lists memory-mapped read-only
        self.info: dict[str, Any] = {}  # why it was built, when, measured recall (for the manifest)
        self._gpu = None

    # subclasses override
    def default_search_params(self) -> dict:
        return {}

    def tuning_ladders(self) -> list[list[dict]]:
        """Search-parameter ladders for `tune`, each from cheapest to most thorough."""
        return [[{}]]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids):
            with threads_for(len(ids) * self.dim * 64):
                self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim), ids)
            self._changed()

    def remove(self, ids: Iterable[int]) -> None:
        ids = np.ascontiguousarray(np.fromiter((int(i) for i in ids), dtype=np.int64))
        if len(ids):
            self.index.remove_ids(load_faiss().IDSelectorBatch(len(ids), load_faiss().swig_ptr(ids)))
            self._changed()

    def _changed(self) -> None:
        self.dirty = True
        self._gpu = None

    def ids(self) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        """The FAISS structure, in index_factory-like words."""
        return self.kind

    def memory_bytes(self) -> int:
        return estimate_bytes(self.kind, len(self), self.dim, self.params)

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, **overrides) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (nq, k'), best first; k' <= k. `allowed`: the only ids that may be
        returned (the true top k among them, not the top k filtered afterwards). Rows with fewer
        results than k' end with id -1. `overrides` replace tuned search parameters."""
        q = prep_queries(queries, self.dim)
        k = int(k)
        if k < 1:
            raise UsageError("k must be at least 1")
        if allowed is not None:
            allowed = np.unique(np.asarray(allowed, dtype=np.int64))
            allowed = allowed[allowed >= 0]
            if len(allowed) == 0:
                return no_results(len(q))
        k = min(k, len(self))
        if k <= 0:
            return no_results(len(q))
        params = {**self.search_params, **overrides}
        # a few queries: one thread. FAISS splits a single query's scan poorly; measured on 2
        # cores, 100k x 512 flat: 12 ms on 1 thread vs 15 ms on 2 idle, 34 vs 87 ms when busy
        with threads_for(len(q), threshold=SEARCH_THREADS_MIN_QUERIES):
            D, I = self._search(q, k, allowed, params)
        return trim_columns(D, I)

    def _search(self, q, k, allowed, params) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _exact_over(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact top k among `allowed` from the stored vectors (None without `fetch`)."""
        if self.fetch is None:
            return None
        live = allowed[np.isin(allowed, self.ids(), assume_unique=True)] if len(allowed) else allowed
        if len(live) == 0:
            return no_results(len(q))
        X = self.fetch(live)
        S = q @ X.T
        kk = min(k, len(live))
        part = np.argpartition(-S, kk - 1, axis=1)[:, :kk] if kk < len(live) else np.tile(np.arange(len(live)), (len(q), 1))
        D = np.take_along_axis(S, part, 1)
        return topk_rows(D, live[part], kk)

    def _rerank(self, q: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidate ids exactly from `fetch` and keep the best k."""
        uniq = np.unique(I[I >= 0])
        if len(uniq) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        X = self.fetch(uniq)
        pos = np.searchsorted(uniq, np.where(I >= 0, I, uniq[0]))
        S = np.einsum("qd,qcd->qc", q, X[pos])
        return topk_rows(np.where(I >= 0, S, -np.inf), I, k)

    # -- persistence
    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary sibling, fsync, rename, fsync the folder."""
        faiss = load_faiss()
        self._store_search_params()
        data = self.data_file()
        if data is not None:  # the codes the new .faiss will point at reach the disk first
            fsync_file(data)
        atomic_write(path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        self.dirty = False

    def _store_search_params(self) -> None:
        """Put the tuned search parameters into the FAISS structure, so the file carries them."""

    def data_file(self) -> Path | None:
        """The file outside the .faiss that holds this index's data (on-disk IVF lists), if any."""
        return None

    @staticmethod
    def load(path: str | Path, dim: int, *, mmap: bool = False, fetch: Fetch | None = None) -> Vectors:
        """Read any kind back (the kind is recognised from the FAISS structure). `mmap`:
        memory-map IVF inverted lists (read-only, for serving indexes larger than RAM)."""
        faiss = load_faiss()
        try:
            with quiet_stdout():  # on-disk lists print their new location when a bundle moved
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0))
                if mmap and on_disk_lists(index):  # mapped already; IO_FLAG_MMAP on them crashes searches
                    index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError as e:
            raise CorruptIndexError(f"cannot read vector index {path}: {str(e).splitlines()[0]}") from e
        if index.d != dim:
            raise CorruptIndexError(f"vector index {path} has dimension {index.d}, expected {dim}")
        cls = _kind_of(index)
        if cls is None:
            raise CorruptIndexError(f"vector index {path} is a {type(faiss.downcast_index(index)).__name__}, not one searchkit writes")
        v = cls.wrap(dim, index)
        v.fetch = fetch
        v.mmapped = mmap
        return v

    @classmethod
    def wrap(cls, dim: int, index) -> Vectors:
        return cls(dim, index)


class IdMapped(Vectors):
    """A kind wrapped in an IndexIDMap(2): position -> id, cached until the next change."""

    _idmap: np.ndarray | None = None

    def _id_map(self) -> np.ndarray:
        if self._idmap is None:
            self._idmap = load_faiss().vector_to_array(self.index.id_map).astype(np.int64)
        return self._idmap

    def _changed(self) -> None:
        super()._changed()
        self._idmap = None


def create(kind: str, dim: int, params: dict | None = None, fetch: Fetch | None = None) -> Vectors:
    """A new, empty index of `kind` (an IVF-PQ one is trained before vectors are added)."""
    return Vectors.kinds[kind](dim, None, params, None, fetch)


def _kind_of(index) -> type[Vectors] | None:
    index = load_faiss().downcast_index(index)
    return next((cls for cls in Vectors.kinds.values() if cls.holds(index)), None)
