"""Fault injection for `searchkit index`: a child runner that SIGKILLs itself at a chosen moment,
and the invariants a bundle must meet after a re-run. Used by tests/test_faults.py (a few
seeded moments) and bench/faults.py (many random ones).

As a script: `python tests/faultlib.py MOMENT -- ARGS...` runs `searchkit ARGS...` and kills
itself with SIGKILL (no cleanup of any kind) at MOMENT:
  commit:N        inside the Nth meta.db transaction, after its statements, before COMMIT
  after-commit:N  right after the Nth COMMIT, before the in-memory FAISS index takes the batch
  rename:NAME     as a file is about to be renamed onto NAME (image.faiss, text.faiss,
                  manifest.json, text-onnx): the final save and the export, temporaries left
  open:TEXT       as a file whose path contains TEXT is opened (e.g. .text-onnx-: mid-export)
  time:SECONDS    after SECONDS of wall time, wherever it is
  slow:SECONDS    never, but sleep SECONDS after every COMMIT (a run that is surely still
                  going when a test interrupts it)
  none            never
The moment is watched through the code's own seams (Store.transaction, audit events of
os.rename and open), so the code under test runs unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment: str) -> None:
    """Make this process kill itself at `moment` (see the module docstring)."""
    what, _, arg = moment.partition(":")
    if what == "none":
        return
    if what == "time":
        t = threading.Timer(float(arg), _die)
        t.daemon = True
        t.start()
        return
    if what in ("commit", "after-commit", "slow"):
        import time

        from searchkit.store import Store

        real = Store.transaction
        n = {"seen": 0}

        @contextmanager
        def transaction(self):
            with real(self) as db:
                yield db
                n["seen"] += 1
                if what == "commit" and n["seen"] == int(arg):
                    _die()
            if what == "after-commit" and n["seen"] == int(arg):
                _die()
            if what == "slow":
                time.sleep(float(arg))

        Store.transaction = transaction
        return
    if what in ("rename", "open"):

        def hook(event: str, args: tuple) -> None:
            if what == "rename" and event == "os.rename" and os.path.basename(os.fsdecode(args[1])) == arg:
                _die()
            if what == "open" and event == "open" and isinstance(args[0], (str, bytes)) and arg in os.fsdecode(args[0]):
                _die()

        sys.addaudithook(hook)
        return
    raise SystemExit(f"unknown moment {moment!r}")


# -- invariants -------------------------------------------------------------------------------
def snapshot(bundle: str | os.PathLike) -> dict:
    """What a bundle holds, by content: {(path, kind, locator, text): vector}, plus checks that
    need the open bundle (FAISS ids, self-retrieval, manifest freshness, temporaries)."""
    import searchkit
    from searchkit.recovery import temp_pid

    out: dict = {"problems": []}
    with searchkit.open_index(bundle) as idx:
        db = idx.store.db
        rows = db.execute(
            "SELECT items.id, files.path, items.kind, items.locator, items.text, items.vector "
            "FROM items JOIN files ON files.id = items.file_id ORDER BY items.id"
        ).fetchall()
        items = {}
        for _id, path, kind, loc, text, vec in rows:
            key = (os.fsdecode(path) if isinstance(path, bytes) else path, kind, loc, text)
            if key in items:
                out["problems"].append(f"duplicate item {key}")
            items[key] = np.frombuffer(vec, dtype=np.float32)
        out["items"] = items
        paths = [r[0] for r in db.execute("SELECT path FROM files")]
        if len(paths) != len(set(paths)):
            out["problems"].append("duplicate file rows")
        incomplete = db.execute("SELECT COUNT(*) FROM files WHERE complete = 0").fetchone()[0]
        if incomplete:
            out["problems"].append(f"{incomplete} files left incomplete")
        manifest = idx.read_manifest() or {}
        gen = idx.store.generation
        for kind in ("image", "text"):
            entry = (manifest.get("vectors") or {}).get(kind) or {}
            if entry.get("generation") != gen:
                out["problems"].append(f"{kind}.faiss is not saved at the database generation")
            vec = idx.vectors(kind)
            if not np.array_equal(np.sort(vec.ids()), idx.store.item_ids(kind)):
                out["problems"].append(f"{kind}: FAISS ids differ from meta.db ids")
        ids = idx.store.item_ids("image")
        if len(ids):
            q = idx.store.vectors_by_ids(ids, idx.dim)
            _, found = idx.vectors("image").search(q, 1)
            misses = int((found[:, 0] != ids).sum())
            if misses:
                out["problems"].append(f"{misses} images do not find themselves first")
        left = [n for n in os.listdir(idx.path) if temp_pid(n) is not False]
        if left:
            out["problems"].append(f"temporary files left: {left}")
        out["generation"] = gen
    return out


def compare(got: dict, reference: dict) -> list[str]:
    """Problems of `got` against a clean run's snapshot: same items, same vectors, no extras."""
    problems = list(got["problems"])
    a, b = set(got["items"]), set(reference["items"])
    if a != b:
        problems.append(f"items differ: {len(a - b)} extra, {len(b - a)} missing")
    for key in a & b:
        if not np.allclose(got["items"][key], reference["items"][key], atol=1e-5):
            problems.append(f"vector of {key} differs")
            break
    return problems


def main(argv: list[str]) -> None:
    moment, sep, *rest = argv
    if sep != "--":
        raise SystemExit("usage: faultlib.py MOMENT -- SEARCHKIT-ARGS...")
    # Ctrl-C as in a terminal: a child inherits an ignored SIGINT from its parent (a test
    # process whose earlier tests ran servers may have one), and Python then never raises
    signal.signal(signal.SIGINT, signal.default_int_handler)
    arm(moment)
    from searchkit.cli.main import app

    sys.argv = ["searchkit", *rest]
    app()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
