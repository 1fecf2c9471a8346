"""Randomized fault injection: SIGKILL `searchkit index` at random moments, re-run, check.

    nice -n 10 python bench/faults.py --trials 20 [--seed 0] [--images 24] [--docs 20]

Each trial builds a fresh bundle from the same inputs (images + a CSV corpus, tiny random
model, text-tower export on) in a child process that kills itself with SIGKILL at a moment
drawn at random: a random time within a clean run's duration, or an event (inside or right
after the k-th meta.db commit, a rename of the final save or of the export, an open inside the
export's temporary folder). A third of the trials are killed twice before the completing
re-run. The re-run (in this process) must reach a clean run's exact state: tests/faultlib.py
`snapshot` and `compare` list the invariants (same items and vectors, no duplicates, FAISS
ids = meta.db ids, saved at the database generation, every image finds itself first, no
temporary left), the export is current, and a further run does nothing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import faultlib  # noqa: E402

TINY = "open_clip:sk-tiny@random"
BATCH = 4


def make_inputs(root: Path, n_images: int, n_docs: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    (root / "p").mkdir(parents=True)
    for i in range(n_images):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "p" / f"img{i:03d}.jpg")
    (root / "docs.csv").write_text("text\n" + "".join(f"document number {i}\n" for i in range(n_docs)))
    return [root / "p", root / "docs.csv"]


def child(moment: str, bundle: Path, inputs: list[Path], env: dict) -> tuple[int, float]:
    cmd = [sys.executable, str(ROOT / "tests" / "faultlib.py"), moment, "--", "index", *map(str, inputs)]
    cmd += ["--index", str(bundle), "--model", TINY, "--batch-size", str(BATCH), "--json"]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, time.perf_counter() - t


def draw(rng: random.Random, clean_seconds: float, n_commits: int) -> str:
    kind = rng.choice(["time", "time", "commit", "after-commit", "rename", "open"])
    if kind == "time":
        return f"time:{rng.uniform(0.5, clean_seconds):.2f}"
    if kind in ("commit", "after-commit"):
        return f"{kind}:{rng.randint(1, n_commits)}"
    if kind == "rename":
        return f"rename:{rng.choice(['image.faiss', 'text.faiss', 'manifest.json', 'text-onnx'])}"
    return "open:.text-onnx-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--docs", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    env = {
        **os.environ,
        "SEARCHKIT_OPENCLIP_CONFIGS": str(ROOT / "tests" / "assets" / "sk-tiny.json"),
        "SEARCHKIT_DEVICE": "cpu",
        "SEARCHKIT_TEXT_ONNX": "1",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    import searchkit
    from searchkit.encoders.onnx import OnnxTextEncoder

    fingerprint = searchkit.get_encoder(TINY).fingerprint
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = make_inputs(tmp, args.images, args.docs)
        rc, clean_seconds = child("none", tmp / "clean", inputs, env)  # the reference, and its duration
        assert rc == 0, f"the clean run failed ({rc})"
        reference = faultlib.snapshot(tmp / "clean")
        n_commits = 4 + args.images // BATCH + args.docs // 8  # about how many this run makes
        outcomes: Counter = Counter()
        by_moment: Counter = Counter()
        failures = []
        for trial in range(args.trials):
            bundle = tmp / f"t{trial}"
            kills = []
            for _ in range(2 if rng.random() < 1 / 3 else 1):
                moment = draw(rng, clean_seconds, n_commits)
                rc, _ = child(moment, bundle, inputs, env)
                kills.append((moment, "killed" if rc == -signal.SIGKILL else f"exit {rc}"))
                by_moment[moment.split(":")[0]] += rc == -signal.SIGKILL
            with searchkit.open_index(bundle, create=True, model=TINY) as idx:
                idx.add(inputs, batch_size=BATCH)
            problems = faultlib.compare(faultlib.snapshot(bundle), reference)
            if not OnnxTextEncoder.matches(bundle / "text-onnx", fingerprint):
                problems.append("text-onnx/ missing or stale after the re-run")
            with searchkit.open_index(bundle, create=True) as idx:
                s = idx.add(inputs, batch_size=BATCH)
            if s.added or s.updated or s.removed:
                problems.append(f"a further run changed something: {s.to_dict()}")
            killed = any(r == "killed" for _, r in kills)
            outcomes["failed" if problems else "recovered" if killed else "moment not reached"] += 1
            if problems:
                failures.append({"trial": trial, "kills": kills, "problems": problems[:5]})
    print(
        json.dumps(
            {
                "trials": args.trials,
                "seed": args.seed,
                "images": args.images,
                "docs": args.docs,
                "clean_run_seconds": round(clean_seconds, 2),
                "outcomes": dict(outcomes),
                "kills_by_moment": dict(by_moment),
                "failures": failures,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
