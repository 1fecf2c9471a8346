"""Shared fixtures: a tiny random open_clip model registered through open_clip's own config
mechanism, an isolated $SEARCHKIT_HOME, and generated image files of every format and mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ASSETS = Path(__file__).parent / "assets"
TINY = "open_clip:sk-tiny@random"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHKIT_HOME", str(tmp_path / "indexes"))
    monkeypatch.setenv("SEARCHKIT_OPENCLIP_CONFIGS", str(ASSETS / "sk-tiny.json"))
    monkeypatch.setenv("SEARCHKIT_DEVICE", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SEARCHKIT_CACHE", str(tmp_path / "cache"))
    # exporting the text tower for torch-free queries costs seconds; tests/test_onnx.py turns it on
    monkeypatch.setenv("SEARCHKIT_TEXT_ONNX", "0")
    monkeypatch.chdir(tmp_path)


def solid(color, size=(48, 40)):
    from PIL import Image

    return Image.new("RGB", size, color)


def noise_image(seed: int, size=(64, 48)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_images(folder: Path, n: int, start: int = 0, ext: str = "jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.{ext}"
        noise_image(i).save(p)
        paths.append(p)
    return paths


def run_cli(*args: str, env: dict | None = None, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """The real `searchkit` entry point in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "searchkit.cli", *args], capture_output=True, text=True, env=full_env, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc
