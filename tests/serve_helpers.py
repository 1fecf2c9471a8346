"""A tiny served bundle shared by the serve tests (built once per test module), and a real
uvicorn server in a thread of the test process."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ASSETS, TINY, make_images, noise_image

ENV = {
    "SEARCHKIT_OPENCLIP_CONFIGS": str(ASSETS / "sk-tiny.json"),
    "SEARCHKIT_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "SEARCHKIT_TEXT_ONNX": "0",
}


@contextlib.contextmanager
def tiny_env(tmp: Path):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        mp.setenv("SEARCHKIT_CACHE", str(tmp / "cache"))
        yield


def build_bundles(tmp: Path) -> dict:
    """Bundle `main`: 6 photos (one rotated by EXIF, one symlink to a photo outside the folder, in
    a subfolder `sub/`) and a 3-line corpus; bundle `other`: 12 photos (ids main has not)."""
    import searchkit

    photos = tmp / "photos"
    make_images(photos, 4)
    make_images(photos / "sub", 1, start=4)
    rotated = noise_image(50, size=(60, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(photos / "rotated.jpg", exif=exif)
    outside = tmp / "outside"
    outside.mkdir()
    noise_image(77).save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", photos / "link.jpg")
    corpus = tmp / "notes.txt"
    corpus.write_text("a cat on a sofa\nthe quick brown fox\nred bicycle by a wall\n")
    with searchkit.open_index(tmp / "main", create=True, model=TINY) as idx:
        idx.add([photos, corpus])
    make_images(tmp / "more", 12, start=100)
    with searchkit.open_index(tmp / "other", create=True, model=TINY) as idx:
        idx.add([tmp / "more"])
    return {"main": tmp / "main", "other": tmp / "other", "photos": photos, "outside": outside, "corpus": corpus}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """`app` under a real uvicorn server on 127.0.0.1 (in a thread); yields its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
