"""ivf-pq: [OPQ rotation +] IVF-PQ, inverted lists of product-quantized codes + 8-byte ids;
nlist ~ 4 sqrt(N), trained on 39 x nlist sampled vectors (see plan.py).

In memory the codes are 4-bit "fast-scan" PQ (IndexIVFPQFastScan: m sub-quantizers of 16
centroids, m/2 bytes per vector, scanned with SIMD lookups in registers; measured at 1M x 512-d:
PQ128x4fs answers at the recall of PQ64x8 with the same 64 bytes per code in less than half the
time). On-disk lists keep 8-bit PQ (IndexIVFPQ: m bytes per vector), because FAISS' on-disk lists
cannot hold fast-scan blocks. Candidates (k x rerank) are re-scored exactly from meta.db, so
scores are true cosines. OPQ is kept when it lowers the quantization error on held-out training
vectors (it usually does for CLIP-like embeddings), dropped otherwise.

On disk (params on_disk): when even the smallest in-memory IVF-PQ exceeds the budget, the codes
are added in shards of ONDISK_SHARD vectors, merged into one `<kind>.<token>.ivfdata` file (FAISS
OnDiskInvertedLists) and memory-mapped, so only the centroids and code books stay resident: an
index larger than RAM can be served. The .ivfdata file is never changed in place: a writer
copies it first (copy on write), so a kill leaves the previous .faiss + .ivfdata pair intact."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .base import EXACT_FILTER_MAX, Vectors
from .faissutil import Selector, load_faiss, no_prefetch, on_disk_lists, quiet_stdout, threads_for
from .gpu import to_all_gpus

LOG = logging.getLogger(__name__)

#: k-means iterations for the IVF coarse quantizer (faiss' default is 25; 10 gives lists as good
#: for search at 40% of the training time)
KMEANS_ITERATIONS = 10
#: OPQ is used when at least this share of the covariance energy lies across PQ blocks
OPQ_MIN_CROSS_ENERGY = 0.3
#: on-disk IVF-PQ builds add this many vectors per shard (in memory) before merging on disk
ONDISK_SHARD = 1_000_000


def _new_ivfdata(folder: Path, name: str) -> Path:
    return folder / f"{name}.{time.time_ns():x}.ivfdata"


class IVFPQVectors(Vectors):
    """[OPQ +] IVF-PQ with exact re-ranking of k x rerank candidates through `fetch`."""

    kind = "ivf-pq"

    @classmethod
    def holds(cls, index) -> bool:
        faiss = load_faiss()
        pq = (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)
        return isinstance(index, (faiss.IndexPreTransform, *pq)) and isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), pq)

    def __init__(self, dim: int, index=None, params=None, search_params=None, fetch=None):
        if index is None:
            index = self._create(dim, params or {})
        no_prefetch(index)
        super().__init__(dim, index, params, search_params, fetch)

    @staticmethod
    def _create(dim: int, params: dict):
        faiss = load_faiss()
        d_pq = params.get("d_pq", dim)
        quantizer = faiss.IndexFlatIP(d_pq)
        cls = faiss.IndexIVFPQFastScan if params.get("fastscan") else faiss.IndexIVFPQ
        ivf = cls(quantizer, d_pq, int(params["nlist"]), int(params["m"]), int(params.get("nbits", 8)), faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()
        # training cost matters at 512-d: fewer k-means iterations and points than faiss'
        # defaults (measured: same recall after exact re-ranking, a fraction of the time)
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.pq.cp.niter = 10
        ivf.pq.cp.max_points_per_centroid = 100
        if params.get("opq") is True:
            opq = faiss.OPQMatrix(dim, int(params["m"]), d_pq)
            opq.niter, opq.niter_pq, opq.niter_pq_0, opq.max_train_points = 10, 2, 10, 16_384
            idx = faiss.IndexPreTransform(opq, ivf)
            idx.own_fields = True
            opq.this.disown()
            ivf.this.disown()
            return idx
        return ivf

    @classmethod
    def wrap(cls, dim, index):
        faiss = load_faiss()
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        params = {
            "nlist": int(ivf.nlist), "m": int(ivf.pq.M), "nbits": int(ivf.pq.nbits), "d_pq": int(ivf.d),
            "opq": isinstance(index, faiss.IndexPreTransform), "fastscan": isinstance(ivf, faiss.IndexIVFPQFastScan),
        }
        if on_disk_lists(index):
            params["on_disk"] = True
        return cls(dim, index, params, {"nprobe": int(ivf.nprobe)})

    def default_search_params(self) -> dict:
        return {"nprobe": 16, "rerank": 10}

    def tuning_ladders(self) -> list[list[dict]]:
        nlist = int(self.params["nlist"])
        # steps of ~1.25x where a rung costs most (and cross-modal queries often need it)
        rungs = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 240, 288, 352, 416, 512)
        probes = [p for p in rungs if p < nlist] + [nlist]
        reranks = (5, 10, 20, 40) if self.fetch is not None else (1,)
        return [[{"nprobe": p, "rerank": r} for p in probes] for r in reranks]

    def _store_search_params(self) -> None:
        self._ivf().nprobe = int(self.search_params.get("nprobe", 16))

    def _ivf(self):
        faiss = load_faiss()
        return faiss.downcast_index(faiss.extract_index_ivf(self.index))

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def describe(self) -> str:
        p = self.params
        opq = f"OPQ{p['m']}_{p.get('d_pq', self.dim)}," if p.get("opq") is True else ""
        fs = "fs" if p.get("fastscan") else ""
        return f"{opq}IVF{p['nlist']},PQ{p['m']}x{p.get('nbits', 8)}{fs}" + (" (lists on disk)" if p.get("on_disk") else "")

    def data_file(self) -> Path | None:
        lists = load_faiss().downcast_InvertedLists(self._ivf().invlists)
        return Path(lists.filename) if isinstance(lists, load_faiss().OnDiskInvertedLists) else None

    def add(self, ids, vectors) -> None:
        self._writable()
        with quiet_stdout() if self.params.get("on_disk") else contextlib.nullcontext():
            super().add(ids, vectors)

    def remove(self, ids) -> None:
        self._writable()
        sizes = self._list_sizes() if self.params.get("fastscan") else None
        with quiet_stdout() if self.params.get("on_disk") else contextlib.nullcontext():
            super().remove(ids)
        if sizes is not None:
            self._clear_vacated_slots(sizes)

    def _list_sizes(self) -> list[int]:
        inv = self._ivf().invlists
        return [inv.list_size(i) for i in range(inv.nlist)]

    def _clear_vacated_slots(self, before: list[int]) -> None:
        """Zero the codes left behind in the last block of each fast-scan list that shrank.

        FAISS (checked with 1.15) removes an entry by moving the list's last code into its slot
        and shrinking the list, but leaves the old code's 4-bit values in the now-unused tail
        of the last 32-code block; a later add packs its codes into those slots by OR-ing, so
        the new vectors get corrupted codes and are not found (a removal then an add loses the
        added vectors; tests/test_vectors.py checks it). Unpack the block, zero the vacated
        codes and the block, and pack it back."""
        faiss = load_faiss()
        ivf = self._ivf()
        inv = faiss.downcast_InvertedLists(ivf.invlists)
        packer = ivf.get_CodePacker()  # a new object, owned (and freed) by its Python proxy
        nvec, size, code = int(packer.nvec), int(packer.block_size), int(packer.code_size)
        flat = np.zeros(nvec * code, np.uint8)
        for lst, old in enumerate(before):
            n = inv.list_size(lst)
            if n == old or n % nvec == 0:
                continue
            last = n // nvec
            block = faiss.rev_swig_ptr(inv.get_codes(lst), (last + 1) * size)[last * size :]
            packer.unpack_all(faiss.swig_ptr(block), faiss.swig_ptr(flat))
            flat.reshape(nvec, code)[n % nvec :] = 0
            block[:] = 0
            packer.pack_all(faiss.swig_ptr(flat), faiss.swig_ptr(block))

    def _writable(self) -> None:
        if self.mmapped:
            raise UsageError("this vector index is memory-mapped read-only; open the bundle for writing to change it")
        data = self.data_file()
        if data is not None and not getattr(self, "_own_data", False):
            self._copy_on_write(data)

    def _copy_on_write(self, data: Path) -> None:
        """Point the on-disk lists at a private copy of their file before the first change, so
        the saved .faiss + .ivfdata pair stays intact until the new pair is saved."""
        faiss = load_faiss()
        fresh = _new_ivfdata(data.parent, data.name.split(".")[0])
        shutil.copyfile(data, fresh)
        faiss.downcast_InvertedLists(self._ivf().invlists).filename = str(fresh)
        tmp = fresh.with_suffix(".faiss.tmp")
        try:  # re-open through a file: the lists map the copy, the old mapping is released
            faiss.write_index(self.index, str(tmp))
            with quiet_stdout():
                self.index = faiss.read_index(str(tmp), faiss.IO_FLAG_ONDISK_SAME_DIR)
            no_prefetch(self.index)
        finally:
            tmp.unlink(missing_ok=True)
        self._own_data = True
        self._changed()

    def _changed(self) -> None:
        super()._changed()
        self._ids = None

    def ids(self) -> np.ndarray:
        if getattr(self, "_ids", None) is None:
            faiss = load_faiss()
            inv = self._ivf().invlists
            out = []
            for lst in range(inv.nlist):
                size = inv.list_size(lst)
                if size:
                    ptr = inv.get_ids(lst)
                    out.append(faiss.rev_swig_ptr(ptr, size).copy())
                    inv.release_ids(lst, ptr)
            self._ids = np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
        return self._ids

    def train(self, sample: np.ndarray) -> None:
        """Train OPQ (when params['opq'] is 'auto', only if it lowers the quantization error on
        held-out sample rows) and the IVF-PQ on `sample`; k-means runs on a GPU when present."""
        faiss = load_faiss()
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        with threads_for(sample.size):
            if self.params.get("opq", "auto") == "auto":
                helps, share = opq_helps(sample, int(self.params["m"]))
                LOG.info("covariance energy across PQ blocks: %.2f -> %s OPQ", share, "with" if helps else "without")
                self.params["opq"] = helps
                self.params["opq_cross_energy"] = round(share, 3)
                self.index = self._create(self.dim, self.params)
            ivf = self._ivf()
            gpu = to_all_gpus(faiss.IndexFlatIP(ivf.d), "k-means")
            if gpu is not None:
                ivf.clustering_index = gpu
            self.index.train(sample)
        self.params["trained_on"] = int(len(sample))
        self._changed()

    def _search(self, q, k, allowed, params):
        faiss = load_faiss()
        ivf = self._ivf()
        nprobe = int(params.get("nprobe", 16))
        rerank = int(params.get("rerank", 10)) if self.fetch is not None else 1
        s = None
        if allowed is not None:
            share = len(allowed) / max(len(self), 1)
            if len(allowed) <= EXACT_FILTER_MAX and self.fetch is not None:
                ex = self._exact_over(q, k, allowed)
                if ex is not None:
                    return ex
            nprobe = min(ivf.nlist, max(nprobe, math.ceil(nprobe / max(share, 1e-9))))
            s = Selector(allowed)
        kk = min(len(self), k * max(rerank, 1))

        def probing(n: int):
            extra = {"sel": s.sel} if s else {}
            return faiss.SearchParametersIVF(nprobe=min(n, ivf.nlist), **extra)

        D, I = self.index.search(q, kk, params=probing(nprobe))
        reachable = min(k, len(allowed) if allowed is not None else len(self))
        if (I[:, :reachable] < 0).any() and nprobe < ivf.nlist:  # the probed lists hold too few: all lists
            D, I = self.index.search(q, kk, params=probing(ivf.nlist))
        if rerank > 1:
            return self._rerank(q, I, k)
        return D[:, :k], I[:, :k]


def opq_helps(sample: np.ndarray, m: int, threshold: float = OPQ_MIN_CROSS_ENERGY) -> tuple[bool, float]:
    """Whether an OPQ rotation is worth training before PQ with m sub-quantizers, and the
    measure: the share of the covariance energy (squared Frobenius norm) that lies *between*
    the m blocks of dimensions PQ quantizes independently. PQ captures structure within a
    block but not across blocks; OPQ rotates the space to move it inside. With little energy
    across blocks (near-isotropic or block-aligned data) the rotation buys nothing."""
    n, d = sample.shape
    if d % m or m < 2 or n < 2 * d:
        return False, 0.0
    x = sample[: min(n, 20_000)].astype(np.float64)
    c = np.cov(x, rowvar=False)
    block = np.arange(d) // (d // m)
    inside = block[:, None] == block[None, :]
    energy = float((c**2).sum())
    share = float((c[~inside] ** 2).sum() / energy) if energy > 0 else 0.0
    return share >= threshold, share


def add_in_shards(vec: IVFPQVectors, chunks: Iterable[tuple[np.ndarray, np.ndarray]], folder: Path, name: str, shard_size: int) -> None:
    """Fill a trained, empty IVF-PQ through shard files merged into one on-disk .ivfdata
    (faiss.contrib.ondisk): at most `shard_size` vectors' codes are in memory at a time."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = load_faiss()
    shards: list[str] = []
    state = {"index": None, "n": 0}

    def flush() -> None:
        if state["index"] is not None and state["n"]:
            f = folder / f".{name}.shard{len(shards)}.{os.getpid()}.tmp"
            faiss.write_index(state["index"], str(f))
            shards.append(str(f))
        state["index"], state["n"] = None, 0

    try:
        for ids, x in chunks:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            x = np.ascontiguousarray(x, dtype=np.float32)
            pos = 0
            while pos < len(ids):
                if state["index"] is None:
                    state["index"] = faiss.clone_index(vec.index)
                take = min(len(ids) - pos, shard_size - state["n"])
                with threads_for(take * vec.dim * 64):
                    state["index"].add_with_ids(x[pos : pos + take], ids[pos : pos + take])
                pos += take
                state["n"] += take
                if state["n"] >= shard_size:
                    flush()
        flush()
        data = _new_ivfdata(folder, name)
        with quiet_stdout():
            merge_ondisk(vec.index, shards, str(data))
        no_prefetch(vec.index)
        vec._own_data = True  # a new file of this build: no copy needed before changing it
        vec.params["shards"] = len(shards)
    finally:
        for f in shards:
            Path(f).unlink(missing_ok=True)
    vec._changed()
