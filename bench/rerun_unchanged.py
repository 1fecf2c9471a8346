"""Re-running `searchkit index` on an unchanged folder of N files (default 10k).

    python bench/rerun_unchanged.py [--n 10000]

Builds the bundle once with a tiny random model (the re-run never loads the model, so its cost
does not depend on it), then times `searchkit index` as a fresh process on the unchanged folder.
Prints one JSON object. Target (issue 4): <= 2 s for 10k files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from PIL import Image

    env = {**os.environ, "SEARCHKIT_OPENCLIP_CONFIGS": str(ROOT / "tests" / "assets" / "sk-tiny.json"), "SEARCHKIT_TEXT_ONNX": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        for i in range(args.n):
            sub = folder / f"{i // 1000:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(sub / f"{i:06d}.png")
        cmd = [sys.executable, "-m", "searchkit.cli", "index", str(folder), "--index", str(Path(tmp) / "b"), "--model", "open_clip:sk-tiny@random", "--json"]
        t = time.perf_counter()
        first = subprocess.run(cmd, capture_output=True, text=True, env=env)
        build_s = time.perf_counter() - t
        assert first.returncode == 0, first.stderr
        runs, last = [], None
        for _ in range(args.runs):
            t = time.perf_counter()
            last = subprocess.run(cmd, capture_output=True, text=True, env=env)
            runs.append(time.perf_counter() - t)
        summary = json.loads(last.stdout)
    print(
        json.dumps(
            {
                "benchmark": "rerun_unchanged",
                "n_files": args.n,
                "first_index_s": round(build_s, 1),
                "rerun_wall_s": [round(x, 2) for x in runs],
                "rerun_median_s": round(statistics.median(runs), 2),
                "rerun_summary": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
