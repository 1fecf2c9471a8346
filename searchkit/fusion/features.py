"""Frozen-encoder features of data rows, computed once and cached on disk.

Rows share features: two rows naming the same image file (or the same text) point at one
feature row, so a data set with every image twice encodes each image once. `Features` keeps the
unique feature rows plus, for every data row, the index of its image and its text (-1: missing).

The cache is one SQLite file per encoder under `$SEARCHKIT_CACHE/fusion` (default
`~/.cache/searchkit/fusion`), named by the encoder's fingerprint; entries are keyed by the image
file's content hash or by the text itself, and by the kind of feature (pooled or tokens), so a
renamed or copied file is still a hit and an edited one is not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import Encoder
from ..errors import DecodeError
from .data import Rows

LOG = logging.getLogger(__name__)

#: bump when feature code changes the numbers it stores
FEATURE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("SEARCHKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "searchkit")
    return Path(root) / "fusion"


@dataclass
class Features:
    """Unique image/text features and, for every data row, which of them it has (-1: none)."""

    image_index: np.ndarray  # (n,) int64
    text_index: np.ndarray  # (n,) int64
    image: np.ndarray  # (u, dim) float32 pooled, L2-normalized (the encoder contract)
    text: np.ndarray  # (v, dim) float32
    image_tokens: np.ndarray | None = None  # (u, T, d_img) float16
    text_tokens: np.ndarray | None = None  # (v, L, d_txt) float16, zero-padded
    text_mask: np.ndarray | None = None  # (v, L) bool, True at real tokens

    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def has_tokens(self) -> bool:
        return self.image_tokens is not None and self.text_tokens is not None

    def subset(self, rows: Sequence[int] | np.ndarray) -> Features:
        """Features of some data rows (the unique tables are shared, not copied)."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(self, image_index=self.image_index[rows], text_index=self.text_index[rows])

    def drop(self, modality: str | None) -> Features:
        """The same rows with every image (`"image"`) or every text (`"text"`) missing."""
        if modality == "image":
            return replace(self, image_index=np.full_like(self.image_index, -1))
        if modality == "text":
            return replace(self, text_index=np.full_like(self.text_index, -1))
        return self


class FeatureCache:
    """Feature arrays in one SQLite file: (kind, key) -> shape, dtype, bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features (kind TEXT, key TEXT, shape TEXT, dtype TEXT, data BLOB, "
            "PRIMARY KEY (kind, key))"
        )

    @classmethod
    def for_encoder(cls, encoder: Encoder, cache_dir: str | os.PathLike | None = None) -> FeatureCache:
        digest = hashlib.sha256(f"{encoder.fingerprint}|v{FEATURE_VERSION}".encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.spec)[-48:]
        return cls(Path(cache_dir or default_cache_dir()) / f"{slug}-{digest}.sqlite")

    def get(self, kind: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, shape, dtype, data in self._db.execute(
                f"SELECT key, shape, dtype, data FROM features WHERE kind=? AND key IN ({marks})", [kind, *chunk]
            ):
                dims = tuple(int(s) for s in shape.split("x")) if shape else ()
                found[key] = np.frombuffer(data, dtype=dtype).reshape(dims)
        return found

    def put(self, kind: str, items: Iterable[tuple[str, np.ndarray]]) -> None:
        rows = [
            (kind, key, "x".join(str(s) for s in arr.shape), arr.dtype.str, np.ascontiguousarray(arr).tobytes())
            for key, arr in items
        ]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


class _NoCache(FeatureCache):
    def __init__(self) -> None:  # nothing is stored
        pass

    def get(self, kind: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return {}

    def put(self, kind: str, items: Iterable[tuple[str, np.ndarray]]) -> None:
        pass

    def close(self) -> None:
        pass


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _unique(values: Sequence[Any], key_of) -> tuple[list[str], list[Any], np.ndarray]:
    """(unique keys, one value per key, row -> key index or -1)."""
    keys: dict[str, int] = {}
    firsts: list[str] = []
    index = np.full(len(values), -1, dtype=np.int64)
    for i, v in enumerate(values):
        if v is None:
            continue
        k = key_of(v)
        if k not in keys:
            keys[k] = len(keys)
            firsts.append(v)
        index[i] = keys[k]
    return list(keys), firsts, index


def _image_key(image: Any) -> str:
    """Content hash of an image file's bytes, or of a PIL image's pixels."""
    from ..images import read_bytes

    if isinstance(image, (str, os.PathLike)):
        try:
            return hashlib.sha256(read_bytes(image)).hexdigest()
        except DecodeError as e:
            raise DecodeError(f"{image}: {e}") from e
    h = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    h.update(image.tobytes())
    return "pixels-" + h.hexdigest()


def _image_keys(images: Sequence[Any]) -> tuple[list[str], list[Any], np.ndarray]:
    """(unique content keys, the image of each key, row -> key index or -1)."""
    def ident(img: Any) -> Any:
        return str(img) if isinstance(img, (str, os.PathLike)) else id(img)

    keys: dict[Any, str] = {}
    for img in images:
        if img is not None and ident(img) not in keys:
            keys[ident(img)] = _image_key(img)
    return _unique(images, lambda img: keys[ident(img)])


def _encode_images(encoder: Encoder, paths: list[Any], fn) -> list[Any]:
    """Apply `fn(NCHW batch)` to images batch by batch; one output row per image, in order.

    `fn` returns an array with one row per image, or a tuple of such arrays (then each output
    row is a tuple)."""
    import torch

    from ..encoders.base import stack_batch
    from ..images import load_image, to_rgb

    def prepare(item: Any):
        if not isinstance(item, (str, os.PathLike)):
            return encoder.preprocess(to_rgb(item))
        try:
            return encoder.preprocess(load_image(item, draft_size=encoder.image_size))
        except DecodeError as e:
            raise DecodeError(f"{item}: {e}") from e

    out: list[np.ndarray] = []
    step = max(1, encoder.image_batch_size)
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), step):
            batch = torch.as_tensor(stack_batch(list(pool.map(prepare, paths[start : start + step]))))
            result = fn(batch)
            out.extend(zip(*result) if isinstance(result, tuple) else np.asarray(result))
    return out


#: inputs encoded between two cache writes
CHUNK = 512
#: storage type of each kind of feature (token sequences are large: half precision)
DTYPES = {"image": np.float32, "text": np.float32, "image_tokens": np.float16, "text_tokens": np.float16}


def _cached(cache: FeatureCache, kinds: list[str], keys: list[str], values: list, compute) -> list:
    """Features of `values` (keyed by `keys`): cache hits, the rest computed and stored.

    With one kind, `compute` gives one array row per value and the result is a list of rows;
    with several, it gives a tuple per value (one entry per kind) and so does the result.
    """
    have = [cache.get(kind, keys) for kind in kinds]
    todo = [i for i, k in enumerate(keys) if any(k not in h for h in have)]
    if todo:
        LOG.info("%s: %d cached, computing %d", "+".join(kinds), len(keys) - len(todo), len(todo))
    for start in range(0, len(todo), CHUNK):  # stored chunk by chunk: an interrupted run resumes
        chunk = todo[start : start + CHUNK]
        fresh = compute([values[i] for i in chunk])
        for j, (kind, h) in enumerate(zip(kinds, have)):
            new = [(keys[i], np.asarray(f if len(kinds) == 1 else f[j], dtype=DTYPES[kind])) for i, f in zip(chunk, fresh)]
            cache.put(kind, new)
            h.update(new)
        if len(todo) > CHUNK:
            LOG.info("%s: %d/%d computed", "+".join(kinds), min(start + CHUNK, len(todo)), len(todo))
    if len(kinds) == 1:
        return [have[0][k] for k in keys]
    return [tuple(h[k] for h in have) for k in keys]


def extract_features(
    encoder: Encoder,
    rows: Rows,
    *,
    tokens: bool = False,
    use_image: bool = True,
    use_text: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> Features:
    """Pooled features (and, with `tokens`, token sequences) of every row's image and text.

    A side that is not used (`use_image=False`) is treated as missing in every row and not
    encoded. Raises DecodeError naming a file that cannot be decoded, UsageError when tokens
    are asked of an encoder that cannot give them.
    """
    from .tokens import token_adapter

    adapter = token_adapter(encoder) if tokens else None
    store = FeatureCache.for_encoder(encoder, cache_dir) if cache else _NoCache()
    try:
        img_paths = rows.images if use_image else [None] * len(rows)
        texts = rows.texts if use_text else [None] * len(rows)
        ikeys, ipaths, image_index = _image_keys(img_paths)
        tkeys, tvals, text_index = _unique(texts, _text_key)
        dim = encoder.dim

        text = _cached(store, ["text"], tkeys, tvals, encoder.encode_texts)
        if adapter is None:
            pooled = _cached(store, ["image"], ikeys, ipaths, lambda ps: _encode_images(encoder, ps, encoder.encode_image_tensors))
            return Features(image_index, text_index, _stack(pooled, (0, dim)), _stack(text, (0, dim)))
        # with tokens, one forward pass gives the pooled embedding and the image tokens
        both = _cached(
            store, ["image", "image_tokens"], ikeys, ipaths,
            lambda ps: _encode_images(encoder, ps, adapter.pooled_and_image_tokens),
        )
        ttok = _cached(store, ["text_tokens"], tkeys, tvals, lambda ts: _batched_text_tokens(adapter, ts))
        text_tokens, text_mask = _pad(ttok)
        return Features(
            image_index,
            text_index,
            _stack([p for p, _ in both], (0, dim)),
            _stack(text, (0, dim)),
            image_tokens=_stack([t for _, t in both], None),
            text_tokens=text_tokens,
            text_mask=text_mask,
        )
    finally:
        store.close()


def _batched_text_tokens(adapter, texts: list[str], batch: int = 128) -> list[np.ndarray]:
    # sorted by length so a batch pads little; returned in input order
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[np.ndarray | None] = [None] * len(texts)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        for i, tok in zip(idx, adapter.text_tokens([texts[i] for i in idx])):
            out[i] = tok
    return out  # type: ignore[return-value]


def _stack(arrays: list[np.ndarray], empty_shape: tuple | None) -> np.ndarray:
    if arrays:
        return np.stack(arrays)
    return np.zeros(empty_shape or (0, 1, 1), dtype=np.float32 if empty_shape else np.float16)


def _pad(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length (L_i, d) sequences to a zero-padded (n, L, d) array and its mask."""
    if not seqs:
        return np.zeros((0, 1, 1), dtype=np.float16), np.zeros((0, 1), dtype=bool)
    length = max(1, max(len(s) for s in seqs))
    d = seqs[0].shape[-1]
    out = np.zeros((len(seqs), length, d), dtype=np.float16)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return out, mask
