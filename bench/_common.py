"""Shared helpers for the benchmarks (not part of the library)."""

from __future__ import annotations

import resource
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLICKR = SHARED / "flickr8k"


def require_data(path: Path = FLICKR) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} is missing: this benchmark needs ../shared/data (see its README)")
    return path


def flickr_images(n: int) -> list[Path]:
    return sorted((require_data() / "images").glob("*.jpg"))[:n]


def make_phone_photos(dest: Path, n: int, size=(4032, 3024), quality: int = 90) -> list[Path]:
    """Upscale Flickr8k images to 12 MP JPEGs (q90), like full-size phone pictures."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(flickr_images(n)):
        p = dest / f"photo{i:05d}.jpg"
        if not p.exists():
            Image.open(src).convert("RGB").resize(size, Image.BICUBIC).save(p, quality=quality)
        out.append(p)
    return out


def peak_rss_mb(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


#: runs argv and prints its peak RSS (KB) on stderr's last line. A child forked straight from a
#: benchmark that holds a model would count the parent's pages in its own ru_maxrss; forked
#: from this small process, it counts only its own.
RSS_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def run_measured(cmd: list[str], **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True) plus the command's own peak RSS in MB."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True, **kwargs)
    lines = out.stderr.rstrip().splitlines()
    rss = int(lines[-1]) / 1024.0 if lines and lines[-1].isdigit() else float("nan")
    out.stderr = "\n".join(lines[:-1])
    return out, rss


def cpu_count() -> int:
    """The cores the benchmark may use (searchkit's own count)."""
    from searchkit.machine import cpu_cores

    return cpu_cores()


def stratified_folds(truth, n_classes: int, k: int = 5, seed: int = 0) -> list:
    """(train, test) index arrays of a k-fold split in which each class is spread evenly over
    the folds (seeded), for the few-shot benchmarks' cross-validation ceilings."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fold = np.empty(len(truth), dtype=np.int64)
    for c in range(n_classes):
        ix = np.flatnonzero(truth == c)
        fold[rng.permutation(ix)] = np.arange(len(ix)) % k
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]
