"""Model exports cached once per model fingerprint, shared by every bundle on the machine.

An export (the text tower as ONNX, the fp32 image tower as ONNX) depends on the model, not on
the bundle, so it lives in `$SEARCHKIT_CACHE/<kind>/<key>/` (key: a hash of the fingerprint and
`VERSION`) and a bundle that needs one gets hard links to its files (a copy across file
systems), so the bundle still describes itself and survives a cleared cache.

Crash safety: an entry is built in `.<key>-<pid>-*` beside it, its files fsynced, `meta.json`
written last, then renamed into place in one step; an entry without a readable `meta.json` does
not exist. Temporaries of dead builders are removed by the next build. Two processes building
the same entry at once both finish; the second rename loses and its copy is dropped. A model
that cannot be exported this way leaves `<key>.unsupported`, so later runs do not load the
model only to find that out again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..fsutil import fsync_dir, fsync_file
from ..machine import pid_alive

LOG = logging.getLogger(__name__)

#: bump when an export's format or exporter changes (old entries are then ignored)
VERSION = 3  # 2: trained dual encoders (mini) gained a text export; 3: and ConSE outputs (zero-shot without torch)


def cache_dir() -> Path:
    return Path(os.environ.get("SEARCHKIT_CACHE", Path.home() / ".cache" / "searchkit"))


def entry(kind: str, fingerprint: str) -> Path:
    key = hashlib.sha256(f"{fingerprint}|v{VERSION}".encode()).hexdigest()[:20]
    return cache_dir() / kind / key


def _valid(folder: Path) -> bool:
    try:
        json.loads((folder / "meta.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def lookup(kind: str, fingerprint: str) -> Path | None:
    """The cached export, or None when there is none (yet)."""
    folder = entry(kind, fingerprint)
    return folder if _valid(folder) else None


def unsupported(kind: str, fingerprint: str) -> bool:
    folder = entry(kind, fingerprint)
    return folder.with_name(folder.name + ".unsupported").exists()


def build(kind: str, fingerprint: str, make: Callable[[Path], bool]) -> Path | None:
    """The cached export, made by `make(tmp_folder)` (which writes meta.json last and returns
    False when the model has no such export) when missing; None when unsupported."""
    folder = lookup(kind, fingerprint)
    if folder is not None:
        return folder
    if unsupported(kind, fingerprint):
        return None
    folder = entry(kind, fingerprint)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-{os.getpid()}-", dir=folder.parent))
    try:
        if not make(tmp):
            folder.with_name(folder.name + ".unsupported").touch()
            return None
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if folder.exists() and not _valid(folder):
            shutil.rmtree(folder, ignore_errors=True)  # a torn entry of an older, unsafe writer
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _valid(folder):  # (another process renamed its copy first: keep that one)
                raise
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def link_into(src: Path, dest: Path) -> None:
    """Make `dest` a folder holding `src`'s files (hard links, else copies), replacing it in one
    rename. The temporary is `.<dest name>-<pid>-*`, the shape bundle cleanup recognises."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-{os.getpid()}-", dir=dest.parent))
    try:
        for f in sorted(Path(src).iterdir()):
            try:
                os.link(f, tmp / f.name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(f, tmp / f.name)
                fsync_file(tmp / f.name)
        fsync_dir(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_dead_temporaries(folder: Path) -> None:
    """Remove `.<key>-<pid>-*` folders whose builder process is gone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        parts = e.name.split("-")
        if not (e.name.startswith(".") and len(parts) >= 3 and parts[1].isdigit()):
            continue
        pid = int(parts[1])
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
