"""Fusion classifiers: learning what needs both modalities, missing inputs, save/load, reports,
plots, the `fusion` commands and their one-line errors.

The data set is generated: an image is a noisy patch of one colour, a text names a colour among
other words, and the label says whether the two colours agree. Every image colour and every
colour word occurs equally often under both labels, so neither side alone can beat chance.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.fusion import register
from searchkit.encoders import Encoder, get_encoder, l2_normalize, register_family
from searchkit.encoders.base import stack_batch
from searchkit.errors import InputError, ModelMismatchError, UnknownModelError, UsageError
from searchkit.fusion import (
    FusionConfig,
    ablate,
    evaluate_model,
    extract_features,
    load_model,
    predict_one,
    read_rows,
    train_fusion,
)
from tests.conftest import ASSETS, SHARED_DATA, TINY

COLOURS = {"red": (215, 35, 35), "green": (35, 190, 50), "blue": (40, 50, 215)}
ADJECTIVES = ["small", "big", "shiny", "old", "plain", "striped"]
NOUNS = ["ball", "car", "cup", "box", "hat", "kite"]
PNG = b"\x89PNG\r\n\x1a\n"


def write_colour_data(folder: Path, per_pair: int, seed: int) -> Path:
    """image,text,label rows; label = match iff the image colour is the colour word."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = []
    for ci, colour in enumerate(names):
        for j in range(per_pair):
            for match in (True, False):
                word = colour if match else names[(ci + 1 + j % 2) % 3]
                pixels = np.asarray(COLOURS[colour])[None, None] + noise.normal(0, 25, (36, 44, 3))
                name = f"img{len(rows):04d}.png"
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
                text = f"a {rng.choice(ADJECTIVES)} {word} {rng.choice(NOUNS)}"
                rows.append({"image": name, "text": text, "label": "match" if match else "no-match"})
    path = folder / "data.csv"
    write_csv(path, rows)
    return path


def write_csv(path: Path, rows: list[dict], fields=("image", "text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(fields))
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("colours")
    return write_colour_data(root / "train", 20, seed=1), write_colour_data(root / "eval", 10, seed=2)


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny():
    return get_encoder(TINY)


# --- learning ------------------------------------------------------------------------------------


def test_fusion_learns_what_no_single_modality_can(colour_data, tiny, tmp_path):
    train_csv, eval_csv = colour_data
    result = ablate(
        read_rows(train_csv),
        tiny,
        eval_rows=read_rows(eval_csv),
        config=FusionConfig(epochs=25, input_dropout=0.0),  # 32-d toy features: no feature noise
        out=tmp_path / "ablation",
    )
    acc = {r.name: r.accuracy for r in result.runs}
    assert set(acc) == {"text-only", "image-only", "both-concat-plain", "both-concat", "both-gated", "both-attention"}
    assert acc["text-only"] <= 65 and acc["image-only"] <= 65, acc
    for method in ("concat", "gated", "attention"):
        assert acc[f"both-{method}"] >= 85, acc
    # the table is written as Markdown and JSON
    md = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| both-gated | both | gated |" in md and "acc. image dropped %" in md
    data = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert data["best"].startswith("both-") and len(data["runs"]) == 6


# --- missing modalities --------------------------------------------------------------------------


def test_missing_image_or_text_trains_and_predicts(colour_data, tiny, tmp_path):
    train_csv, eval_csv = colour_data
    rows = read_csv(train_csv)
    for i, row in enumerate(rows):  # every 5th row lacks its image, every 7th its text
        if i % 5 == 0:
            row["image"] = ""
        elif i % 7 == 0:
            row["text"] = "   "
    holey = write_csv(train_csv.parent / "holey.csv", rows)
    data = read_rows(holey)
    assert data.images[0] is None and data.texts[7] is None and data.texts[0] is not None
    model = train_fusion(data, tiny, FusionConfig(method="gated", epochs=20))
    assert evaluate_model(model, tiny, read_rows(eval_csv)).accuracy >= 80

    # a missing side goes through the learned placeholder: the same answer however it is missing
    evald = read_rows(eval_csv)
    text_only = predict_one(model, tiny, text=evald.texts[0])
    no_image_row = write_csv(tmp_path / "one.csv", [{"image": "", "text": evald.texts[0], "label": "match"}])
    probs = model.predict_proba(model.features(tiny, read_rows(no_image_row)))[0]
    assert np.allclose(list(text_only.probabilities.values()), probs, atol=1e-5)
    image_only = predict_one(model, tiny, image=evald.images[0])
    assert image_only.text is None and abs(sum(image_only.probabilities.values()) - 1) < 1e-4
    with pytest.raises(UsageError):
        predict_one(model, tiny)
    # dropping a side at prediction time runs, and costs accuracy on this task
    dropped = evaluate_model(model, tiny, evald, drop="image")
    assert dropped.dropped == "image" and dropped.accuracy <= 70


def test_single_modality_model_ignores_the_other_side(colour_data, tiny):
    train_csv, _ = colour_data
    model = train_fusion(read_rows(train_csv), tiny, FusionConfig(modality="text", epochs=3))
    a = predict_one(model, tiny, text="a big red ball", image=str(train_csv.parent / "img0000.png"))
    b = predict_one(model, tiny, text="a big red ball")
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


# --- saving, features ----------------------------------------------------------------------------


def test_save_load_round_trip(colour_data, tiny, tmp_path):
    train_csv, eval_csv = colour_data
    model = train_fusion(read_rows(train_csv), tiny, FusionConfig(method="attention", epochs=3))
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "searchkit.fusion" and cfg["method"] == "attention" and cfg["modality"] == "both"
    assert cfg["encoder"] == {"spec": TINY, "fingerprint": tiny.fingerprint, "dim": tiny.dim}
    assert cfg["labels"] == ["match", "no-match"] and len(cfg["history"]) == 3
    loaded = load_model(tmp_path / "m")
    rows = read_rows(eval_csv)
    before = model.predict_proba(model.features(tiny, rows))
    after = loaded.predict_proba(loaded.features(tiny, rows))
    np.testing.assert_allclose(before, after, atol=1e-6)


def test_features_are_cached_by_content_and_shared_between_rows(colour_data, tiny, tmp_path, monkeypatch):
    train_csv, _ = colour_data
    rows = read_rows(train_csv)
    twice = rows.subset(list(range(6)) + list(range(6)))
    feats = extract_features(tiny, twice, tokens=True)
    assert len(feats.image) == 6 and (feats.image_index[:6] == feats.image_index[6:]).all()
    assert feats.image_tokens.shape == (6, 16, tiny.dim) and feats.text_mask[:, 0].all()
    calls = []
    monkeypatch.setattr(type(tiny), "encode_image_tensors", lambda self, b: calls.append(len(b)) or 1 / 0)
    again = extract_features(tiny, twice, tokens=True)  # all from the cache: the model is never called
    assert calls == [] and np.array_equal(again.image, feats.image)


def test_token_adapters_share_the_pooled_pass(colour_data, tiny, tmp_path):
    """open_clip and trained dual encoders (frozen towers + heads): hooked tokens, exact pooled."""
    import torch

    from searchkit.encoders.mini import HeadSpec, build_heads, head_config, save_checkpoint
    from searchkit.fusion.tokens import token_adapter

    image_head, text_head = HeadSpec(tiny.dim, 8), HeadSpec(tiny.dim, 8)
    save_checkpoint(
        tmp_path / "dual",
        build_heads(image_head, text_head),
        {"image_tower": TINY, "text_tower": TINY, **head_config(image_head, text_head)},
    )
    rows = read_rows(colour_data[0])
    for enc in (tiny, get_encoder(str(tmp_path / "dual"))):
        adapter = token_adapter(enc)
        batch = torch.as_tensor(stack_batch([enc.preprocess(Image.open(p).convert("RGB")) for p in rows.images[:3]]))
        pooled, tokens = adapter.pooled_and_image_tokens(batch)
        np.testing.assert_allclose(pooled, enc.encode_image_tensors(batch), atol=1e-6)
        np.testing.assert_allclose(tokens, adapter.image_tokens(batch), atol=1e-5)
        assert tokens.shape == (3, 16, tokens.shape[-1])
        texts = adapter.text_tokens(["a red cup", "a big shiny green kite"])
        assert len(texts[1]) > len(texts[0]) >= 3
    model = train_fusion(rows, enc, FusionConfig(method="attention", epochs=2))
    assert model.spec.image_token_dim == tokens.shape[-1] and model.encoder_spec == enc.spec


class _NoTokenEncoder(Encoder):
    """A deterministic encoder without token access: mean colour / bag of hashed words."""

    spec, dim, image_size = "sk-fake", 16, 16

    def __init__(self):
        self.proj = np.random.default_rng(0).normal(size=(3, self.dim)).astype(np.float32)

    def preprocess(self, image):
        import torch

        return torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)

    def encode_image_tensors(self, batch):
        import torch

        return l2_normalize(batch.mean(dim=(2, 3)) @ torch.from_numpy(self.proj))

    def _encode_text_batch(self, texts):
        import torch

        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, sum(map(ord, w)) % self.dim] += 1
        return l2_normalize(out + 1e-3)


def test_attention_needs_token_features(colour_data):
    register_family("sk-fake", lambda rest, device: _NoTokenEncoder())
    enc = get_encoder("sk-fake")
    rows = read_rows(colour_data[0])
    with pytest.raises(UsageError, match="cannot give token features"):
        train_fusion(rows, enc, FusionConfig(method="attention", epochs=1))
    assert train_fusion(rows, enc, FusionConfig(method="concat", epochs=1)).encoder_spec == "sk-fake"


# --- commands ------------------------------------------------------------------------------------


@pytest.fixture
def cli():
    app = typer.Typer()
    app.command("version")(lambda: None)  # a second command keeps `fusion` a named group
    register(app)
    register(app)  # idempotent
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def test_cli_train_eval_predict_ablate(colour_data, cli, tmp_path):
    train_csv, eval_csv = colour_data
    out = tmp_path / "gated"
    r = cli("fusion", "train", train_csv, "--method", "gated", "--model", TINY, "--out", out, "--epochs", "20", "--json")
    assert r.exit_code == 0, r.stderr
    assert "epoch  20" in r.stderr and "val acc" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["method"] == "gated" and summary["labels"] == ["match", "no-match"]
    for name in ("config.json", "model.safetensors", "training_curve.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "training_curve.png").read_bytes().startswith(PNG)

    r = cli("fusion", "eval", out, eval_csv, "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["accuracy"] >= 80 and report["n"] == 60
    assert {c["label"] for c in report["classes"]} == {"match", "no-match"}
    assert set(report["classes"][0]) == {"label", "precision", "recall", "f1", "support"}
    assert sum(map(sum, report["confusion"])) == 60
    assert (out / "confusion.png").read_bytes().startswith(PNG)
    assert json.loads((out / "eval.json").read_text())["accuracy"] == report["accuracy"]
    r = cli("fusion", "eval", out, eval_csv, "--drop", "text")
    assert r.exit_code == 0 and "accuracy" in r.stdout and (out / "confusion-no-text.png").exists()

    img = eval_csv.parent / "img0000.png"
    r = cli("fusion", "predict", out, "--image", img, "--text", "a big red kite", "--plot", tmp_path / "p" / "pred.png", "--json")
    assert r.exit_code == 0, r.stderr
    pred = json.loads(r.stdout)
    assert pred["label"] in ("match", "no-match") and sum(pred["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert (tmp_path / "p" / "pred.png").read_bytes().startswith(PNG)
    r = cli("fusion", "predict", out, "--text", "a big red kite")
    assert r.exit_code == 0 and "label:" in r.stdout

    r = cli("fusion", "ablate", train_csv, "--eval-data", eval_csv, "--methods", "concat", "--no-plain-concat",
            "--model", TINY, "--epochs", "5", "--out", tmp_path / "abl", "--json")
    assert r.exit_code == 0, r.stderr
    assert [x["name"] for x in json.loads(r.stdout)["runs"]] == ["text-only", "image-only", "both-concat"]
    assert (tmp_path / "abl" / "ablation.md").read_text().count("\n| ") == 4


def _error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_cli_bad_inputs_fail_in_one_line_and_write_nothing(colour_data, cli, tmp_path, monkeypatch):
    train_csv, eval_csv = colour_data
    rows = read_csv(train_csv)
    out = tmp_path / "never"
    train = ("fusion", "train")
    common = ("--model", TINY, "--out", out, "--epochs", "2")

    r = cli(*train, train_csv, "--label-col", "class", *common)
    assert r.exit_code == 2 and "no column 'class'" in _error(r) and "--label-col" in r.stderr

    missing = write_csv(train_csv.parent / "missing.csv", rows[:5] + [{**rows[5], "image": "nope.png"}])
    r = cli(*train, missing, *common)
    assert r.exit_code == 1 and "image file 'nope.png' not found" in _error(r)

    r = cli(*train, train_csv, "--labels", "match,no-match,maybe", *common)
    assert r.exit_code == 2 and "'maybe' has no rows" in _error(r)

    one_class = write_csv(train_csv.parent / "one.csv", [r_ for r_ in rows if r_["label"] == "match"])
    r = cli(*train, one_class, *common)
    assert r.exit_code == 2 and "at least two classes" in _error(r)
    assert not out.exists()  # nothing was written by any failed run

    model = tmp_path / "m"
    assert cli(*train, train_csv, "--model", TINY, "--out", model, "--epochs", "2").exit_code == 0
    unseen = write_csv(tmp_path / "unseen.csv", [{**rows[0], "label": "maybe"}])
    r = cli("fusion", "eval", model, unseen, "--images", train_csv.parent)
    assert r.exit_code == 2 and "labels not seen at training time: maybe" in _error(r)
    assert not (model / "eval.json").exists()

    # a model file from another encoder: another architecture, or changed weights
    tiny2 = tmp_path / "sk-tiny2.json"
    cfg = json.loads((ASSETS / "sk-tiny.json").read_text())
    cfg["embed_dim"] = 24
    tiny2.write_text(json.dumps(cfg))
    monkeypatch.setenv("SEARCHKIT_OPENCLIP_CONFIGS", f"{ASSETS / 'sk-tiny.json'}:{tiny2}")
    r = cli("fusion", "eval", model, eval_csv, "--model", "open_clip:sk-tiny2@random")
    assert r.exit_code == 1 and f"trained on features of {TINY}" in _error(r)
    config = json.loads((model / "config.json").read_text())
    config["encoder"]["fingerprint"] = "elsewhere"
    (model / "config.json").write_text(json.dumps(config))
    r = cli("fusion", "predict", model, "--text", "a red cup")
    assert r.exit_code == 1 and "changed since this fusion model was trained" in _error(r)

    r = cli("fusion", "predict", tmp_path, "--text", "x")
    assert r.exit_code == 1 and "is not a fusion model" in _error(r)
    r = cli("fusion", "predict", model)
    assert r.exit_code == 2 and "--image" in _error(r)


def test_library_errors_are_typed(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_rows(tmp_path / "nope.csv")
    with pytest.raises(UnknownModelError):
        load_model(tmp_path)
    with pytest.raises(UsageError, match="unknown fusion method"):
        FusionConfig(method="sum").check()
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"format": "searchkit.dual-encoder"}))
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnknownModelError, match="not a fusion model"):
        load_model(model_dir)
    assert issubclass(ModelMismatchError, Exception)


# --- real data (skipped on a clean clone) --------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "flickr8k" / "captions.csv").is_file(), reason="no ../shared/data/flickr8k")
def test_flickr8k_matching_rows(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "fusion_flickr8k", Path(__file__).resolve().parents[1] / "bench" / "fusion_flickr8k.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = bench.build_matching_csv(SHARED_DATA / "flickr8k", "dev", tmp_path / "dev.csv", limit=20)
    rows = read_rows(tmp_path / "dev.csv", images_dir=SHARED_DATA / "flickr8k" / "images")
    assert n == len(rows) == 40
    assert rows.labels.count("match") == rows.labels.count("no-match") == 20
    assert rows.images[0::2] == rows.images[1::2]  # each image once per label
