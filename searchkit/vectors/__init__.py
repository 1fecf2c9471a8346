"""FAISS vector indexes over explicit ids (the SQLite row ids): exact, HNSW and IVF-PQ.

Rows are L2-normalized, so inner product is cosine similarity. The bundle keeps one index per
item kind (image, text). Every index kind honours one contract (`Vectors`): add, remove, search
(optionally restricted to a set of allowed ids), ids, save, load. The embeddings themselves stay
in meta.db (lossless float32); an index can read them back through `fetch` to re-rank its
approximate candidates exactly and to answer very selective filters exactly.

One task per module, numpy in and out:
    base.py       the contract, `create` and `load` by kind
    flat.py       flat: float16 exact scan re-scored exactly, split over the cores (default <= 1M)
    hnsw.py       hnsw: HNSW graph, removals as tombstones
    ivfpq.py      ivf-pq: [OPQ +] fast-scan IVF-PQ in memory, 8-bit lists on disk (copy on write)
    plan.py       memory model, IVF-PQ parameters from N, `plan_index` under a memory budget
    build.py      streaming build of a plan (training sample, on-disk shards)
    tune.py       recall@10 against exact search; the cheapest search parameters reaching a target
    gpu.py        FAISS GPUs when present
    faissutil.py  lazy import, thread counts, selectors, result rows

Every public name is importable from `searchkit.vectors`.
"""

from __future__ import annotations

from .base import EXACT_FILTER_MAX, SEARCH_THREADS_MIN_QUERIES, Chunks, Fetch, Vectors, create
from .build import build, reservoir_sample
from .flat import FLAT_EXTRA, FLAT_SCORE_ERROR, SPLIT_SCAN_MIN, FlatVectors
from .gpu import gpu_count
from .hnsw import HNSWVectors
from .ivfpq import KMEANS_ITERATIONS, ONDISK_SHARD, OPQ_MIN_CROSS_ENERGY, IVFPQVectors, opq_helps
from .plan import (
    CHOICES,
    EXACT_MAX,
    FASTSCAN_BLOCK,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    KINDS,
    NLIST_PER_SQRT_N,
    RETRAIN_GROWTH,
    TOMBSTONE_REBUILD,
    TRAIN_PER_LIST,
    Plan,
    check_choice,
    code_bytes,
    default_budget,
    estimate_bytes,
    flat_bytes,
    format_bytes,
    hnsw_bytes,
    ivf_pq_bytes,
    ivf_pq_min_count,
    ivf_pq_params,
    plan_index,
)
from .tune import RECALL_K, TARGET_RECALL, TUNE_MARGIN, QuerySet, exact_knn, recall_at_k, tune

__all__ = [
    "CHOICES", "EXACT_FILTER_MAX", "EXACT_MAX", "FASTSCAN_BLOCK", "FLAT_EXTRA", "FLAT_SCORE_ERROR",
    "HNSW_EF_CONSTRUCTION", "HNSW_M", "KINDS", "KMEANS_ITERATIONS", "NLIST_PER_SQRT_N", "ONDISK_SHARD",
    "OPQ_MIN_CROSS_ENERGY", "RECALL_K", "RETRAIN_GROWTH", "SEARCH_THREADS_MIN_QUERIES", "SPLIT_SCAN_MIN",
    "TARGET_RECALL", "TOMBSTONE_REBUILD", "TRAIN_PER_LIST", "TUNE_MARGIN",
    "Chunks", "Fetch", "FlatVectors", "HNSWVectors", "IVFPQVectors", "Plan", "QuerySet", "Vectors",
    "build", "check_choice", "code_bytes", "create", "default_budget", "estimate_bytes", "exact_knn",
    "flat_bytes", "format_bytes", "gpu_count", "hnsw_bytes", "ivf_pq_bytes", "ivf_pq_min_count",
    "ivf_pq_params", "opq_helps", "plan_index", "recall_at_k", "reservoir_sample", "tune",
]
