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
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    BudgetError,
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
    def vector_settings(self) -> dict:
        """What the bundle asks of its vector indexes (recorded in meta.db): the requested kind
        (auto, flat, hnsw, ivf-pq), the memory budget in bytes (None: half of physical memory)
        and the recall@10 that search parameters are tuned to."""
        from .vectors import TARGET_RECALL

        budget = self.store.get_meta("max_memory")
        return {
            "requested": self.store.get_meta("vector_index") or "auto",
            "max_memory": int(budget) if budget else None,
            "target_recall": float(self.store.get_meta("target_recall") or TARGET_RECALL),
        }

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
        from .filters import parse_size
        from .vectors import check_choice

        if not self.writable:
            raise UsageError("this index was opened read-only; open it for writing to configure it")
        settings = self.vector_settings()
        if vector_index is not None:
            settings["requested"] = check_choice(vector_index)
        if max_memory is not None:
            settings["max_memory"] = parse_size(max_memory, what="memory budget") or None
        if target_recall is not None:
            if not 0 < float(target_recall) <= 1:
                raise UsageError(f"target recall must be in (0, 1], not {target_recall}")
            settings["target_recall"] = float(target_recall)
        self._plan_all(settings)  # raises BudgetError before anything changes
        with self.store.transaction():
            self.store.set_meta("vector_index", settings["requested"])
            self.store.set_meta("max_memory", settings["max_memory"] or "")
            self.store.set_meta("target_recall", settings["target_recall"])
        return settings

    def _plan_all(self, settings: dict, counts: dict[str, int] | None = None) -> dict:
        """The plan of every kind's index; the budget covers both kinds together."""
        from .vectors import default_budget, plan_index

        counts = counts or self.store.counts()
        budget = settings["max_memory"] or default_budget()
        plans = {}
        order = sorted(KINDS, key=lambda k: counts.get(k, 0))  # the small one first
        used = 0
        for kind in order:
            try:
                plans[kind] = plan_index(counts.get(kind, 0), self.dim, settings["requested"], budget - used)
            except BudgetError as e:
                need = used + (e.min_bytes or 0)
                other = [k for k in KINDS if k != kind]
                raise BudgetError(
                    f"{e} [{kind} items; the {other[0]} index takes {used:,} bytes of the budget too]"
                    if used else str(e),
                    min_bytes=need,
                ) from None
            used += plans[kind].memory
        return plans

    def check_vector_budget(self, extra: dict[str, int] | None = None) -> None:
        """Raise BudgetError if the vectors, plus `extra` more of each kind, cannot fit the budget."""
        counts = self.store.counts()
        for kind, n in (extra or {}).items():
            counts[kind] = counts.get(kind, 0) + n
        self._plan_all(self.vector_settings(), counts)

    def _fetch(self, ids) -> np.ndarray:
        # missing_ok: a reader's on-disk index left behind by a killed run may still name
        # items meta.db no longer has; they score 0 here and are dropped from the results
        return self.store.vectors_by_ids(ids, self.dim, missing_ok=True)

    def vectors(self, kind: str):
        """The vector index of one kind, in step with meta.db.

        Loaded from its FAISS file when that matches the manifest (IVF inverted lists are
        memory-mapped for readers); a file older than the database (a run was killed) is
        brought up to date from meta.db by id (items never change their vector, so adding the
        missing ids and removing the vanished ones is exact); a missing or unreadable file is
        rebuilt from meta.db with the manifest's kind and parameters."""
        if kind not in KINDS:
            raise UsageError(f"unknown kind '{kind}'; use one of: {', '.join(KINDS)}")
        gen = self.store.generation
        if kind in self._vectors and self._vectors_generation.get(kind) == gen:
            return self._vectors[kind]
        vec = self._vectors.get(kind)
        if vec is None or vec.mmapped:
            vec = self._open_vectors(kind, gen)
        else:
            self._reconcile(kind, vec)
        vec.fetch = self._fetch
        self._vectors[kind] = vec
        self._vectors_generation[kind] = gen
        return vec

    def _manifest_entry(self, kind: str) -> dict:
        try:
            return ((self.read_manifest() or {}).get("vectors") or {}).get(kind) or {}
        except CorruptIndexError:
            return {}

    def _open_vectors(self, kind: str, gen: int):
        from .vectors import Vectors

        entry = self._manifest_entry(kind)
        file = self.path / f"{kind}.faiss"
        vec = None
        if file.exists():
            st = file.stat()
            fresh = entry.get("generation") == gen and (
                "file_size" not in entry  # manifests before the file check
                or (entry.get("file_size"), entry.get("file_mtime_ns")) == (st.st_size, st.st_mtime_ns)
            )
            mmap = fresh and not self.writable and entry.get("kind") == "ivf-pq"
            try:
                vec = Vectors.load(file, self.dim, mmap=mmap, fetch=self._fetch)
            except CorruptIndexError as e:
                LOG.warning("%s; rebuilding it from %s", e, META_DB)
            if vec is not None:
                if entry.get("kind") == vec.kind:
                    vec.params.update(entry.get("params") or {})
                    vec.search_params.update(entry.get("search") or {})
                    vec.info = {k: entry[k] for k in ("recall", "reason", "built_at", "requested", "max_memory") if k in entry}
                if not fresh:
                    self._reconcile(kind, vec)
        if vec is None:
            vec = self._build(kind, self._plan_from_entry(kind, entry), tune=False)
            if entry.get("kind") == vec.kind:
                vec.search_params.update(entry.get("search") or {})
                vec.info.update({k: entry[k] for k in ("recall", "requested", "max_memory") if k in entry})
        return vec

    def _plan_from_entry(self, kind: str, entry: dict):
        from .vectors import KINDS as VKINDS
        from .vectors import Plan, estimate_bytes, ivf_pq_params, plan_index

        n = self.store.counts().get(kind, 0)
        k = entry.get("kind")
        params = {p: v for p, v in (entry.get("params") or {}).items() if p not in ("built_count", "trained_on")}
        if k in VKINDS and not (k == "ivf-pq" and (ivf_pq_params(n, self.dim) is None or "nlist" not in params)):
            return Plan(k, params, estimate_bytes(k, n, self.dim, params), "rebuilt from meta.db as the manifest records")
        s = self.vector_settings()
        try:
            return plan_index(n, self.dim, s["requested"], s["max_memory"])
        except BudgetError:
            return plan_index(n, self.dim, "auto", None)

    def _reconcile(self, kind: str, vec) -> None:
        """Bring `vec` in step with meta.db by id: add the missing items, remove the vanished.
        A reader leaves on-disk lists alone (catching up would copy their file): it searches
        them as they are, and the next `index` run catches up."""
        if vec.data_file() is not None and not self.writable:
            LOG.warning("%s index is behind %s (a run was interrupted); run `searchkit index` again to catch up", kind, META_DB)
            return
        db_ids = self.store.item_ids(kind)
        have = vec.ids()
        gone = np.setdiff1d(have, db_ids, assume_unique=True)
        new = np.setdiff1d(db_ids, have, assume_unique=True)
        if len(gone) or len(new):
            LOG.info("%s index: catching up with %s (+%d, -%d)", kind, META_DB, len(new), len(gone))
        if len(gone):
            vec.remove(gone)
        for start in range(0, len(new), 20_000):
            part = new[start : start + 20_000]
            vec.add(part, self.store.vectors_by_ids(part, self.dim))

    def _sample(self, kind: str, n: int, seed: int = 0) -> np.ndarray:
        """n stored vectors of `kind`, drawn uniformly (fewer if there are fewer)."""
        ids = self.store.item_ids(kind)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(ids), min(n, len(ids)), replace=False))
        return self.store.vectors_by_ids(ids[pick], self.dim)

    def _build(self, kind: str, plan, *, tune: bool = True):
        """Build `plan` from meta.db, streaming; measure recall and tune it when approximate."""
        from .vectors import build

        t = time.perf_counter()
        vec = build(
            plan,
            self.dim,
            lambda: self.store.iter_vectors(kind, self.dim),
            sample=lambda n: self._sample(kind, n),
            fetch=self._fetch,
            folder=self.path,
            name=kind,
        )
        s = self.vector_settings()
        vec.info = {
            "reason": plan.reason,
            "built_at": _now(),
            "build_seconds": round(time.perf_counter() - t, 2),
            "requested": s["requested"],
            "max_memory": s["max_memory"],
        }
        if tune and vec.kind != "flat":
            vec.info["recall"] = self._tune(kind, vec, s["target_recall"])
        vec.dirty = True
        return vec

    def _tune(self, kind: str, vec, target: float) -> dict:
        """recall@10 against exact search: leave-one-out stored vectors of this kind and (when
        the bundle has them) embeddings of the other kind as cross-modal queries."""
        from .vectors import QuerySet, tune

        rng = np.random.default_rng(1)
        sets = []
        ids = self.store.item_ids(kind)
        if len(ids) > 1:
            pick = np.sort(rng.choice(len(ids), min(500, len(ids)), replace=False))
            sets.append(QuerySet(f"{kind} (stored, leave-one-out)", self.store.vectors_by_ids(ids[pick], self.dim), ids[pick]))
        other = "text" if kind == "image" else "image"
        oids = self.store.item_ids(other)
        if len(oids):
            pick = np.sort(rng.choice(len(oids), min(500, len(oids)), replace=False))
            sets.append(QuerySet(f"{other}->{kind}", self.store.vectors_by_ids(oids[pick], self.dim), np.full(len(pick), -1)))
        result = tune(vec, sets, lambda: self.store.iter_vectors(kind, self.dim), target=target)
        if result.get("recall") is not None and not result.get("met"):
            LOG.warning(
                "%s index: recall@10 %.3f is below the target %.2f even with the most thorough search "
                "parameters tried (%s)", kind, result["recall"], target, result.get("search"),
            )
        return result

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
        plans = self._plan_all(self.vector_settings())
        gen = self.store.generation
        for kind in KINDS:
            self._vectors[kind] = self._build(kind, plans[kind])
            self._vectors_generation[kind] = gen
        self.save()
        return {k: self._vector_entry(k) for k in KINDS}

    def maintain_vectors(self) -> list[str]:
        """End-of-run upkeep (called by `add`): build an approximate index once a flat one has
        outgrown the plan or the settings changed, retrain IVF-PQ once it holds RETRAIN_GROWTH x
        the vectors it was built with, rebuild HNSW once tombstones pass TOMBSTONE_REBUILD, and
        measure recall where it is unknown. Returns what it did, one line per action."""
        from .vectors import RETRAIN_GROWTH, TOMBSTONE_REBUILD

        done = []
        s = self.vector_settings()
        try:
            plans = self._plan_all(s)
        except BudgetError as e:
            LOG.warning("vector indexes left as they are: %s", e)
            return done
        for kind in KINDS:
            vec = self.vectors(kind)
            plan = plans[kind]
            n = len(vec)
            changed = (vec.info.get("requested", s["requested"]), vec.info.get("max_memory", s["max_memory"])) != (
                s["requested"], s["max_memory"]
            )
            why = None
            where = (vec.kind, bool(vec.params.get("on_disk"))) != (plan.kind, bool(plan.params.get("on_disk")))
            if where and (vec.kind == "flat" or changed):
                why = f"{vec.describe()} -> {plan.kind}{' on disk' if plan.params.get('on_disk') else ''} ({plan.reason})"
            elif vec.kind == "ivf-pq" and n >= RETRAIN_GROWTH * max(1, int(vec.params.get("built_count") or n)):
                why = f"retrain: grew from {vec.params.get('built_count')} to {n} vectors"
            elif vec.kind == "hnsw" and vec.tombstones > TOMBSTONE_REBUILD * max(1, vec.index.ntotal):
                why = f"rebuild: {vec.tombstones} of {vec.index.ntotal} HNSW nodes are deleted"
            if why:
                LOG.info("%s index: %s", kind, why)
                self._vectors[kind] = self._build(kind, plan)
                self._vectors_generation[kind] = self.store.generation
                done.append(f"{kind}: {why}")
            elif vec.kind != "flat" and not (vec.info.get("recall") or {}).get("recall"):
                vec.info["recall"] = self._tune(kind, vec, s["target_recall"])
                vec.dirty = True
                done.append(f"{kind}: measured recall")
        return done

    def _vector_entry(self, kind: str, generation: int | None = None) -> dict:
        """The manifest's description of one kind's vector index (loaded in this session)."""
        vec = self._vectors[kind]
        file = self.path / f"{kind}.faiss"
        entry: dict[str, Any] = {
            "file": file.name,
            "count": len(vec),
            "kind": vec.kind,
            "faiss": vec.describe(),
            "params": vec.params,
            "search": vec.search_params,
            "memory_bytes": vec.memory_bytes(),
            **{k: v for k, v in vec.info.items()},
        }
        if vec.kind == "flat":
            entry["recall"] = {"k": 10, "recall": 1.0, "exact": True}
        if vec.kind == "hnsw":
            entry["tombstones"] = vec.tombstones
        data = vec.data_file()
        if data is not None:
            entry["data_file"] = data.name
            entry["data_bytes"] = data.stat().st_size if data.exists() else None
        if generation is not None:
            entry["generation"] = generation
        if file.exists():
            st = file.stat()
            entry["file_size"], entry["file_mtime_ns"] = st.st_size, st.st_mtime_ns
        return entry

    def save(self) -> None:
        """Write the changed FAISS files (atomically), then the manifest, for the current generation."""
        for kind in KINDS:
            vec = self.vectors(kind)
            file = self.path / f"{kind}.faiss"
            if vec.dirty or not file.exists():
                vec.save(file)
        self._write_manifest({k: self._vectors_generation[k] for k in KINDS})
        self._remove_unused_data_files()

    def _remove_unused_data_files(self) -> None:
        """Delete on-disk list files (<kind>.*.ivfdata) that no saved .faiss points at any more:
        the previous file after a copy on write or a rebuild, or what a killed run left."""
        for kind in KINDS:
            if kind not in self._vectors:  # not loaded: nothing known about its files
                continue
            data = self._vectors[kind].data_file()
            for f in self.path.glob(f"{kind}.*.ivfdata"):
                if data is None or f.name != data.name:
                    f.unlink(missing_ok=True)

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
        vectors = {}
        for k in KINDS:
            if saved_generations and k in self._vectors:
                vectors[k] = self._vector_entry(k, saved_generations[k])
            else:
                vectors[k] = {**old.get(k, {}), "file": f"{k}.faiss", "generation": old.get(k, {}).get("generation")}
            vectors[k]["count"] = counts.get(k, 0)
        settings = self.vector_settings()
        image = vectors["image"]
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder": {
                "spec": self.spec,
                "fingerprint": self.store.get_meta("encoder_fingerprint"),
                "dim": self.dim,
            },
            "metric": "inner_product",
            "normalized": True,
            "vector_index": {
                "kind": image.get("kind", "flat"),
                "faiss": image.get("faiss", "IDMap2,Flat"),
                "requested": settings["requested"],
                "max_memory": settings["max_memory"],
                "target_recall": settings["target_recall"],
            },
            "vectors": vectors,
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
        summary = add_paths(self, paths, text_column=text_column, batch_size=batch_size, workers=workers, progress=progress, engine=engine)
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

    def search(self, query, k: int = 10, kind: str = "image", *, where=None) -> list[SearchResult]:
        """The k items of `kind` nearest to a text (str), an image (PIL or pathlib.Path) or an
        embedding; best first.

        `where`: a `searchkit.filters.Filter` (or a dict of its fields: path, min_size,
        max_size, after, before) restricting the results to items whose file matches; the
        result is the true top k among the matches (FAISS id-selector pre-filtering)."""
        from .filters import Filter

        if k < 1:
            raise UsageError("k must be at least 1")
        flt = Filter.of(where)
        vec = self.vectors(kind)
        if len(vec) == 0:
            what = "images" if kind == "image" else "text items"
            hint = "index a folder of images" if kind == "image" else "index a text corpus (.txt .csv .tsv .jsonl)"
            raise EmptyIndexError(f"index '{self.name}' holds no {what}; {hint} first")
        allowed = None
        if flt is not None:
            allowed = self.store.matching_ids(kind, *flt.sql())
            if len(allowed) == 0:
                return []
        scores, ids = vec.search(self._embed_query(query), k, allowed=allowed)
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
            idx._acquire_write_lock()
        except BaseException:
            idx.close()
            raise
        return idx
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
