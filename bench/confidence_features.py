"""Which feature of the top-1 score best tells "a good match exists" (the choice behind
searchkit/confidence.py), over several random halves of Flickr8k dev.

    nice -n 10 .venv/bin/python bench/confidence_features.py [--model mini] [--seeds 0,1,2,3,4] [--keep DIR]

The protocol of bench/confidence.py, replayed exactly in NumPy for each seed: all 1,000 dev
images are embedded once (through a real bundle) and all 5,000 dev captions once; per seed, a
random half of the images is "indexed" (exact search over it, as the flat index does), the other
half held out, and the images of each half split again into a fit part and an evaluation part.
For every feature: AUROC on the evaluation captions for "the caption's own image is in the
index", and the ECE (10 bins) of the feature's logistic map, fitted on the fit captions with the
top-1 label "is the own image". Mean and spread over the seeds; one JSON object.

Features of the query's own scores (what a search has at hand: its top-10 cosines, the mean mu
and spread sigma of its cosines over the index sample), plus two kinds not tried before:
  - all of them at once: one logistic map over (s1, s2, mean of top 10, mu, sigma);
  - the hit's hubness (CSLS, Conneau et al. 2018; querybank normalisation, Bogolin et al. 2022):
    an image that is close to every caption scores high for any query, so its score says less.
    r(i) = mean of image i's 10 best cosines to a bank of captions from the *train* split (no
    dev caption in it); features s1 - r(top hit), the CSLS 2 s1 - mean(top 10) - r(top hit),
    and the image-side z (s1 - m(i)) / sd(i), m and sd over the bank. These need per-image
    statistics the bundle does not store, so they are measured here only.
--keep caches the embeddings in DIR.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import FLICKR, require_data  # noqa: E402
from fusion_flickr8k import read_captions  # noqa: E402

from searchkit.confidence import SAMPLE_SIZE, auroc, expected_calibration_error, fit_logistic  # noqa: E402

BANK = 5000  # train captions in the hubness bank (one per train image, random images)
TOP = 10


def embeddings(model: str, root: Path, data: Path):
    """(dev image names, their vectors, dev captions as (image, text), their vectors, bank vectors)."""
    from searchkit import open_index

    names = [n.strip() for n in (data / "splits" / "dev.txt").read_text().splitlines() if n.strip()]
    captions = read_captions(data)
    slug = re.sub(r"[^A-Za-z0-9_.+-]", "_", model)  # a checkpoint path is a model spec too
    cache = root / f"features-{slug}.npz"
    if cache.exists():
        d = np.load(cache)
        img, cap, bank = d["images"], d["captions"], d["bank"]
    else:
        with open_index(root / f"dev-all-{slug}", create=True, model=model) as idx:
            idx.add([data / "images" / n for n in names])
            ids, vecs = next(idx.store.iter_vectors("image", idx.dim, chunk=10**9))
            rows = idx.store.item_rows(ids)
            by_name = {Path(rows[int(i)]["path"]).name: v for i, v in zip(ids, vecs)}
            img = np.stack([by_name[n] for n in names])
            cap = idx.encoder.encode_texts([c for n in names for c in captions[n]])
            train = [n.strip() for n in (data / "splits" / "train.txt").read_text().splitlines() if n.strip()]
            pick = random.Random(0).sample(train, BANK)
            bank = idx.encoder.encode_texts([captions[n][0] for n in pick])
        np.savez(cache, images=img, captions=cap, bank=bank)
    queries = [(n, c) for n in names for c in captions[n]]
    return names, img.astype(np.float32), queries, cap.astype(np.float32), bank.astype(np.float32)


def fit_multi(X: np.ndarray, y: np.ndarray, iters: int = 100) -> np.ndarray:
    """Logistic regression weights (last one the bias) by Newton's method, tiny ridge; the
    columns standardised first so one step size suits them all."""
    mean, std = X.mean(0), X.std(0) + 1e-12
    Z = np.column_stack([(X - mean) / std, np.ones(len(X))])
    w = np.zeros(Z.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(Z @ w)))
        g = Z.T @ (p - y) + 1e-4 * w
        H = (Z * (p * (1 - p))[:, None]).T @ Z + 1e-4 * np.eye(len(w))
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return lambda X2: ((X2 - mean) / std) @ w[:-1] + w[-1]


def one_seed(seed: int, names, img, queries, cap, bank, n_images: int) -> dict:
    order = list(names[:n_images])
    random.Random(seed).shuffle(order)  # as bench/confidence.py
    half = len(order) // 2
    inside, outside = order[:half], order[half:]
    fit_images = set(inside[: len(inside) // 2] + outside[: len(outside) // 2])
    row = {n: i for i, n in enumerate(names)}
    inside_set = set(inside)
    keep = [k for k, (n, _) in enumerate(queries) if n in row and row[n] < n_images]
    q = cap[keep]
    qimg = [queries[k][0] for k in keep]
    index = img[[row[n] for n in inside]]
    # the bulk sample: what Searcher.bulk_sample draws (all of them when the index is smaller)
    pick = np.sort(np.random.default_rng(0).choice(len(index), min(SAMPLE_SIZE, len(index)), replace=False))
    S = q @ index.T
    top = np.argsort(-S, axis=1)[:, :TOP]
    scores = np.take_along_axis(S, top, axis=1)
    bulk = S[:, pick]
    mu, sigma = bulk.mean(1), np.maximum(bulk.std(1), 1e-3)
    own = np.array([inside[t] == n for t, n in zip(top[:, 0], qimg)])
    in_index = np.array([n in inside_set for n in qimg])
    fit = np.array([n in fit_images for n in qimg])
    ev = ~fit
    # the hubness of each indexed image over the train-caption bank
    B = index @ bank.T
    r_hub = -np.sort(-B, axis=1)[:, :TOP].mean(1)
    m_img, sd_img = B.mean(1), B.std(1) + 1e-6
    s1, hit = scores[:, 0], top[:, 0]
    top_mean = scores.mean(1)
    feats = {
        "raw cosine": s1,
        "z (s1 - mu) / sigma": (s1 - mu) / sigma,
        "s1 - mu": s1 - mu,
        "s1 - mean(top10)": s1 - top_mean,
        "(s1 - mean(top10)) / sigma": (s1 - top_mean) / sigma,
        "s1 - s2": s1 - scores[:, 1],
        "(s1 - s2) / sigma": (s1 - scores[:, 1]) / sigma,
        "(s1 - s10) / (s1 - mu)": (s1 - scores[:, -1]) / np.maximum(s1 - mu, 1e-6),
        "hub: s1 - r(hit)": s1 - r_hub[hit],
        "hub: CSLS 2 s1 - mean(top10) - r(hit)": 2 * s1 - top_mean - r_hub[hit],
        "hub: image-side z (s1 - m(hit)) / sd(hit)": (s1 - m_img[hit]) / sd_img[hit],
    }
    out = {}
    for name, f in feats.items():
        a, b = fit_logistic(f[fit], own[fit])
        p = 1 / (1 + np.exp(-(a * f[ev] + b)))
        out[name] = (auroc(f[ev], in_index[ev]), expected_calibration_error(p, own[ev])[0])
    # the results re-ranked by CSLS (their top hit may change): its top-1 CSLS
    csls = 2 * S - top_mean[:, None] - r_hub[None, :]
    csls_hit = csls.argmax(1)
    csls_own = np.array([inside[t] == n for t, n in zip(csls_hit, qimg)])
    f = csls.max(1)
    a, b = fit_logistic(f[fit], csls_own[fit])
    out["hub-ranked: top-1 of the CSLS ranking"] = (auroc(f[ev], in_index[ev]), expected_calibration_error(1 / (1 + np.exp(-(a * f[ev] + b))), csls_own[ev])[0])
    # how typical the caption is: its mean cosine to its 10 nearest bank captions
    density = -np.sort(-(q @ bank.T), axis=1)[:, :TOP].mean(1)
    for name, X in {
        "joint logistic (s1, s2, mean top10, mu, sigma)": np.column_stack([s1, scores[:, 1], top_mean, mu, sigma]),
        "joint logistic (s1, caption density in the bank)": np.column_stack([s1, density]),
        "joint logistic (s1 - r(hit), caption density in the bank)": np.column_stack([s1 - r_hub[hit], density]),
    }.items():
        logit = fit_multi(X[fit], own[fit].astype(float))(X[ev])
        out[name] = (auroc(logit, in_index[ev]), expected_calibration_error(1 / (1 + np.exp(-logit)), own[ev])[0])
    # not features: how often the top hit is the own image (captions whose image is indexed)
    out["_top1_is_own_image (cosine ranking)"] = (float(own[ev & in_index].mean()), 0.0)
    out["_top1_is_own_image (CSLS ranking)"] = (float(csls_own[ev & in_index].mean()), 0.0)
    # ceilings: the AUROC of an oracle that knows whether the own image is the top hit (in the top 10)
    own10 = np.array([n in {inside[t] for t in row_} for row_, n in zip(top, qimg)])
    out["_auroc_ceiling_oracle_top1"] = (auroc(own[ev].astype(float), in_index[ev]), 0.0)
    out["_auroc_ceiling_oracle_top10"] = (auroc(own10[ev].astype(float), in_index[ev]), 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--keep", type=Path, default=None, help="cache the embeddings here")
    args = ap.parse_args()
    data = require_data(FLICKR)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        names, img, queries, cap, bank = embeddings(args.model, root, data)
        per_seed = [one_seed(s, names, img, queries, cap, bank, args.images) for s in seeds]
    out = {"benchmark": "confidence_features", "model": args.model, "seeds": seeds, "bank_captions": len(bank), "features": {}}
    raw = np.array([r["raw cosine"][0] for r in per_seed])
    out["features"] = {}
    for name in per_seed[0]:
        au = np.array([r[name][0] for r in per_seed])
        ece = np.array([r[name][1] for r in per_seed])
        if name.startswith("_"):
            out[name[1:]] = {"mean": round(float(au.mean()), 4), "per_seed": [round(float(x), 4) for x in au]}
            continue
        out["features"][name] = {
            "auroc_in_index_mean": round(float(au.mean()), 4), "auroc_sd": round(float(au.std()), 4),
            "auroc_minus_raw_mean": round(float((au - raw).mean()), 4),
            "ece_top1_mean": round(float(ece.mean()), 4), "per_seed_auroc": [round(float(x), 4) for x in au],
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
