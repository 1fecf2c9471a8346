"""hnsw: IndexIDMap(IndexHNSWFlat, M=32), graph search over full vectors; no training.

HNSW cannot delete a node, so a removed id becomes a tombstone: its slot in the id map is set to
-1 (that is saved with the index, nothing else to keep in step) and searches pass a selector
that excludes it. The graph keeps routing through it. When tombstones pass TOMBSTONE_REBUILD of
the nodes, the end of a run rebuilds the index (see searchkit/kind_vectors.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .base import EXACT_FILTER_MAX, IdMapped
from .faissutil import Selector, load_faiss, no_results
from .plan import HNSW_EF_CONSTRUCTION, HNSW_M


class HNSWVectors(IdMapped):
    """HNSW graph over full vectors (IndexIDMap over IndexHNSWFlat); removals are tombstones."""

    kind = "hnsw"

    @classmethod
    def holds(cls, index) -> bool:
        faiss = load_faiss()
        return isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)) and isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW)

    def __init__(self, dim: int, index=None, params=None, search_params=None, fetch=None):
        faiss = load_faiss()
        params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, **(params or {})}
        if index is None:
            h = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
            h.hnsw.efConstruction = int(params["ef_construction"])
            index = faiss.IndexIDMap(h)
        super().__init__(dim, index, params, search_params, fetch)

    @classmethod
    def wrap(cls, dim, index):
        faiss = load_faiss()
        # (keep `index` itself: it owns the C++ object; a downcast proxy of it would not)
        h = faiss.downcast_index(index.index)
        params = {"M": int(h.hnsw.nb_neighbors(1)), "ef_construction": int(h.hnsw.efConstruction)}
        return cls(dim, index, params, {"efSearch": int(h.hnsw.efSearch)})

    def default_search_params(self) -> dict:
        return {"efSearch": 64}

    def tuning_ladders(self) -> list[list[dict]]:
        return [[{"efSearch": ef} for ef in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)]]

    def _store_search_params(self) -> None:
        self._hnsw().hnsw.efSearch = int(self.search_params.get("efSearch", 64))

    def _hnsw(self):
        return load_faiss().downcast_index(self.index.index)

    @property
    def tombstones(self) -> int:
        return int((self._id_map() < 0).sum())

    def __len__(self) -> int:
        return int(self.index.ntotal) - self.tombstones

    def ids(self) -> np.ndarray:
        m = self._id_map()
        return m[m >= 0]

    def remove(self, ids: Iterable[int]) -> None:
        ids = np.fromiter((int(i) for i in ids), dtype=np.int64)
        if not len(ids):
            return
        m = self._id_map().copy()
        hit = np.isin(m, ids)
        if hit.any():
            m[hit] = -1
            load_faiss().copy_array_to_vector(m, self.index.id_map)
            self._changed()
            self._idmap = m

    def describe(self) -> str:
        return f"IDMap,HNSW{self.params['M']},Flat"

    def _search(self, q, k, allowed, params):
        faiss = load_faiss()
        ef = int(params.get("efSearch", 64))
        n_total = int(self.index.ntotal)
        if allowed is not None:
            share = len(allowed) / max(len(self), 1)
            if len(allowed) <= max(EXACT_FILTER_MAX, 0.02 * n_total) or share < 0.02:
                return self._exact_matches(q, k, allowed)
            ef = min(max(ef, math.ceil(ef / share)), 4096)
            s = Selector(allowed)
        elif self.tombstones:
            s = Selector.__new__(Selector)
            s.sel = faiss.IDSelectorRange(0, 1 << 62)
        else:
            s = None
        sp = faiss.SearchParametersHNSW(efSearch=max(ef, k), sel=s.sel) if s else faiss.SearchParametersHNSW(efSearch=max(ef, k))
        D, I = self.index.search(q, k, params=sp)
        if allowed is not None and (I < 0).any():  # the graph walk found too few matches
            return self._exact_matches(q, k, allowed)
        return D, I

    def _exact_matches(self, q, k, allowed):
        """Exact top k among `allowed`, from the vectors the HNSW index stores (no SQLite)."""
        faiss = load_faiss()
        m = self._id_map()
        positions = np.nonzero(np.isin(m, allowed))[0].astype(np.int64)
        if len(positions) == 0:
            return no_results(len(q))
        storage = faiss.downcast_index(self._hnsw().storage)
        s = Selector(positions)
        D, P = storage.search(q, min(k, len(positions)), params=faiss.SearchParameters(sel=s.sel))
        return D, np.where(P >= 0, m[np.maximum(P, 0)], -1)
