"""Inputs named by URL (`s3://bucket/photos`, `gs://...`, `file:///srv/photos`, any scheme
pyarrow's filesystems know), so Ray workers on other machines read them without a shared disk.

A URL input is kept in meta.db by its full URL, listed, sized and dated through the same
filesystem, so planning and incremental runs work on it as on a local folder. Credentials and
regions come from the filesystem's usual environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS...).
"""

from __future__ import annotations

import re
import threading

from .errors import DecodeError, UsageError, require

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FILESYSTEMS: dict[str, object] = {}
_LOCK = threading.Lock()


def is_url(path: str) -> bool:
    return bool(_URL.match(str(path)))


def _split(url: str):
    """(pyarrow filesystem, its path for `url`); one filesystem per scheme and host, reused."""
    pafs = require("pyarrow.fs", "'searchkit[ray]'")
    scheme, rest = url.split("://", 1)
    netloc = rest.split("/", 1)[0]
    key = f"{scheme.lower()}://{netloc}"
    with _LOCK:
        cached = _FILESYSTEMS.get(key)
    if cached is None:
        try:
            fs, path = pafs.FileSystem.from_uri(url)
        except (ValueError, OSError) as e:  # unknown scheme, malformed URL, unreachable store
            raise UsageError(f"{url}: {str(e).splitlines()[0]}") from e
        # s3://bucket/key -> "bucket/key", file:///a -> "/a", hdfs://host:port/a -> "/a"
        cached = (fs, bool(netloc) and not path.startswith(netloc))
        with _LOCK:
            _FILESYSTEMS[key] = cached
        return fs, path
    fs, drop_netloc = cached
    return fs, rest[len(netloc):] if drop_netloc else rest


def resolve(url: str) -> tuple[str, bool]:
    """(normalized URL, is it a folder); UsageError when nothing is there."""
    pafs = require("pyarrow.fs", "'searchkit[ray]'")
    url = url.rstrip("/") if not url.endswith("://") else url
    fs, path = _split(url)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise UsageError(f"{url}: {str(e).splitlines()[0]}") from e
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"{url}: no such file or folder")
    return url, info.type == pafs.FileType.Directory


def list_files(url: str, unreadable: list[tuple[str, str]] | None = None) -> list[str]:
    """URLs of the files below a folder URL, recursively, sorted; names starting with '.' (and
    everything below such folders) are skipped, as for local folders."""
    pafs = require("pyarrow.fs", "'searchkit[ray]'")
    fs, path = _split(url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        if unreadable is not None:
            unreadable.append((url, f"cannot list folder: {str(e).splitlines()[0]}"))
        return []
    base = path.rstrip("/") + "/"
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.startswith(base):
            continue
        if any(part.startswith(".") for part in info.path[len(base):].split("/")):
            continue
        out.append(url.rstrip("/") + "/" + info.path[len(base):])
    return sorted(out)


def stat(url: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file URL; OSError when it cannot be had."""
    pafs = require("pyarrow.fs", "'searchkit[ray]'")
    fs, path = _split(url)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(url)
    return int(info.size), int(info.mtime_ns or 0)


def read(url: str) -> bytes:
    """A file URL's bytes, or DecodeError naming why they cannot be had."""
    fs, path = _split(url)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise DecodeError("file not found") from e
    except PermissionError as e:
        raise DecodeError("permission denied") from e
    except OSError as e:
        raise DecodeError(f"cannot read: {str(e).splitlines()[0]}") from e
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return bytes(data)
