"""Vector indexes at scale: exact vs HNSW vs IVF-PQ on 1M x 512-d vectors.

    python bench/ann.py [--n 1000000] [--max-memory 512M] [--kinds flat,ivf-pq,hnsw] [--queries 1000]

Data: when the offline encoder `mini` loads, the real embeddings of --real-images Flickr8k images
(../shared/data) mixed into clustered synthetic vectors shaped like them (clusters of ~20 around
centres drawn from the real embeddings' density, spread with their within-cluster covariance;
see `synthetic_like`), all mapped from mini's 256-d into 512-d by one fixed random isometry
(inner products unchanged).
Without mini: synthetic only, 2,000 clusters in a random 96-d subspace plus 512-d isotropic
noise (nearest-neighbour cosine ~0.83, random pairs ~0.47); the JSON says which.
Queries: held-out synthetic vectors (not in the index) and, with mini, caption embeddings of
the Flickr8k dev images (text->image). Half of the queries tune the search parameters (the
library's own `tune`, target recall 0.95), the other half measure.

Every index is built with searchkit.vectors directly from numpy (no SQLite rows: IVF-PQ's
exact re-ranking reads the float32 vectors from an in-memory array here, from meta.db in a
bundle; `rerank_fetch_sqlite_ms` measures that read on a 200k-row meta.db for comparison).
The auto choice under --max-memory (default 512M: flat and HNSW do not fit at 1M) is the
"chosen" index. Timings are single-thread, one query at a time (p50/p99 per query); builds use
all cores. The exact index is also timed with its scan split over the cores, as searchkit runs
single queries (`split_over_cores`). Prints one JSON object.

Targets: chosen index recall@10 >= 0.95 at >= 20x the exact index's single-thread QPS;
single-query p50 <= 2 ms; IVF-PQ <= 100 MB per million vectors; build <= 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# a shared, busy machine: OpenMP threads that spin while waiting for a descheduled sibling make
# small FAISS steps (k-means of 8-d sub-vectors) many times slower; sleeping waits do not
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLICKR, cpu_count, peak_rss_mb  # noqa: E402

LOG = logging.getLogger("bench.ann")


def synthetic(n: int, d: int = 512, seed: int = 0, clusters: int = 2000, rank: int = 96, noise: float = 0.35, chunk: int = 100_000) -> np.ndarray:
    g = np.random.default_rng(12345)  # the population (same for every seed)
    basis, _ = np.linalg.qr(g.standard_normal((d, rank)))
    basis = basis.T.astype(np.float32)
    spec = (1.0 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
    centers = g.standard_normal((clusters, rank)).astype(np.float32) * spec
    mean = g.standard_normal(rank).astype(np.float32) * spec * 1.5
    rng = np.random.default_rng(seed)  # the sample
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = mean + centers[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, rank)).astype(np.float32) * spec
        x = z @ basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += noise / np.sqrt(d) * rng.standard_normal((m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def real_embeddings(max_images: int, max_captions: int, cache: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(image vectors, caption vectors, note) from mini on Flickr8k, in mini's own dimension."""
    empty = np.zeros((0, 0), np.float32)
    if not FLICKR.exists():
        return empty, empty, f"{FLICKR} missing: synthetic only"
    try:
        import searchkit

        enc = searchkit.get_encoder("mini")
    except Exception as e:  # no encoder offline: say so, run on synthetic vectors only
        return empty, empty, f"mini unavailable ({e}): synthetic only"
    import csv

    images = sorted((FLICKR / "images").glob("*.jpg"))[:max_images]
    dev = set((FLICKR / "splits" / "dev.txt").read_text().split())
    caps = [r["caption"] for r in csv.DictReader(open(FLICKR / "captions.csv")) if r["image"] in dev][:max_captions]
    key = cache / f"mini-{enc.fingerprint[:12]}-{len(images)}-{len(caps)}.npz"
    if key.exists():
        z = np.load(key)
        xi, xt = z["images"], z["captions"]
    else:
        t = time.perf_counter()
        xi = enc.encode_images([str(p) for p in images])
        xt = enc.encode_texts(caps)
        LOG.info("encoded %d images and %d captions in %.0fs", len(xi), len(xt), time.perf_counter() - t)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(key, images=xi, captions=xt)
    note = f"mini ({enc.spec}, {xi.shape[1]}-d): {len(xi)} Flickr8k images mixed in, {len(xt)} dev captions as text queries"
    return xi.astype(np.float32), xt.astype(np.float32), note


def synthetic_like(real: np.ndarray, n: int, seed: int = 0, per_cluster: int = 20, spread: float = 1.0, tightness: float = 0.9, chunk: int = 100_000) -> np.ndarray:
    """n clustered synthetic vectors distributed like `real`: n/per_cluster cluster centres, each a
    random real vector plus `spread` x noise with the real vectors' within-cluster covariance,
    and points around them with `tightness` x that noise; unit length. (Calibrated at 200k
    vectors: nearest-neighbour cosine ~0.73, and an IVF at nprobe 1/16/64 finds 0.65/0.91/0.97
    of an image query's true top 10, ~0.2/0.74/0.94 of a caption's, like CLIP-style data.)"""
    import faiss

    km = faiss.Kmeans(real.shape[1], 50, niter=20, spherical=True, seed=1)
    km.train(real)
    _, a = km.index.search(real, 1)
    w, U = np.linalg.eigh(np.cov(real - km.centroids[a[:, 0]], rowvar=False))
    scale = (U * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32)  # z @ scale ~ N(0, within-cluster cov)
    rng = np.random.default_rng(seed)
    k = real.shape[1]

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    nc = max(1, n // per_cluster)
    centres = np.empty((nc, k), np.float32)
    for s in range(0, nc, chunk):
        m = min(chunk, nc - s)
        centres[s : s + m] = unit(real[rng.integers(0, len(real), m)] + spread * rng.standard_normal((m, k)).astype(np.float32) @ scale)
    out = np.empty((n, k), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s : s + m] = unit(centres[rng.integers(0, nc, m)] + tightness * rng.standard_normal((m, k)).astype(np.float32) @ scale)
    return out


def lift(x: np.ndarray, d: int) -> np.ndarray:
    """Map k-d unit vectors into d dims by a fixed random isometry (inner products unchanged)."""
    if x.shape[1] == d:
        return x
    rot, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((d, d)))
    basis = rot[:, : x.shape[1]].T.astype(np.float32)
    out = np.empty((len(x), d), np.float32)
    for s in range(0, len(x), 100_000):
        out[s : s + 100_000] = x[s : s + 100_000] @ basis
    return out


def timed_single(vec, queries: np.ndarray, k: int = 10, *, split: bool = False) -> dict:
    """One query at a time, single thread: QPS, p50/p99 latency (ms). `split`: let an exact scan
    split over the cores as searchkit does for single queries (not single-thread then)."""
    import faiss

    from searchkit.vectors import flat

    before, split_min = faiss.omp_get_max_threads(), flat.SPLIT_SCAN_MIN
    faiss.omp_set_num_threads(1)
    flat.SPLIT_SCAN_MIN = split_min if split else 1 << 62
    try:
        vec.search(queries[:1], k)  # warm
        lat = []
        for q in queries:
            t = time.perf_counter()
            vec.search(q[None, :], k)
            lat.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(before)
        flat.SPLIT_SCAN_MIN = split_min
    lat = np.asarray(lat)
    return {
        "qps": round(float(len(lat) / lat.sum()), 1),
        "p50_ms": round(float(np.percentile(lat, 50) * 1000), 3),
        "p99_ms": round(float(np.percentile(lat, 99) * 1000), 3),
        "queries_timed": int(len(lat)),
    }


def recall_on(vec, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    from searchkit.vectors import recall_at_k

    _, I = vec.search(queries, k)
    return round(float(recall_at_k(I, list(truth), k).mean()), 4)


def sqlite_fetch_ms(xb: np.ndarray, rows: int = 200_000, reps: int = 200, per: int = 100) -> float:
    """p50 ms to read `per` random embeddings by id from a meta.db-shaped SQLite table."""
    from searchkit.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        st = Store(Path(tmp) / "meta.db", create=True)
        n = min(rows, len(xb))
        with st.transaction():
            st.db.conn.executemany("INSERT INTO files(id, path, kind, size, mtime_ns, hash, complete) VALUES (1, '/x', 'image', 0, 0, '', 1)", [()])
            st.db.conn.executemany(
                "INSERT INTO items(id, file_id, kind, vector) VALUES (?, 1, 'image', ?)",
                ((i + 1, xb[i].tobytes()) for i in range(n)),
            )
        rng = np.random.default_rng(0)
        st.vectors_by_ids(np.arange(1, 1000), xb.shape[1])
        lat = []
        for _ in range(reps):
            ids = np.sort(rng.choice(n, per, replace=False) + 1)
            t = time.perf_counter()
            st.vectors_by_ids(ids, xb.shape[1])
            lat.append(time.perf_counter() - t)
        st.close()
    return round(float(np.percentile(lat, 50) * 1000), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000, help="held-out synthetic queries (half tune, half measure)")
    ap.add_argument("--max-memory", default="512M", help="budget for the auto choice (the 'chosen' index)")
    ap.add_argument("--kinds", default="flat,ivf-pq,hnsw", help="any of flat, ivf-pq, hnsw, ivf-pq-disk (lists on disk, memory-mapped)")
    ap.add_argument("--hnsw-n", type=int, default=0, help="build HNSW on the first N vectors only (0: all)")
    ap.add_argument("--real-images", type=int, default=2000, help="Flickr8k images embedded with mini and mixed in")
    ap.add_argument("--text-queries", type=int, default=1000)
    ap.add_argument("--exact-timed", type=int, default=30, help="single queries timed on the exact index")
    ap.add_argument("--no-real", action="store_true", help="synthetic vectors only")
    ap.add_argument("--cache", default=os.environ.get("SEARCHKIT_CACHE", str(Path(tempfile.gettempdir()) / "searchkit-bench")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    import faiss

    from searchkit import vectors as V
    from searchkit.filters import parse_size

    budget = parse_size(args.max_memory)
    workdir = Path(tempfile.mkdtemp(prefix="searchkit-ann-"))  # on-disk lists live here
    d = args.dim
    t0 = time.perf_counter()
    if args.no_real:
        xi = xt = np.zeros((0, 0), np.float32)
        real_note = "synthetic only (--no-real)"
    else:
        xi, xt, real_note = real_embeddings(args.real_images, args.text_queries, Path(args.cache))
    if len(xi) and xi.shape[1] <= d:
        # synthetic vectors shaped like the real ones, so the real images are in-distribution
        pool = synthetic_like(xi, args.n + args.queries)
        slots = np.random.default_rng(3).choice(args.n, len(xi), replace=False)
        pool[slots] = xi  # the real image embeddings, spread over the id range
        xb = lift(pool, d)
        del pool
        xt = lift(xt, d)
        generator = f"clusters of ~20 shaped like the {len(xi)} real image embeddings ({xi.shape[1]}-d), lifted to {d}-d by a random isometry"
    else:
        if len(xi):
            real_note += f"; dim {xi.shape[1]} > {d}: not mixed in"
        xi = xt = np.zeros((0, d), np.float32)
        xb = synthetic(args.n + args.queries, d)
        generator = "2,000 clusters in a random 96-d subspace + isotropic noise (nn cos ~0.83, random pairs ~0.47)"
    xq = xb[args.n :].copy()
    xb = xb[: args.n]
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    gen_s = time.perf_counter() - t0
    LOG.info("data ready in %.0fs: %d x %d, %d real images, %d queries + %d text queries", gen_s, args.n, d, len(xi), len(xq), len(xt))

    def fetch(i):
        return xb[np.asarray(i) - 1]

    def chunks():
        for s in range(0, args.n, 50_000):
            yield ids[s : s + 50_000], xb[s : s + 50_000]

    # ground truth for every query, exact, streaming
    allq = np.vstack([xq, xt]) if len(xt) else xq
    t = time.perf_counter()
    _, truth = V.exact_knn(allq, chunks(), 10)
    gt_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    order = rng.permutation(len(xq))
    tune_q, eval_q = order[: len(xq) // 2], order[len(xq) // 2 :]
    t_order = rng.permutation(len(xt))
    tune_t, eval_t = t_order[: len(xt) // 2], t_order[len(xt) // 2 :]

    plan = V.plan_index(args.n, d, "auto", budget)
    out: dict = {
        "benchmark": "ann",
        "n": args.n,
        "dim": d,
        "data": {"synthetic": args.n - len(xi), "real_images": int(len(xi)), "real": real_note, "synthetic_generator": generator},
        "queries": {"held_out_synthetic": len(eval_q), "text": int(len(eval_t)), "tuning": len(tune_q) + len(tune_t)},
        "cpu_cores": cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "budget": args.max_memory,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "chosen": {"kind": plan.kind, "params": plan.params, "reason": plan.reason},
        "ground_truth_s": round(gt_s, 1),
        "indexes": {},
    }
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    exact_qps = None
    for kind in kinds:
        gc.collect()
        n_k = args.hnsw_n if kind == "hnsw" and args.hnsw_n else args.n
        if kind == "ivf-pq":
            p = plan if plan.kind == "ivf-pq" and not plan.params.get("on_disk") else V.plan_index(n_k, d, "ivf-pq", None)
        elif kind == "ivf-pq-disk":  # what plan_index picks when not even the in-memory IVF-PQ fits
            params = V.ivf_pq_params(n_k, d, None, on_disk=True)
            p = V.Plan("ivf-pq", params, V.ivf_pq_bytes(n_k, d, params), "lists on disk")
        elif kind == "hnsw":
            p = V.plan_index(n_k, d, "hnsw", 1 << 50)
        else:
            p = V.plan_index(n_k, d, "flat", 1 << 50)

        def kchunks(n_k=n_k):
            for s in range(0, n_k, 50_000):
                e = min(n_k, s + 50_000)
                yield ids[s:e], xb[s:e]

        LOG.info("building %s on %d vectors", kind, n_k)
        t = time.perf_counter()
        vec = V.build(
            p, d, kchunks, sample=lambda m, n_k=n_k: xb[np.sort(np.random.default_rng(1).choice(n_k, min(m, n_k), replace=False))],
            fetch=fetch, folder=workdir, name=kind,
        )
        build_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "v.faiss"
            vec.save(f)
            file_bytes = f.stat().st_size
        row: dict = {
            "n": n_k,
            "faiss": vec.describe(),
            "build_s": round(build_s, 1),
            "memory_mb": round(vec.memory_bytes() / 2**20, 1),
            "file_mb": round(file_bytes / 2**20, 1),
        }
        if vec.data_file() is not None:
            row["data_file_mb"] = round(vec.data_file().stat().st_size / 2**20, 1)
        if kind == "ivf-pq":
            row["mb_per_million"] = round(file_bytes / 2**20 / (n_k / 1e6), 1)
            row["params"] = {k: v for k, v in vec.params.items()}
        if n_k == args.n:
            if kind != "flat":
                sets = [V.QuerySet("held-out", xq[tune_q], np.full(len(tune_q), -1))]
                if len(xt):
                    sets.append(V.QuerySet("text", xt[tune_t], np.full(len(tune_t), -1)))
                t = time.perf_counter()
                V.tune(vec, sets, chunks, target=V.TARGET_RECALL)
                row["tune_s"] = round(time.perf_counter() - t, 1)
                row["search_params"] = dict(vec.search_params)
            row["recall_at_10"] = recall_on(vec, xq[eval_q], truth[eval_q])
            if len(xt):
                row["recall_at_10_text"] = recall_on(vec, xt[eval_t], truth[len(xq) + eval_t])
            timed = xq[eval_q][: args.exact_timed] if kind == "flat" else xq[eval_q]
            row.update(timed_single(vec, timed))
            if kind == "flat":
                exact_qps = row["qps"]
                row["split_over_cores"] = timed_single(vec, timed, split=True)
            elif exact_qps:
                row["speedup_vs_exact"] = round(row["qps"] / exact_qps, 1)
            if kind == "ivf-pq":  # the same index without exact re-ranking, for reference
                row["recall_at_10_no_rerank"] = recall_on(_NoRerank(vec), xq[eval_q], truth[eval_q])
        out["indexes"][kind] = row
        LOG.info("%s: %s", kind, json.dumps(row))
        del vec
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    out["rerank_fetch_sqlite_ms_p50"] = sqlite_fetch_ms(xb)
    chosen = out["indexes"].get(plan.kind, {})
    ivf = out["indexes"].get("ivf-pq", {})
    out["targets"] = {
        "chosen_recall_at_10>=0.95": chosen.get("recall_at_10", 0) >= 0.95,
        "chosen_speedup>=20x": (chosen.get("speedup_vs_exact") or 0) >= 20,
        "chosen_p50<=2ms": chosen.get("p50_ms", 1e9) <= 2.0,
        "ivf_pq_mb_per_million<=100": ivf.get("mb_per_million", 1e9) <= 100,
        "chosen_build<=300s": chosen.get("build_s", 1e9) <= 300,
    }
    out["peak_rss_mb"] = round(peak_rss_mb(), 0)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    out["faiss"] = faiss.__version__
    print(json.dumps(out))


class _NoRerank:
    """An IVF-PQ index searched on its codes alone (no exact re-ranking)."""

    def __init__(self, vec):
        self.vec = vec

    def search(self, q, k):
        fetch, self.vec.fetch = self.vec.fetch, None
        try:
            return self.vec.search(q, k)
        finally:
            self.vec.fetch = fetch


if __name__ == "__main__":
    main()
