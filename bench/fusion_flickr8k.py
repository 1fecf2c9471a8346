"""Real-data check of the fusion classifiers: image–caption matching on Flickr8k.

For every image of a split, one of its own captions makes a `match` row and one caption of
another image of the same split a `no-match` row, so neither side alone says anything about
the label (each image and, in expectation, each kind of caption appear under both labels).
Training rows come from the official train split, evaluation rows from dev. The ablation
(text-only, image-only, both with every fusion method) runs on frozen features of `--model`
(default `mini`: pip-shipped towers with trained heads, offline), and each both-modality model
is also scored with the image, and with the text, dropped at prediction time.

    .venv/bin/python bench/fusion_flickr8k.py                 # prints one JSON object
    .venv/bin/python bench/fusion_flickr8k.py --limit 500     # quick look

Progress goes to stderr; the JSON object is the only thing on stdout. When the model cannot be
loaded (e.g. `mini` has no trained heads yet) the object says `"status": "pending"` and why.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k"


def read_captions(data: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    with open(data / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = (row["caption"] or "").strip()
            if text:
                captions[row["image"].strip()].append(text)
    return captions


def build_matching_csv(data: Path, split: str, out_csv: Path, *, seed: int = 0, limit: int | None = None) -> int:
    """Write `image,text,label` rows for a split (two rows per image); returns the row count."""
    names = [n.strip() for n in (data / "splits" / f"{split}.txt").read_text().splitlines() if n.strip()]
    captions = read_captions(data)
    names = [n for n in names if captions.get(n) and (data / "images" / n).is_file()]
    rng = random.Random(f"{seed}-{split}")
    if limit:
        names = sorted(rng.sample(names, min(limit, len(names))))
    rows = []
    for i, name in enumerate(names):
        rows.append((name, rng.choice(captions[name]), "match"))
        other = names[(i + rng.randrange(1, len(names))) % len(names)]
        rows.append((name, rng.choice(captions[other]), "no-match"))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "label"])
        w.writerows(rows)
    return len(rows)


def load_encoder(spec: str):
    from searchkit.encoders import get_encoder

    try:  # make sure the trained dual-encoder families are registered
        import searchkit.encoders.mini  # noqa: F401
    except ImportError as e:  # get_encoder below reports the model as unavailable
        logging.getLogger(__name__).info("searchkit.encoders.mini not importable: %s", e)
    return get_encoder(spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Flickr8k folder (images/, captions.csv, splits/)")
    p.add_argument("--model", default="mini", help="encoder spec (default: mini)")
    p.add_argument("--out", type=Path, default=REPO / "build" / "fusion-flickr8k", help="folder for CSVs and the ablation table")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--methods", default="concat,gated,attention")
    p.add_argument("--input-dropout", type=float, default=0.4, help="dropout on the pooled features (library default)")
    p.add_argument("--limit", type=int, default=None, help="use only this many images of each split")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = "python bench/fusion_flickr8k.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not (args.data / "captions.csv").is_file():
        print(json.dumps({"status": "skipped", "reason": f"no Flickr8k data at {args.data}", "command": command}))
        return 0
    t0 = time.perf_counter()
    train_csv, dev_csv = args.out / "train.csv", args.out / "dev.csv"
    n_train = build_matching_csv(args.data, "train", train_csv, seed=args.seed, limit=args.limit)
    n_dev = build_matching_csv(args.data, "dev", dev_csv, seed=args.seed, limit=args.limit)

    from searchkit.errors import SearchkitError
    from searchkit.fusion import FusionConfig, ablate, read_rows

    try:
        encoder = load_encoder(args.model)
    except SearchkitError as e:
        print(json.dumps({"status": "pending", "model": args.model, "reason": str(e), "command": command}))
        return 0
    images = args.data / "images"
    result = ablate(
        read_rows(train_csv, images_dir=images),
        encoder,
        eval_rows=read_rows(dev_csv, images_dir=images),
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        config=FusionConfig(epochs=args.epochs, seed=args.seed, input_dropout=args.input_dropout),
        out=args.out,
        on_run=lambda r: print(f"{r.name}: {r.accuracy:.1f}% ({r.train_seconds:.0f}s)", file=sys.stderr),
    )
    best = result.best
    report = {
        "status": "ok",
        "task": "flickr8k image-caption matching (1 own + 1 foreign caption per image)",
        "model": encoder.spec,
        "train_rows": n_train,
        "dev_rows": n_dev,
        "epochs": args.epochs,
        "input_dropout": args.input_dropout,
        "runs": {
            r.name: {
                "accuracy": r.accuracy,
                "macro_f1": r.macro_f1,
                "accuracy_image_dropped": r.accuracy_image_dropped,
                "accuracy_text_dropped": r.accuracy_text_dropped,
                "best_epoch": r.best_epoch,
                "train_seconds": r.train_seconds,
            }
            for r in result.runs
        },
        "best": None if best is None else {"run": best.name, "accuracy": best.accuracy},
        "feature_seconds": result.feature_seconds,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "table": str(args.out / "ablation.md"),
        "command": command,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
