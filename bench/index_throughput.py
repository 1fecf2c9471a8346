"""Indexing throughput on full-size phone photos, measured in one run.

    python bench/index_throughput.py [--n 64] [--model open_clip:ViT-B-32@random] [--keep DIR]
    python bench/index_throughput.py --first-run [--n 120] [--compare OTHER_PYTHON] [--reps 2]

Steady state: (a) model only: preprocessed tensors, best batch size, for each image backend
(ONNX Runtime and torch on CPU); (d) decode: one thread reading, draft-decoding and
preprocessing a photo; (b) naive loop: open, decode fully, preprocess and encode one image at a
time; (c) end to end: `Index.add` on the folder (model already loaded), against the 2-core
ceiling 1 / (1/a + d/2) with a of the fastest backend; and the `searchkit index` command as a
fresh process (wall time and peak RSS at N/4 and N). Targets: c >= 0.9 ceiling, c >= 2.5 b.

First run (`--first-run`): `searchkit index` as a user runs it the first time on a folder: a
fresh process and a fresh bundle, text-tower export included, wall and CPU seconds and peak
RSS. The model's exports are in the cache (a warm-up run made them, once per machine, and its
own figures are reported as `cold_cache`). `--compare PYTHON` runs another installation's
`python -m searchkit.cli` the same way, interleaved with this one (e.g. the untouched main
checkout, or `--compare-pythonpath` a snapshot made with `git archive`), each with its own cache,
and reports the ratios.
Prints one JSON object.
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
    from searchkit.encoders.base import stack_batch
    from searchkit.images import load_image

    tensors = [enc.preprocess(load_image(p, draft_size=enc.image_size)) for p in paths]
    best = {}
    for bs in batch_sizes:
        batch = stack_batch((tensors * (bs // len(tensors) + 1))[:bs])
        enc.encode_image_tensors(batch)  # warm-up at this very shape (oneDNN plans per shape)
        reps, t = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t < 3.0:  # at least 2 calls and 3 s per size
            enc.encode_image_tensors(batch)
            reps += 1
        best[bs] = reps * bs / (time.perf_counter() - t)
    bs = max(best, key=best.get)
    return {"images_per_s": round(best[bs], 2), "best_batch": bs, "by_batch": {k: round(v, 2) for k, v in best.items()}}


def naive(enc, paths) -> dict:
    from PIL import Image

    from searchkit.encoders.base import stack_batch

    enc.encode_image_tensors(stack_batch([enc.preprocess(Image.open(paths[0]).convert("RGB"))]))  # warm-up
    t = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB")  # full-size decode
        enc.encode_image_tensors(stack_batch([enc.preprocess(img)]))
    return {"images_per_s": round(len(paths) / (time.perf_counter() - t), 2)}


def decode_cost(enc, paths) -> float:
    """Seconds per photo for one thread to read, hash, draft-decode and preprocess it."""
    from searchkit.images import decode_image
    from searchkit.pipeline import content_hash

    t = time.perf_counter()
    for p in paths:
        data = p.read_bytes()
        content_hash(data)
        enc.preprocess(decode_image(data, draft_size=enc.image_size))
    return (time.perf_counter() - t) / len(paths)


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
    ap.add_argument("--first-run", action="store_true", help="measure first runs instead (see the docstring)")
    ap.add_argument("--compare", help="another installation's python to run interleaved (--first-run)")
    ap.add_argument("--compare-pythonpath", help="PYTHONPATH for --compare (a source snapshot, e.g. of main)")
    ap.add_argument("--cache-root", type=Path, help="keep each installation's cache in DIR/cache-NAME across runs "
                    "(the warm-up is then no cold-cache run)")
    ap.add_argument("--reps", type=int, default=2, help="first runs per installation (median reported)")
    args = ap.parse_args()
    if args.first_run:
        return first_run_main(args)

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
        sizes = [int(x) for x in args.batch_sizes.split(",")]
        enc = searchkit.get_encoder(args.model)
        a = {type(enc).__name__: model_only(enc, paths[:16], sizes)}
        base = getattr(enc, "torch_encoder", None)
        if base is not None:
            a[type(base()).__name__] = model_only(base(), paths[:16], sizes)
        best_a = max(v["images_per_s"] for v in a.values())
        d = decode_cost(enc, paths[:16])
        ceiling = 1.0 / (1.0 / best_a + d / 2)
        b = naive(enc, paths[: min(len(paths), 16)])
        c = end_to_end(args.model, folder, work)
        cli = cli_run(args.model, folder, work, paths)

    print(
        json.dumps(
            {
                "benchmark": "index_throughput",
                "model": args.model,
                "n_photos": len(paths),
                "photo": {"size": "4032x3024", "jpeg_quality": 90, "mean_mb": round(mb, 2), "generate_s": round(make_s, 1)},
                "cpu_cores": cpu_count(),
                "encoder": type(enc).__name__,
                "a_model_only": a,
                "d_decode_s_per_photo_one_thread": round(d, 4),
                "ceiling_images_per_s": round(ceiling, 2),
                "b_naive_loop": b,
                "c_end_to_end": c,
                "c_over_ceiling": round(c["images_per_s"] / ceiling, 3),
                "c_over_best_a": round(c["images_per_s"] / best_a, 3),
                "c_over_b": round(c["images_per_s"] / b["images_per_s"], 3),
                "cli": cli,
            }
        )
    )


#: runs argv; prints the command's peak RSS (KB) and CPU seconds (user + system) on stderr's last line
_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(r.returncode)"
)


def first_run(python: str, spec: str, folder: Path, bundle: Path, cache: Path, pythonpath: str | None = None) -> dict:
    """One `searchkit index` of `folder` into the fresh `bundle`, as a fresh process."""
    import subprocess

    cmd = [python, "-c", _MEASURE, python, "-m", "searchkit.cli", "index", str(folder), "--index", str(bundle), "--model", spec, "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEARCHKIT_")}
    env["SEARCHKIT_CACHE"] = str(cache)
    env["PYTHONWARNINGS"] = "ignore"
    if pythonpath:  # (a source snapshot to run instead of the installation's own searchkit)
        env["PYTHONPATH"] = pythonpath
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=bundle.parent)  # (cwd: not a checkout)
    wall = time.perf_counter() - t
    lines = out.stderr.rstrip().splitlines()
    if out.returncode != 0:
        raise SystemExit(f"{python}: exit {out.returncode}\n" + "\n".join(lines[-20:]))
    rss_kb, cpu_s = lines[-1].split()
    added = json.loads(out.stdout)["added"]
    res = {"wall_s": round(wall, 2), "cpu_s": round(float(cpu_s), 2), "peak_rss_mib": round(int(rss_kb) / 1024, 1), "added": added,
           "text_export": (bundle / "text-onnx" / "meta.json").exists()}
    print(bundle.name, json.dumps(res), file=sys.stderr, flush=True)  # (progress, in case of a timeout)
    return res


def first_run_main(args) -> None:
    import statistics

    pythons = {"this": sys.executable}
    if args.compare:
        pythons["compare"] = args.compare
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_phone_photos(args.keep or work / "photos", args.n)
        folder = work / "first-run"  # exactly the n photos (--keep may hold more)
        folder.mkdir()
        for p in paths:
            os.symlink(p, folder / p.name)
        runs: dict[str, list[dict]] = {k: [] for k in pythons}
        paths_of = {"this": None, "compare": args.compare_pythonpath}
        caches = args.cache_root or work
        cold = {
            k: first_run(py, args.model, folder, work / f"warmup-{k}", caches / f"cache-{k}", paths_of[k]) for k, py in pythons.items()
        }
        for rep in range(args.reps):  # interleaved, so both see the same load
            for k, py in pythons.items():
                runs[k].append(first_run(py, args.model, folder, work / f"bundle-{k}-{rep}", caches / f"cache-{k}", paths_of[k]))
    med = {
        k: {m: round(statistics.median(r[m] for r in rs), 2) for m in ("wall_s", "cpu_s", "peak_rss_mib")} | {"runs": rs}
        for k, rs in runs.items()
    }
    result = {
        "benchmark": "index_throughput.first_run",
        "model": args.model,
        "n_photos": len(paths),
        "photo": {"size": "4032x3024", "jpeg_quality": 90},
        "cpu_cores": cpu_count(),
        "pythons": pythons,
        "first_run_median": med,
        ("warm_up" if args.cache_root else "cold_cache"): cold,
    }
    if "compare" in med:
        result["this_over_compare"] = {m: round(med["this"][m] / med["compare"][m], 3) for m in ("wall_s", "cpu_s", "peak_rss_mib")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
