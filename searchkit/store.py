"""The bundle's metadata database (SQLite through sqlite-utils).

Tables:
  files     one row per indexed source file: path, kind, size, mtime_ns, content hash,
            `complete` (0 while a text corpus is half-way through its documents)
  items     one row per embedded thing; items.id is the FAISS id. An image file has one item;
            a text corpus has one item per document, `locator` = its line number
  failures  inputs that could not be read or decoded, with the reason (key: path, or
            path:line for one bad line of a corpus)
  photos    per image file, what its EXIF says: date taken, camera make/model, GPS, pixel size
  meta      key/value: encoder spec, fingerprint, dim, generation
  migrations  the named schema migrations applied, in order

Every change of items bumps `generation` inside the same transaction, so a FAISS file written
at generation g is known stale as soon as the database is at any other generation.

Paths are Python's `os.fsdecode` strings: a Linux file name is bytes, and one that is not valid
UTF-8 arrives with surrogate escapes, which SQLite text cannot hold. Such a path is stored as a
BLOB of its raw bytes (`os.fsencode`) in the same column and decoded back on the way out, so it
round-trips losslessly; every other path stays TEXT, so no two spellings of one name can meet.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptIndexError


def _import_sqlite_utils():
    """sqlite-utils imports pandas when it is installed (Ray's data extra brings it) only to map
    pandas.Timestamp columns, which searchkit never writes; that import cost every command
    ~0.7 s and ~73 MB before its first line of work (importing the store: 1.1-1.3 s / 115 MB
    with it, 0.4-0.6 s / 42 MB without). So pandas is hidden while sqlite-utils
    loads, unless something has loaded it already (and can import it normally afterwards)."""
    import sys

    if "pandas" in sys.modules:
        import sqlite_utils

        return sqlite_utils
    sys.modules["pandas"] = None  # type: ignore[assignment]  # makes `import pandas` fail
    try:
        import sqlite_utils
    finally:
        if sys.modules.get("pandas", 0) is None:
            del sys.modules["pandas"]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_db(path: str) -> str | bytes:
    """A path as meta.db stores it: TEXT when it is valid UTF-8, else its raw bytes (BLOB)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def safe_text(s: str) -> str:
    """Text SQLite can store: lone surrogates (from an undecodable name in a message) escaped."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def m001_initial(db: sqlite_utils.Database) -> None:
    db["files"].create(
        {"id": int, "path": str, "kind": str, "size": int, "mtime_ns": int, "hash": str, "complete": int},
        pk="id",
    )
    db["files"].create_index(["path"], unique=True)
    db["files"].create_index(["hash"])
    db.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "file_id INTEGER NOT NULL REFERENCES files(id), kind TEXT NOT NULL, "
        "locator INTEGER, text TEXT, vector BLOB NOT NULL)"
    )
    db["items"].create_index(["file_id"])
    db["items"].create_index(["kind"])
    db["failures"].create({"path": str, "reason": str, "at": str}, pk="path")
    db["meta"].create({"key": str, "value": str}, pk="key")


def m002_photo_meta(db: sqlite_utils.Database) -> None:
    """What EXIF says about each image file (see photos.PhotoMeta). `taken_ns` is the date
    taken in nanoseconds since the epoch, the camera's local time read as this machine's local
    time (as the date filters read naive dates)."""
    db.execute(
        "CREATE TABLE photos (file_id INTEGER PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE, "
        "taken TEXT, taken_ns INTEGER, make TEXT, model TEXT, lat REAL, lon REAL, width INTEGER, height INTEGER)"
    )
    db["photos"].create_index(["taken_ns"])


MIGRATIONS = [("m001_initial", m001_initial), ("m002_photo_meta", m002_photo_meta)]

PHOTO_FIELDS = ("taken", "make", "model", "lat", "lon", "width", "height")


class Store:
    """Typed access to meta.db; all writes go through `transaction()`."""

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = str(path)
        if not create and not Path(self.path).exists():
            raise CorruptIndexError(f"{self.path} is missing")
        try:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            from .fsutil import storage_error

            full = storage_error(e, self.path)  # (the disk, not the file: say so)
            if full is not None:
                raise full from e
            raise CorruptIndexError(f"{self.path} is not a searchkit metadata database: {e}") from e

    def close(self) -> None:
        self.db.close()

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        if not self.db["migrations"].exists():
            if self.db.table_names() and "meta" not in self.db.table_names():
                raise CorruptIndexError(f"{self.path} holds tables searchkit did not write")
            self.db["migrations"].create({"name": str, "applied_at": str}, pk="name")
        done = {r["name"] for r in self.db["migrations"].rows}
        for name, fn in MIGRATIONS:
            if name not in done:
                with self.db.atomic():
                    fn(self.db)
                    self.db["migrations"].insert({"name": name, "applied_at": _now()})

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        with self.db.atomic():
            yield self.db

    # -- meta -----------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, str(value)],
        )

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0") or 0)

    def bump_generation(self) -> None:
        self.set_meta("generation", self.generation + 1)

    # -- files ----------------------------------------------------------------------------------
    def all_files(self) -> dict[str, dict]:
        cur = self.db.execute("SELECT id, path, kind, size, mtime_ns, hash, complete FROM files")
        cols = [d[0] for d in cur.description]
        return {from_db(row[1]): {**dict(zip(cols, row)), "path": from_db(row[1])} for row in cur}

    def upsert_file(self, path: str, kind: str, size: int, mtime_ns: int, hash_: str | None, complete: bool) -> int:
        path = to_db(path)
        row = self.db.execute("SELECT id FROM files WHERE path = ?", [path]).fetchone()
        values = [kind, size, mtime_ns, hash_, int(complete)]
        if row:
            self.db.execute(
                "UPDATE files SET kind=?, size=?, mtime_ns=?, hash=?, complete=? WHERE id=?", values + [row[0]]
            )
            return int(row[0])
        cur = self.db.execute(
            "INSERT INTO files(path, kind, size, mtime_ns, hash, complete) VALUES (?, ?, ?, ?, ?, ?)",
            [path] + values,
        )
        return int(cur.lastrowid)

    def move_file(self, file_id: int, new_path: str, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE files SET path=?, size=?, mtime_ns=? WHERE id=?", [to_db(new_path), size, mtime_ns, file_id])

    def delete_items_of(self, file_id: int) -> list[int]:
        """Remove a file's items; returns their ids."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM items WHERE file_id = ?", [file_id])]
        self.db.execute("DELETE FROM items WHERE file_id = ?", [file_id])
        return ids

    def delete_file(self, file_id: int) -> list[int]:
        """Remove a file and its items; returns the removed item ids."""
        ids = self.delete_items_of(file_id)
        self.db.execute("DELETE FROM photos WHERE file_id = ?", [file_id])
        self.db.execute("DELETE FROM files WHERE id = ?", [file_id])
        return ids

    # -- photo facts (EXIF) ---------------------------------------------------------------------
    def set_photo_meta(self, file_id: int, meta) -> None:
        """Record a photos.PhotoMeta for a file (replacing what was there)."""
        self.db.execute(
            "INSERT OR REPLACE INTO photos(file_id, taken, taken_ns, make, model, lat, lon, width, height) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [file_id, meta.taken, meta.taken_ns, meta.make, meta.model, meta.lat, meta.lon, meta.width, meta.height],
        )

    def files_without_photo_meta(self) -> set[int]:
        """Ids of image files with no photos row (indexed before EXIF was recorded)."""
        cur = self.db.execute("SELECT f.id FROM files f LEFT JOIN photos p ON p.file_id = f.id WHERE f.kind = 'image' AND p.file_id IS NULL")
        return {r[0] for r in cur}

    def photo_meta_of(self, item_ids: Iterable[int]) -> dict[int, dict]:
        """Item id -> its file's recorded EXIF facts (only the known ones)."""
        ids = [int(i) for i in item_ids]
        out: dict[int, dict] = {}
        for start in range(0, len(ids), 900):
            part = ids[start : start + 900]
            marks = ",".join("?" * len(part))
            cur = self.db.execute(
                f"SELECT items.id, {', '.join('p.' + f for f in PHOTO_FIELDS)} FROM items "
                f"JOIN photos p ON p.file_id = items.file_id WHERE items.id IN ({marks})",
                part,
            )
            for row in cur:
                out[row[0]] = {k: v for k, v in zip(PHOTO_FIELDS, row[1:]) if v is not None}
        return out

    def photo_summary(self) -> dict:
        """How many image files have a date, a camera, a position; the cameras by count."""
        n, dated, located = self.db.execute(
            "SELECT COUNT(*), COUNT(taken_ns), COUNT(lat) FROM photos"
        ).fetchone()
        cams = self.db.execute(
            "SELECT TRIM(COALESCE(make, '') || ' ' || COALESCE(model, '')) AS c, COUNT(*) FROM photos "
            "WHERE make IS NOT NULL OR model IS NOT NULL GROUP BY c ORDER BY COUNT(*) DESC, c LIMIT 20"
        ).fetchall()
        return {"with_exif_facts": n, "with_date": dated, "with_gps": located, "cameras": {c: k for c, k in cams}}

    def item_counts_by_file(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT file_id, COUNT(*) FROM items GROUP BY file_id").fetchall())

    def delete_failure(self, path: str) -> None:
        self.db.execute("DELETE FROM failures WHERE path = ?", [to_db(path)])

    # -- items ----------------------------------------------------------------------------------
    def insert_item(self, file_id: int, kind: str, vector: np.ndarray, locator: int | None = None, text: str | None = None) -> int:
        cur = self.db.execute(
            "INSERT INTO items(file_id, kind, locator, text, vector) VALUES (?, ?, ?, ?, ?)",
            [file_id, kind, locator, text, np.ascontiguousarray(vector, dtype=np.float32).tobytes()],
        )
        return int(cur.lastrowid)

    def delete_items(self, ids: Iterable[int]) -> None:
        self.db.conn.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])

    def set_locators(self, pairs: Iterable[tuple[int, int]]) -> None:
        self.db.conn.executemany("UPDATE items SET locator = ? WHERE id = ?", [(loc, i) for i, loc in pairs])

    def text_items_of(self, file_id: int) -> list[tuple[int, str, int]]:
        return [tuple(r) for r in self.db.execute("SELECT id, text, locator FROM items WHERE file_id = ? ORDER BY id", [file_id])]

    def iter_vectors(self, kind: str, dim: int, chunk: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of one kind in id order, `chunk` rows at a time (keyset pagination), so
        building a vector index never holds every embedding in memory at once."""
        last = -1
        while True:
            rows = self.db.execute(
                "SELECT id, vector FROM items WHERE kind = ? AND id > ? ORDER BY id LIMIT ?", [kind, last, chunk]
            ).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            last = int(ids[-1])

    def item_ids(self, kind: str) -> np.ndarray:
        """Every item id of one kind, ascending."""
        cur = self.db.execute("SELECT id FROM items WHERE kind = ? ORDER BY id", [kind])
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def vectors_by_ids(self, ids: Iterable[int], dim: int, *, missing_ok: bool = False) -> np.ndarray:
        """The stored embeddings of `ids`, in that order (float32, (n, dim)); KeyError if one is
        missing, or (missing_ok) a zero row for it."""
        ids = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
            part = ids[start : start + 900]
            marks = ",".join("?" * len(part))
            found.update(self.db.execute(f"SELECT id, vector FROM items WHERE id IN ({marks})", part).fetchall())
        if not ids:
            return np.zeros((0, dim), dtype=np.float32)
        if missing_ok and len(found) < len(set(ids)):
            zero = bytes(4 * dim)
            return np.frombuffer(b"".join(found.get(i, zero) for i in ids), dtype=np.float32).reshape(len(ids), dim)
        return np.frombuffer(b"".join(found[i] for i in ids), dtype=np.float32).reshape(len(ids), dim)

    def matching_ids(self, kind: str, where_sql: str, params: list) -> np.ndarray:
        """Ids of the items of `kind` whose file row (aliased f) satisfies `where_sql`, ascending."""
        cur = self.db.execute(
            f"SELECT items.id FROM items JOIN files AS f ON f.id = items.file_id "
            f"WHERE items.kind = ? AND ({where_sql}) ORDER BY items.id",
            [kind, *params],
        )
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def item_rows(self, ids: Iterable[int]) -> dict[int, dict]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        cur = self.db.execute(
            f"SELECT items.id, items.kind, items.locator, items.text, files.path FROM items "
            f"JOIN files ON files.id = items.file_id WHERE items.id IN ({marks})",
            ids,
        )
        return {r[0]: {"id": r[0], "kind": r[1], "locator": r[2], "text": r[3], "path": from_db(r[4])} for r in cur}

    def file_hashes(self, ids: Iterable[int]) -> dict[int, str | None]:
        """Item id -> the content hash of its file."""
        ids = [int(i) for i in ids]
        out: dict[int, str | None] = {}
        for start in range(0, len(ids), 900):
            part = ids[start : start + 900]
            marks = ",".join("?" * len(part))
            out.update(self.db.execute(
                f"SELECT items.id, files.hash FROM items JOIN files ON files.id = items.file_id WHERE items.id IN ({marks})", part
            ).fetchall())
        return out

    def counts(self) -> dict[str, int]:
        out = {"image": 0, "text": 0}
        for kind, n in self.db.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind"):
            out[kind] = n
        return out

    def file_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM files").fetchone()[0])

    # -- failures -------------------------------------------------------------------------------
    def record_failure(self, path: str, reason: str) -> None:
        self.db.execute(
            "INSERT INTO failures(path, reason, at) VALUES (?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET reason = excluded.reason, at = excluded.at",
            [to_db(path), safe_text(reason), _now()],
        )

    def clear_failures(self, path: str) -> None:
        """Forget failures of a file and of its lines (`path`, `path:N`)."""
        raw = os.fsencode(path) + b":"  # compared as bytes: keys may be TEXT or BLOB (see to_db)
        self.db.execute(
            "DELETE FROM failures WHERE path = ? OR (substr(CAST(path AS BLOB), 1, ?) = ? "
            "AND CAST(substr(CAST(path AS BLOB), ?) AS TEXT) GLOB '[0-9]*')",
            [to_db(path), len(raw), raw, len(raw) + 1],
        )

    def failures(self) -> list[dict]:
        cur = self.db.execute("SELECT path, reason, at FROM failures ORDER BY path")
        return [{"path": from_db(p), "reason": r, "at": a} for p, r, a in cur]

    # -- reads for the server -------------------------------------------------------------------
    def item(self, item_id: int) -> dict | None:
        """One item with its file row (path, size, mtime_ns), or None; ids beyond SQLite's
        integer range are simply absent."""
        if not 0 <= int(item_id) < 2**63:
            return None
        row = self.db.execute(
            "SELECT items.id, items.kind, items.locator, items.text, files.path, files.size, files.mtime_ns "
            "FROM items JOIN files ON files.id = items.file_id WHERE items.id = ?",
            [int(item_id)],
        ).fetchone()
        if row is None:
            return None
        keys = ("id", "kind", "locator", "text", "path", "size", "mtime_ns")
        out = dict(zip(keys, row))
        out["path"] = from_db(out["path"])
        return out
