"""The fp32 ONNX Runtime image tower and the export cache (encoders/onnx_image.py, export_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import TINY, make_images, noise_image

from searchkit.encoders import export_cache
from searchkit.encoders.onnx_image import KIND, OnnxImageEncoder, export_image_tower, preprocess_of


@pytest.fixture
def tiny_torch():
    from searchkit.encoders.openclip import load_open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_open_clip(TINY.partition(":")[2], "cpu")


def test_numpy_preprocess_matches_torchvision(tiny_torch):
    pre = preprocess_of(tiny_torch._preprocess)
    assert pre is not None
    for size in [(64, 48), (48, 64), (33, 200), (20, 12), (32, 32)]:
        img = noise_image(sum(size), size)
        ref = tiny_torch.preprocess(img).numpy()
        np.testing.assert_allclose(pre(img), ref, atol=1e-5)


def test_onnx_image_tower_matches_torch_and_is_cached(tiny_torch, tmp_path):
    folder = export_cache.build(KIND, tiny_torch.fingerprint, lambda tmp: export_image_tower(tiny_torch, tmp))
    enc = OnnxImageEncoder(folder, lambda: pytest.fail("the torch model must not be needed for images"))
    assert (enc.spec, enc.fingerprint, enc.dim, enc.image_size) == (
        tiny_torch.spec, tiny_torch.fingerprint, tiny_torch.dim, tiny_torch.image_size
    )
    paths = make_images(tmp_path / "imgs", 7)
    a, b = enc.encode_images(paths), tiny_torch.encode_images(paths)
    assert a.dtype == np.float32 and a.shape == b.shape
    assert (a * b).sum(axis=1).min() >= 0.9999
    # the index pipeline's compact (uint8) decode form gives the very same embeddings
    from searchkit.images import load_image

    imgs = [load_image(p, draft_size=enc.image_size) for p in paths]
    compact = np.stack([enc.preprocess_compact(im) for im in imgs])
    assert compact.dtype == np.uint8 and compact.shape == (7, enc.image_size, enc.image_size, 3)
    np.testing.assert_array_equal(enc.encode_image_tensors(compact), enc.encode_image_tensors(np.stack([enc.preprocess(im) for im in imgs])))
    # a batch runs as one-thread streams, a slice each: the same rows, in their order
    enc._streams = 3
    one_by_one = np.concatenate([enc.encode_image_tensors(compact[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(enc.encode_image_tensors(compact), one_by_one, atol=1e-5)
    # a second build finds the entry instead of exporting again
    assert export_cache.build(KIND, tiny_torch.fingerprint, lambda tmp: pytest.fail("exported twice")) == folder


def test_export_cache_is_crash_safe(tmp_path):
    fp = "some-model"
    folder = export_cache.entry("things", fp)
    folder.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = folder.parent / f".{folder.name}-{int(dead.stdout)}-abc"
    leftover.mkdir()
    (leftover / "half.onnx").write_bytes(b"x")
    folder.mkdir()  # a torn entry: no meta.json, so it does not exist
    (folder / "x.onnx").write_bytes(b"y")
    assert export_cache.lookup("things", fp) is None

    def make(tmp):
        (tmp / "a.onnx").write_bytes(b"data")
        (tmp / "meta.json").write_text(json.dumps({"ok": True}))
        return True

    assert export_cache.build("things", fp, make) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["a.onnx", "meta.json"]
    assert not leftover.exists()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []
    # linked into a bundle: the same file, and the bundle keeps it when the cache goes
    dest = tmp_path / "bundle" / "things"
    dest.parent.mkdir()
    export_cache.link_into(folder, dest)
    assert os.path.samefile(dest / "a.onnx", folder / "a.onnx")
    # a model with no such export is remembered, and not asked again
    assert export_cache.build("things", "other", lambda tmp: False) is None
    assert export_cache.build("things", "other", lambda tmp: pytest.fail("asked twice")) is None


def test_warm_cache_index_run_never_imports_torch(tiny_torch, tmp_path):
    """With the model's exports cached, a fresh process indexes images into a new bundle, and
    gets its text export linked from the cache, without importing torch."""
    folder = export_cache.build(KIND, tiny_torch.fingerprint, lambda tmp: export_image_tower(tiny_torch, tmp))
    from searchkit.encoders.onnx import _export_text_tower

    export_cache.build("text-onnx", tiny_torch.fingerprint, lambda tmp: _export_text_tower(tiny_torch, tmp))
    make_images(tmp_path / "imgs", 5)
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); import searchkit\n"
        f"idx = searchkit.open_index({str(tmp_path / 'b')!r}, create=True, model={TINY!r})\n"
        f"s = idx.add([{str(tmp_path / 'imgs')!r}])\n"
        "hits = idx.search('a red square', k=2)\n"
        "print(s.added, len(hits), type(idx.encoder).__name__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "SEARCHKIT_TEXT_ONNX": "1"}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "2", "OnnxImageEncoder", "False"]
    cached = export_cache.lookup("text-onnx", tiny_torch.fingerprint)
    assert os.path.samefile(tmp_path / "b" / "text-onnx" / "text.onnx", cached / "text.onnx")
    # the bundle's vectors agree with the torch model's
    import searchkit

    first = sorted((tmp_path / "imgs").iterdir())[0]
    with searchkit.open_index(tmp_path / "b") as idx:
        assert len(idx.vectors("image")) == 5
        hit = idx.search(tiny_torch.encode_images([first]), k=1)[0]
        assert hit.path == str(first) and hit.score >= 0.9999
    assert folder.exists()


def test_image_onnx_can_be_turned_off(tmp_path, monkeypatch):
    from searchkit.encoders import onnx_image

    monkeypatch.setenv("SEARCHKIT_IMAGE_ONNX", "0")
    assert not onnx_image.enabled("cpu")
    monkeypatch.delenv("SEARCHKIT_IMAGE_ONNX")
    assert onnx_image.enabled("cpu") and not onnx_image.enabled("cuda")


def test_default_device_needs_no_torch_without_a_gpu_driver(monkeypatch):
    from searchkit.encoders.base import _cuda_driver_absent

    if not _cuda_driver_absent():
        pytest.skip("this machine has a GPU driver: torch is asked")
    env = {k: v for k, v in os.environ.items() if k != "SEARCHKIT_DEVICE"}
    code = "import sys; from searchkit.encoders.base import default_device; print(default_device(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["cpu", "False"], out.stderr
