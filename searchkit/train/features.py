"""Tower features computed once and cached on disk, so head training costs seconds an epoch.

For partial fine-tuning the cached thing is the frozen trunk's output instead: the activations at
the input of the tower's last N blocks (`cut_activations`), so an epoch runs only those blocks.
For the text side (LiT-style tuning of MiniLM's last N layers) it is every caption's token states
at the input of the first tuned layer (`text_states`, keyed by that layer's index), stored ragged:
the non-padding tokens of all captions in one array, plus each caption's token count.

A cache entry is one `.npz` file (features plus a row mask of the inputs that could be read)
named by the tower spec and a hash of everything that determines it: the tower, the feature
code's version and the inputs (image paths with their size and mtime, or the texts themselves).
The cache lives under `$SEARCHKIT_CACHE/features`, default `~/.cache/searchkit/features`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..encoders.towers import ImageTower, TextTower
from ..errors import DecodeError, InputError

if TYPE_CHECKING:
    from ..encoders.nets import TowerCut

LOG = logging.getLogger(__name__)

#: bump when the feature code changes in a way that changes the numbers
FEATURE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("SEARCHKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "searchkit")
    return Path(root) / "features"


def _entry_path(cache_dir: Path, tower_spec: str, kind: str, payload: object) -> Path:
    digest = hashlib.sha256(
        json.dumps({"tower": tower_spec, "kind": kind, "v": FEATURE_VERSION, "items": payload}).encode()
    ).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", tower_spec)[:60]
    return cache_dir / f"{slug}-{kind}-{digest}.npz"


def _load(path: Path, first: str = "features", second: str = "ok") -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as z:
            return z[first].astype(np.float32), z[second].astype(bool if second == "ok" else np.int64)
    except (OSError, KeyError, ValueError):
        return None


def _save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, leave=False)


def image_features(
    tower: ImageTower,
    paths: Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, tower.dim) float32, ok (n,) bool) for image files; unreadable rows are zero.

    The tower's raw output is what is cached (under its `cache_spec`); `tower.derive` is applied
    on the way out.
    """
    raw, ok = _cached_image_pass(
        tower, tower.cache_spec, tower.raw_features, paths,
        cache_dir=cache_dir, batch_size=batch_size, workers=workers, progress=progress,
    )
    if raw is None:
        return np.zeros((len(paths), tower.dim), dtype=np.float32), ok
    return _derive(tower, raw), ok


def cut_activations(
    tower: ImageTower,
    cut: TowerCut,
    paths: Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(activations (n, ...) float32 at the input of the tower's last `cut.blocks` blocks, ok (n,)).

    Cached like `image_features`, under the tower's `cache_spec` and the cut (the pretrained trunk
    is all they depend on). Unreadable rows are zero; InputError when no image can be read.
    """
    import torch

    def trunk(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return cut.trunk(batch.to(tower.device)).float()

    acts, ok = _cached_image_pass(
        tower, f"{tower.cache_spec}@last{cut.blocks}", trunk, paths,
        cache_dir=cache_dir, batch_size=batch_size, workers=workers, progress=progress,
    )
    if acts is None:
        raise InputError(f"none of the {len(paths)} images could be read")
    return acts, ok


def _cached_image_pass(
    tower: ImageTower,
    cache_spec: str,
    fn: Callable,
    paths: Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None,
    batch_size: int,
    workers: int,
    progress: bool,
) -> tuple[np.ndarray | None, np.ndarray]:
    """`fn` (a preprocessed batch -> a tensor per image) over image files, cached under `cache_spec`.

    Returns (outputs (n, ...) float32, ok); outputs is None when no image could be read (then
    nothing is cached).
    """
    import torch

    from ..images import load_image

    paths = [os.path.abspath(p) for p in paths]
    payload = [(p, *_stat(p)) for p in paths]
    entry = _entry_path(Path(cache_dir) if cache_dir else default_cache_dir(), cache_spec, "image", payload)
    cached = _load(entry) if entry.exists() else None
    if cached is not None and len(cached[0]) == len(paths):
        LOG.info("image features of %d files from cache %s", len(paths), entry)
        return cached

    def prepare(path: str):
        try:
            return tower.preprocess(load_image(path, draft_size=tower.image_size))
        except DecodeError as e:
            LOG.warning("skipping unreadable image %s: %s", path, e)
            return None

    feats: np.ndarray | None = None
    ok = np.zeros(len(paths), dtype=bool)
    with ThreadPoolExecutor(max(1, workers)) as pool, _bar(len(paths), f"{cache_spec} images", progress) as bar:
        for start in range(0, len(paths), batch_size):
            tensors = list(pool.map(prepare, paths[start : start + batch_size]))
            rows = [i for i, t in enumerate(tensors) if t is not None]
            if rows:
                out = fn(torch.stack([tensors[i] for i in rows])).cpu().numpy()
                if feats is None:
                    feats = np.zeros((len(paths), *out.shape[1:]), dtype=np.float32)
                idx = np.asarray(rows) + start
                feats[idx] = out
                ok[idx] = True
            bar.update(len(tensors))
    if feats is not None:
        _save(entry, features=feats, ok=ok)
    return feats, ok


def _derive(tower: ImageTower, raw: np.ndarray) -> np.ndarray:
    import torch

    out = [tower.derive(torch.from_numpy(raw[i : i + 4096])).cpu().numpy() for i in range(0, len(raw), 4096)]
    return np.concatenate(out).astype(np.float32) if out else raw


def text_features(
    tower: TextTower,
    texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """(n, tower.dim) float32 features of texts."""
    texts = [str(t) for t in texts]
    entry = _entry_path(Path(cache_dir) if cache_dir else default_cache_dir(), tower.spec, "text", texts)
    cached = _load(entry) if entry.exists() else None
    if cached is not None and len(cached[0]) == len(texts):
        LOG.info("text features of %d texts from cache %s", len(texts), entry)
        return cached[0]
    # sort by length so each batch pads little; results go back to input order
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    feats = np.zeros((len(texts), tower.dim), dtype=np.float32)
    with _bar(len(texts), f"{tower.spec} texts", progress) as bar:
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            feats[idx] = tower.features([texts[i] for i in idx]).cpu().numpy()
            bar.update(len(idx))
    _save(entry, features=feats, ok=np.ones(len(texts), dtype=bool))
    return feats


class TokenStates:
    """Token states of texts at a text tower cut, ragged: text i's tokens are rows
    `offsets[i] : offsets[i] + lengths[i]` of `states` (one (tokens, d) float32 tensor)."""

    def __init__(self, states, offsets: np.ndarray, lengths: np.ndarray):
        self.states, self.offsets, self.lengths = states, offsets, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, idx) -> TokenStates:
        """The states of texts `idx` (shares `states`, no copy)."""
        return TokenStates(self.states, self.offsets[idx], self.lengths[idx])

    def batch(self, idx, device: str = "cpu"):
        """(states (b, longest, d) zero-padded, attention mask (b, longest) int64) of texts `idx`."""
        import torch

        idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        lengths = self.lengths[idx]
        pos = np.arange(int(lengths.max()) if len(idx) else 0)
        mask = pos[None, :] < lengths[:, None]
        rows = torch.from_numpy(np.where(mask, self.offsets[idx][:, None] + pos[None, :], 0))
        mask_t = torch.from_numpy(mask)
        hidden = self.states[rows] * mask_t[..., None]
        return hidden.to(device), mask_t.to(torch.int64).to(device)


def text_states(
    tower: TextTower,
    cut: TowerCut,
    texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> TokenStates:
    """Every text's token states at the input of the tower's last `cut.blocks` layers (cached
    under the tower spec and that layer's index; the pretrained trunk is all they depend on)."""
    import torch

    texts = [str(t) for t in texts]
    layer = len(cut.network.encoder.layer) - cut.blocks
    entry = _entry_path(Path(cache_dir) if cache_dir else default_cache_dir(), f"{tower.spec}@layer{layer}", "text-states", texts)
    cached = _load(entry, "states", "lengths") if entry.exists() else None
    if cached is not None and len(cached[1]) == len(texts):
        LOG.info("token states of %d texts from cache %s", len(texts), entry)
        states, lengths = cached
    else:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks: list[np.ndarray] = [np.zeros((0, tower.dim), dtype=np.float32)] * len(texts)
        lengths = np.zeros(len(texts), dtype=np.int64)
        with _bar(len(texts), f"{tower.spec} token states", progress) as bar, torch.no_grad():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                tokens = tower.tokens([texts[i] for i in idx])
                hidden = cut.trunk(tokens["input_ids"], tokens["attention_mask"]).float().cpu().numpy()
                for row, i in enumerate(idx):
                    lengths[i] = int(tokens["attention_mask"][row].sum())
                    chunks[i] = hidden[row, : lengths[i]]  # right-padded: the first tokens are the text's
                bar.update(len(idx))
        states = np.concatenate(chunks) if texts else np.zeros((0, tower.dim), dtype=np.float32)
        _save(entry, states=states, lengths=lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return TokenStates(torch.from_numpy(states), offsets, lengths)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1
