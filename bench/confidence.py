"""Calibrated confidence versus raw cosine on Flickr8k dev, and the fit that ships.

A random half of the 1,000 dev images is indexed (real `index` pipeline, `--model`, default
mini); the other half is held out. Every dev caption is a query: its own image is in the index
(a good match exists) or not (none does). The images of each half are split again into a fit
part and an evaluation part; the calibration (logistic map of --feature, see searchkit/confidence.py) is
fitted on the fit part's captions, their top result labelled "is the caption's own image",
and everything reported is measured on the evaluation part's captions:
  - AUROC of the top-1 confidence, and of the raw top-1 cosine, for "own image is in the index";
  - expected calibration error (10 bins) of the top-1 confidence for "top-1 is the own image",
    and a reliability diagram (PNG).

    nice -n 10 .venv/bin/python bench/confidence.py [--plot reliability.png] [--write] [--keep DIR]

--write stores the fit as searchkit/weights/calibration/<model>.json. --keep keeps the bundle and
the caption embeddings in DIR and reuses them on the next run (same model and seed). Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLICKR, require_data  # noqa: E402
from fusion_flickr8k import read_captions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=1000, help="dev images used (half indexed)")
    ap.add_argument("--plot", type=Path, default=None, help="reliability diagram PNG")
    ap.add_argument("--write", nargs="?", const="model", default=None, help="write the fit into the package (as <model>.json; '--write default': as default.json, the fallback)")
    ap.add_argument("--feature", default="cosine", choices=["z", "z_top", "cosine"], help="the feature the map is fitted on")
    ap.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the bundle and caption embeddings here")
    args = ap.parse_args()
    data = require_data(FLICKR)
    import numpy as np

    from searchkit import open_index
    from searchkit.confidence import Calibration, auroc, bulk_stats, expected_calibration_error, fit_logistic

    t0 = time.perf_counter()
    names = [n.strip() for n in (data / "splits" / "dev.txt").read_text().splitlines() if n.strip()][: args.images]
    rng = random.Random(args.seed)
    rng.shuffle(names)
    half = len(names) // 2
    inside, outside = names[:half], names[half:]
    fit_images = set(inside[: len(inside) // 2] + outside[: len(outside) // 2])
    captions = read_captions(data)
    queries = [(img, c) for img in names for c in captions[img]]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        bundle = root / f"dev-half-{args.model}-{args.seed}-{args.images}"
        with open_index(bundle, create=True, model=args.model) as idx:
            idx.add([data / "images" / n for n in inside])
        t_index = time.perf_counter() - t0
        print(f"indexed {len(inside)} images in {t_index:.0f} s", file=sys.stderr)
        idx = open_index(bundle)
        cached = root / f"{bundle.name}.captions.npy"
        if cached.exists():
            q = np.load(cached)
        else:
            q = idx.encoder.encode_texts([c for _, c in queries])
            np.save(cached, q)
        print(f"captions embedded at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        sample = idx._searcher.bulk_sample("image")
        feats = {"fit": ([], []), "eval": []}
        for (img, _), v in zip(queries, q):
            res = idx.search(v, k=10)
            scores = np.array([r.score for r in res])
            own = np.array([Path(r.path).name == img for r in res])
            mu, sigma = bulk_stats(v, sample)
            x = Calibration(0, 0, feature=args.feature).feature_of(scores, mu, sigma, float(scores.mean()))
            if img in fit_images:  # the top result: what "no good match" is about
                feats["fit"][0].append(x[0])
                feats["fit"][1].append(own[0])
            else:
                feats["eval"].append((img in inside, scores[0], x[0], bool(own[0]), scores[0] - scores[1]))
        idx.close()
    a, b = fit_logistic(np.array(feats["fit"][0]), np.array(feats["fit"][1]))
    cal = Calibration(a, b, feature=args.feature)
    ev = feats["eval"]
    in_index = np.array([e[0] for e in ev])
    raw1 = np.array([e[1] for e in ev])
    z1 = np.array([e[2] for e in ev])
    top1_ok = np.array([e[3] for e in ev])
    gap = np.array([e[4] for e in ev])
    conf1 = cal(z1)
    ece, bins = expected_calibration_error(conf1, top1_ok)
    raw_ece, _ = expected_calibration_error(np.clip(raw1, 0, 1), top1_ok)
    out = {
        "benchmark": "confidence",
        "model": args.model,
        "indexed_images": len(inside),
        "held_out_images": len(outside),
        "eval_queries": len(ev),
        "fit": {"feature": args.feature, "a": round(a, 4), "b": round(b, 4), "rows": len(feats["fit"][0])},
        "auroc_own_image_in_index": {
            "confidence_top1": round(auroc(conf1, in_index), 4),
            "raw_cosine_top1": round(auroc(raw1, in_index), 4),
            "top1_minus_top2_cosine": round(auroc(gap, in_index), 4),
        },
        "top1_is_own_image": {
            "share": round(float(top1_ok.mean()), 4),
            "ece_confidence": round(ece, 4),
            "ece_raw_cosine_as_probability": round(raw_ece, 4),
            "mean_confidence": round(float(conf1.mean()), 4),
        },
        "min_confidence_0.5": {
            "kept_share_in_index": round(float((conf1[in_index] >= 0.5).mean()), 4),
            "kept_share_not_in_index": round(float((conf1[~in_index] >= 0.5).mean()), 4),
            "top1_correct_when_kept": round(float(top1_ok[conf1 >= 0.5].mean()) if (conf1 >= 0.5).any() else float("nan"), 4),
        },
        "reliability_bins": [{k: round(v, 4) if isinstance(v, float) else v for k, v in b_.items()} for b_ in bins],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect")
        ax.plot([x["confidence"] for x in bins], [x["accuracy"] for x in bins], "o-", label=f"confidence (ECE {ece:.3f})")
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel("share of top-1 that is the caption's own image")
        ax.set_title(f"Flickr8k dev, {args.model}: reliability", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)
        out["plot"] = str(args.plot)
    if args.write:
        path = REPO / "searchkit" / "weights" / "calibration" / (f"{args.model}.json" if args.write != "default" else "default.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        src = f"bench/confidence.py --model {args.model} --seed {args.seed}: Flickr8k dev, {len(inside)} images indexed"
        entry = {"a": round(a, 5), "b": round(b, 5), "feature": args.feature, "source": src}
        if args.write == "default":
            entry["fallback"] = True
        path.write_text(json.dumps(entry, indent=1) + "\n")
        out["written"] = str(path.relative_to(REPO))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
