"""Cold start of `searchkit query TEXT` and `searchkit classify IMAGE` on a `mini` bundle.

    python bench/cold_start.py [--model mini] [--runs 5] [--n 2000] [--old /work/main/.venv/bin/searchkit]

Builds one bundle of `--n` random unit vectors with this checkout (as `searchkit index` would,
text-tower export included), then times fresh processes, `--runs` of each, interleaved:
  new            this checkout's `searchkit` (the torch-free text path: text-onnx/)
  new-no-onnx    the same without text-onnx/ (the fallback: the full model, text tower only)
  old            `--old` (another checkout's entry point) on a copy without text-onnx/, which is
                 what that checkout's own `index` leaves for `mini` (it exported open_clip only)
Wall seconds to exit and peak RSS (ru_maxrss of the child, from wait4). Prints one JSON object:
the median of the runs per variant. Targets (issue 13): cold query <= 1.5 s and <= 400 MB, cold
classify of one image <= 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query_latency import build_bundle  # noqa: E402


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one fresh process; exits on failure."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {err.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--old", default="/work/main/.venv/bin/searchkit", help="entry point of the checkout to compare with ('' to skip)")
    args = ap.parse_args()
    if args.build:
        build_bundle(Path(args.build), args.model, args.n)
        return
    new = str(Path(sys.executable).with_name("searchkit"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from PIL import Image  # PIL only: the parent stays small (see above)

        img = tmp / "photo.jpg"
        Image.effect_noise((224, 224), 64).convert("RGB").save(img)
        bundle = tmp / "with-onnx"
        # built in a child: Linux carries a process's peak RSS across fork+exec, so a parent that
        # had loaded the model would report its own peak for every child it starts
        subprocess.run([sys.executable, __file__, "--build", str(bundle), "--model", args.model, "--n", str(args.n)], check=True)
        if not (bundle / "text-onnx").is_dir():
            raise SystemExit("the text tower export was not written")
        plain = tmp / "no-onnx"
        shutil.copytree(bundle, plain)
        shutil.rmtree(plain / "text-onnx")
        env = {**os.environ, "SEARCHKIT_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        variants = {"new": (new, bundle), "new-no-onnx": (new, plain)}
        if args.old and Path(args.old).exists():
            variants["old"] = (args.old, plain)
        runs: dict[str, dict[str, list]] = {v: {"query_s": [], "query_mb": [], "classify_s": [], "classify_mb": []} for v in variants}
        for i in range(args.runs):
            for name, (exe, b) in variants.items():
                s, mb = timed([exe, "query", f"a dog on the beach {i}", "--index", str(b), "-k", "10", "--json"], env)
                runs[name]["query_s"].append(s)
                runs[name]["query_mb"].append(mb)
                s, mb = timed([exe, "classify", str(img), "--labels", "cat,dog,car", "--index", str(b), "--json"], env)
                runs[name]["classify_s"].append(s)
                runs[name]["classify_mb"].append(mb)
    print(json.dumps({
        "benchmark": "cold_start",
        "model": args.model,
        "runs": args.runs,
        "median": {v: {k: round(statistics.median(x), 2) for k, x in r.items()} for v, r in runs.items()},
        "all": {v: {k: [round(y, 2) for y in x] for k, x in r.items()} for v, r in runs.items()},
    }))


if __name__ == "__main__":
    main()
