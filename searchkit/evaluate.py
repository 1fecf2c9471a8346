"""Evaluation: cross-modal retrieval Recall@K and zero-shot classification accuracy.

Retrieval follows the standard protocol on an image–caption split: embed every image and every
caption; text→image R@K is the share of captions whose own image ranks in the top K images;
image→text R@K is the share of images with at least one of their captions in the top K captions.
Ranks come from a stable sort of the scores (a tie goes to the item listed first). All figures
are percentages.

Zero-shot classification reads a folder with one sub-folder per class (the folder name, with
`_` read as a space, is the label) and classifies each image by its nearest label prompt (the
recipe of `searchkit.zeroshot`), keeping only what the report needs so any label set fits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, UsageError
from .figures import save_figure

LOG = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """rank[i, j] = position (0 = best) of column j in row i's descending, stable order."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :].repeat(len(scores), 0), axis=1)
    return ranks


def retrieval_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray, *, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each caption's own image, best rank among each image's captions), 0-based."""
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if len(text_emb) != len(caption_image):
        raise UsageError(f"{len(text_emb)} caption embeddings but {len(caption_image)} caption→image links")
    if len(caption_image) and (caption_image.min() < 0 or caption_image.max() >= len(image_emb)):
        raise UsageError("a caption points at an image index outside the image embeddings")
    t2i = np.empty(len(text_emb), dtype=np.int64)
    for s in range(0, len(text_emb), block):
        r = _ranks(text_emb[s : s + block] @ image_emb.T)
        t2i[s : s + block] = r[np.arange(len(r)), caption_image[s : s + block]]
    i2t = np.full(len(image_emb), np.iinfo(np.int64).max, dtype=np.int64)
    for s in range(0, len(image_emb), block):
        r = _ranks(image_emb[s : s + block] @ text_emb.T)  # (images in block, captions)
        rows = caption_image - s
        inside = (rows >= 0) & (rows < len(r))
        caps = np.flatnonzero(inside)
        np.minimum.at(i2t, caption_image[caps], r[rows[caps], caps])
    return t2i, i2t


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@K both ways in percent: keys `t2i_R@K`, `i2t_R@K` and `mean` (of all of them).

    Images without any caption are left out of image→text recall.
    """
    t2i, i2t = retrieval_ranks(image_emb, text_emb, caption_image)
    has_caption = np.zeros(len(image_emb), dtype=bool)
    has_caption[np.asarray(caption_image, dtype=np.int64)] = True
    i2t = i2t[has_caption]
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float(np.mean(t2i < k)) if len(t2i) else 0.0
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(np.mean(i2t < k)) if len(i2t) else 0.0
    out["mean"] = float(np.mean(list(out.values())))
    return out


def evaluate_retrieval(
    encoder,
    captions_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    split: str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """Embed the split's images and captions with `encoder` (an Encoder or a spec) and score.

    The data is read and checked before a spec is resolved to a model. `split` is a file with one image name per line (default: every image of the CSV).
    Returns {"model", "images", "captions", "metrics": retrieval_recall(...)}.
    """
    from .train.data import read_list, read_pairs

    pairs = read_pairs(captions_csv, image_root)
    images = np.arange(len(pairs.images))
    if split is not None:
        wanted = set(read_list(split))
        images = np.array([i for i, n in enumerate(pairs.images) if n in wanted], dtype=np.int64)
        if len(images) == 0:
            raise InputError(f"no image of {split} has captions in {captions_csv}")
    caps = pairs.captions_of(images)
    encoder = _as_encoder(encoder)
    image_emb = encoder.encode_images([pairs.paths[i] for i in images])
    text_emb = encoder.encode_texts([pairs.captions[c] for c in caps])
    caption_image = np.searchsorted(images, pairs.caption_image[caps])
    return {
        "model": encoder.spec,
        "images": int(len(images)),
        "captions": int(len(caps)),
        "metrics": retrieval_recall(image_emb, text_emb, caption_image, ks),
    }


#: the confusion matrix is reported (and drawn with counts in the cells) up to this many classes;
#: beyond it, the report lists the most confused pairs and the plot shows the most confused classes
FULL_CONFUSION = 50
#: how many most-confused classes the plot of a large label set shows
PLOT_CLASSES = 30


@dataclass
class ZeroShotReport:
    model: str
    labels: list[str]
    n: int
    top1: float
    top5: float | None
    per_class: dict[str, float]
    confusion: list[list[int]] | None  # rows: true class, columns: predicted; None beyond FULL_CONFUSION classes
    class_images: list[int] = field(default_factory=list)  # images read per class
    most_confused: list[tuple[str, str, int]] = field(default_factory=list)  # (true, predicted, count)
    failed: list[tuple[str, str]] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "labels": self.labels,
            "images": self.n,
            "top1": self.top1,
            "top5": self.top5,
            "per_class": self.per_class,
            "class_images": self.class_images,
            "confusion": self.confusion,
            "most_confused": [list(x) for x in self.most_confused],
            "failed": [{"path": p, "error": e} for p, e in self.failed],
            "plot": self.plot,
        }


def class_folders(root: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """(label, image paths) for each non-empty sub-folder of `root`, sorted by folder name."""
    from .images import image_paths_under

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        paths = image_paths_under(sub)
        if paths:
            out.append((sub.name.replace("_", " "), paths))
    if len(out) < 2:
        raise InputError(f"{root} needs at least two sub-folders of images (one per class)")
    return out


def evaluate_zeroshot(
    encoder,
    root: str | os.PathLike,
    *,
    templates: Sequence[str] | None = None,
    plot: str | os.PathLike | None = None,
) -> ZeroShotReport:
    """Zero-shot accuracy on a folder of class sub-folders; writes a confusion PNG if `plot`.

    `encoder` is an Encoder or a spec, resolved after the folder has been checked. Memory stays
    bounded for any number of classes: label prompts are embedded in chunks, images a batch at a
    time, and only each image's top-5 labels are kept (confusions as sparse counts).
    """
    from collections import Counter

    from .zeroshot import check_templates, label_scorer

    classes = class_folders(root)
    encoder = _as_encoder(encoder)
    labels = [label for label, _ in classes]
    scorer = label_scorer(encoder, labels, check_templates(templates))  # the same scores as classify
    pairs: Counter[tuple[int, int]] = Counter()
    hits5, failed = 0, []
    items = [(p, t) for t, (_, paths) in enumerate(classes) for p in paths]
    for batch_truth, logits, bad in _scored_batches(encoder, scorer, items):
        failed.extend(bad)
        if not len(logits):
            continue
        top = np.argsort(-logits, axis=1, kind="stable")[:, :5] if len(labels) > 5 else np.argsort(-logits, axis=1, kind="stable")
        pairs.update(zip(batch_truth, top[:, 0].tolist()))
        hits5 += int((top == np.asarray(batch_truth)[:, None]).any(axis=1).sum())
    n = sum(pairs.values())
    if n == 0:
        raise InputError(f"no image under {root} could be read")
    class_images = [0] * len(labels)
    correct = [0] * len(labels)
    for (t, p), c in pairs.items():
        class_images[t] += c
        correct[t] += c if t == p else 0
    confusion = None
    if len(labels) <= FULL_CONFUSION:
        dense = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for (t, p), c in pairs.items():
            dense[t, p] = c
        confusion = dense.tolist()
    errors = sorted(((c, t, p) for (t, p), c in pairs.items() if t != p), key=lambda x: (-x[0], x[1], x[2]))
    report = ZeroShotReport(
        model=encoder.spec,
        labels=labels,
        n=n,
        top1=100.0 * sum(correct) / n,
        top5=100.0 * hits5 / n if len(labels) >= 5 else None,
        per_class={label: 100.0 * correct[i] / max(1, class_images[i]) for i, label in enumerate(labels)},
        confusion=confusion,
        class_images=class_images,
        most_confused=[(labels[t], labels[p], c) for c, t, p in errors[:20]],
        failed=failed,
    )
    if plot is not None:
        shown = _plotted_classes(pairs, len(labels))
        pos = {c: i for i, c in enumerate(shown)}
        sub = np.zeros((len(shown), len(shown)), dtype=np.int64)
        for (t, p), c in pairs.items():
            if t in pos and p in pos:
                sub[pos[t], pos[p]] = c
        title = f"{Path(root).name}: {encoder.spec}"
        if len(shown) < len(labels):
            title += f"\nthe {len(shown)} most confused of {len(labels)} classes"
        report.plot = str(plot_confusion(sub, [labels[c] for c in shown], plot, title=title))
    return report


def _scored_batches(encoder, scorer, items: list[tuple[str, int]]):
    """(truths, label scores, [(path, error)]) per batch of readable images."""
    from .errors import DecodeError
    from .images import load_image

    step = max(1, int(encoder.image_batch_size))
    for start in range(0, len(items), step):
        truths, images, bad = [], [], []
        for path, t in items[start : start + step]:
            try:
                images.append(load_image(path, draft_size=encoder.image_size))
                truths.append(t)
            except DecodeError as e:
                bad.append((path, str(e)))
        yield truths, scorer(images) if images else np.zeros((0, 0), np.float32), bad


def _plotted_classes(pairs, n_labels: int) -> list[int]:
    """Every class when few, else the PLOT_CLASSES classes with the most errors (as truth or guess)."""
    if n_labels <= PLOT_CLASSES:
        return list(range(n_labels))
    errors = np.zeros(n_labels, dtype=np.int64)
    for (t, p), c in pairs.items():
        if t != p:
            errors[t] += c
            errors[p] += c
    return sorted(np.argsort(-errors, kind="stable")[:PLOT_CLASSES].tolist())


def _as_encoder(encoder):
    if isinstance(encoder, str):
        from .encoders import get_encoder

        return get_encoder(encoder)
    return encoder


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """A confusion matrix (rows: true, columns: predicted; shading by row share) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    share = confusion / confusion.sum(1, keepdims=True).clip(1)
    size = 2.5 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size), constrained_layout=True)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return save_figure(fig, path)
