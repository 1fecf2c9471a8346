"""What a writer finishes for a writer that was killed: derived files and temporary leftovers.

Derived files are what a bundle keeps beside meta.db for speed, made from its encoder (the
text tower exported as ONNX, `text-onnx/`). A kill after the last batch commit but before the
export leaves none, and a re-run with nothing to index would never load the model to make one;
so every run checks each registered derived file against the bundle's encoder fingerprint and
builds what is missing or stale, loading the encoder only when something is. An encoder that
cannot have a derived file (or whose build failed for a reason other than the disk) is recorded
in meta.db (`derived.<name>` = `skip:<fingerprint>:v<version>`), so later runs do not load the
model just to find that out again; bump `version` when a kind gains support for more encoders.

Temporary leftovers are the files writers make before an atomic rename: `.<name>.<pid>.tmp`
(manifest, FAISS files, shards), `<kind>.<token>.faiss.tmp`, and `.text-onnx-<pid>-*/`. Only
the holder of the writer lock makes them, so under the lock every one whose PID is not ours
and not alive (or that names no PID) is a leftover of a killed run and is removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import storage_error
from .machine import pid_alive

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Derived:
    """A file or folder of the bundle derived from its encoder."""

    name: str  # under the bundle folder
    is_current: Callable[[Path, str], bool]  # (path, encoder fingerprint) -> up to date?
    build: Callable[[Any, Path], bool]  # (encoder, path) -> False when the encoder has none
    enabled: Callable[[], bool] = lambda: True
    version: int = 1


def _text_onnx_current(path: Path, fingerprint: str) -> bool:
    from .encoders.onnx import OnnxTextEncoder

    return OnnxTextEncoder.matches(path, fingerprint)


def _text_onnx_build(encoder: Any, path: Path) -> bool:
    from .encoders.onnx import export_text_query_model

    return export_text_query_model(encoder, path)


DERIVED: list[Derived] = [
    Derived(
        "text-onnx",
        _text_onnx_current,
        _text_onnx_build,
        enabled=lambda: os.environ.get("SEARCHKIT_TEXT_ONNX") != "0",
    )
]


def register_derived(derived: Derived) -> None:
    """Add (or replace, by name) a derived file that every writer run keeps current."""
    DERIVED[:] = [d for d in DERIVED if d.name != derived.name] + [derived]


def finish_derived(idx) -> list[str]:
    """Build every enabled derived file of a writable bundle that is missing or stale; returns
    the names built. Best effort: a failure is logged, and only costs query speed."""
    fingerprint = idx.store.get_meta("encoder_fingerprint")
    if not fingerprint:
        return []
    todo = []
    for d in DERIVED:
        if not d.enabled() or d.is_current(idx.path / d.name, fingerprint):
            continue
        if idx.store.get_meta(f"derived.{d.name}") == _skip_mark(d, fingerprint):
            continue
        todo.append(d)
    if not todo:
        return []
    from .errors import SearchkitError

    try:
        enc = idx.encoder  # loads the model when this run did not need it for indexing
    except SearchkitError as e:  # (weights not available here now): a later run makes them
        LOG.warning("could not load %s to build %s (%s)", idx.spec, ", ".join(d.name for d in todo), e)
        return []
    built = []
    for d in todo:
        try:
            ok = d.build(enc, idx.path / d.name)
        except Exception as e:
            if isinstance(e, OSError) or storage_error(e, idx.path) is not None:
                # the disk (full, read-only): worth trying again next run
                LOG.warning("could not write %s (%s); queries will be slower until a later run makes it", d.name, e)
                continue
            # the encoder cannot be exported this way: do not load it again to retry
            LOG.warning("could not build %s for fast queries (%s); queries will load the full model", d.name, e)
            ok = False
        if ok:
            built.append(d.name)
            continue
        try:
            with idx.store.transaction():
                idx.store.set_meta(f"derived.{d.name}", _skip_mark(d, fingerprint))
        except Exception as e:  # (only a cost: the next run finds out again)
            if storage_error(e, idx.path) is None:
                raise
    return built


def _skip_mark(d: Derived, fingerprint: str) -> str:
    return f"skip:{fingerprint}:v{d.version}"


# -- leftovers ----------------------------------------------------------------------------------
_TEMP = re.compile(r"^(?:\..+\.(?P<pid>\d+)\.tmp|.+\.tmp|\.text-onnx-(?:(?P<pid2>\d+)-)?.*)$")


def temp_pid(name: str) -> int | None | bool:
    """The PID a temporary name carries, None if it carries none, False if it is no temporary."""
    m = _TEMP.match(name)
    if not m:
        return False
    pid = m.group("pid") or m.group("pid2")
    return int(pid) if pid else None


def remove_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries that killed writers left in a bundle folder (call it holding the
    writer lock); returns their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid = temp_pid(entry.name)
        if pid is False or pid == os.getpid() or (pid is not None and pid_alive(pid)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as e:
            LOG.debug("could not remove %s: %s", entry.path, e)
            continue
        removed.append(entry.name)
    if removed:
        LOG.info("removed what an interrupted run left: %s", ", ".join(sorted(removed)))
    return removed
