"""The index bundle: a folder that describes itself.

    <bundle>/manifest.json       format version, encoder, dim, metric, vector files, counts, times
    <bundle>/meta.db             SQLite: files, items (+ embeddings), failures (see store.py)
    <bundle>/image.faiss         FAISS index of image items (ids = items.id)
    <bundle>/text.faiss          FAISS index of text items
    <bundle>/<kind>.*.ivfdata    on-disk IVF-PQ lists, when a kind's index keeps them on disk
    <bundle>/text-onnx/          the text tower as ONNX + tokenizer, so text queries skip torch
    <bundle>/.lock               the writer lock (flock)

meta.db is the source of truth; every change to it is one transaction that bumps its generation.
The FAISS files are derived from it and replaced atomically at the end of a run together with
the manifest, which records the database generation each file reflects (and its size and mtime):
`is_fresh` tells a reader whether a file is in step, or stale because a run was killed.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .errors import CorruptIndexError, IndexBusyError
from .fsutil import atomic_write_json

FORMAT_VERSION = 1
#: the item kinds; each has its own vector index
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


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Bundle:
    """The files of one bundle folder: paths, the manifest, the writer lock, leftover cleanup."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def text_onnx_dir(self) -> Path:
        return self.path / TEXT_ONNX_DIR

    def vector_file(self, kind: str) -> Path:
        return self.path / f"{kind}.faiss"

    # -- manifest ---------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise CorruptIndexError(f"cannot read {self.path / MANIFEST}: {e}") from e

    def manifest_entry(self, kind: str) -> dict:
        """The manifest's record of one kind's vector index ({} when there is none or it is unreadable)."""
        try:
            return ((self.read_manifest() or {}).get("vectors") or {}).get(kind) or {}
        except CorruptIndexError:
            return {}

    def write_manifest(self, store, settings: dict, vectors: dict[str, dict]) -> None:
        """Describe the bundle (atomically): the encoder and counts from `store` (meta.db), the
        vector settings, and `vectors`, each kind's entry."""
        image = vectors["image"]
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder": {
                "spec": store.get_meta("encoder_spec"),
                "fingerprint": store.get_meta("encoder_fingerprint"),
                "dim": int(store.get_meta("dim") or 0),
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
            "counts": {**store.counts(), "files": store.file_count(), "failures": len(store.failures())},
            "generation": store.generation,
            "created_at": store.get_meta("created_at"),
            "updated_at": now(),
        }
        atomic_write_json(self.path / MANIFEST, manifest)

    def is_fresh(self, kind: str, entry: dict, generation: int) -> bool:
        """Whether `kind`'s FAISS file is the one the manifest `entry` describes, at `generation`."""
        st = self.vector_file(kind).stat()
        return entry.get("generation") == generation and (
            "file_size" not in entry  # manifests before the file check
            or (entry.get("file_size"), entry.get("file_mtime_ns")) == (st.st_size, st.st_mtime_ns)
        )

    def remove_unused_data_files(self, kind: str, keep: Path | None) -> None:
        """Delete on-disk list files (<kind>.*.ivfdata) but `keep`, the one the saved .faiss points
        at: the previous file after a copy on write or a rebuild, or what a killed run left."""
        for f in self.path.glob(f"{kind}.*.ivfdata"):
            if keep is None or f.name != keep.name:
                f.unlink(missing_ok=True)

    # -- writer lock ------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the writer lock (IndexBusyError when another process holds it)."""
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
        from .recovery import remove_leftovers

        remove_leftovers(self.path)  # what a killed writer left

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
