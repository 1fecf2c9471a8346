"""Shared helpers for the benchmarks (not part of the library)."""

from __future__ import annotations

import os
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


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
