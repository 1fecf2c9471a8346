"""Image–caption pairs: reading the CSV and splitting it into training and validation images.

The CSV has an `image` column (a file name relative to the image root) and a `caption` column;
an image usually has several captions. Splits are by image, never by caption, so no image is
seen in training and validation both.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError

LOG = logging.getLogger(__name__)


@dataclass
class PairSet:
    """Unique images (sorted by name), all captions, and the image each caption describes."""

    root: Path
    images: list[str]
    captions: list[str]
    caption_image: np.ndarray  # (n_captions,) int index into `images`

    @property
    def paths(self) -> list[str]:
        return [str(self.root / name) for name in self.images]

    def captions_of(self, image_idx: np.ndarray) -> np.ndarray:
        """Indices of the captions of the given images."""
        return np.flatnonzero(np.isin(self.caption_image, image_idx))


def read_pairs(captions_csv: str | os.PathLike, image_root: str | os.PathLike) -> PairSet:
    """Read an `image,caption` CSV; rows whose image file is missing are dropped with a warning."""
    root = Path(image_root)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    try:
        with open(captions_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            if not {"image", "caption"} <= fields:
                raise InputError(
                    f"{captions_csv} needs the columns image,caption (found: {', '.join(sorted(fields)) or 'none'})"
                )
            rows = [(r["image"].strip(), (r["caption"] or "").strip()) for r in reader]
    except FileNotFoundError as e:
        raise InputError(f"captions file {captions_csv} does not exist") from e
    rows = [(img, cap) for img, cap in rows if img and cap]
    names = sorted({img for img, _ in rows})
    missing = {n for n in names if not (root / n).is_file()}
    if missing:
        LOG.warning("%d images named in %s are not under %s; their captions are skipped", len(missing), captions_csv, root)
        names = [n for n in names if n not in missing]
        rows = [(img, cap) for img, cap in rows if img not in missing]
    if not rows:
        raise InputError(f"no usable image,caption rows in {captions_csv} (images under {root})")
    index = {n: i for i, n in enumerate(names)}
    return PairSet(root, names, [c for _, c in rows], np.array([index[i] for i, _ in rows], dtype=np.int64))


def read_list(path: str | os.PathLike) -> list[str]:
    """One image name per line (blank lines and #-comments ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError as e:
        raise InputError(f"split file {path} does not exist") from e


def split_images(
    pairs: PairSet,
    *,
    val_split: str | os.PathLike | None = None,
    val_fraction: float | None = None,
    train_split: str | os.PathLike | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(train image indices, validation image indices) into `pairs.images`.

    Validation is the images listed in `val_split`, or a random `val_fraction` of them. Training
    is the images in `train_split` when given, else every image not in validation.
    """
    index = {n: i for i, n in enumerate(pairs.images)}
    if val_split is not None and val_fraction is not None:
        raise UsageError("give either a validation split file or a validation fraction, not both")
    if val_split is not None:
        val = _known(read_list(val_split), index, val_split)
    else:
        frac = 0.1 if val_fraction is None else float(val_fraction)
        if not 0.0 < frac < 1.0:
            raise UsageError(f"validation fraction must be between 0 and 1 (got {frac})")
        rng = np.random.default_rng(seed)
        n_val = max(1, round(frac * len(pairs.images)))
        val = np.sort(rng.permutation(len(pairs.images))[:n_val])
    if train_split is not None:
        train = _known(read_list(train_split), index, train_split)
        train = np.setdiff1d(train, val)
    else:
        train = np.setdiff1d(np.arange(len(pairs.images)), val)
    if len(train) < 2 or len(val) < 2:
        raise UsageError(f"need at least 2 training and 2 validation images (got {len(train)} and {len(val)})")
    return train, val


def _known(names: list[str], index: dict[str, int], source) -> np.ndarray:
    found = [index[n] for n in names if n in index]
    if len(found) < len(names):
        LOG.warning("%d images listed in %s have no captions or no file; ignored", len(names) - len(found), source)
    return np.array(sorted(set(found)), dtype=np.int64)


def word_dropout(caption: str, rng: np.random.Generator, p: float, keep_min: int = 3) -> str:
    """`caption` with each word dropped with probability `p`, keeping at least `keep_min` words
    (and all of a caption that has no more): a caption augmentation for frozen text towers."""
    words = caption.split()
    if len(words) <= keep_min:
        return caption
    keep = rng.random(len(words)) >= p
    if keep.sum() < keep_min:
        keep[np.sort(rng.choice(len(words), keep_min, replace=False))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def caption_variants(captions: list[str], n: int, p: float, seed: int = 0) -> list[list[str]]:
    """`n` word-dropout variants of every caption (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    return [[word_dropout(c, rng, p) for _ in range(n)] for c in captions]
