"""Near-duplicate images: the same photo stored twice, re-encoded, resized, cropped a little,
brightened, or with its EXIF rotation applied to the pixels.

Two stages:
  1. candidates from the stored embeddings: every pair whose cosine is at least `threshold`
     (one FAISS range search of the image vectors against themselves; no image is encoded);
  2. a cheap perceptual check on each candidate pair: the Pearson correlation of 16x16
     grayscale thumbnails of the central 90 % of both pictures (EXIF orientation applied, so a
     rotation stripped into the pixels looks the same). Correlation ignores brightness and
     contrast changes and survives re-encoding, resizing and a small crop, while two shots of
     one scene (a burst) whose subject moved fall below `min_pixel_similarity`. Identical bytes
     (same content hash) are duplicates without either check.
Accepted pairs are grouped transitively (union-find); groups come largest first.

The range search compares every vector with every other (exact, float32): fine for a photo
library of up to a few hundred thousand images on a laptop; it holds all image vectors in memory.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .errors import DecodeError, EmptyIndexError, UsageError

LOG = logging.getLogger(__name__)

#: embedding cosine a pair must reach to be a candidate. bench/dupes.py with mini: re-encoding
#: (JPEG q30) and halving move an embedding more than one would think (a third of those pairs fall
#: below 0.80), while the pixel check at 0.80 keeps distinct photos apart (pair precision 1.0 at
#: every cut from 0.50 up), so the cut is low and the pixel check decides
DEFAULT_THRESHOLD = 0.65
#: thumbnail correlation a candidate pair must reach (bench/dupes.py)
DEFAULT_PIXEL_SIMILARITY = 0.80
THUMB = 16
CENTRE = 0.9


@dataclass(frozen=True)
class DupePair:
    a: str
    b: str
    score: float  # embedding cosine
    pixels: float | None  # thumbnail correlation (None: identical bytes, not checked)
    identical: bool

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "score": round(self.score, 6),
            "pixels": None if self.pixels is None else round(self.pixels, 4),
            "identical": self.identical,
        }


@dataclass(frozen=True)
class DupeGroup:
    paths: list[str]
    pairs: list[DupePair] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"size": len(self.paths), "paths": self.paths, "pairs": [p.to_dict() for p in self.pairs]}


def thumbnail(path: str) -> np.ndarray | None:
    """The zero-mean, unit-norm 16x16 grayscale thumbnail of the picture's centre (None if unreadable)."""
    from .images import load_image

    try:
        img = load_image(path, draft_size=4 * THUMB)
    except DecodeError as e:
        LOG.warning("dupes: cannot read %s (%s); skipped in the perceptual check", path, e)
        return None
    w, h = img.size
    dx, dy = w * (1 - CENTRE) / 2, h * (1 - CENTRE) / 2
    from PIL import Image

    g = np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BILINEAR, box=(dx, dy, w - dx, h - dy)), dtype=np.float64).reshape(-1)
    g = g - g.mean()
    n = np.linalg.norm(g)
    return g / n if n > 1e-9 else g


def pixel_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return 0.0
    if not a.any() and not b.any():  # two flat pictures: same only if equally flat
        return 1.0
    return float(a @ b)


def candidate_pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with cosine >= threshold (rows are unit vectors)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    lims, D, I = index.range_search(vectors, float(threshold))
    out = []
    for i in range(len(vectors)):
        for d, j in zip(D[lims[i] : lims[i + 1]], I[lims[i] : lims[i + 1]]):
            if j > i:
                out.append((i, int(j), float(d)))
    return out


def find_duplicates(store, dim: int, threshold: float = DEFAULT_THRESHOLD, min_pixel_similarity: float = DEFAULT_PIXEL_SIMILARITY) -> list[DupeGroup]:
    """Groups of near-duplicate images among the bundle's stored image embeddings."""
    if not (0.0 < threshold <= 1.0):
        raise UsageError(f"threshold must be in (0, 1], not {threshold}")
    parts = list(store.iter_vectors("image", dim))
    if not parts:
        raise EmptyIndexError("this index holds no images")
    ids = np.concatenate([p[0] for p in parts])
    vecs = np.ascontiguousarray(np.concatenate([p[1] for p in parts]), dtype=np.float32)
    rows: dict[int, dict] = {}
    for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
        rows.update(store.item_rows(ids[start : start + 900]))
    hashes = store.file_hashes(ids)
    path_of = [rows[int(i)]["path"] for i in ids]
    hash_of = [hashes.get(int(i)) for i in ids]
    thumbs: dict[int, np.ndarray | None] = {}

    def thumb(i: int):
        if i not in thumbs:
            thumbs[i] = thumbnail(path_of[i])
        return thumbs[i]

    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    accepted: list[tuple[int, int, DupePair]] = []
    for i, j, score in candidate_pairs(vecs, threshold):
        identical = hash_of[i] is not None and hash_of[i] == hash_of[j]
        pixels = None if identical else pixel_similarity(thumb(i), thumb(j))
        if identical or pixels >= min_pixel_similarity:
            accepted.append((i, j, DupePair(path_of[i], path_of[j], score, pixels, identical)))
            parent[find(i)] = find(j)
    pairs_of: dict[int, list[DupePair]] = defaultdict(list)
    for i, _, pair in accepted:
        pairs_of[find(i)].append(pair)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(ids)):
        r = find(i)
        if r in pairs_of:
            members[r].append(i)
    groups = [DupeGroup(sorted(path_of[i] for i in m), sorted(pairs_of[r], key=lambda p: -p.score)) for r, m in members.items()]
    groups.sort(key=lambda g: (-len(g.paths), -max(p.score for p in g.pairs), g.paths[0]))
    return groups
