"""`Index`, the public API over one bundle, and `open_index`.

A thin facade: the folder, manifest and writer lock live in bundle.py, the vector indexes and
their lifecycle in kind_vectors.py, query embedding, search and classification in query.py, the
incremental indexing run in pipeline.py, the SQLite metadata in store.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .bundle import (
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    META_DB,
    TEXT_ONNX_DIR,
    Bundle,
    now,
    resolve_index_path,
    searchkit_home,
)
from .errors import EmptyIndexError, IndexNotFoundError, ModelMismatchError, UsageError
from .kind_vectors import BundleVectors
from .query import Searcher, classify_images, load_image_or_raise
from .results import AddSummary, ClassifyResult, SearchResult
from .store import Store

__all__ = [
    "FORMAT_VERSION", "KINDS", "MANIFEST", "META_DB", "TEXT_ONNX_DIR",
    "Index", "open_index", "classify_images", "load_image_or_raise", "resolve_index_path", "searchkit_home",
]


class Index:
    """An index bundle. Use `open_index` to get one."""

    def __init__(self, path, store: Store, *, writable: bool = False):
        self.bundle = Bundle(path)
        self.path = self.bundle.path
        self.store = store
        self.writable = writable
        self._encoder = None
        self._vecs = BundleVectors(self.bundle, store, writable)
        # the session's loaded indexes and their generations, which the pipeline updates as it writes
        self._vectors = self._vecs.loaded
        self._vectors_generation = self._vecs.generation
        self._searcher = Searcher(self.bundle, store, self.vectors, lambda: self.encoder, lambda: self._encoder)

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
                self.store.set_meta("created_at", now())
            self._encoder = enc
            self._vecs.write_manifest()
            return
        if enc.fingerprint != self.store.get_meta("encoder_fingerprint"):
            raise ModelMismatchError(
                f"index '{self.name}' holds embeddings of {self.spec}; refusing to add embeddings of "
                f"{enc.spec}. Use another --index, or omit --model to use {self.spec}"
            )
        self._encoder = enc

    # -- vectors (see kind_vectors.py) ------------------------------------------------------------
    def vector_settings(self) -> dict:
        """The requested vector index kind, memory budget (bytes; None: half of RAM) and target recall."""
        return self._vecs.settings()

    def configure_vectors(
        self,
        vector_index: str | None = None,
        max_memory: int | str | None = None,
        target_recall: float | None = None,
    ) -> dict:
        """Record the requested vector index kind, memory budget (bytes or '4G') and target
        recall for this bundle (None keeps the current value). Refuses a budget that the
        current vectors cannot meet (BudgetError) before recording anything. The indexes
        follow at the end of the next `add` (or now, with `reindex`)."""
        if not self.writable:
            raise UsageError("this index was opened read-only; open it for writing to configure it")
        return self._vecs.configure(vector_index, max_memory, target_recall)

    def check_vector_budget(self, extra: dict[str, int] | None = None) -> None:
        """Raise BudgetError if the vectors, plus `extra` more of each kind, cannot fit the budget."""
        self._vecs.check_budget(extra)

    def vectors(self, kind: str):
        """The vector index of one kind, in step with meta.db (a stale or missing FAISS file is
        caught up or rebuilt from meta.db)."""
        return self._vecs.get(kind)

    def reindex(
        self,
        vector_index: str | None = None,
        max_memory: int | str | None = None,
        target_recall: float | None = None,
    ) -> dict:
        """Rebuild every vector index from the embeddings stored in meta.db (no image is read
        or encoded), as `vector_index` under `max_memory`; measure recall and tune search
        parameters for approximate kinds; save. A budget that cannot be met is refused
        (BudgetError) before anything is built. Returns {kind: description}."""
        if not self.writable:
            raise UsageError("this index was opened read-only; open it for writing to reindex")
        self.configure_vectors(vector_index, max_memory, target_recall)
        return self._vecs.reindex()

    def maintain_vectors(self) -> list[str]:
        """End-of-run upkeep (called by `add`): build an approximate index once a flat one has
        outgrown the plan or the settings changed, retrain IVF-PQ once it has grown enough,
        rebuild HNSW with too many tombstones, and measure recall where it is unknown. Returns
        what it did, one line per action."""
        return self._vecs.maintain()

    def save(self) -> None:
        """Write the changed FAISS files (atomically), then the manifest, for the current generation."""
        self._vecs.save()

    def read_manifest(self) -> dict | None:
        return self.bundle.read_manifest()

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        self.bundle.unlock()
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
        engine: Any = "local",
    ) -> AddSummary:
        """Index image files, folders of images and text corpora, incrementally.

        Unchanged files are skipped without decoding, changed ones re-encoded, vanished ones
        removed, moved ones keep their vectors. Unreadable inputs are recorded as failures
        (see `failures()`) and counted in the summary; the run goes on. `engine` runs decoding
        and encoding in this process ("local") or on a Ray cluster ("ray", or a
        `searchkit.pipeline_ray.RayEngine` with its options; needs `searchkit[ray]`).
        """
        from .pipeline import add_paths

        if not self.writable:
            raise UsageError("this index was opened read-only; use open_index(..., create=True) to add")
        if engine in (None, "local"):
            engine = None
        else:
            from .pipeline_ray import RayEngine

            engine = RayEngine.coerce(engine)
        summary = add_paths(self, paths, text_column=text_column, batch_size=batch_size, workers=workers, progress=progress, engine=engine)
        self._ensure_text_query_model()
        return summary

    def _ensure_text_query_model(self) -> None:
        """Export the text tower for torch-free queries when missing or stale (best effort)."""
        from .recovery import finish_derived

        finish_derived(self)

    def text_encoder(self):
        """What text queries are embedded with: the bundle's torch-free text tower when it
        matches the encoder, else the encoder itself (loaded on first use)."""
        return self._searcher.text_encoder()

    def search(self, query, k: int = 10, kind: str = "image", *, where=None, min_confidence: float | None = None) -> list[SearchResult]:
        """The k items of `kind` nearest to a text (str), an image (PIL or pathlib.Path), an
        embedding, or a combined `searchkit.terms.Query` (or list of (weight, term) pairs,
        negative weights subtracting); best first.

        `where`: a `searchkit.filters.Filter` (or a dict of its fields: path, min_size,
        max_size, after, before, taken_after, taken_before, camera, near) restricting the results to items whose file matches; the
        result is the true top k among the matches (FAISS id-selector pre-filtering).
        Every result carries a calibrated `confidence` in [0, 1] (see confidence.py);
        `min_confidence` drops weaker results (possibly all of them: no good match)."""
        return self._searcher.search(query, k, kind, where=where, min_confidence=min_confidence)

    def classify(self, images, labels=None, templates: Sequence[str] | None = None, *, examples=None) -> list[ClassifyResult]:
        """Classify images (paths, folders or PIL images) with this bundle's encoder: zero-shot,
        or few-shot with `examples` (a folder of label sub-folders or a `FewShotClassifier`)."""
        text = self._searcher.text_encoder()  # the torch-free text tower when the bundle has one
        return classify_images(self.encoder, images, labels, templates, examples=examples, text_encoder=text)

    def dupes(self, threshold: float | None = None, min_pixel_similarity: float | None = None) -> list:
        """Groups of near-duplicate images (`searchkit.dupes.DupeGroup`), largest first: pairs
        whose stored embeddings reach `threshold` (cosine) and that pass the perceptual check,
        or identical bytes. See dupes.py."""
        from .dupes import DEFAULT_PIXEL_SIMILARITY, DEFAULT_THRESHOLD, find_duplicates

        return find_duplicates(
            self.store,
            self.dim,
            DEFAULT_THRESHOLD if threshold is None else threshold,
            DEFAULT_PIXEL_SIMILARITY if min_pixel_similarity is None else min_pixel_similarity,
        )

    def failures(self) -> list[dict]:
        return self.store.failures()

    def info(self) -> dict:
        counts = self.store.counts()
        return {
            "index": str(self.path),
            "manifest": self.read_manifest(),
            "counts": {**counts, "files": self.store.file_count()},
            "photos": self.store.photo_summary(),
            "failures": self.store.failures(),
        }


def open_index(
    name_or_path: str | os.PathLike | None = None,
    *,
    create: bool = False,
    model: str | None = None,
    write: bool = False,
) -> Index:
    """Open an index bundle by name (under $SEARCHKIT_HOME) or path.

    create=False opens an existing bundle for querying (IndexNotFoundError if there is none);
    with write=True, for writing (taking the writer lock, loading no model: for `reindex`).
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
        if not write:
            return Index(path, Store(db_path))
        idx = Index(path, Store(db_path), writable=True)
        try:
            idx.bundle.lock()
        except BaseException:
            idx.close()
            raise
        return idx
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    idx = Index(path, Store(db_path, create=True), writable=True)
    try:
        idx.bundle.lock()
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
