"""Few-shot classification (examples fix what zero-shot gets wrong; saved classifiers; the example
cache), `eval fewshot`, and `eval zeroshot` on hundreds of classes under a memory cap."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from searchkit.errors import ModelMismatchError, UsageError
from searchkit.fewshot import FewShotClassifier
from searchkit.query import classify_images
from tests.conftest import TINY
from tests.test_train_eval import ColorEncoder

# yellows: zero-shot calls them red (nearer (255,0,0) than (0,255,0)); the examples say green
YELLOWS = [(250, 200, 0), (240, 210, 10), (255, 190, 5), (235, 205, 0), (250, 215, 15), (245, 195, 10)]
REDS = [(250, 5, 5), (240, 20, 10), (230, 0, 20), (255, 10, 0), (245, 15, 15), (235, 5, 10)]
BLUES = [(0, 0, 255), (20, 20, 230), (10, 0, 240), (5, 15, 250), (15, 5, 235), (0, 10, 245)]


def _write(folder, colors_by_label):
    from PIL import Image

    for label, colors in colors_by_label.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(colors):
            Image.new("RGB", (10, 10), c).save(folder / label / f"{i}.png")
    return folder


class CountingColors(ColorEncoder):
    calls = 0

    def encode_image_tensors(self, batch):
        CountingColors.calls += len(batch)
        return super().encode_image_tensors(batch)


def test_examples_fix_what_zero_shot_gets_wrong_and_the_classifier_round_trips(tmp_path):
    enc = CountingColors()
    ex = _write(tmp_path / "ex", {"red": REDS[:3], "green": YELLOWS[:3], "blue": BLUES[:3]})
    queries = _write(tmp_path / "q", {"x": YELLOWS[3:] + REDS[3:]})
    zero = classify_images(enc, [str(queries)], ["red", "green", "blue"], ["{}"])
    assert [r.label for r in zero] == ["red"] * 6  # sorted paths: the three yellows first
    few = classify_images(enc, [str(queries)], None, ["{}"], examples=ex)
    assert sorted(few[0].scores) == ["blue", "green", "red"]  # labels from the folder names
    assert [r.label for r in few] == ["green"] * 3 + ["red"] * 3

    clf = FewShotClassifier.fit(enc, ex, templates=["{}"])
    assert clf.examples == 9 and np.abs(clf.weights).max() > 0
    calls = CountingColors.calls
    FewShotClassifier.fit(enc, ex, templates=["{}"])
    assert CountingColors.calls == calls  # the examples came from the cache
    clf.save(tmp_path / "clf.npz")
    back = FewShotClassifier.load(tmp_path / "clf.npz")
    emb, feats = enc.encode_images_with_features([str(p) for p in sorted((queries / "x").iterdir())])
    np.testing.assert_array_equal(back.probabilities(emb, feats), clf.probabilities(emb, feats))
    assert [r.label for r in classify_images(enc, [str(queries)], None, examples=back)] == [r.label for r in few]

    back.fingerprint = "another model"
    with pytest.raises(ModelMismatchError):
        classify_images(enc, [str(queries)], None, examples=back)
    with pytest.raises(UsageError, match="not in --labels"):
        FewShotClassifier.fit(enc, ex, labels="red,blue")


def test_cli_classify_with_examples_and_eval_fewshot(tmp_path):
    from typer.testing import CliRunner

    from searchkit.cli.main import app
    from tests.conftest import make_images

    for label, start in (("cats", 0), ("dogs", 10)):
        make_images(tmp_path / "ds" / label, 6, start=start)
    runner = CliRunner()
    r = runner.invoke(app, ["classify", str(tmp_path / "ds" / "cats" / "img000.jpg"), "--examples", str(tmp_path / "ds"), "--model", TINY, "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["scores"]) == {"cats", "dogs"}
    r = runner.invoke(app, ["classify", str(tmp_path / "ds"), "--model", TINY])
    assert r.exit_code != 0 and "--labels" in r.output
    r = runner.invoke(app, ["eval", "fewshot", str(tmp_path / "ds"), "--shots", "1,2,4", "--draws", "3", "--model", TINY, "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["shots"]) == {"1", "2", "4"} and rep["images"] == 12 and 0 <= rep["zeroshot"] <= 100
    assert all(0 <= v["min"] <= v["mean"] <= v["max"] <= 100 for v in rep["shots"].values())
    assert (tmp_path / "o" / "fewshot-ds.png").read_bytes().startswith(b"\x89PNG")
    r = runner.invoke(app, ["eval", "fewshot", str(tmp_path / "ds"), "--shots", "0,2", "--model", TINY])
    assert r.exit_code != 0 and "at least 1" in r.output


def test_eval_fewshot_accuracy_on_colours(tmp_path):
    from searchkit.eval_fewshot import evaluate_fewshot

    ds = _write(tmp_path / "ds", {"red": REDS, "green": YELLOWS, "blue": BLUES})
    rep = evaluate_fewshot(ColorEncoder(), ds, shots=[1, 4], draws=3, templates=["{}"], plot=tmp_path / "f.png")
    assert rep.zeroshot == pytest.approx(100 * 12 / 18)  # every yellow is called red
    assert rep.shots[4]["mean"] == 100.0 and rep.shots[1]["mean"] > rep.zeroshot
    assert (tmp_path / "f.png").stat().st_size > 0


def _peak_mb(*args: str) -> tuple[int, str]:
    """(peak RSS MB, stdout) of a fresh `searchkit` process."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'searchkit.cli', *sys.argv[1:]], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr); sys.stdout.write(r.stdout)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
        "sys.exit(r.returncode)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    *out, peak = r.stdout.splitlines()
    return int(peak), "\n".join(out)


def test_eval_zeroshot_hundreds_of_classes_under_a_memory_cap(tmp_path):
    """300 classes cost at most 200 MB more than 3 (the old per-cell confusion plot alone was
    a 16,700-pixel-square figure with 90,000 texts, over 1 GB)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for n, name in ((3, "few"), (300, "many")):
        for i in range(n):
            (tmp_path / name / f"class{i:03d}").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / name / f"class{i:03d}" / "a.png")
    base_mb, _ = _peak_mb("eval", "zeroshot", str(tmp_path / "few"), "--model", TINY, "--out", str(tmp_path / "o"), "--json")
    peak_mb, out = _peak_mb("eval", "zeroshot", str(tmp_path / "many"), "--model", TINY, "--out", str(tmp_path / "o"), "--json")
    rep = json.loads(out)
    assert rep["images"] == 300 and rep["confusion"] is None and len(rep["most_confused"]) <= 20
    assert sum(rep["class_images"]) == 300
    assert (tmp_path / "o" / "zeroshot-many.png").read_bytes().startswith(b"\x89PNG")
    assert peak_mb < base_mb + 200, f"peak RSS {peak_mb} MB with 300 classes, {base_mb} MB with 3"


def test_centring_and_prior_by_hand():
    import torch

    from searchkit.fewshot import feature_scale, prior_weight, rescale

    # standardized features f = l2normalize((x - mean) / std) times std, renormalized, are
    # l2normalize(x - mean): x = (3, 4), mean 0, std (1, 2): f = (3, 2)/|.|; rescaled (3, 4)/5
    std = np.array([1.0, 2.0], np.float32)
    f = np.array([[3.0, 2.0]]) / 13**0.5
    np.testing.assert_allclose(rescale(f, std), [[0.6, 0.8]], atol=1e-6)
    np.testing.assert_array_equal(rescale(f, None), f.astype(np.float32))
    clf = FewShotClassifier(["a", "b"], np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
                            logit_scale=4.0, fingerprint="toy", scale=std, prior=0.5)
    # image emb (.6,.8): zero-shot 4*(.6,.8) at weight .5; features rescaled (.6,.8): probe 10*(.6, 1.6)
    np.testing.assert_allclose(clf.logits(np.array([[0.6, 0.8]]), f), [[1.2 + 6.0, 1.6 + 16.0]], atol=1e-5)
    with pytest.raises(ModelMismatchError, match="2-d features, these are 3-d"):
        clf.logits(np.array([[0.6, 0.8]]), np.ones((1, 3)))
    assert prior_weight(1) == 0.5 and prior_weight(3) == 0.25

    class Heads(torch.nn.Module):  # what DualEncoder holds: heads.image.std
        def __init__(self):
            super().__init__()
            self.image = torch.nn.Module()
            self.image.register_buffer("std", torch.tensor([1.0, 2.0]))

    enc = ColorEncoder()
    enc.heads = Heads()
    np.testing.assert_array_equal(feature_scale(enc, 2), std)
    assert feature_scale(enc, 3) is None and feature_scale(ColorEncoder(), 2) is None

    # fitting: the prior weight follows the examples per label; the examples are fitted
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]], np.float32)
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]], np.float32)
    fit = FewShotClassifier.from_embeddings(["a", "b"], clf.text, emb, feats, np.array([0, 1, 0, 1]), 4.0, "toy", std)
    assert fit.prior == prior_weight(2) and fit.scale is std
    assert (fit.logits(emb, feats).argmax(1) == [0, 1, 0, 1]).all()


def test_saved_classifier_keeps_scale_and_prior_and_reads_version_1(tmp_path):
    from searchkit.errors import InputError

    rng = np.random.default_rng(0)
    emb, feats = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    text = np.eye(3, 4, dtype=np.float32)
    scale = rng.uniform(0.5, 2, 5).astype(np.float32)
    clf = FewShotClassifier.from_embeddings(["a", "b", "c"], text, emb, feats, np.array([0, 0, 1, 1, 2, 2]), 10.0, "fp", scale)
    back = FewShotClassifier.load(clf.save(tmp_path / "c.npz"))
    np.testing.assert_array_equal(back.scale, scale)
    assert back.prior == clf.prior == 1 / 3 and back.labels == clf.labels
    np.testing.assert_array_equal(back.logits(emb, feats), clf.logits(emb, feats))
    plain = FewShotClassifier.from_embeddings(["a", "b", "c"], text, emb, feats, np.array([0, 0, 1, 1, 2, 2]), 10.0, "fp")
    assert FewShotClassifier.load(plain.save(tmp_path / "p.npz")).scale is None

    # a version-1 file (no scale, prior 1) reads back as what it computed
    meta = {"format": "searchkit.fewshot", "labels": ["a", "b", "c"], "logit_scale": 10.0, "fingerprint": "fp", "examples": 6}
    np.savez(tmp_path / "v1.npz", text=text, weights=clf.weights, meta=np.array(json.dumps(meta)))
    old = FewShotClassifier.load(tmp_path / "v1.npz")
    np.testing.assert_allclose(old.logits(emb, feats), 10.0 * emb @ text.T + 10.0 * feats @ clf.weights.T, rtol=1e-5, atol=1e-5)
    np.savez(tmp_path / "v9.npz", text=text, weights=clf.weights, meta=np.array(json.dumps({**meta, "version": 9})))
    with pytest.raises(InputError, match="format version 9 is newer"):
        FewShotClassifier.load(tmp_path / "v9.npz")


class WideColors(CountingColors):
    """Same fingerprint as ColorEncoder, other features (like mini's torch and ONNX towers)."""

    def encode_image_tensors_with_features(self, batch):
        emb = self.encode_image_tensors(batch)
        return emb, np.concatenate([emb, emb], axis=1) / 2**0.5


def test_example_cache_is_per_feature_kind(tmp_path):
    from searchkit.fewshot import embed_cached

    ex = _write(tmp_path / "ex", {"red": REDS[:2], "blue": BLUES[:2]})
    paths = [str(p) for p in sorted(ex.rglob("*.png"))]
    assert embed_cached(ColorEncoder(), paths)[1].shape == (4, 3)
    assert WideColors().fingerprint == ColorEncoder().fingerprint
    assert embed_cached(WideColors(), paths)[1].shape == (4, 6)  # not the cached 3-d rows


def test_tiny_open_clip_fits_its_examples(tmp_path):
    from searchkit.encoders import get_encoder
    from searchkit.fewshot import prior_weight
    from tests.conftest import make_images

    for label, start in (("cats", 0), ("dogs", 10)):
        make_images(tmp_path / "ds" / label, 4, start=start)
    enc = get_encoder(TINY)
    clf = FewShotClassifier.fit(enc, tmp_path / "ds")
    assert clf.scale is None and clf.prior == prior_weight(4)  # open_clip: features are the embeddings
    paths = [str(p) for label in ("cats", "dogs") for p in sorted((tmp_path / "ds" / label).iterdir())]
    assert (clf.logits(*enc.encode_images_with_features(paths)).argmax(1) == [0] * 4 + [1] * 4).all()
