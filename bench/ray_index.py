"""The cost of the ray engine: local engine vs `--engine ray` on this machine, in one run.

    nice -n 10 python bench/ray_index.py [--n 32] [--model open_clip:ViT-B-32@random]

Same 12 MP phone photos as bench/index_throughput.py (Flickr8k upscaled to 4032x3024, q90).
Each engine indexes the folder into a fresh bundle with the model already loaded in the driver;
the ray engine on a local Ray instance started here (all cores), twice: the first run also
starts Ray's worker processes, the second finds them (its encoder actors still start afresh).
For each run: wall seconds, images/s overall and in steady state (first commit to last), and
per-stage seconds: the driver's wait, encode and write; for ray also the CPU seconds the decode
tasks and encoder actors spent, per image, which is what the README's cluster estimate uses.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_count, make_phone_photos  # noqa: E402


class StageLog(logging.Handler):
    """Catches pipeline's end-of-run 'stage seconds' record (read-wait, encode, write)."""

    def __init__(self):
        super().__init__()
        self.stages: dict = {}

    def emit(self, record):
        if record.msg.startswith("stage seconds"):
            self.stages = dict(zip(("read_wait", "encode", "write"), (round(x, 2) for x in record.args)))


def one_run(spec: str, folder: Path, bundle: Path, engine, stage_log: StageLog, batch_size: int) -> dict:
    import searchkit

    commits: list[tuple[float, int]] = []
    done = 0

    def progress(advance, total):
        nonlocal done
        done += advance
        if advance:
            commits.append((time.perf_counter(), done))

    with searchkit.open_index(bundle, create=True, model=spec) as idx:
        t = time.perf_counter()
        s = idx.add([folder], engine=engine, progress=progress, batch_size=batch_size)
        wall = time.perf_counter() - t
    first_t, first_n = commits[0]
    last_t, last_n = commits[-1]
    out = {
        "seconds": round(wall, 2),
        "images_per_s": round(s.added / wall, 2),
        "first_commit_s": round(first_t - t, 2),
        "steady_images_per_s": round((last_n - first_n) / (last_t - first_t), 2) if last_t > first_t else None,
        "added": s.added,
        "driver_stages_s": stage_log.stages,
    }
    if not isinstance(engine, str):
        ct = engine.cluster_times
        out["cluster_cpu_s"] = {k: round(v, 2) for k, v in ct.items()}
        out["per_image_ms"] = {k: round(1000 * v / max(1, s.added), 1) for k, v in ct.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--model", default="open_clip:ViT-B-32@random")
    ap.add_argument("--batch-size", type=int, default=8, help="images per model call and per commit (both engines)")
    ap.add_argument("--keep", type=Path, help="reuse/keep the generated photos in this folder")
    args = ap.parse_args()

    warnings.filterwarnings("ignore", message=".*randomly initialised")
    os.environ["SEARCHKIT_TEXT_ONNX"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    stage_log = StageLog()
    logging.getLogger("searchkit.pipeline").addHandler(stage_log)
    logging.getLogger("searchkit.pipeline").setLevel(logging.INFO)
    import ray
    import torch

    import searchkit
    from searchkit.pipeline_ray import RayEngine

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = args.keep or work / "photos"
        t = time.perf_counter()
        paths = make_phone_photos(folder, args.n)
        make_s = time.perf_counter() - t
        searchkit.get_encoder(args.model)  # loaded once in the driver, as `searchkit index` does
        local = one_run(args.model, folder, work / "local", "local", stage_log, args.batch_size)
        t = time.perf_counter()
        ray.init(address="local", num_cpus=cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, object_store_memory=256 << 20)
        ray_init_s = time.perf_counter() - t
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            ray_cold = one_run(args.model, folder, work / "ray1", RayEngine(), stage_log, args.batch_size)
            ray_warm = one_run(args.model, folder, work / "ray2", RayEngine(), stage_log, args.batch_size)
        finally:
            ray.shutdown()
    print(
        json.dumps(
            {
                "benchmark": "ray_index",
                "model": args.model,
                "n_photos": len(paths),
                "photo": {"size": "4032x3024", "jpeg_quality": 90, "generate_s": round(make_s, 1)},
                "cpu_cores": cpu_count(),
                "torch_threads_driver": torch.get_num_threads(),
                "local": local,
                "ray_init_s": round(ray_init_s, 2),
                "ray_first_run": ray_cold,
                "ray_second_run": ray_warm,
                "ray_over_local": round(ray_warm["images_per_s"] / local["images_per_s"], 3),
                "ray_over_local_steady": round(ray_warm["steady_images_per_s"] / local["steady_images_per_s"], 3)
                if ray_warm["steady_images_per_s"] and local["steady_images_per_s"] else None,
            }
        )
    )


if __name__ == "__main__":
    main()
