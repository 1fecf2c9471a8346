"""Ablations: text-only, image-only and both modalities, and every fusion method, side by side.

Features are extracted once (tokens too when attention is among the methods) and shared by
every run. Each run trains on the training rows and is scored on the evaluation rows; runs that
use both modalities are also scored with the image, and with the text, hidden at prediction time.
Single-modality runs use the first listed method; with `plain_concat`, a concatenation run
without product/difference features shows what those features add.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import Encoder
from ..errors import UsageError
from ..fsutil import atomic_write_bytes, atomic_write_json
from .data import Columns, Rows, check_classes, check_known_labels, stratified_split
from .features import Features, extract_features
from .model import FusionModel
from .report import classification_report, curve_png, markdown_table
from .train import METHODS, EpochStats, FusionConfig, fit_model

LOG = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "run",
    "modality",
    "method",
    "accuracy %",
    "macro-F1 %",
    "acc. image dropped %",
    "acc. text dropped %",
    "best epoch",
    "train s",
]


@dataclass
class AblationRun:
    name: str
    modality: str
    method: str
    interactions: bool
    accuracy: float
    macro_f1: float
    accuracy_image_dropped: float | None
    accuracy_text_dropped: float | None
    best_epoch: int
    val_accuracy: float | None
    train_seconds: float

    def row(self) -> list[Any]:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}"

        return [
            self.name,
            self.modality,
            self.method if self.interactions else f"{self.method} (no product/diff)",
            pct(self.accuracy),
            pct(self.macro_f1),
            pct(self.accuracy_image_dropped),
            pct(self.accuracy_text_dropped),
            self.best_epoch,
            f"{self.train_seconds:.1f}",
        ]


@dataclass
class AblationResult:
    encoder: str
    classes: list[str]
    n_train: int
    n_eval: int
    eval_source: str
    runs: list[AblationRun] = field(default_factory=list)
    feature_seconds: float = 0.0

    @property
    def best(self) -> AblationRun | None:
        both = [r for r in self.runs if r.modality == "both"]
        return max(both, key=lambda r: r.accuracy) if both else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best"] = None if self.best is None else self.best.name
        return d

    def markdown(self) -> str:
        head = (
            f"encoder `{self.encoder}`; classes: {', '.join(self.classes)}; "
            f"{self.n_train} training rows, {self.n_eval} evaluation rows ({self.eval_source})\n\n"
        )
        return head + markdown_table(TABLE_COLUMNS, [r.row() for r in self.runs])


def plan_runs(
    methods: Sequence[str], modalities: Sequence[str], plain_concat: bool
) -> list[tuple[str, str, str, bool]]:
    """(name, modality, method, interactions) of every run, in table order."""
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown fusion method '{m}'; use one of: {', '.join(METHODS)}")
    if not methods:
        raise UsageError("name at least one fusion method")
    runs = []
    for modality in modalities:
        if modality in ("text", "image"):
            runs.append((f"{modality}-only", modality, methods[0], True))
        elif modality == "both":
            if plain_concat and "concat" in methods:
                runs.append(("both-concat-plain", "both", "concat", False))
            runs.extend((f"both-{m}", "both", m, True) for m in methods)
        else:
            raise UsageError(f"unknown modality '{modality}'; use: both, image, text")
    return runs


def ablate(
    train_rows: Rows,
    encoder: Encoder,
    *,
    eval_rows: Rows | None = None,
    test_split: float = 0.2,
    methods: Sequence[str] = METHODS,
    modalities: Sequence[str] = ("text", "image", "both"),
    plain_concat: bool = True,
    config: FusionConfig | None = None,
    classes: Sequence[str] | None = None,
    columns: Columns = Columns(),
    out: str | os.PathLike | None = None,
    save_models: bool = False,
    cache_dir: str | os.PathLike | None = None,
    on_run: Callable[[AblationRun], None] | None = None,
    on_epoch: Callable[[str, EpochStats], None] | None = None,
) -> AblationResult:
    """Train and score every planned run; with `out`, write ablation.md and ablation.json there.

    Evaluation rows are `eval_rows`, else a stratified `test_split` share of `train_rows` held
    out before training. Nothing is written until every run has finished.
    """
    config = config or FusionConfig()
    plan = plan_runs(list(methods), list(modalities), plain_concat)
    if train_rows.labels is None:
        raise UsageError("the ablation needs labelled training rows")
    labels = check_classes(train_rows.labels, classes)
    if eval_rows is None:
        fit_idx, test_idx = stratified_split(train_rows.labels, test_split, config.seed + 1)
        if not len(test_idx):
            raise UsageError("no rows left to evaluate on; pass evaluation data or a larger --test-split")
        source = f"{test_split:.0%} held out of {train_rows.source or 'the training data'}"
        all_rows, n_fit = train_rows.subset(np.concatenate([fit_idx, test_idx])), len(fit_idx)
    else:
        if eval_rows.labels is None:
            raise UsageError("the evaluation data needs labels")
        check_known_labels(eval_rows.labels, labels)
        source = eval_rows.source or "evaluation data"
        all_rows = Rows(
            train_rows.images + eval_rows.images,
            train_rows.texts + eval_rows.texts,
            train_rows.labels + eval_rows.labels,
        )
        n_fit = len(train_rows)
    t0 = time.perf_counter()
    feats = extract_features(
        encoder, all_rows, tokens=any(m == "attention" for _, _, m, _ in plan), cache_dir=cache_dir
    )
    result = AblationResult(
        encoder=encoder.spec,
        classes=labels,
        n_train=n_fit,
        n_eval=len(all_rows) - n_fit,
        eval_source=source,
        feature_seconds=round(time.perf_counter() - t0, 1),
    )
    fit_feats = feats.subset(np.arange(n_fit))
    eval_feats = feats.subset(np.arange(n_fit, len(all_rows)))
    fit_labels = all_rows.labels[:n_fit]
    y_eval = [labels.index(lab) for lab in all_rows.labels[n_fit:]]
    models: dict[str, FusionModel] = {}
    for name, modality, method, interactions in plan:
        LOG.info("ablation run %s", name)
        cfg = replace(config, method=method, modality=modality, interactions=interactions)
        start = time.perf_counter()
        model = fit_model(
            fit_feats,
            fit_labels,
            labels,
            encoder,
            cfg,
            columns=columns,
            on_epoch=(lambda s, n=name: on_epoch(n, s)) if on_epoch else None,
            source=train_rows.source,
        )
        seconds = time.perf_counter() - start
        run = _score(name, model, eval_feats, y_eval, labels, seconds)
        result.runs.append(run)
        models[name] = model
        if on_run is not None:
            on_run(run)
    if out is not None:
        write_ablation(result, out, models if save_models else {})
    return result


def _score(name: str, model: FusionModel, feats: Features, y: list[int], labels: list[str], seconds: float) -> AblationRun:
    def acc(f: Features, dropped: str | None = None):
        return classification_report(y, model.predict_proba(f).argmax(1), labels, dropped=dropped)

    full = acc(feats)
    both = model.modality == "both"
    return AblationRun(
        name=name,
        modality=model.modality,
        method=model.method,
        interactions=model.spec.interactions,
        accuracy=full.accuracy,
        macro_f1=full.macro_f1,
        accuracy_image_dropped=acc(feats.drop("image"), "image").accuracy if both else None,
        accuracy_text_dropped=acc(feats.drop("text"), "text").accuracy if both else None,
        best_epoch=int(model.training.get("best_epoch", 0)),
        val_accuracy=model.training.get("val_accuracy"),
        train_seconds=round(seconds, 1),
    )


def write_ablation(result: AblationResult, out: str | os.PathLike, models: dict[str, FusionModel] | None = None) -> Path:
    """ablation.md, ablation.json and (optionally) one model folder per run, under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (models or {}).items():
        model.save(out / name, curve_png=curve_png(model.history, title=name))
    atomic_write_json(out / "ablation.json", result.to_dict())
    atomic_write_bytes(out / "ablation.md", result.markdown().encode("utf-8"))
    return out
