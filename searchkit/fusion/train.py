"""Training a fusion classifier head with cross-entropy on frozen, cached encoder features.

    from searchkit.fusion import FusionConfig, read_rows, train_fusion
    rows = read_rows("data.csv", images_dir="photos/")
    model = train_fusion(rows, get_encoder("mini"), FusionConfig(method="gated"))
    model.save("models/gated")

A held-out stratified share of the rows (`val_split`) picks the epoch whose weights are kept
(best validation accuracy, ties to the lower loss). With `modality="both"`, modality dropout
hides the image or the text of a training row now and then (never both), so the learned
placeholders are trained and a model still works when one side is missing at prediction time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..encoders.base import Encoder, default_device
from ..errors import UsageError
from .data import Columns, Rows, check_classes, stratified_split
from .features import Features, extract_features
from .model import FusionModel, feature_tensors, make_batch

LOG = logging.getLogger(__name__)

METHODS = ("concat", "gated", "attention")
MODALITIES = ("both", "image", "text")


@dataclass
class FusionConfig:
    """What to train and how."""

    method: str = "concat"
    modality: str = "both"
    epochs: int = 30
    batch_size: int = 64
    #: peak learning rate (linear warm-up, cosine decay)
    lr: float = 1e-3
    weight_decay: float = 0.01
    hidden: int = 256
    dropout: float = 0.2
    #: dropout on the standardized pooled features: noise on the agreement the head reads, so
    #: it does not trust the over-tight agreement a frozen encoder shows on its own training data
    input_dropout: float = 0.4
    #: chance that training hides one present side of a row (modality "both" only)
    modality_dropout: float = 0.15
    #: product and difference features of the two sides (False: plain concatenation)
    interactions: bool = True
    attn_dim: int = 64
    attn_heads: int = 4
    attn_layers: int = 1
    #: share of rows held out (stratified) to choose the epoch; 0 keeps the last epoch
    val_split: float = 0.1
    #: stop after this many epochs without a better validation accuracy (None: never)
    patience: int | None = None
    seed: int = 0
    #: torch CPU threads while training (fusion heads are small: more threads mostly add
    #: synchronisation cost, badly so on a busy machine); None leaves torch's setting
    threads: int | None = 1

    def check(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown fusion method '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.modality not in MODALITIES:
            raise UsageError(f"unknown modality '{self.modality}'; use one of: {', '.join(MODALITIES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("epochs and batch size must be at least 1")
        if not 0.0 <= self.modality_dropout < 0.5:
            raise UsageError(f"modality dropout must be in [0, 0.5) (got {self.modality_dropout})")
        if self.attn_dim % self.attn_heads:
            raise UsageError(f"attention width {self.attn_dim} is not divisible by {self.attn_heads} heads")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    state: dict
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0


def train_fusion(
    rows: Rows,
    encoder: Encoder,
    config: FusionConfig | None = None,
    *,
    classes: Sequence[str] | None = None,
    columns: Columns = Columns(),
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    device: str | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FusionModel:
    """Encode `rows` (cached), train a fusion head on them, return the model (not yet saved).

    Raises UsageError for a bad config or bad labels (see `check_classes`), and the typed
    errors of feature extraction (undecodable images, an encoder without token features).
    """
    config = config or FusionConfig()
    config.check()
    if rows.labels is None:
        raise UsageError("training needs a label for every row")
    labels = check_classes(rows.labels, classes)
    feats = extract_features(
        encoder,
        rows,
        tokens=config.method == "attention",
        use_image=config.modality != "text",
        use_text=config.modality != "image",
        cache_dir=cache_dir,
        cache=cache,
    )
    return fit_model(
        feats, rows.labels, labels, encoder, config, columns=columns, device=device, on_epoch=on_epoch, source=rows.source
    )


def fit_model(
    feats: Features,
    row_labels: Sequence[str],
    classes: Sequence[str],
    encoder: Encoder,
    config: FusionConfig,
    *,
    columns: Columns = Columns(),
    device: str | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    source: str = "",
) -> FusionModel:
    """Train on already extracted features (the ablation shares one extraction between runs)."""
    import torch

    from .nets import NetSpec, build_net
    from .tokens import MAX_TEXT_TOKENS

    config.check()
    classes = list(classes)
    y = np.array([classes.index(lab) for lab in row_labels], dtype=np.int64)
    _check_sides(feats, config.modality)
    spec = NetSpec(
        method=config.method,
        modality=config.modality,
        n_classes=len(classes),
        dim=encoder.dim,
        hidden=config.hidden,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        interactions=config.interactions,
        attn_dim=config.attn_dim,
        attn_heads=config.attn_heads,
        attn_layers=config.attn_layers,
    )
    if config.method == "attention":
        if not feats.has_tokens:
            raise UsageError("attention fusion needs token features (extract them with tokens=True)")
        spec.n_image_tokens, spec.image_token_dim = (
            (int(feats.image_tokens.shape[1]), int(feats.image_tokens.shape[2])) if len(feats.image_tokens) else (1, 1)
        )
        spec.text_token_dim = int(feats.text_tokens.shape[2]) if len(feats.text_tokens) else 1
        spec.max_text_tokens = MAX_TEXT_TOKENS
    train_idx, val_idx = stratified_split(row_labels, config.val_split, config.seed)
    device = device or default_device()
    with torch.random.fork_rng(devices=[]), torch_threads(config.threads):
        torch.manual_seed(config.seed)
        net = build_net(spec)
        net.set_stats(*_train_stats(feats, train_idx))
        if spec.method == "attention":
            net.fit_reduction(*_token_sample(feats, train_idx, np.random.default_rng(config.seed)))
        result = _fit(net, spec, feats, y, train_idx, val_idx, config, device, on_epoch)
    net.load_state_dict(result.state)
    best = result.history[result.best_epoch - 1] if result.history else None
    training = {
        "data": source,
        "rows": len(y),
        "train_rows": len(train_idx),
        "val_rows": len(val_idx),
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "best_epoch": result.best_epoch,
        "val_accuracy": None if best is None else best.val_accuracy,
        "config": asdict(config),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return FusionModel(
        net=net.cpu().eval(),
        spec=spec,
        classes=classes,
        encoder_spec=encoder.spec,
        encoder_fingerprint=encoder.fingerprint,
        columns=columns,
        training=training,
        history=[h.to_dict() for h in result.history],
    )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with `n` torch CPU threads, restoring the previous count after it."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_stats(feats: Features, train_idx: np.ndarray):
    """The pooled image and text features of the training rows (each unique input once)."""
    import torch

    out = []
    for table, index in ((feats.image, feats.image_index), (feats.text, feats.text_index)):
        used = np.unique(index[train_idx])
        used = used[used >= 0]
        out.append(torch.from_numpy(np.asarray(table[used], dtype=np.float32)) if len(used) else None)
    return out


def _token_sample(feats: Features, train_idx: np.ndarray, rng, limit: int = 20000):
    """Up to `limit` image and text token vectors of the training rows, for the fixed PCA."""
    import torch

    out = []
    for table, index, mask in (
        (feats.image_tokens, feats.image_index, None),
        (feats.text_tokens, feats.text_index, feats.text_mask),
    ):
        used = np.unique(index[train_idx])
        used = used[used >= 0]
        if not len(used):
            out.append(None)
            continue
        vectors = table[used][mask[used]] if mask is not None else table[used].reshape(-1, table.shape[-1])
        if len(vectors) > limit:
            vectors = vectors[np.sort(rng.choice(len(vectors), limit, replace=False))]
        out.append(torch.from_numpy(np.asarray(vectors, dtype=np.float32)))
    return out


def _check_sides(feats: Features, modality: str) -> None:
    has_image, has_text = bool((feats.image_index >= 0).any()), bool((feats.text_index >= 0).any())
    if modality in ("both", "image") and not has_image:
        raise UsageError(f"no row has an image, so modality '{modality}' has nothing to learn from")
    if modality in ("both", "text") and not has_text:
        raise UsageError(f"no row has a text, so modality '{modality}' has nothing to learn from")


def _fit(net, spec, feats, y, train_idx, val_idx, config: FusionConfig, device, on_epoch) -> FitResult:
    import torch
    import torch.nn.functional as F

    tables = net.prepare(feature_tensors(feats))
    net.to(device)
    y_t = torch.from_numpy(y)
    rng = np.random.default_rng(config.seed)
    steps = max(1, math.ceil(len(train_idx) / config.batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps * config.epochs))
    both = feats.image_index[train_idx] >= 0
    both &= feats.text_index[train_idx] >= 0
    result = FitResult(state=copy.deepcopy(net.state_dict()))
    best_key: tuple[float, float] | None = None
    stale = 0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        order = rng.permutation(len(train_idx))
        total, correct, loss_sum = 0, 0, 0.0
        for s in range(0, len(order), config.batch_size):
            pos = order[s : s + config.batch_size]
            idx = train_idx[pos]
            drop_i, drop_t = _modality_dropout(rng, both[pos], config)
            batch = make_batch(tables, idx, spec, device, drop_image=drop_i, drop_text=drop_t)
            target = y_t[idx].to(device)
            logits = net(batch)
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.item()) * len(idx)
            correct += int((logits.argmax(-1) == target).sum().item())
            total += len(idx)
        val_loss, val_acc = _evaluate(net, spec, tables, y_t, val_idx, device) if len(val_idx) else (None, None)
        stats = EpochStats(epoch, loss_sum / total, 100.0 * correct / total, val_loss, val_acc, time.perf_counter() - t0)
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        LOG.info("epoch %d: loss %.4f acc %.1f val %s", epoch, stats.loss, stats.accuracy, val_acc)
        key = (val_acc, -val_loss) if val_acc is not None else (float(epoch), 0.0)
        if best_key is None or key > best_key:
            best_key, stale = key, 0
            result.state = copy.deepcopy(net.state_dict())
            result.best_epoch = epoch
        else:
            stale += 1
            if config.patience is not None and stale >= config.patience:
                LOG.info("no better validation accuracy for %d epochs; stopping", stale)
                break
    return result


def _warmup_cosine(total: int, warmup_share: float = 0.1) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over the first tenth, then cosine to zero."""
    warmup = max(1, round(warmup_share * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _modality_dropout(rng, has_both: np.ndarray, config: FusionConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    p = config.modality_dropout
    if config.modality != "both" or p <= 0:
        return None, None
    u = rng.random(len(has_both))
    drop_i = has_both & (u < p)
    drop_t = has_both & (u >= p) & (u < 2 * p)
    return drop_i, drop_t


def _evaluate(net, spec, tables, y_t, idx, device, batch_size: int = 512) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    net.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(idx), batch_size):
            rows = idx[s : s + batch_size]
            logits = net(make_batch(tables, rows, spec, device))
            target = y_t[rows].to(device)
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum").item())
            correct += int((logits.argmax(-1) == target).sum().item())
    return loss_sum / len(idx), 100.0 * correct / len(idx)
