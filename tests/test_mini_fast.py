"""`mini` and trained checkpoints: torch-free text queries (exact), towers loaded only when used,
ConSE class prompts read from the checkpoint instead of embedded at every load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import searchkit
from tests.conftest import make_images
from tests.test_onnx import TRICKY, needs_mini_towers

pytestmark = needs_mini_towers


@pytest.fixture
def mini_text_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHKIT_TEXT_ONNX", "1")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat on a sofa\nthe dog runs on the beach\na red car\n")
    with searchkit.open_index("m", create=True, model="mini") as idx:
        idx.add([corpus])
    return tmp_path / "indexes" / "m"


def test_mini_text_export_is_exact_and_cold_query_is_torch_free(mini_text_bundle):
    from searchkit.encoders.onnx import OnnxTextEncoder

    folder = mini_text_bundle / "text-onnx"
    enc = searchkit.get_encoder("mini")
    assert OnnxTextEncoder.matches(folder, enc.fingerprint)
    onnx = OnnxTextEncoder(folder)
    texts = [*TRICKY, "word " * 400]  # the last one is cut at MiniLM's 128 tokens on both paths
    tok = enc.text_tower.tokenizer(texts, padding="max_length", truncation=True, max_length=128)["input_ids"]
    np.testing.assert_array_equal(onnx.tokenize(texts), np.asarray(tok))
    np.testing.assert_allclose(onnx.encode_texts(texts), enc.encode_texts(texts), atol=1e-5)

    code = (
        "import sys; from searchkit.cli.main import app\n"
        "try:\n    app(['query', 'a dog on the sand', '--index', 'm', '--kind', 'text', '--json'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('LOADED', *(m in sys.modules for m in ('torch', 'transformers', 'timm')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert json.loads(lines[0])["text"] == "the dog runs on the beach"
    assert lines[-1] == "LOADED False False False"


def test_towers_load_only_when_used_and_conse_comes_from_the_checkpoint(tmp_path):
    import torch
    from safetensors.torch import save_file

    from searchkit.encoders.mini import CONSE_FILE, MINI_DIR, DualEncoder, load_class_text

    shipped = load_class_text(MINI_DIR)
    assert shipped is not None and tuple(shipped.shape) == (1000, 384)
    # a checkpoint whose stored class prompts differ: loading must use them, not embed its own
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "heads.safetensors"):
        shutil.copy(MINI_DIR / name, ckpt / name)
    stored = torch.nn.functional.normalize(torch.randn(1000, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    save_file({"class_text": stored}, str(ckpt / CONSE_FILE))
    enc = DualEncoder(ckpt, str(ckpt), "cpu")
    assert enc.image_size == 224 and enc._image_tower is None and enc._text_tower is None
    paths = make_images(tmp_path / "p", 2)
    emb = enc.encode_images(paths)
    assert emb.shape == (2, 256) and enc._text_tower is None  # an image call builds no text tower
    assert torch.equal(enc.image_tower.class_text, stored)
    enc.encode_texts(["a dog"])
    assert enc._text_tower is not None
    text_only = DualEncoder(MINI_DIR, "mini", "cpu")
    text_only.encode_texts(["a dog"])
    assert text_only._image_tower is None  # a text call builds no image tower


def test_shipped_conse_prompts_are_what_minilm_computes():
    from searchkit.encoders.mini import MINI_DIR, load_class_text
    from searchkit.encoders.towers import conse_class_text

    np.testing.assert_allclose(load_class_text(MINI_DIR).numpy(), conse_class_text("cpu").numpy(), atol=1e-6)


def test_cold_mini_classify_is_torch_free_and_scores_as_the_torch_model(tmp_path, monkeypatch):
    """The image export carries the tower's class probabilities and the text export its pre-head
    features, so ConSE zero-shot runs on ONNX Runtime alone, with the torch model's figures."""
    from searchkit.encoders import export_cache, onnx_image
    from searchkit.encoders.mini import load_mini
    from searchkit.encoders.onnx import OnnxTextEncoder
    from searchkit.images import load_image
    from searchkit.zeroshot import DEFAULT_TEMPLATES

    monkeypatch.setenv("SEARCHKIT_TEXT_ONNX", "1")
    paths = make_images(tmp_path / "imgs", 3)
    with searchkit.open_index("m", create=True, model="mini") as idx:
        idx.add([tmp_path / "imgs"])  # leaves text-onnx/ in the bundle
    bundle = tmp_path / "indexes" / "m"
    torch_enc = load_mini("", "cpu")
    onnx_enc = onnx_image.load(torch_enc.fingerprint, lambda: torch_enc)  # exported now unless cached
    folder = export_cache.lookup(onnx_image.KIND, torch_enc.fingerprint)
    assert isinstance(onnx_enc, onnx_image.OnnxImageEncoder) and (folder / "class_names.safetensors").is_file()
    text = OnnxTextEncoder(bundle / "text-onnx")
    assert text.has_text_features
    labels = ["daisy", "sports car", "tabby cat"]
    images = [load_image(p, draft_size=torch_enc.image_size) for p in paths]
    want = torch_enc.zeroshot_scorer(labels, DEFAULT_TEMPLATES)(images)
    got = onnx_enc.zeroshot_scorer(labels, DEFAULT_TEMPLATES, text_encoder=text)(images)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # few-shot compares examples by the same standardized tower features on both paths
    from searchkit.fewshot import feature_scale

    (e1, f1), (e2, f2) = onnx_enc.encode_images_with_features(images), torch_enc.encode_images_with_features(images)
    assert f1.shape == f2.shape == (3, 1664)
    np.testing.assert_allclose(f1, f2, atol=1e-4)
    np.testing.assert_allclose(e1, e2, atol=1e-4)
    np.testing.assert_array_equal(feature_scale(onnx_enc, 1664), feature_scale(torch_enc, 1664))

    code = (
        "import sys; from searchkit.cli.main import app\n"
        f"try:\n    app(['classify', {str(paths[1])!r}, '--index', 'm', '--labels', {','.join(labels)!r}, '--json'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('LOADED', *(m in sys.modules for m in ('torch', 'transformers', 'timm')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    row = json.loads(lines[0])
    np.testing.assert_allclose([row["scores"][lab] for lab in labels], want[1], atol=1e-4)
    assert lines[-1] == "LOADED False False False"
