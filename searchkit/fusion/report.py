"""Classification reports and figures: metrics, confusion matrix, training curve, prediction plot.

Figures are returned as PNG bytes so callers write them atomically (searchkit.fsutil).
Accuracy, precision, recall and F1 are percentages.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class ClassReport:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvalReport:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows: truth)."""

    n: int
    accuracy: float
    macro_f1: float
    classes: list[ClassReport]
    labels: list[str]
    confusion: list[list[int]]
    dropped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = [asdict(c) for c in self.classes]
        return d


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], *, dropped: str | None = None
) -> EvalReport:
    """Metrics of predicted class indices against true ones, over the classes `labels`."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class, f1s = [], []
    for i, lab in enumerate(labels):
        tp, pred, true = cm[i, i], cm[:, i].sum(), cm[i].sum()
        p = 100.0 * tp / pred if pred else 0.0
        r = 100.0 * tp / true if true else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class.append(ClassReport(lab, round(p, 2), round(r, 2), round(f1, 2), int(true)))
        if true:  # macro-F1 over the classes present in the evaluated data
            f1s.append(f1)
    acc = 100.0 * float(np.trace(cm)) / len(y_true) if len(y_true) else 0.0
    return EvalReport(
        n=len(y_true),
        accuracy=round(acc, 2),
        macro_f1=round(float(np.mean(f1s)) if f1s else 0.0, 2),
        classes=per_class,
        labels=list(labels),
        confusion=cm.tolist(),
        dropped=dropped,
    )


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(report: EvalReport, title: str = "") -> bytes:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted)."""
    plt = _pyplot()
    cm = np.asarray(report.confusion)
    k = len(report.labels)
    side = max(4.0, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), constrained_layout=True)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), report.labels)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title or f"accuracy {report.accuracy:.1f}%  macro-F1 {report.macro_f1:.1f}%", fontsize=10)
    top = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    return _figure_bytes(fig)


def curve_png(history: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """Training curve: loss and accuracy per epoch, training and validation."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(epochs, [h["loss"] for h in history], marker=".", label="train")
    ax_acc.plot(epochs, [h["accuracy"] for h in history], marker=".", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker=".", label="validation")
    ax_loss.set(title="cross-entropy loss", xlabel="epoch")
    ax_acc.set(title="accuracy (%)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _figure_bytes(fig)


def prediction_png(image, probabilities: Mapping[str, float], text: str | None = None) -> bytes:
    """The input image (or a blank panel) beside a bar chart of class probabilities."""
    plt = _pyplot()
    labels = list(probabilities)
    probs = [100.0 * probabilities[k] for k in labels]
    fig, (ax_img, ax_bar) = plt.subplots(
        1, 2, figsize=(10, max(3.5, 0.35 * len(labels) + 1.5)), gridspec_kw={"width_ratios": [1, 1.3]},
        constrained_layout=True,
    )
    if image is not None:
        ax_img.imshow(np.asarray(image))
    else:
        ax_img.text(0.5, 0.5, "(no image)", ha="center", va="center", color="gray")
    ax_img.set_axis_off()
    if text:
        ax_img.set_title(text if len(text) <= 70 else text[:67] + "...", fontsize=9, wrap=True)
    best = int(np.argmax(probs)) if probs else -1
    colors = ["tab:orange" if i == best else "tab:blue" for i in range(len(labels))]
    ax_bar.barh(range(len(labels)), probs, color=colors)
    ax_bar.set_yticks(range(len(labels)), labels)
    ax_bar.invert_yaxis()
    ax_bar.set(xlim=(0, 100), xlabel="probability (%)")
    for i, p in enumerate(probs):
        ax_bar.text(min(p + 1, 88), i, f"{p:.1f}", va="center", fontsize=8)
    return _figure_bytes(fig)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
