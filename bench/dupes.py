"""Near-duplicate detection on real photos: Flickr8k dev images and generated variants.

300 dev images; 100 of them get five variants each (JPEG q30, 50 % resize, 90 % centre crop,
PNG re-save, +10 % brightness), so there are 100 families of 6 files (15 true pairs each, 1,500
in all) and 200 photos without a copy. Everything is indexed with `--model` (default mini); then
`Index.dupes` runs once with a low threshold and no perceptual cut, and every setting of the
grid is scored from those candidate pairs: pair precision and recall of the groups (all pairs
inside a predicted group), per variant type, and the pairs of distinct Flickr8k photos grouped
together (the same scene shot twice by one photographer).

    nice -n 10 .venv/bin/python bench/dupes.py [--images 300 --families 100]

Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLICKR, require_data  # noqa: E402

VARIANTS = ("q30", "half", "crop90", "png", "bright")


def make_variants(src: Path, folder: Path, stem: str) -> list[Path]:
    from PIL import Image, ImageEnhance

    img = Image.open(src).convert("RGB")
    w, h = img.size
    out = {}
    out["q30"] = folder / f"{stem}_q30.jpg"
    img.save(out["q30"], quality=30)
    out["half"] = folder / f"{stem}_half.jpg"
    img.resize((w // 2, h // 2), Image.LANCZOS).save(out["half"], quality=90)
    out["crop90"] = folder / f"{stem}_crop90.jpg"
    img.crop((round(w * 0.05), round(h * 0.05), round(w * 0.95), round(h * 0.95))).save(out["crop90"], quality=90)
    out["png"] = folder / f"{stem}_png.png"
    img.save(out["png"])
    out["bright"] = folder / f"{stem}_bright.jpg"
    ImageEnhance.Brightness(img).enhance(1.1).save(out["bright"], quality=90)
    return [out[v] for v in VARIANTS]


def group_pairs(pairs, n_paths_hint=0):
    """All pairs inside the transitive groups of `pairs` (frozensets of two paths)."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for x in list(parent):
        groups.setdefault(find(x), []).append(x)
    return {frozenset(p) for g in groups.values() for p in itertools.combinations(sorted(g), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--families", type=int, default=100)
    args = ap.parse_args()
    data = require_data(FLICKR)
    from searchkit import open_index
    from searchkit.dupes import DEFAULT_PIXEL_SIMILARITY, DEFAULT_THRESHOLD

    t0 = time.perf_counter()
    names = [n.strip() for n in (data / "splits" / "dev.txt").read_text().splitlines() if n.strip()][: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        family_of: dict[str, int] = {}
        variant_of: dict[str, str] = {}
        for i, name in enumerate(names):
            orig = folder / f"p{i:04d}.jpg"
            shutil.copy(data / "images" / name, orig)
            family_of[str(orig)] = i
            variant_of[str(orig)] = "original"
            if i < args.families:
                for v, p in zip(VARIANTS, make_variants(orig, folder, f"p{i:04d}")):
                    family_of[str(p)] = i
                    variant_of[str(p)] = v
        bundle = Path(tmp) / "b"
        with open_index(bundle, create=True, model=args.model) as idx:
            idx.add([folder])
        t_index = time.perf_counter() - t0
        print(f"indexed {len(family_of)} files in {t_index:.0f} s", file=sys.stderr)
        with open_index(bundle) as idx:
            t1 = time.perf_counter()
            groups = idx.dupes(threshold=0.5, min_pixel_similarity=-1.0)
            t_dupes = time.perf_counter() - t1
            t1 = time.perf_counter()
            default_groups = idx.dupes()
            t_default = time.perf_counter() - t1
    candidates = [(p.a, p.b, p.score, -1.0 if p.pixels is None else p.pixels, p.identical) for g in groups for p in g.pairs]
    truth = {frozenset(p) for fam in range(args.families) for p in itertools.combinations([x for x, f in family_of.items() if f == fam], 2)}

    def score(pred: set) -> dict:
        hit = len(pred & truth)
        return {"precision": round(hit / len(pred), 4) if pred else 1.0, "recall": round(hit / len(truth), 4), "pairs": len(pred)}

    grid = {}
    for t in (0.50, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90):
        for px in (-1.0, 0.70, 0.75, 0.80, 0.85, 0.90):
            pred = group_pairs([(a, b) for a, b, s, p, ident in candidates if s >= t and (ident or p >= px)])
            grid[f"t={t:.2f} pixels>={px:.2f}" if px > -1 else f"t={t:.2f} no pixel check"] = score(pred)
    default_pred = {frozenset((a, b)) for g in default_groups for a, b in itertools.combinations(g.paths, 2)}
    per_variant = {}
    for v in VARIANTS:
        want = {p for p in truth if any(variant_of[x] == v for x in p) and any(variant_of[x] == "original" for x in p)}
        per_variant[f"original~{v}"] = round(len(want & default_pred) / len(want), 4)
    wrong = sorted(default_pred - truth, key=sorted)
    cross_originals = [sorted(p) for p in wrong if all(variant_of[x] == "original" for x in p)]
    name_of = {str(folder / f"p{i:04d}.jpg"): n for i, n in enumerate(names)}
    out = {
        "benchmark": "dupes",
        "model": args.model,
        "files": len(family_of),
        "families": args.families,
        "true_pairs": len(truth),
        "default": {"threshold": DEFAULT_THRESHOLD, "min_pixel_similarity": DEFAULT_PIXEL_SIMILARITY, **score(default_pred)},
        "default_recall_by_variant": per_variant,
        "false_pairs": len(wrong),
        "distinct_flickr_photos_grouped": [[name_of.get(x, Path(x).name) for x in p] for p in cross_originals[:20]],
        "grid": grid,
        "seconds": {"index": round(t_index, 1), "dupes_candidates_0.5": round(t_dupes, 2), "dupes_default": round(t_default, 2)},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
