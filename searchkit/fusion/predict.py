"""Using a trained fusion model: evaluate it on labelled rows, predict one image and/or text."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import Encoder
from ..errors import UsageError
from .data import Rows, check_known_labels
from .model import FusionModel
from .report import EvalReport, classification_report


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]
    image: str | None
    text: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities, "image": self.image, "text": self.text}


def evaluate_model(
    model: FusionModel,
    encoder: Encoder,
    rows: Rows,
    *,
    drop: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> EvalReport:
    """Accuracy, macro-F1, per-class scores and confusion matrix of `model` on labelled rows.

    `drop="image"` (or `"text"`) hides that side of every row, measuring the model with one
    modality missing at prediction time. UsageError when a row's label is not a model class.
    """
    if rows.labels is None:
        raise UsageError("evaluation needs a label for every row")
    check_known_labels(rows.labels, model.classes)
    feats = model.features(encoder, rows.drop(drop), cache_dir=cache_dir, cache=cache)
    probs = model.predict_proba(feats)
    y_true = [model.classes.index(lab) for lab in rows.labels]
    return classification_report(y_true, probs.argmax(1), model.classes, dropped=drop)


def predict_one(
    model: FusionModel,
    encoder: Encoder,
    *,
    image: str | os.PathLike | Any | None = None,
    text: str | None = None,
    cache: bool = False,
) -> Prediction:
    """Class probabilities for one image (a path or a PIL image) and/or one text.

    Either may be left out; the model's placeholder stands in for it. UsageError when both are.
    """
    text = text.strip() if text else None
    if image is None and not text:
        raise UsageError("give an image, a text, or both to predict from")
    if model.modality == "image" and image is None:
        raise UsageError("this model was trained on images alone; give an image")
    if model.modality == "text" and not text:
        raise UsageError("this model was trained on texts alone; give a text")
    if isinstance(image, (str, os.PathLike)):
        from ..errors import DecodeError
        from ..images import read_bytes

        image = os.path.abspath(image)
        try:
            read_bytes(image)
        except DecodeError as e:
            raise DecodeError(f"{image}: {e}") from e
    rows = Rows([image], [text], None)
    probs = model.predict_proba(model.features(encoder, rows, cache=cache))[0]
    best = int(np.argmax(probs))
    return Prediction(
        label=model.classes[best],
        probabilities={c: round(float(p), 6) for c, p in zip(model.classes, probs)},
        image=image if isinstance(image, str) else None,
        text=text,
    )


def image_for_plot(image: str | Path | Any | None):
    """A PIL image to draw, or None."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        from ..images import load_image

        return load_image(image)
    return image
