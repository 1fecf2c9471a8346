"""Indexing throughput on full-size phone photos, measured in one run.

    python bench/index_throughput.py [--n 64] [--model open_clip:ViT-B-32@random] [--keep DIR]

(a) model only: preprocessed tensors, best batch size;  (b) naive loop: open, decode fully,
preprocess and encode one image at a time;  (c) end to end: `Index.add` on the folder (model
already loaded), and the `searchkit index` command as a fresh process (wall time and peak RSS).
Prints one JSON object. Targets (issue 4): c >= 0.9 a and c >= 2.5 b.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_count, make_phone_photos, run_measured  # noqa: E402


def model_only(enc, paths, batch_sizes) -> dict:
    import torch

    from searchkit.images import load_image

    tensors = [enc.preprocess(load_image(p, draft_size=enc.image_size)) for p in paths]
    best = {}
    for bs in batch_sizes:
        batch = torch.stack((tensors * (bs // len(tensors) + 1))[:bs])
        enc.encode_image_tensors(batch)  # warm-up at this very shape (oneDNN plans per shape)
        reps, t = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t < 3.0:  # at least 2 calls and 3 s per size
            enc.encode_image_tensors(batch)
            reps += 1
        best[bs] = reps * bs / (time.perf_counter() - t)
    bs = max(best, key=best.get)
    return {"images_per_s": round(best[bs], 2), "best_batch": bs, "by_batch": {k: round(v, 2) for k, v in best.items()}}


def naive(enc, paths) -> dict:
    import torch
    from PIL import Image

    enc.encode_image_tensors(torch.stack([enc.preprocess(Image.open(paths[0]).convert("RGB"))]))  # warm-up
    t = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB")  # full-size decode
        enc.encode_image_tensors(torch.stack([enc.preprocess(img)]))
    return {"images_per_s": round(len(paths) / (time.perf_counter() - t), 2)}


def end_to_end(spec, folder, workdir) -> dict:
    """`Index.add` on the folder with the model loaded; the one-time export of the text tower
    for torch-free queries (once per bundle, at the end of its first run) is timed apart."""
    import searchkit

    os.environ["SEARCHKIT_TEXT_ONNX"] = "0"
    with searchkit.open_index(workdir / "bundle-lib", create=True, model=spec) as idx:
        t = time.perf_counter()
        s = idx.add([folder])
        dt = time.perf_counter() - t
        del os.environ["SEARCHKIT_TEXT_ONNX"]
        t = time.perf_counter()
        idx._ensure_text_query_model()
        export_s = time.perf_counter() - t
    return {"images_per_s": round(s.added / dt, 2), "seconds": round(dt, 2), "added": s.added, "text_export_once_s": round(export_s, 1)}


def cli_run(spec, folder, workdir, paths) -> dict:
    """`searchkit index` as fresh processes: a quarter of the photos, then all of them (peak RSS
    of each, to show memory does not grow with the number of photos), an unchanged re-run, and
    a first run that also exports the text tower (its peak RSS)."""
    quarter = workdir / "quarter"
    quarter.mkdir()
    for p in paths[: max(1, len(paths) // 4)]:
        os.symlink(p, quarter / p.name)

    def run(src, bundle, export="0"):
        cmd = [sys.executable, "-m", "searchkit.cli", "index", str(src), "--index", str(workdir / bundle), "--model", spec, "--json"]
        t = time.perf_counter()
        out, rss = run_measured(cmd, env={**os.environ, "SEARCHKIT_TEXT_ONNX": export})
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        return time.perf_counter() - t, rss, json.loads(out.stdout)

    _, rss_quarter, _ = run(quarter, "bundle-quarter")
    wall, rss_full, _ = run(folder, "bundle-cli")
    rerun, _, again = run(folder, "bundle-cli")
    _, rss_export, _ = run(quarter, "bundle-export", export="1")
    return {
        "peak_rss_mb_with_text_export": round(rss_export, 1),
        "wall_s": round(wall, 2),
        "peak_rss_mb_quarter": round(rss_quarter, 1),
        "peak_rss_mb_full": round(rss_full, 1),
        "unchanged_rerun_wall_s": round(rerun, 2),
        "rerun_unchanged": again["unchanged"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--model", default="open_clip:ViT-B-32@random")
    ap.add_argument("--keep", type=Path, help="reuse/keep the generated photos in this folder")
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    args = ap.parse_args()

    import warnings

    warnings.filterwarnings("ignore", message=".*randomly initialised")
    import searchkit

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = args.keep or work / "photos"
        t = time.perf_counter()
        paths = make_phone_photos(folder, args.n)
        make_s = time.perf_counter() - t
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        enc = searchkit.get_encoder(args.model)
        a = model_only(enc, paths[:16], [int(x) for x in args.batch_sizes.split(",")])
        b = naive(enc, paths[: min(len(paths), 16)])
        c = end_to_end(args.model, folder, work)
        cli = cli_run(args.model, folder, work, paths)
    import torch

    print(
        json.dumps(
            {
                "benchmark": "index_throughput",
                "model": args.model,
                "n_photos": len(paths),
                "photo": {"size": "4032x3024", "jpeg_quality": 90, "mean_mb": round(mb, 2), "generate_s": round(make_s, 1)},
                "cpu_cores": cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "a_model_only": a,
                "b_naive_loop": b,
                "c_end_to_end": c,
                "c_over_a": round(c["images_per_s"] / a["images_per_s"], 3),
                "c_over_b": round(c["images_per_s"] / b["images_per_s"], 3),
                "cli": cli,
            }
        )
    )


if __name__ == "__main__":
    main()
