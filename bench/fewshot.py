"""Few-shot methods compared on one labelled folder (what chose `searchkit.fewshot`'s method).

    python bench/fewshot.py ../shared/data/flowers-dev [--model mini] [--shots 1,2,4,8,16] [--draws 5]

Every image is embedded once through the library's example cache (embeddings and few-shot
features); then, for each shot count and draw (the same draws as `searchkit eval fewshot`), each
method is fitted on the examples and scored on the other images:
  zeroshot         the label prompts alone
  proto-mix        each label's text prototype mixed with its examples' mean embedding (weight n/(n+1))
  tip-cache        a Tip-Adapter-style cache over the features, alpha and beta by leave-one-out
  probe            a linear probe on the features alone (no text)
  probe+text       the probe with the zero-shot logits as its prior (shipped until centring)
  c-sup+text-shrink  SimpleShot centring on the examples' mean, l2normalize(features - mean),
                   then probe+text with the prior weighted 1/(1+k) at k shots
  c-head+text      centred on the image head's training mean instead (mini's torch features are
                   l2normalize((x - mean) / std); times std, renormalized: l2normalize(x - mean)),
                   prior 1; .5: prior at a fixed 0.5; only where `feature_scale` applies
  shipped          what `FewShotClassifier.from_embeddings` does: c-head where it applies,
                   features as they are elsewhere, prior 1/(1+k)
Prints one JSON object: mean accuracy (%) per method and shot count. On CPU, mini's image tower
runs on ONNX Runtime, whose few-shot features are the embeddings; SEARCHKIT_IMAGE_ONNX=0 keeps
the torch tower and its own features.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def tip_cache(emb_s, f_s, y_s, text, scale, emb_q, f_q, n):
    onehot = np.eye(n)[y_s]
    zero_s = emb_s @ text.T
    best = (-1.0, 0.0, 1.0)
    if np.bincount(y_s, minlength=n).max() >= 2:
        sims = f_s @ f_s.T
        for beta in (1.0, 3.0, 5.5, 10.0, 20.0):
            aff = np.exp(-beta * (1 - sims))
            np.fill_diagonal(aff, 0)
            for alpha in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0):
                acc = float(((zero_s + alpha * aff @ onehot).argmax(1) == y_s).mean())
                if acc > best[0] + 1e-9:
                    best = (acc, alpha, beta)
    else:
        best = (0, 1.0, 5.5)  # Tip-Adapter's defaults when leave-one-out cannot choose
    _, alpha, beta = best
    return emb_q @ text.T + alpha * np.exp(-beta * (1 - f_q @ f_s.T)) @ onehot


def probe_text(emb_s, f_s, y_s, emb_q, f_q, text, s, n, prior=1.0, mean=None):
    """probe+text, its features centred on `mean` first (None: as they are)."""
    from searchkit.fewshot import PROBE_SCALE, fit_probe

    if mean is not None:
        f_s, f_q = norm(f_s - mean), norm(f_q - mean)
    w = fit_probe(prior * s * emb_s @ text.T, f_s, y_s, n)
    return prior * s * emb_q @ text.T + PROBE_SCALE * f_q @ w.T


def main() -> None:
    from searchkit.encoders import get_encoder
    from searchkit.eval_fewshot import draws_of, embed_folder, parse_shots
    from searchkit.evaluate import class_folders
    from searchkit.fewshot import FewShotClassifier, feature_scale, fit_probe
    from searchkit.zeroshot import DEFAULT_TEMPLATES, label_embeddings

    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--model", default="mini")
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    enc = get_encoder(args.model)
    classes = class_folders(args.folder)
    labels = [label for label, _ in classes]
    paths = [p for _, ps in classes for p in ps]
    truth = np.array([i for i, (_, ps) in enumerate(classes) for _ in ps])
    emb, feats, ok, _ = embed_folder(enc, paths)
    truth = truth[ok]
    text = label_embeddings(enc, labels, DEFAULT_TEMPLATES)
    s, n = enc.logit_scale, len(labels)
    std = feature_scale(enc, feats.shape[1])
    k_now = {"k": 1}
    methods = {
        "zeroshot": lambda es, fs, ys, eq, fq: eq @ text.T,
        "proto-mix": lambda es, fs, ys, eq, fq: eq @ norm(np.stack([
            (text[c] + (ys == c).sum() * norm(es[ys == c].mean(0))) / (1 + (ys == c).sum()) for c in range(n)
        ])).T,
        "tip-cache": lambda es, fs, ys, eq, fq: tip_cache(es, fs, ys, text, s, eq, fq, n),
        "probe": lambda es, fs, ys, eq, fq: fq @ fit_probe(np.zeros((len(ys), n)), fs, ys, n).T,
        "probe+text": lambda es, fs, ys, eq, fq: probe_text(es, fs, ys, eq, fq, text, s, n),
        "c-sup+text-shrink": lambda es, fs, ys, eq, fq: probe_text(es, fs, ys, eq, fq, text, s, n, 1 / (1 + k_now["k"]), fs.mean(0)),
        "shipped": lambda es, fs, ys, eq, fq: FewShotClassifier.from_embeddings(labels, text, es, fs, ys, s, "", std).logits(eq, fq),
    }
    if std is not None:
        for name, prior in (("c-head+text", 1.0), ("c-head+text.5", 0.5)):
            methods[name] = lambda es, fs, ys, eq, fq, p=prior: probe_text(es, norm(fs * std), ys, eq, norm(fq * std), text, s, n, p)
    out = {m: {} for m in methods}
    for k in parse_shots(args.shots):
        k_now["k"] = k
        accs = {m: [] for m in methods}
        for sup, q in draws_of(truth, n, k, args.draws):  # the draws of `searchkit eval fewshot --seed 0`
            for m, f in methods.items():
                z = f(emb[sup], feats[sup], truth[sup], emb[q], feats[q])
                accs[m].append(100.0 * float((z.argmax(1) == truth[q]).mean()))
        for m in methods:
            out[m][k] = round(float(np.mean(accs[m])), 1)
    print(json.dumps({"benchmark": "fewshot", "folder": Path(args.folder).name, "model": enc.spec, "features": int(feats.shape[1]), "draws": args.draws, "accuracy": out}))


if __name__ == "__main__":
    main()
