"""Combined and negative query terms on real photos (clothing-dev, 10 classes, 341 photos).

1. Negative terms: for each base query, alone and minus "shoes" (weight 1, what `--not shoes`
   does; and 0.5), the share of shoes in the top 50 and the mean rank of the shoe photos in the
   full ranking of every photo. The base queries are generic ones fixed before looking at the
   results (GENERIC; all reported), plus the earlier shoe-leaning ones (SHOE_LEANING).
2. Text + image: every photo in turn is the image term (its stored embedding, the vector the
   index holds for it; the photo itself is left out of its results), the text term names its class
   ("a photo of a {class}"); precision@10 of the photo's class for the image alone, the text
   alone and both (1:1), averaged over the photos.

    nice -n 10 .venv/bin/python bench/query_terms.py [--model mini] [--limit N] [--bundle DIR]

--bundle keeps the index bundle there (and reuses it when it exists) instead of a temporary one.

Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, require_data  # noqa: E402

PROMPT = {"longsleeve": "long-sleeve top", "outwear": "jacket", "t-shirt": "t-shirt"}
GENERIC = ("clothing", "a photo of clothing", "something to wear", "an outfit", "a fashion item", "apparel",
           "a product photo", "an accessory")
SHOE_LEANING = ("black leather", "sports gear", "a pair")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--limit", type=int, default=0, help="photos per class (0: all)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--bundle", type=Path, default=None)
    args = ap.parse_args()
    data = require_data(SHARED / "clothing-dev")
    from searchkit import open_index
    from searchkit.terms import Query

    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or Path(tmp) / "clothing"
        with open_index(bundle, create=True, model=args.model) as idx:
            if args.limit:
                paths = [p for c in classes for p in sorted((data / c).glob("*"))[: args.limit]]
            else:
                paths = [data]
            idx.add(paths)
        print(f"indexed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        idx = open_index(bundle)
        label_of = lambda path: Path(path).parent.name  # noqa: E731
        ids, vecs = next(idx.store.iter_vectors("image", idx.dim, chunk=10**9))
        rows = idx.store.item_rows(ids)
        n = len(ids)

        def shoes(query) -> dict:
            """Share of shoes in the top 50 and the mean (1-based) rank of the shoe photos."""
            res = idx.search(query, k=n)
            is_shoe = [label_of(r.path) == "shoes" for r in res]
            ranks = [i + 1 for i, s in enumerate(is_shoe) if s]
            return {"top50": round(sum(is_shoe[:50]) / 50, 3), "mean_rank": round(sum(ranks) / len(ranks), 1)}

        def negatives(bases) -> dict:
            return {
                base: {
                    "alone": shoes(base),
                    "minus_0.5_shoes": shoes([(1, base), (-0.5, "shoes")]),
                    "minus_shoes": shoes([(1, base), (-1, "shoes")]),
                }
                for base in bases
            }

        generic, leaning, query_shoes = negatives(GENERIC), negatives(SHOE_LEANING), shoes("shoes")
        mean_of = lambda key, field: round(sum(g[key][field] for g in generic.values()) / len(generic), 3 if field == "top50" else 1)  # noqa: E731
        n_shoes = sum(label_of(r["path"]) == "shoes" for r in rows.values())

        def precision(query, own: int, label: str) -> float:
            res = [r for r in idx.search(query, k=args.k + 1) if r.id != own][: args.k]
            return sum(label_of(r.path) == label for r in res) / args.k

        text_vecs = {c: idx._searcher.embed_texts([f"a photo of a {PROMPT.get(c, c)}"])[0] for c in classes}
        sums = {"image": 0.0, "text": 0.0, "text+image": 0.0}
        per_class: dict[str, list[float]] = {c: [0.0, 0.0, 0.0, 0] for c in classes}
        for i, v in zip(ids, vecs):
            label = label_of(rows[int(i)]["path"])
            p = (
                precision([(1, v)], int(i), label),
                precision([(1, text_vecs[label])], int(i), label),
                precision(Query([(1, text_vecs[label]), (1, v)]), int(i), label),
            )
            for key, val in zip(sums, p):
                sums[key] += val
            acc = per_class[label]
            for j in range(3):
                acc[j] += p[j]
            acc[3] += 1
        idx.close()
    out = {
        "benchmark": "query_terms",
        "model": args.model,
        "photos": n,
        "negative_terms": {
            "shoes_in_index": n_shoes,
            "share_of_shoes": round(n_shoes / n, 3),
            "mean_rank_by_chance": round((n + 1) / 2, 1),
            "query_shoes": query_shoes,  # the negative term itself, as a query
            "generic": generic,
            "generic_mean": {key: {f: mean_of(key, f) for f in ("top50", "mean_rank")} for key in ("alone", "minus_0.5_shoes", "minus_shoes")},
            "shoe_leaning": leaning,
        },
        "text_plus_image": {
            f"precision@{args.k}": {k: round(v / n, 3) for k, v in sums.items()},
            "per_class": {c: {"image": round(a[0] / a[3], 3), "text": round(a[1] / a[3], 3), "text+image": round(a[2] / a[3], 3)} for c, a in per_class.items() if a[3]},
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
