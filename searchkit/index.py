"""The index bundle: a folder that describes itself, and the `Index` API over it.

    <bundle>/manifest.json   format version, encoder, dim, metric, vector files, counts, times
    <bundle>/meta.db         SQLite: files, items (+ embeddings), failures (see store.py)
    <bundle>/image.faiss     FAISS index of image items (ids = items.id)
    <bundle>/text.faiss      FAISS index of text items
    <bundle>/text-onnx/      the text tower as ONNX + tokenizer, so text queries skip torch

meta.db is the source of truth; every change to it is one transaction. The FAISS files are
derived from it and replaced atomically at the end of a run together with the manifest, which
records the database generation they reflect; a reader that finds them stale (a run was killed)
rebuilds them from meta.db in memory, and the next writer saves them again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    CorruptIndexError,
    EmptyIndexError,
    IndexBusyError,
    IndexNotFoundError,
    InputError,
    ModelMismatchError,
    UsageError,
)
from .fsutil import atomic_write_json
from .results import AddSummary, ClassifyResult, SearchResult
from .store import Store

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("image", "text")
MANIFEST = "manifest.json"
META_DB = "meta.db"
TEXT_ONNX_DIR = "text-onnx"


def searchkit_home() -> Path:
    return Path(os.environ.get("SEARCHKIT_HOME", "indexes"))


def resolve_index_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """A value with a path separator, or that exists, is the bundle folder; else a name under
    `$SEARCHKIT_HOME` (default ./indexes). None means the name `default`."""
    if name_or_path is None:
        return searchkit_home() / "default"
    value = str(name_or_path)
    if isinstance(name_or_path, Path) or os.sep in value or "/" in value or os.path.exists(value):
        return Path(value)
    return searchkit_home() / value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Index:
    """An index bundle. Use `open_index` to get one."""

    def __init__(self, path: Path, store: Store, *, writable: bool = False):
        self.path = Path(path)
        self.store = store
        self.writable = writable
        self._encoder = None
        self._vectors: dict[str, Any] = {}
        self._vectors_generation: dict[str, int] = {}
        self._lock_fd: int | None = None
        self._text_query = None

    # -- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def spec(self) -> str | None:
        return self.store.get_meta("encoder_spec")

    @property
    def dim(self) -> int:
        return int(self.store.get_meta("dim") or 0)

    @property
    def encoder(self):
        """The exact encoder this bundle was built with (loaded on first use)."""
        if self._encoder is None:
            from .encoders import get_encoder

            if not self.spec:
                raise EmptyIndexError(f"index '{self.name}' has no model yet; add files first")
            enc = get_encoder(self.spec)
            self._check_fingerprint(enc)
            self._encoder = enc
        return self._encoder

    def _check_fingerprint(self, enc) -> None:
        stored = self.store.get_meta("encoder_fingerprint")
        if stored and stored != enc.fingerprint:
            raise ModelMismatchError(
                f"index '{self.name}' was built with {self.spec} (fingerprint {stored[:16]}), "
                f"but that spec now loads different weights ({enc.fingerprint[:16]})"
            )

    def bind_encoder(self, enc) -> None:
        """Use `enc` for this bundle: records it in an empty bundle, refuses a different one."""
        if self.spec is None:
            with self.store.transaction():
                self.store.set_meta("encoder_spec", enc.spec)
                self.store.set_meta("encoder_fingerprint", enc.fingerprint)
                self.store.set_meta("dim", enc.dim)
                self.store.set_meta("created_at", _now())
            self._encoder = enc
            self._write_manifest()
            return
        if enc.fingerprint != self.store.get_meta("encoder_fingerprint"):
            raise ModelMismatchError(
                f"index '{self.name}' holds embeddings of {self.spec}; refusing to add embeddings of "
                f"{enc.spec}. Use another --index, or omit --model to use {self.spec}"
            )
        self._encoder = enc

    # -- vectors --------------------------------------------------------------------------------
    def vectors(self, kind: str):
        """The FAISS index of one kind, loaded from disk or rebuilt from meta.db when stale."""
        from .vectors import FlatVectors

        if kind not in KINDS:
            raise UsageError(f"unknown kind '{kind}'; use one of: {', '.join(KINDS)}")
        gen = self.store.generation
        if kind in self._vectors and self._vectors_generation.get(kind) == gen:
            return self._vectors[kind]
        manifest = self.read_manifest() or {}
        entry = (manifest.get("vectors") or {}).get(kind) or {}
        file = self.path / f"{kind}.faiss"
        if entry.get("generation") == gen and file.exists():
            vec = FlatVectors.load(file, self.dim)
        else:
            ids, mat = self.store.vectors(kind, self.dim)
            vec = FlatVectors.build(self.dim, ids, mat)
        self._vectors[kind] = vec
        self._vectors_generation[kind] = gen
        return vec

    def save(self) -> None:
        """Write the FAISS files and the manifest (atomically) for the current generation."""
        for kind in KINDS:
            self.vectors(kind).save(self.path / f"{kind}.faiss")
        self._write_manifest({k: self._vectors_generation[k] for k in KINDS})

    def read_manifest(self) -> dict | None:
        import json

        try:
            return json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise CorruptIndexError(f"cannot read {self.path / MANIFEST}: {e}") from e

    def _write_manifest(self, saved_generations: dict[str, int] | None = None) -> None:
        """Describe the bundle; `saved_generations`: the generation each FAISS file on disk
        reflects, when they were just written (otherwise the previous manifest's entries stay)."""
        counts = self.store.counts()
        gen = self.store.generation
        old = (self.read_manifest() or {}).get("vectors", {})
        saved = saved_generations or {k: old.get(k, {}).get("generation") for k in KINDS}
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder": {
                "spec": self.spec,
                "fingerprint": self.store.get_meta("encoder_fingerprint"),
                "dim": self.dim,
            },
            "metric": "inner_product",
            "normalized": True,
            "vector_index": {"kind": "flat", "faiss": "IndexIDMap2(IndexFlatIP)"},
            "vectors": {
                k: {"file": f"{k}.faiss", "count": counts.get(k, 0), "generation": saved[k]}
                for k in KINDS
            },
            "counts": {**counts, "files": self.store.file_count(), "failures": len(self.store.failures())},
            "generation": gen,
            "created_at": self.store.get_meta("created_at"),
            "updated_at": _now(),
        }
        atomic_write_json(self.path / MANIFEST, manifest)

    # -- lifecycle ------------------------------------------------------------------------------
    def _acquire_write_lock(self) -> None:
        import fcntl

        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise IndexBusyError(
                f"index '{self.name}' is being written by another searchkit process; wait for it to finish"
            ) from e
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API -----------------------------------------------------------------------------
    def add(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        text_column: str | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> AddSummary:
        """Index image files, folders of images and text corpora, incrementally.

        Unchanged files are skipped without decoding, changed ones re-encoded, vanished ones
        removed, moved ones keep their vectors. Unreadable inputs are recorded as failures
        (see `failures()`) and counted in the summary; the run goes on.
        """
        from .pipeline import add_paths

        if not self.writable:
            raise UsageError("this index was opened read-only; use open_index(..., create=True) to add")
        summary = add_paths(self, paths, text_column=text_column, batch_size=batch_size, workers=workers, progress=progress)
        self._ensure_text_query_model()
        return summary

    def _text_query_encoder(self):
        """The bundle's torch-free text tower (text-onnx/) when it matches, else the encoder."""
        if self._encoder is not None:
            return self._encoder
        if self._text_query is None:
            fingerprint = self.store.get_meta("encoder_fingerprint")
            folder = self.path / TEXT_ONNX_DIR
            try:
                from .encoders.onnx import OnnxTextEncoder

                if fingerprint and OnnxTextEncoder.matches(folder, fingerprint):
                    self._text_query = OnnxTextEncoder(folder)
            except Exception as e:  # any failure here only costs speed: fall back to torch
                LOG.info("text queries use the full encoder (%s)", e)
            if self._text_query is None:
                self._text_query = self.encoder
        return self._text_query

    def _ensure_text_query_model(self) -> None:
        """Export the text tower for torch-free queries, once per bundle (best effort)."""
        if self._encoder is None or os.environ.get("SEARCHKIT_TEXT_ONNX") == "0":
            return
        folder = self.path / TEXT_ONNX_DIR
        try:
            from .encoders.onnx import OnnxTextEncoder, export_text_query_model

            if not OnnxTextEncoder.matches(folder, self._encoder.fingerprint):
                export_text_query_model(self._encoder, folder)
        except Exception as e:
            LOG.warning("could not export the text tower for fast queries (%s); queries will load the full model", e)

    def _embed_query(self, query) -> np.ndarray:
        from PIL import Image

        from .images import load_image, to_rgb

        if isinstance(query, str):
            if not query.strip():
                raise UsageError("empty query text")
            return self._text_query_encoder().encode_texts([query])
        if isinstance(query, Path):
            img = load_image_or_raise(query, draft_size=self.encoder.image_size)
        elif isinstance(query, Image.Image):
            img = to_rgb(query)
        elif isinstance(query, np.ndarray):
            return np.atleast_2d(query).astype(np.float32)
        else:
            raise UsageError(f"query must be text, an image path (pathlib.Path) or a PIL image, not {type(query).__name__}")
        return self.encoder.encode_images([img])

    def search(self, query, k: int = 10, kind: str = "image") -> list[SearchResult]:
        """The k items of `kind` nearest to a text (str), an image (PIL or pathlib.Path) or an
        embedding; best first."""
        if k < 1:
            raise UsageError("k must be at least 1")
        vec = self.vectors(kind)
        if len(vec) == 0:
            what = "images" if kind == "image" else "text items"
            hint = "index a folder of images" if kind == "image" else "index a text corpus (.txt .csv .tsv .jsonl)"
            raise EmptyIndexError(f"index '{self.name}' holds no {what}; {hint} first")
        scores, ids = vec.search(self._embed_query(query), k)
        rows = self.store.item_rows(i for i in ids[0] if i >= 0)
        out = []
        for score, i in zip(scores[0], ids[0]):
            row = rows.get(int(i))
            if row is None:
                continue
            out.append(
                SearchResult(len(out) + 1, float(score), row["kind"], row["id"], row["path"], row["text"], row["locator"])
            )
        return out

    def classify(self, images, labels, templates: Sequence[str] | None = None) -> list[ClassifyResult]:
        """Zero-shot classify images (paths, folders or PIL images) with this bundle's encoder."""
        return classify_images(self.encoder, images, labels, templates)

    def failures(self) -> list[dict]:
        return self.store.failures()

    def info(self) -> dict:
        counts = self.store.counts()
        return {
            "index": str(self.path),
            "manifest": self.read_manifest(),
            "counts": {**counts, "files": self.store.file_count()},
            "failures": self.store.failures(),
        }


def load_image_or_raise(path, draft_size=None):
    from .errors import DecodeError
    from .images import load_image

    try:
        return load_image(path, draft_size=draft_size)
    except DecodeError as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def classify_images(encoder, images, labels, templates=None) -> list[ClassifyResult]:
    """Zero-shot classification of images (paths, folders or PIL images) by nearest label prompt."""
    from PIL import Image

    from .errors import DecodeError
    from .images import image_paths_under, load_image, to_rgb
    from .zeroshot import check_templates, label_embeddings, parse_labels, probabilities

    labels = parse_labels(labels)
    templates = check_templates(templates)
    items: list[tuple[str, Any]] = []
    for x in [images] if isinstance(images, (str, os.PathLike, Image.Image)) else images:
        if isinstance(x, Image.Image):
            items.append((getattr(x, "filename", "") or "<image>", x))
        elif os.path.isdir(x):
            items.extend((p, p) for p in image_paths_under(x))
        else:
            items.append((str(x), str(x)))
    if not items:
        raise UsageError("no images to classify")
    text_emb = label_embeddings(encoder, labels, templates)
    results: list[ClassifyResult] = []
    batch: list[tuple[str, Any]] = []

    def flush():
        if not batch:
            return
        emb = encoder.encode_images([img for _, img in batch])
        probs = probabilities(emb, text_emb, encoder.logit_scale)
        for (path, _), p in zip(batch, probs):
            best = int(np.argmax(p))
            results.append(ClassifyResult(path, labels[best], float(p[best]), dict(zip(labels, map(float, p)))))
        batch.clear()

    for name, x in items:
        try:
            img = to_rgb(x) if isinstance(x, Image.Image) else load_image(x, draft_size=encoder.image_size)
        except DecodeError as e:
            flush()
            results.append(ClassifyResult(name, None, None, {}, error=str(e)))
            continue
        batch.append((name, img))
        if len(batch) >= encoder.image_batch_size:
            flush()
    flush()
    return results


def open_index(
    name_or_path: str | os.PathLike | None = None,
    *,
    create: bool = False,
    model: str | None = None,
) -> Index:
    """Open an index bundle by name (under $SEARCHKIT_HOME) or path.

    create=False opens an existing bundle for querying (IndexNotFoundError if there is none).
    create=True opens it for writing, creating it if needed and taking the writer lock; `model`
    (a spec string; None or 'auto' = the bundle's own model, or auto for a new bundle) is bound
    to a new bundle and must match an existing one (ModelMismatchError otherwise).
    """
    path = resolve_index_path(name_or_path)
    db_path = path / META_DB
    if not create:
        if not db_path.exists():
            raise IndexNotFoundError(
                f"no index at {path}; build one with: searchkit index PATH --index {name_or_path or 'default'}"
            )
        return Index(path, Store(db_path))
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    idx = Index(path, Store(db_path, create=True), writable=True)
    try:
        idx._acquire_write_lock()
        if model not in (None, "auto") or idx.spec is None:
            from .encoders import get_encoder

            if idx.spec is not None and model == idx.spec:
                pass  # same spec: the fingerprint check happens when the encoder loads
            else:
                idx.bind_encoder(get_encoder(model or "auto"))
    except BaseException:
        idx.close()
        raise
    return idx
