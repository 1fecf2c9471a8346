"""Building a planned index from a stream of (ids, vectors) blocks, so the embeddings never need
to be in memory all at once: create, train (IVF-PQ, on a sample), add (in shards on disk)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .base import Chunks, Fetch, Vectors, create
from .ivfpq import ONDISK_SHARD, IVFPQVectors, add_in_shards
from .plan import TRAIN_PER_LIST, Plan

LOG = logging.getLogger(__name__)


def build(
    plan: Plan,
    dim: int,
    chunks: Chunks,
    *,
    sample: Callable[[int], np.ndarray] | None = None,
    fetch: Fetch | None = None,
    folder: Path | None = None,
    name: str = "vectors",
) -> Vectors:
    """Build the planned index streaming: `chunks()` yields (ids, vectors) blocks (called once,
    or twice for IVF-PQ when no `sample` is given: once to draw the training sample), so the
    embeddings never need to be in memory all at once. An on-disk IVF-PQ writes its lists to
    `folder/<name>.<token>.ivfdata`."""
    if plan.params.get("on_disk") and plan.params.get("fastscan"):
        raise UsageError("on-disk IVF-PQ lists cannot hold fast-scan codes; plan them with ivf_pq_params(..., on_disk=True)")
    vec = create(plan.kind, dim, plan.params, fetch)
    if isinstance(vec, IVFPQVectors):
        want = int(plan.params.get("train_size") or TRAIN_PER_LIST * plan.params["nlist"])
        t = time.perf_counter()
        vec.train(sample(want) if sample is not None else reservoir_sample(chunks(), want))
        LOG.info("trained %s on %d vectors in %.1fs", vec.describe(), vec.params["trained_on"], time.perf_counter() - t)
    t = time.perf_counter()
    if plan.params.get("on_disk"):
        if folder is None:
            raise UsageError("an on-disk vector index needs a folder for its data file")
        add_in_shards(vec, chunks(), Path(folder), name, int(plan.params.get("shard_size") or ONDISK_SHARD))
    else:
        for ids, x in chunks():
            vec.add(ids, x)
    LOG.info("added %d vectors to %s in %.1fs", len(vec), vec.describe(), time.perf_counter() - t)
    vec.params["built_count"] = len(vec)
    return vec


def reservoir_sample(chunks: Iterable[tuple[np.ndarray, np.ndarray]], n: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of n rows from a stream of blocks, holding at most n rows."""
    rng = np.random.default_rng(seed)
    out: np.ndarray | None = None
    seen = 0
    for _, x in chunks:
        if out is None:
            out = np.empty((n, x.shape[1]), np.float32)
        for row in x:
            if seen < n:
                out[seen] = row
            else:
                j = rng.integers(0, seen + 1)
                if j < n:
                    out[j] = row
            seen += 1
    if out is None:
        raise UsageError("no vectors to train on")
    return out[: min(seen, n)]
