"""Crash-safe file replacement: write a temporary sibling, fsync, rename, fsync the folder."""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import StorageError

#: errno values that mean "this disk will not take the write", not "this input is bad"
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO})


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Replace `path` with what `write(tmp)` writes to a temporary sibling, so that a kill at
    any moment leaves the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        err = storage_error(e, path)
        if err is None:
            raise
        raise err from e
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def display_path(path: str) -> str:
    """A path as a person reads it: bytes of the name that are not UTF-8 (surrogate escapes in
    Python's `os.fsdecode` form) shown as \\xNN. For showing only; the path itself stays exact."""
    return path.encode("utf-8", "searchkit.display").decode("utf-8")


def _show_surrogates(e: UnicodeError) -> tuple[str, int]:
    if not isinstance(e, UnicodeEncodeError):
        raise e
    chunk = e.object[e.start : e.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}" for c in chunk), e.end


codecs.register_error("searchkit.display", _show_surrogates)


def show_undecodable(stream: Any) -> None:
    """Let a text stream print paths that are not UTF-8 (as display_path shows them) instead of
    raising UnicodeEncodeError on their surrogate escapes."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="searchkit.display")
        except (ValueError, OSError):  # a closed or detached stream: nothing to print on anyway
            pass


def storage_error(e: BaseException, where: str | Path) -> StorageError | None:
    """A StorageError with one clear line if `e` is the disk refusing a write (no space, a
    file-size limit, read-only, I/O error: from Python, SQLite or FAISS), else None."""
    reason = None
    if isinstance(e, StorageError):
        return e
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        reason = e.strerror or os.strerror(e.errno)
    elif isinstance(e, sqlite3.Error):
        name = getattr(e, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY")) or re.search(r"disk I/O error|disk is full", str(e)):
            reason = f"SQLite: {e}"
    elif isinstance(e, RuntimeError) and "write error" in str(e):  # FAISS: "... write error in F: n != m (why)"
        m = re.search(r"\(([^()]*)\)\s*$", str(e))
        reason = m.group(1) if m else "write error"
    if reason is None:
        return None
    return StorageError(
        f"cannot write the index at {where}: {reason} (no space left, or over a file-size limit?); "
        "what was committed is kept: free space and run the command again"
    )
