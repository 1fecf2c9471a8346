"""Which per-query feature of the top-1 score best tells "a good match exists" (the choice
behind searchkit/confidence.py), from the queries `bench/confidence.py --keep DIR` dumped.

    .venv/bin/python bench/confidence_features.py DIR/dev-half-mini-0-1000.queries.npz

Every feature is computed from what a search has at hand: the top-10 cosines of the query and
the mean/std of its cosines over the index sample. AUROC on the evaluation queries for "the
caption's own image is in the index", and, fitted on the fit queries with the top-1 label "is
the own image", the ECE of that feature's logistic map on the evaluation queries. One JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from searchkit.confidence import auroc, expected_calibration_error, fit_logistic  # noqa: E402


def features(scores: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    s1 = scores[:, 0]
    top = scores.mean(axis=1)
    return {
        "raw cosine": s1,
        "z (s1 - mu) / sigma": (s1 - mu) / sigma,
        "s1 - mu": s1 - mu,
        "s1 - mean(top10)": s1 - top,
        "(s1 - mean(top10)) / sigma": (s1 - top) / sigma,
        "s1 - s2": s1 - scores[:, 1],
        "(s1 - s2) / sigma": (s1 - scores[:, 1]) / sigma,
        "(s1 - s10) / (s1 - mu)": (s1 - scores[:, -1]) / np.maximum(s1 - mu, 1e-6),
    }


def main() -> None:
    d = np.load(sys.argv[1])
    scores, own, mu, sigma = d["scores"], d["own"], d["mu"], d["sigma"]
    in_index, fit = d["in_index"].astype(bool), d["fit"].astype(bool)
    ev = ~fit
    out = {"queries": int(len(scores)), "eval": int(ev.sum()), "features": {}}
    for name, f in features(scores, mu, sigma).items():
        a, b = fit_logistic(f[fit], own[fit, 0])
        p = 1 / (1 + np.exp(-(a * f[ev] + b)))
        ece, _ = expected_calibration_error(p, own[ev, 0])
        out["features"][name] = {"auroc_in_index": round(auroc(f[ev], in_index[ev]), 4), "ece_top1": round(ece, 4)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
