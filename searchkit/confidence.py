"""A calibrated `confidence` per result: one meaning for every query.

A logistic map of one feature of the result's score, fitted on Flickr8k dev by
`bench/confidence.py` (label: the top result is the caption's own image), gives the probability
that the result is the query's true match: confidence = 1 / (1 + exp(-(a * x + b))). Features:
  z       (score - mu) / sigma, mu and sigma the mean and spread of the query's scores over a
          fixed random sample of the index's vectors: how far the hit stands above the bulk,
          the same scale for every query and every encoder
  z_top   (score - mean of the query's 10 best scores) / sigma
  cosine  the raw score
Which one an encoder uses is chosen by measurement (bench/confidence_features.py) and written in
its calibration file.

Calibrations ship in the package, one small JSON per encoder under `weights/calibration/`:
`<spec>.json` (the spec with every character other than letters, digits, `.` `_` `-` made `_`),
else `<family>.json` (the part before the first `:`), else `default.json` — for encoders never
fitted; it holds mini's fit of z and is marked `"fallback": true` (z is scale-free, so it
transfers roughly, where a raw cosine does not; but only a fit of that encoder is calibrated).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

CALIBRATION_DIR = Path(__file__).parent / "weights" / "calibration"
#: stored vectors the bulk of a query's scores is estimated from
SAMPLE_SIZE = 2048


#: how many of the query's best (unfiltered) scores the "z_top" feature averages
TOP = 10
FEATURES = ("z", "z_top", "cosine")


@dataclass(frozen=True)
class Calibration:
    a: float
    b: float
    source: str = ""
    fallback: bool = False
    #: "z": (score - mu) / sigma; "z_top": (score - mean of the query's top 10) / sigma;
    #: "cosine": the score itself
    feature: str = "z"

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(z, dtype=np.float64) + self.b)))

    def feature_of(self, scores: np.ndarray, mu: float, sigma: float, top_mean: float | None = None) -> np.ndarray:
        if self.feature == "cosine":
            return np.asarray(scores, dtype=np.float64)
        centre = top_mean if self.feature == "z_top" else mu
        return z_scores(scores, centre, sigma)


def _file_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec) + ".json"


@lru_cache(maxsize=32)
def load_calibration(spec: str | None) -> Calibration:
    """The shipped calibration of `spec`, else of its family, else the fallback."""
    names = []
    if spec:
        names += [_file_name(spec), _file_name(spec.partition(":")[0])]
    for name in [*names, "default.json"]:
        path = CALIBRATION_DIR / name
        if path.is_file():
            d = json.loads(path.read_text())
            feature = d.get("feature", "z")
            if feature not in FEATURES:
                raise ValueError(f"{path}: unknown confidence feature {feature!r}")
            fallback = bool(d.get("fallback", False)) or name == "default.json"
            return Calibration(float(d["a"]), float(d["b"]), d.get("source", name), fallback, feature)
    return Calibration(1.0, -3.0, "built-in", True)


def bulk_stats(query: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the query's scores over the sample (sigma floored so a
    one-item index gives finite numbers)."""
    if len(sample) == 0:
        return 0.0, 1.0
    s = sample @ np.asarray(query, dtype=np.float32).reshape(-1)
    return float(s.mean()), max(float(s.std()), 1e-3)


def z_scores(scores: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return (np.asarray(scores, dtype=np.float64) - mu) / sigma


def confidences(scores: np.ndarray, mu: float, sigma: float, cal: Calibration, top_mean: float | None = None) -> np.ndarray:
    out = cal(cal.feature_of(scores, mu, sigma, top_mean))
    return np.where(np.isfinite(out), out, 0.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(a, b) maximising the likelihood of y ~ sigmoid(a x + b) (Newton's method, tiny ridge)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(2)
    X = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        g = X.T @ (p - y) + 1e-6 * w
        H = (X * (p * (1 - p))[:, None]).T @ X + 1e-6 * np.eye(2)
        step = np.linalg.solve(H, g)
        w -= step
        if float(np.abs(step).max()) < 1e-9:
            break
    return float(w[0]), float(w[1])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return math.nan
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE over equal-width bins, and the bins (for a reliability diagram)."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        gap = abs(conf[m].mean() - correct[m].mean())
        ece += m.mean() * gap
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()), "confidence": float(conf[m].mean()), "accuracy": float(correct[m].mean())})
    return float(ece), table
