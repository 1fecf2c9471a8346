"""Query latency on a 100k-vector bundle.

    python bench/query_latency.py [--n 100000] [--model open_clip:ViT-B-32@random] [--queries 200]

Builds a bundle of N synthetic unit vectors in clusters of ~50 (rows written through the store, as `index` writes
them, without encoding N images), then measures (1) warm text queries end to end through
`Index.search` (tokenise, encode, search, fetch metadata): p50/p99 ms, and each stage alone;
(2) cold `searchkit query` as a fresh process, to printed results: wall seconds.
Prints one JSON object. Targets (issue 4): warm p50 <= 15 ms, p99 <= 40 ms; cold <= 2.5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_bundle(path: Path, spec: str, n: int) -> None:
    import searchkit

    with searchkit.open_index(path, create=True, model=spec) as idx:
        dim = idx.dim
        rng = np.random.default_rng(0)
        db = idx.store.db
        with idx.store.transaction():
            db.conn.executemany(
                "INSERT INTO files(id, path, kind, size, mtime_ns, hash, complete) VALUES (?, ?, 'image', 0, 0, ?, 1)",
                ((i, f"/photos/{i:07d}.jpg", f"{i:032x}") for i in range(1, n + 1)),
            )
            # clustered like real embeddings (isotropic noise would be a worst case no ANN index meets)
            centers = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
            for start in range(0, n, 10000):
                m = min(10000, n - start)
                v = centers[rng.integers(0, len(centers), m)] + 0.7 * rng.standard_normal((m, dim)).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                db.conn.executemany(
                    "INSERT INTO items(id, file_id, kind, vector) VALUES (?, ?, 'image', ?)",
                    ((start + j + 1, start + j + 1, row.tobytes()) for j, row in enumerate(v)),
                )
            idx.store.bump_generation()
        idx.save()
        idx._ensure_text_query_model()  # what `searchkit index` does at the end of a run


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="open_clip:ViT-B-32@random")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--vector-index", default="auto", help="reindex the bundle as this kind first (auto: exact at this size)")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message=".*randomly initialised")
    import searchkit

    words = "cat dog sofa beach sunset mountain red blue child running car street snow park bicycle".split()
    rng = np.random.default_rng(1)
    queries = [" ".join(rng.choice(words, size=rng.integers(2, 7))) for _ in range(args.queries)]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        t = time.perf_counter()
        build_bundle(bundle, args.model, args.n)
        build_s = time.perf_counter() - t
        recall = None
        if args.vector_index != "auto":
            with searchkit.open_index(bundle, write=True) as w:
                recall = w.reindex(args.vector_index)["image"].get("recall")
        idx = searchkit.open_index(bundle)
        idx.search("warm up", k=10)
        total, enc_t, search_t, meta_t = [], [], [], []
        vec = idx.vectors("image")
        for q in queries:
            t0 = time.perf_counter()
            idx.search(q, k=10)
            total.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            e = idx.text_encoder().encode_texts([q])
            t1 = time.perf_counter()
            _, ids = vec.search(e, 10)
            t2 = time.perf_counter()
            idx.store.item_rows(ids[0])
            t3 = time.perf_counter()
            enc_t.append(t1 - t0)
            search_t.append(t2 - t1)
            meta_t.append(t3 - t2)
        idx.close()
        cold = []
        for q in queries[: args.cold_runs]:
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "searchkit.cli", "query", q, "--index", str(bundle), "-k", "10", "--json"],
                capture_output=True,
                text=True,
            )
            cold.append(time.perf_counter() - t0)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
    print(
        json.dumps(
            {
                "benchmark": "query_latency",
                "model": args.model,
                "n_vectors": args.n,
                "vector_index": args.vector_index,
                "recall": recall,
                "build_s": round(build_s, 1),
                "warm_ms": {"p50": round(pct(total, 50), 2), "p99": round(pct(total, 99), 2), "mean": round(statistics.mean(total) * 1000, 2)},
                "stage_p50_ms": {
                    "encode_text": round(pct(enc_t, 50), 2),
                    "faiss_search": round(pct(search_t, 50), 2),
                    "metadata": round(pct(meta_t, 50), 2),
                },
                "cold_cli_s": {"runs": [round(x, 2) for x in cold], "median": round(statistics.median(cold), 2)},
            }
        )
    )


if __name__ == "__main__":
    main()
