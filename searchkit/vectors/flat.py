"""flat: exact search. IndexIDMap2 over float16 copies of the vectors (IndexScalarQuantizer
fp16: half the memory and half the bytes per query of float32, and a scan of 100k x 512 is
memory-bound), whose candidates are re-scored exactly from meta.db: every candidate that rounding
could lift into the top k (a float16 score is within FLAT_SCORE_ERROR x |q| of the float32 one)
is re-scored, so the top k are provably the exact top k. A single query's scan is split over
the cores by position ranges. Bundles written before float16 hold IndexFlatIP, searched as is."""

from __future__ import annotations

import os

import numpy as np

from ..machine import cpu_cores
from .base import SEARCH_THREADS_MIN_QUERIES, IdMapped
from .faissutil import Selector, load_faiss, topk_rows
from .gpu import to_all_gpus
from .plan import flat_bytes

#: |float16 score - float32 score| <= this x |q| for unit rows: float16 rounds each component
#: within 2^-11 of its value (so the dot product moves by at most 2^-11 sum|q_i x_i| <= 4.9e-4
#: |q|), plus float32 accumulation error (~d x 2^-24); doubled for headroom
FLAT_SCORE_ERROR = 1e-3
#: exact search over float16 scans for k + this many candidates first (more only when needed)
FLAT_EXTRA = 16
#: an unfiltered exact search of a few queries over at least this many vectors splits its scan
#: into one range of positions per core, scanned in parallel threads (FAISS parallelizes over
#: queries, so a single query otherwise scans on one core; measured at 100k x 512 float16 on
#: 2 cores: 5.9 -> 3.5 ms, one core alone does not saturate the memory bus)
SPLIT_SCAN_MIN = 20_000

_scan_pool = None


def _forget_scan_pool() -> None:
    global _scan_pool
    _scan_pool = None  # a forked child has none of the parent's threads: start a new pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_scan_pool)


def _split_pool():
    """Threads for splitting one query's exact scan (FAISS releases the GIL while it scans)."""
    global _scan_pool
    if _scan_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _scan_pool = ThreadPoolExecutor(max_workers=min(8, cpu_cores()), thread_name_prefix="searchkit-scan")
    return _scan_pool


class FlatVectors(IdMapped):
    """Exact inner-product search: IndexIDMap2 over float16 vectors (IndexScalarQuantizer), whose
    candidates are re-scored exactly through `fetch`; or over IndexFlatIP (older bundles)."""

    kind = "flat"

    @classmethod
    def holds(cls, index) -> bool:
        faiss = load_faiss()
        if not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)):
            return False
        sub = faiss.downcast_index(index.index)
        return isinstance(sub, faiss.IndexFlat) or (isinstance(sub, faiss.IndexScalarQuantizer) and sub.sq.qtype == faiss.ScalarQuantizer.QT_fp16)

    def __init__(self, dim: int, index=None, params=None, search_params=None, fetch=None):
        faiss = load_faiss()
        if index is None:
            sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexIDMap2(sq)
            index.own_fields = True
            sq.this.disown()
        super().__init__(dim, index, params, search_params, fetch)

    @property
    def half(self) -> bool:
        """Whether the scan reads float16 vectors (and re-scores exactly)."""
        return isinstance(load_faiss().downcast_index(self.index.index), load_faiss().IndexScalarQuantizer)

    def ids(self) -> np.ndarray:
        return self._id_map().copy()

    def describe(self) -> str:
        return "IDMap2,SQfp16" if self.half else "IDMap2,Flat"

    def memory_bytes(self) -> int:
        return flat_bytes(len(self), self.dim) + (0 if self.half else 2 * self.dim * len(self))

    def _search(self, q, k, allowed, params):
        faiss = load_faiss()
        s = Selector(allowed) if allowed is not None else None

        def scan(kk):
            if s is not None:
                return self.index.search(q, kk, params=faiss.SearchParameters(sel=s.sel))
            gpu = self._gpu_index()
            if gpu is None and len(q) < SEARCH_THREADS_MIN_QUERIES and len(self) >= SPLIT_SCAN_MIN and cpu_cores() > 1:
                return self._split_scan(q, kk)
            return (gpu or self.index).search(q, kk)

        if not self.half or self.fetch is None:
            return scan(k)
        return self._exact_from_half(q, k, scan, len(allowed) if allowed is not None else len(self))

    def _split_scan(self, q, kk) -> tuple[np.ndarray, np.ndarray]:
        """One scan per core over consecutive ranges of positions, in parallel, merged."""
        faiss = load_faiss()
        inner = faiss.downcast_index(self.index.index)
        n = int(inner.ntotal)
        bounds = np.linspace(0, n, min(8, cpu_cores()) + 1).astype(np.int64)
        sels = [faiss.IDSelectorRange(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

        def part(sel):
            faiss.omp_set_num_threads(1)  # (per thread) each range is one core's work
            return inner.search(q, kk, params=faiss.SearchParameters(sel=sel))

        parts = list(_split_pool().map(part, sels))
        D, P = topk_rows(np.hstack([d for d, _ in parts]), np.hstack([p for _, p in parts]), kk)
        return D, np.where(P >= 0, self._id_map()[np.maximum(P, 0)], -1)

    def _exact_from_half(self, q, k, scan, reachable: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top k from a float16 scan. With b the rounding bound and s_k the k-th best
        float16 score, the float16 top k all score at least s_k - b exactly, so anything whose
        float16 score is below s_k - 2b cannot enter the exact top k: only the candidates at or
        above that cut are re-scored (k and a few). The scan widens (x4) while the last scanned
        score is still above the cut."""
        bound = FLAT_SCORE_ERROR * np.linalg.norm(q, axis=1)
        kk = min(reachable, k + FLAT_EXTRA)
        while True:
            D, I = scan(kk)
            cut = D[:, min(k, D.shape[1]) - 1] - 2 * bound
            more = (I[:, -1] >= 0) & (D[:, -1] >= cut)  # a full row that may go on past kk
            if kk < reachable and bool(more.any()):
                kk = min(reachable, kk * 4)
                continue
            return self._rerank(q, np.where(D >= cut[:, None], I, -1), k)

    def _gpu_index(self):
        """A GPU copy of the index for unfiltered searches when FAISS has GPUs (else None)."""
        if self._gpu is None and len(self) >= 50_000:
            self._gpu = to_all_gpus(self.index, "flat index") or False
        return self._gpu or None
