"""Labelled image+text rows: reading a CSV, checking it, and splitting it.

A row has an image (a file name relative to an image folder), a text and a label. An empty image
cell or an empty text cell is a *missing modality*: the row still trains and predicts, through
the model's learned placeholder for that side. An image cell naming a file that does not exist is
an error, not a missing modality, so a typo never silently becomes "no image".
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UsageError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Columns:
    """Which CSV columns hold the image file name, the text and the label."""

    image: str = "image"
    text: str = "text"
    label: str = "label"


@dataclass
class Rows:
    """Parallel lists, one entry a row; `None` marks a missing image or text.

    An image is an absolute file path (as `read_rows` gives) or, for library callers, a PIL image.
    """

    images: list[Any]
    texts: list[str | None]
    labels: list[str] | None
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Rows:
        idx = [int(i) for i in idx]
        return Rows(
            [self.images[i] for i in idx],
            [self.texts[i] for i in idx],
            None if self.labels is None else [self.labels[i] for i in idx],
            self.source,
        )

    def drop(self, modality: str | None) -> Rows:
        """The same rows with every image (or every text) removed: `modality` is what is dropped."""
        if modality is None:
            return self
        if modality == "image":
            return Rows([None] * len(self), list(self.texts), self.labels, self.source)
        if modality == "text":
            return Rows(list(self.images), [None] * len(self), self.labels, self.source)
        raise UsageError(f"can only drop 'image' or 'text' (got '{modality}')")


def read_rows(
    csv_path: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    columns: Columns = Columns(),
    need_image: bool = True,
    need_text: bool = True,
    need_label: bool = True,
) -> Rows:
    """Read and check a CSV of labelled rows.

    Image names are resolved against `images_dir` (default: the CSV's folder). Raises UsageError
    for a missing column, an empty label or an empty file; InputError for an unreadable CSV, a
    missing image folder or image cells naming files that do not exist.
    """
    path = Path(csv_path)
    root = Path(images_dir) if images_dir is not None else path.parent
    if need_image and not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            _check_columns(path, fields, columns, need_image, need_text, need_label)
            raw = list(reader)
    except FileNotFoundError as e:
        raise InputError(f"data file {path} does not exist") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not raw:
        raise UsageError(f"{path} has a header but no rows")

    images: list[Any] = []
    texts: list[str | None] = []
    labels: list[str] = []
    missing_files: list[tuple[int, str]] = []
    for line, rec in enumerate(raw, start=2):  # line 1 is the header
        name = (rec.get(columns.image) or "").strip() if need_image else ""
        if name:
            full = name if os.path.isabs(name) else str(root / name)
            if not os.path.isfile(full):
                missing_files.append((line, name))
            images.append(os.path.abspath(full))
        else:
            images.append(None)
        text = (rec.get(columns.text) or "").strip() if need_text else ""
        texts.append(text or None)
        if need_label:
            label = (rec.get(columns.label) or "").strip()
            if not label:
                raise UsageError(f"{path} line {line}: empty '{columns.label}' cell (every row needs a label)")
            labels.append(label)
    if missing_files:
        line, name = missing_files[0]
        more = f" (and {len(missing_files) - 1} more)" if len(missing_files) > 1 else ""
        raise InputError(
            f"{path} line {line}: image file '{name}' not found under {root}{more}; "
            "leave the cell empty for a row without an image"
        )
    return Rows(images, texts, labels if need_label else None, str(path))


def _check_columns(
    path: Path, fields: list[str], columns: Columns, need_image: bool, need_text: bool, need_label: bool
) -> None:
    wanted = [
        (columns.image, "--image-col", need_image),
        (columns.text, "--text-col", need_text),
        (columns.label, "--label-col", need_label),
    ]
    for name, flag, needed in wanted:
        if needed and name not in fields:
            raise UsageError(
                f"{path} has no column '{name}' (columns: {', '.join(fields) or 'none'}); "
                f"name the right one with {flag}"
            )


def check_classes(labels: Sequence[str], declared: Sequence[str] | None = None) -> list[str]:
    """The class list a model is trained on: `declared` in its order, else the sorted labels.

    Raises UsageError when fewer than two classes are present, when a row's label is not
    declared, or when a declared class has no rows (an empty class).
    """
    present = sorted(set(labels))
    if declared:
        declared = [d.strip() for d in declared if d.strip()]
        if len(set(declared)) != len(declared):
            raise UsageError(f"the class list repeats a label: {', '.join(declared)}")
        unknown = [lab for lab in present if lab not in declared]
        if unknown:
            raise UsageError(f"labels not in the class list: {', '.join(unknown)} (classes: {', '.join(declared)})")
        empty = [d for d in declared if d not in present]
        if empty:
            raise UsageError(f"class {', '.join(repr(e) for e in empty)} has no rows in the training data")
        classes = list(declared)
    else:
        classes = present
    if len(classes) < 2:
        raise UsageError(f"need at least two classes to train a classifier (found: {', '.join(classes) or 'none'})")
    return classes


def check_known_labels(labels: Sequence[str], classes: Sequence[str]) -> None:
    """UsageError naming labels the model never saw in training."""
    unseen = sorted(set(labels) - set(classes))
    if unseen:
        raise UsageError(
            f"labels not seen at training time: {', '.join(unseen)} (the model knows: {', '.join(classes)})"
        )


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): about `fraction` of every class held out.

    A class keeps at least one training row; a class with a single row is never held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"a split fraction must be in [0, 1) (got {fraction})")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    if fraction > 0:
        for lab in sorted(set(labels.tolist())):
            idx = rng.permutation(np.flatnonzero(labels == lab))
            k = min(len(idx) - 1, int(round(fraction * len(idx))))
            held.extend(idx[:k].tolist())
    held_arr = np.sort(np.asarray(held, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), held_arr)
    return train, held_arr
