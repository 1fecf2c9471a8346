"""CLIP-style training of projection heads on frozen tower features, optionally with the image
tower's last blocks fine-tuned.

Tower features are computed once (and cached, see `features`), so an epoch is a few matrix
products. With `unfreeze_image_blocks = N` the image side caches the activations at the input of
the tower's last N blocks instead, and every step runs those blocks (and the pooling and ConSE
steps after them) with gradients; they learn at `tower_lr_scale` times the heads' learning rate,
and the checkpoint carries their weights.

With `unfreeze_text_layers = N` the text side is tuned the LiT way (Zhai et al., CVPR 2022,
"LiT: Zero-shot transfer with locked-image text tuning", here with only the top layers unlocked):
every caption's MiniLM token states at the input of the last N transformer layers are cached once,
and every step runs those N layers, the mean pooling and the text head with gradients; the layers
learn at `text_lr_scale` times the heads' learning rate (2e-5 at the default 5e-4), and the
checkpoint carries their weights. Otherwise the text tower stays frozen (cached features).

With `caption_augment = K` every training caption also gets K word-dropout variants (each word
dropped with probability `caption_word_dropout`), embedded once by the frozen text tower and
cached like the captions; each step then shows a caption or one of its variants, at random.

With `all_captions` each step pairs its images with all of their training captions (Flickr8k: five
each) instead of one: text→image is the usual cross-entropy per caption, image→text counts every
caption of the image as a positive (`multi_positive_infonce`).

Loss: symmetric InfoNCE with a learnable temperature, or with `loss = "sigmoid"` SigLIP's (Zhai et
al., ICCV 2023, "Sigmoid Loss for Language Image Pre-Training"): every image–caption pair of the
batch is its own match / no-match decision, -log sigmoid(±(t·cos + b)) summed over the similarity
matrix and divided by the number of images, with the scale t and a bias b both learned (t from
1 / 0.1, b from -10; `--all-captions` counts every caption of an image as a match). Each epoch
visits every caption once; batches never hold two captions of the same image (they would be false
negatives). After every epoch the heads are scored on the validation images (Recall@1/5/10 both
ways); the best epoch's heads are kept, and training stops after `patience` epochs without
improvement.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..encoders.mini import HeadSpec, build_heads, head_config, save_checkpoint
from ..encoders.towers import MINILM, load_image_tower, load_text_tower
from ..errors import UsageError
from ..evaluate import retrieval_recall
from .data import PairSet, caption_variants, read_pairs, split_images
from .features import cut_activations, image_features, text_features, text_states

LOG = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that shapes a training run (saved into the checkpoint's config.json)."""

    image_tower: str = "efficientnet_lite0+conse"
    text_tower: str = MINILM
    dim: int = 256
    hidden: int = 0  # hidden width of the residual MLP in each head; 0 = linear heads
    dropout: float = 0.5
    epochs: int = 40
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.2
    patience: int = 6
    init_temperature: float | None = None  # None: the loss's own (INIT_TEMPERATURE)
    seed: int = 0
    unfreeze_image_blocks: int = 0  # fine-tune the image tower's last N blocks; 0 = frozen towers
    tower_lr_scale: float = 0.1  # learning rate of the unfrozen blocks, as a fraction of `lr`
    init_from: str | None = None  # start the heads from this checkpoint's ("mini": the shipped one)
    caption_augment: int = 0  # word-dropout variants per training caption; 0 = captions as written
    caption_word_dropout: float = 0.2  # share of a variant's words dropped
    all_captions: bool = False  # each step shows all of its images' captions (several positives each)
    unfreeze_text_layers: int = 0  # tune the text tower's last N transformer layers; 0 = frozen
    text_lr_scale: float = 0.04  # learning rate of the tuned text layers, as a fraction of `lr`
    loss: str = "infonce"  # "infonce" (CLIP) or "sigmoid" (SigLIP, with a learned logit bias)

    def __post_init__(self):
        if self.loss not in INIT_TEMPERATURE:
            raise UsageError(f"unknown loss {self.loss!r}; choose one of: {', '.join(INIT_TEMPERATURE)}")
        if self.init_temperature is None:
            self.init_temperature = INIT_TEMPERATURE[self.loss]


#: each loss's initial temperature: CLIP's 0.07, SigLIP's 0.1 (logit scale 10)
INIT_TEMPERATURE = {"infonce": 0.07, "sigmoid": 0.1}
#: SigLIP's initial logit bias: a batch of n has n - 1 non-matching pairs per match, and a start
#: far below 0 agrees with that prior, so the first steps need no large correction
SIGMOID_INIT_BIAS = -10.0


#: AdamW weight decay of unfrozen tower blocks (pretrained weights: decay gently)
TOWER_WEIGHT_DECAY = 0.01


@dataclass
class EpochStats:
    epoch: int
    loss: float
    val: dict[str, float]
    temperature: float
    seconds: float


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best: dict[str, float]
    history: list[EpochStats] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    plot: Path | None = None

    def to_dict(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "best_epoch": self.best_epoch,
            "best": self.best,
            "history": [asdict(h) for h in self.history],
            "plot": str(self.plot) if self.plot else None,
        }


def distinct_image_batches(
    caption_image: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of caption-index batches in which no image appears twice.

    Captions are dealt in rounds: each round takes one not-yet-used caption of every image that
    has one left, in a fresh random image order, and is cut into batches; a batch never spans
    two rounds, so it holds distinct images. Every caption is used once per epoch (bar a round's
    lone leftover caption, which would make a batch of one).
    """
    by_image: dict[int, list[int]] = {}
    for c in rng.permutation(len(caption_image)):
        by_image.setdefault(int(caption_image[c]), []).append(int(c))
    batches: list[np.ndarray] = []
    while by_image:
        images = rng.permutation(np.fromiter(by_image, dtype=np.int64))
        round_ = np.array([by_image[int(i)].pop() for i in images], dtype=np.int64)
        by_image = {i: cs for i, cs in by_image.items() if cs}
        n_batches = max(1, int(np.ceil(len(round_) / batch_size)))
        batches.extend(b for b in np.array_split(round_, n_batches) if len(b) > 1)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def symmetric_infonce(img, txt, scale):
    """Mean of image→text and text→image cross-entropy over the batch's similarity matrix."""
    import torch
    import torch.nn.functional as F

    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def multi_positive_infonce(img, txt, owner, scale):
    """Symmetric InfoNCE when image i owns every caption j with `owner[j] == i`: text→image is the
    cross-entropy of each caption's row, image→text the -log of the softmax mass on the image's own
    captions, each side averaged over its rows."""
    import torch
    import torch.nn.functional as F

    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # (images, captions)
    t2i = F.cross_entropy(logits.T, owner)
    own = owner[None, :] == torch.arange(len(logits), device=logits.device)[:, None]
    i2t = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~own, float("-inf")), 1)).mean()
    return (t2i + i2t) / 2


def sigmoid_pair_loss(img, txt, scale, bias):
    """SigLIP's loss: -log sigmoid(z_ij (scale · cos(img_i, txt_j) + bias)) summed over the batch's
    similarity matrix and divided by the batch size; z_ij = 1 for the batch's pairs (i = j), else -1."""
    import torch

    return multi_positive_sigmoid_loss(img, txt, torch.arange(len(img), device=img.device), scale, bias)


def multi_positive_sigmoid_loss(img, txt, owner, scale, bias):
    """The sigmoid loss when image i owns every caption j with `owner[j] == i` (z_ij = 1 for each of
    them, -1 elsewhere): summed over the (images, captions) matrix, divided by the number of images."""
    import torch
    import torch.nn.functional as F

    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T + bias
    own = owner[None, :] == torch.arange(len(logits), device=logits.device)[:, None]
    return -F.logsigmoid(torch.where(own, logits, -logits)).sum() / len(logits)


def _caption_table(caption_image: np.ndarray) -> np.ndarray:
    """(n_images, most captions of one image): each image's caption indices, padded with -1."""
    n = int(caption_image.max()) + 1
    counts = np.bincount(caption_image, minlength=n)
    table = np.full((n, int(counts.max())), -1, dtype=np.int64)
    order = np.argsort(caption_image, kind="stable")
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    table[caption_image[order], slot] = order
    return table


def _features(module, inputs, device: str, batch: int = 256):
    """`module` over `inputs` in chunks without gradients (a CPU tensor)."""
    import torch

    with torch.no_grad():
        return torch.cat([module(inputs[i : i + batch].to(device)).float().cpu() for i in range(0, len(inputs), batch)])


def _embed(head, feats, device: str, batch: int = 4096) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for i in range(0, len(feats), batch):
            out.append(F.normalize(head(feats[i : i + batch].to(device)), dim=-1).cpu().numpy())
    return np.concatenate(out)


def fit_heads(
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    caption_image: np.ndarray,
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    config: TrainConfig,
    *,
    device: str = "cpu",
    progress: bool = False,
    on_best: Callable[[object, int, dict], None] | None = None,
    image_tail=None,
    init_heads: dict | None = None,
    text_variants: np.ndarray | None = None,
    text_tail=None,
):
    """Train heads on features. `val` is (val image feats, val text feats, val caption_image).

    `text_variants` (n_captions, K, d): features of K augmented variants of every training
    caption; each step shows a caption's own features or one of its variants', at random.

    With `image_tail` (a module from cut activations to image tower features, whose parameters
    that require gradients are trained too), `image_feats` and `val[0]` are cut activations.
    With `text_tail` (a module from (token states, mask) to text tower features, trained the same
    way), `text_feats` and `val[1]` are `features.TokenStates`.
    Returns (best heads, best epoch, best validation metrics, history, per-step losses); the
    tails, if any, are left holding their best epoch's weights. `on_best(heads, epoch, metrics)` is
    called whenever validation improves (the tails then hold that epoch's weights).
    `init_heads` (a heads state dict) starts the heads, standardization statistics included, from
    trained ones instead of from scratch.
    """
    import copy

    import torch
    from tqdm.auto import tqdm

    if len(caption_image) < 2:
        raise UsageError("need at least two training captions")
    if text_tail is not None and text_variants is not None:
        raise UsageError("caption variants cannot be combined with tuned text tower layers")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    img_t = torch.from_numpy(image_feats)
    val_img = torch.from_numpy(val[0])
    txt_t, val_txt = (text_feats, val[1]) if text_tail is not None else (torch.from_numpy(text_feats), torch.from_numpy(val[1]))
    tail_params: dict = {}
    text_params: dict = {}
    if image_tail is not None:
        image_tail = image_tail.to(device).eval()
        tail_params = {n: p for n, p in image_tail.named_parameters() if p.requires_grad}
        if not tail_params:
            raise UsageError("the image tower tail has no trainable weights")
    if text_tail is not None:
        text_tail = text_tail.to(device).eval()
        text_params = {n: p for n, p in text_tail.named_parameters() if p.requires_grad}
        if not text_params:
            raise UsageError("the text tower tail has no trainable weights")
    # the heads standardize their inputs with statistics of the training features; heads started
    # from a checkpoint bring their own (loaded below), so one row is enough to learn the width
    start_feats = img_t if init_heads is None else img_t[:1]
    if image_tail is not None:
        start_feats = _features(image_tail, start_feats, device)
    if text_tail is not None:
        start_text = _text_features(text_tail, txt_t if init_heads is None else txt_t.take(np.arange(1)), device)
    else:
        start_text = txt_t if init_heads is None else txt_t[:1]
    heads = build_heads(
        HeadSpec(start_feats.shape[1], config.dim, config.hidden, config.dropout),
        HeadSpec(start_text.shape[1], config.dim, config.hidden, config.dropout),
        init_logit_scale=1.0 / config.init_temperature,
        logit_bias=SIGMOID_INIT_BIAS if config.loss == "sigmoid" else None,
    )
    if init_heads is None:
        heads.image.set_stats(start_feats)
        heads.text.set_stats(start_text)
    del start_feats, start_text
    if init_heads is not None:
        # only sigmoid-loss heads have a bias: heads without one (the shipped mini's) start it at
        # SIGMOID_INIT_BIAS, and an infonce run leaves a sigmoid checkpoint's unused
        init_heads = dict(init_heads)
        if heads.logit_bias is None:
            init_heads.pop("logit_bias", None)
        else:
            init_heads.setdefault("logit_bias", heads.logit_bias.detach().clone())
        try:
            heads.load_state_dict(init_heads)
        except RuntimeError as e:
            raise UsageError(f"the initial heads do not fit this run: {str(e).splitlines()[-1].strip()}") from e
    heads = heads.to(device)
    img_t = img_t.to(device)
    if text_tail is None:
        txt_t = txt_t.to(device)
    cap_img = torch.from_numpy(caption_image).to(device)
    if text_variants is not None:  # the captions themselves as variant 0
        variants = torch.cat([txt_t[:, None], torch.from_numpy(text_variants).to(device)], dim=1)
    gen = torch.Generator().manual_seed(config.seed)

    def text_batch(idx):
        if text_tail is not None:
            return text_tail(*txt_t.batch(idx, device))
        if text_variants is None:
            return txt_t[idx]
        pick = torch.randint(0, variants.shape[1], (len(idx),), generator=gen).to(device)
        return variants[idx, pick]

    table = torch.from_numpy(_caption_table(caption_image)).to(device) if config.all_captions else None

    sigmoid = config.loss == "sigmoid"

    def step_loss(b):
        """The loss of one batch of captions (of distinct images)."""
        images = cap_img[b]
        if table is None:
            img, txt = heads.image(image_batch(images)), heads.text(text_batch(b))
            if sigmoid:
                return sigmoid_pair_loss(img, txt, heads.scale(), heads.logit_bias)
            return symmetric_infonce(img, txt, heads.scale())
        caps = table[images]  # (batch, most captions of an image)
        keep = caps >= 0
        owner = torch.arange(len(b), device=device)[:, None].expand_as(caps)[keep]
        img, txt = heads.image(image_batch(images)), heads.text(text_batch(caps[keep]))
        if sigmoid:
            return multi_positive_sigmoid_loss(img, txt, owner, heads.scale(), heads.logit_bias)
        return multi_positive_infonce(img, txt, owner, heads.scale())

    def image_batch(idx):
        x = img_t[idx]
        return image_tail(x) if image_tail is not None else x

    groups = [{
        "params": [p for n, p in heads.named_parameters() if n != "logit_bias"], "lr": config.lr,
        "weight_decay": config.weight_decay,
    }]
    if heads.logit_bias is not None:  # decay would pull the bias from its -10 start towards 0
        groups.append({"params": [heads.logit_bias], "lr": config.lr, "weight_decay": 0.0})
    if tail_params:
        groups.append({
            "params": list(tail_params.values()), "lr": config.lr * config.tower_lr_scale,
            "weight_decay": TOWER_WEIGHT_DECAY,
        })
    if text_params:
        groups.append({
            "params": list(text_params.values()), "lr": config.lr * config.text_lr_scale,
            "weight_decay": TOWER_WEIGHT_DECAY,
        })
    opt = torch.optim.AdamW(groups)
    first = distinct_image_batches(caption_image, config.batch_size, rng)
    total_steps = config.epochs * len(first)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=max(total_steps, 1), pct_start=0.1, anneal_strategy="cos"
    )
    history: list[EpochStats] = []
    step_losses: list[float] = []
    best, best_epoch, best_state, best_tail, best_text, stale = None, 0, None, None, None, 0
    bar = tqdm(range(1, config.epochs + 1), desc="training", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        heads.train()
        for tail in (image_tail, text_tail):
            if tail is not None:
                tail.train()
        batches = first if epoch == 1 else distinct_image_batches(caption_image, config.batch_size, rng)
        losses = []
        for b in batches:
            b = torch.from_numpy(b).to(device)
            loss = step_loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            losses.append(float(loss.item()))
        step_losses.extend(losses)
        heads.eval()
        val_feats, val_text = val_img, val_txt
        if image_tail is not None:
            val_feats = _features(image_tail.eval(), val_img, device)
        if text_tail is not None:
            val_text = _text_features(text_tail.eval(), val_txt, device)
        metrics = retrieval_recall(_embed(heads.image, val_feats, device), _embed(heads.text, val_text, device), val[2])
        stats = EpochStats(epoch, float(np.mean(losses)), metrics, float(1.0 / heads.scale().item()), time.perf_counter() - t0)
        history.append(stats)
        LOG.info(
            "epoch %d: loss %.4f, val mean recall %.2f (t2i R@1 %.2f, R@10 %.2f)",
            epoch, stats.loss, metrics["mean"], metrics["t2i_R@1"], metrics["t2i_R@10"],
        )
        bar.set_postfix(loss=f"{stats.loss:.3f}", val=f"{metrics['mean']:.1f}")
        if best is None or metrics["mean"] > best["mean"]:
            best, best_epoch, stale = metrics, epoch, 0
            best_state = copy.deepcopy(heads.state_dict())
            best_tail = {n: p.detach().clone() for n, p in tail_params.items()}
            best_text = {n: p.detach().clone() for n, p in text_params.items()}
            if on_best is not None:
                on_best(heads, epoch, metrics)
        else:
            stale += 1
            if stale >= config.patience:
                LOG.info("early stop: no improvement for %d epochs", stale)
                break
    bar.close()
    heads.load_state_dict(best_state)
    with torch.no_grad():
        for n, p in tail_params.items():
            p.copy_(best_tail[n])
        for n, p in text_params.items():
            p.copy_(best_text[n])
    for tail in (image_tail, text_tail):
        if tail is not None:
            tail.eval()
    return heads.eval(), best_epoch, best, history, step_losses


def _text_features(tail, states, device: str, batch: int = 256):
    """The text tail over `features.TokenStates` in chunks, without gradients (a CPU tensor);
    chunks follow token count so each pads little."""
    import torch

    order = np.argsort(states.lengths, kind="stable")
    with torch.no_grad():
        feats = torch.cat([tail(*states.batch(order[i : i + batch], device)).float().cpu() for i in range(0, len(order), batch)])
    out = torch.empty_like(feats)
    out[torch.from_numpy(order)] = feats
    return out


def train(
    captions_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    val_split: str | os.PathLike | None = None,
    val_fraction: float | None = None,
    train_split: str | os.PathLike | None = None,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    plot: bool = True,
) -> TrainResult:
    """Train projection heads on image–caption pairs and write a checkpoint folder.

    The folder (`out_dir`) gets config.json + heads.safetensors (+ image_tower.safetensors /
    text_tower.safetensors when tower blocks / text layers were tuned) of the best validation epoch (usable as `--model out_dir` /
    `get_encoder(out_dir)`), history.json, and training.png.
    """
    from ..encoders.base import default_device

    config = config or TrainConfig()
    device = device or default_device()
    pairs = read_pairs(captions_csv, image_root)
    train_img, val_img = split_images(
        pairs, val_split=val_split, val_fraction=val_fraction, train_split=train_split, seed=config.seed
    )
    image_tower = load_image_tower(config.image_tower, device)
    # a tuned text tower is a private copy: the process-wide one stays pretrained
    text_tower = load_text_tower(config.text_tower, device, shared=not config.unfreeze_text_layers)
    if config.unfreeze_text_layers and config.caption_augment:
        raise UsageError("--caption-augment cannot be combined with --unfreeze-text-layers")
    cut, image_tail = None, None
    if config.unfreeze_image_blocks:
        from ..encoders.nets import TailFeatures

        cut = image_tower.cut(config.unfreeze_image_blocks)
        img_feats, ok = cut_activations(image_tower, cut, pairs.paths, cache_dir=cache_dir, progress=progress)
        for name, param in cut.network.named_parameters():
            param.requires_grad_(cut.owns(name))
        image_tail = TailFeatures(cut.tail, image_tower.derive_module())
    else:
        img_feats, ok = image_features(image_tower, pairs.paths, cache_dir=cache_dir, progress=progress)
    text_cut, text_tail = None, None
    if config.unfreeze_text_layers:
        text_cut = text_tower.cut(config.unfreeze_text_layers)
        txt_feats = text_states(text_tower, text_cut, pairs.captions, cache_dir=cache_dir, progress=progress)
        for name, param in text_cut.network.named_parameters():
            param.requires_grad_(text_cut.owns(name))
        text_tail = text_cut.tail
    else:
        txt_feats = text_features(text_tower, pairs.captions, cache_dir=cache_dir, progress=progress)
    take = txt_feats.take if text_cut is not None else txt_feats.__getitem__
    train_img, val_img = train_img[ok[train_img]], val_img[ok[val_img]]

    tr_caps, tr_map = _select(pairs, train_img)
    va_caps, va_map = _select(pairs, val_img)
    variants = None
    if config.caption_augment:
        texts = caption_variants([pairs.captions[i] for i in tr_caps], config.caption_augment, config.caption_word_dropout, config.seed)
        flat = text_features(text_tower, [v for vs in texts for v in vs], cache_dir=cache_dir, progress=progress)
        variants = flat.reshape(len(tr_caps), config.caption_augment, -1)
    LOG.info(
        "training on %d images / %d captions, validating on %d images / %d captions",
        len(train_img), len(tr_caps), len(val_img), len(va_caps),
    )
    out = Path(out_dir)
    ckpt_config = {
        "image_tower": image_tower.spec,
        "text_tower": text_tower.spec,
        "training": {
            "config": asdict(config),
            "captions": os.path.abspath(captions_csv),
            "train_images": int(len(train_img)),
            "val_images": int(len(val_img)),
        },
    }
    if cut is not None:
        ckpt_config["image_tower_tuned"] = {"blocks": cut.blocks}
    if text_cut is not None:
        ckpt_config["text_tower_tuned"] = {"layers": text_cut.blocks}

    def write(heads, epoch: int, metrics: dict) -> None:
        cfg = {**ckpt_config, **head_config(_spec(heads.image, config), _spec(heads.text, config))}
        cfg["training"] = {**cfg["training"], "best_epoch": epoch, "val": metrics}
        save_checkpoint(
            out, heads, cfg, cut.tail_state() if cut is not None else None, class_text=getattr(image_tower, "class_text", None),
            text_state=text_cut.tail_state() if text_cut is not None else None,
        )

    heads, best_epoch, best, history, step_losses = fit_heads(
        img_feats[train_img],
        take(tr_caps),
        tr_map,
        (img_feats[val_img], take(va_caps), va_map),
        config,
        device=device,
        progress=progress,
        on_best=write,
        image_tail=image_tail,
        init_heads=_initial_heads(config),
        text_variants=variants,
        text_tail=text_tail,
    )
    result = TrainResult(out, best_epoch, best, history, step_losses)
    import json

    (out / "history.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if plot:
        from .plot import plot_history

        result.plot = plot_history(history, out / "training.png")
    return result


def _initial_heads(config: TrainConfig) -> dict | None:
    """The heads state dict of `config.init_from`, checked against the run's towers."""
    if not config.init_from:
        return None
    from ..encoders.mini import MINI_DIR, load_heads, read_config

    folder = MINI_DIR if config.init_from == "mini" else Path(config.init_from)
    cfg = read_config(folder)
    if (cfg["image_tower"], cfg["text_tower"]) != (config.image_tower, config.text_tower):
        raise UsageError(
            f"{config.init_from} has towers {cfg['image_tower']} / {cfg['text_tower']}, "
            f"this run {config.image_tower} / {config.text_tower}"
        )
    if cfg.get("image_tower_tuned") or cfg.get("text_tower_tuned"):
        raise UsageError(f"{config.init_from} has fine-tuned tower weights; start from a frozen-tower checkpoint")
    return load_heads(folder, cfg).state_dict()


def _spec(head, config: TrainConfig) -> HeadSpec:
    return HeadSpec(int(head.linear.in_features), int(head.linear.out_features), config.hidden, config.dropout)


def _select(pairs: PairSet, image_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Caption indices of these images, and each caption's position within `image_idx`."""
    caps = pairs.captions_of(image_idx)
    pos = np.searchsorted(image_idx, pairs.caption_image[caps])
    return caps, pos
