"""Faults injected into a real `searchkit index` process: SIGKILL at seeded moments (inside and
right after batch commits, during the final save, during the text-tower export), Ctrl-C, and
a file-size limit that makes the disk refuse writes. After each, a re-run must reach exactly
the state of a clean run (tests/faultlib.py lists the invariants). The long randomized run is
bench/faults.py."""

from __future__ import annotations

import fcntl
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import searchkit
from tests import faultlib
from tests.conftest import TINY, make_images

pytestmark = pytest.mark.slow  # (each test starts real searchkit processes)
FAULTLIB = Path(faultlib.__file__)
N_IMAGES = 14
BATCH = 3
_seed = random.Random(14)
# (moment, export the text tower?): a few seeded kills; each costs one child process
MOMENTS = [
    (f"commit:{_seed.randint(3, 6)}", False),
    (f"after-commit:{_seed.randint(3, 6)}", False),
    ("rename:image.faiss", False),
    ("open:.text-onnx-", True),
]


def _corpus(tmp_path: Path) -> list[Path]:
    make_images(tmp_path / "p", N_IMAGES)
    docs = tmp_path / "docs.csv"
    docs.write_text("text\n" + "".join(f"document number {i}\n" for i in range(12)))
    return [tmp_path / "p", docs]


def _child(moment: str, bundle: Path, inputs: list[Path], env=None, **kw) -> subprocess.Popen:
    args = [sys.executable, str(FAULTLIB), moment, "--", "index", *map(str, inputs), "--index", str(bundle)]
    args += ["--model", TINY, "--batch-size", str(BATCH), "--json"]
    return subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rerun(bundle: Path, inputs: list[Path]):
    with searchkit.open_index(bundle, create=True) as idx:
        return idx.add(inputs, batch_size=BATCH)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every seeded kill started at once (they are independent; the cores run them side by
    side): {moment: (inputs, bundle, process, env)}."""
    runs = {}
    for moment, export in MOMENTS:
        root = tmp_path_factory.mktemp("kill")
        inputs = _corpus(root)
        env = {
            "SEARCHKIT_OPENCLIP_CONFIGS": str(Path(__file__).parent / "assets" / "sk-tiny.json"),
            "SEARCHKIT_TEXT_ONNX": "1" if export else "0",
            "SEARCHKIT_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
        }
        runs[moment] = (root, inputs, root / "bundle", _child(moment, root / "bundle", inputs, env=env), env)
    yield runs
    for *_, proc, _env in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, killed):
    """A clean run over the same inputs (in-process, while the killed runs go on)."""
    root = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:  # (the autouse environment is per test)
        mp.setenv("SEARCHKIT_OPENCLIP_CONFIGS", str(Path(__file__).parent / "assets" / "sk-tiny.json"))
        mp.setenv("SEARCHKIT_TEXT_ONNX", "0")
        mp.setenv("SEARCHKIT_DEVICE", "cpu")
        inputs = _corpus(root)
        with searchkit.open_index(root / "bundle", create=True, model=TINY) as idx:
            idx.add(inputs, batch_size=BATCH)
        return root, faultlib.snapshot(root / "bundle")


def _same_paths(snap: dict, ref_root: Path, root: Path) -> dict:
    """The reference snapshot with its paths moved under `root` (each run has its own tmp)."""
    move = lambda p: str(root / Path(p).relative_to(ref_root))  # noqa: E731
    return {**snap, "items": {(move(p), k, loc, t): v for (p, k, loc, t), v in snap["items"].items()}}


@pytest.mark.parametrize("moment,export", MOMENTS, ids=[m for m, _ in MOMENTS])
def test_a_kill_at_any_moment_is_completed_by_a_rerun(monkeypatch, killed, reference, moment, export):
    ref_root, ref = reference
    root, inputs, bundle, proc, env = killed[moment]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"the moment {moment} never came: rc {proc.returncode}\n{err}"
    if moment.startswith("rename:") or export:
        assert any(faultlib_temp(n) for n in os.listdir(bundle)), "the kill should have left a temporary"
    monkeypatch.setenv("SEARCHKIT_TEXT_ONNX", env["SEARCHKIT_TEXT_ONNX"])
    s = _rerun(bundle, inputs)
    assert s.total == N_IMAGES + 12 and s.failed == 0
    snap = faultlib.snapshot(bundle)
    assert faultlib.compare(snap, _same_paths(ref, ref_root, root)) == []
    if export:  # the export the kill cut short was finished by the re-run
        from searchkit.encoders.onnx import OnnxTextEncoder

        assert OnnxTextEncoder.matches(bundle / "text-onnx", searchkit.get_encoder(TINY).fingerprint)
    s = _rerun(bundle, inputs)  # and a further run does nothing
    assert (s.added, s.updated, s.removed, s.unchanged) == (0, 0, 0, N_IMAGES + 12)
    with searchkit.open_index(bundle) as idx:
        assert idx.store.generation == snap["generation"]


def faultlib_temp(name: str) -> bool:
    from searchkit.recovery import temp_pid

    return temp_pid(name) is not False


def _lock_is_free(bundle: Path) -> bool:
    fd = os.open(bundle / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _items(bundle: Path) -> int:
    try:
        with sqlite3.connect(f"file:{bundle / 'meta.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_ctrl_c_stops_a_run_promptly_and_releases_the_lock(tmp_path):
    folder = tmp_path / "p"
    make_images(folder, 150)
    os.mkfifo(folder / "pipe.jpg")  # (which hung the reader threads for good before)
    bundle = tmp_path / "bundle"
    proc = _child("slow:0.5", bundle, [folder])  # 150 / BATCH commits: still running when interrupted
    proc_args = proc.args
    deadline = time.monotonic() + 90
    while _items(bundle) < 2 * BATCH and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    t = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - t < 10
    assert "interrupted" in err and "Traceback" not in err
    assert _lock_is_free(bundle)
    done = _items(bundle)
    assert 0 < done < 150
    s = _rerun(bundle, [folder])
    assert (s.unchanged + s.added, s.failed) == (150, 1) and s.added == 150 - done, proc_args


def _file_size_limit(limit: int):
    def preexec():  # in the child: writes past `limit` fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_disk_full_stops_with_one_line_and_a_rerun_completes(tmp_path, reference):
    # (after the kills: `reference` waits for nothing, but orders this test after them)
    ref_root, ref = reference
    inputs = _corpus(tmp_path)
    bundle = tmp_path / "bundle"
    make_images(tmp_path / "p", 60, start=N_IMAGES)  # more than the limit lets meta.db hold
    proc = _child("none", bundle, inputs, preexec_fn=_file_size_limit(200_000))
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: cannot write the index") and "run the command again" in lines[0]
    assert not [n for n in os.listdir(bundle) if faultlib_temp(n)]
    with searchkit.open_index(bundle) as idx:  # consistent: readers see what was committed
        for kind in ("image", "text"):
            assert list(idx.vectors(kind).ids()) == list(idx.store.item_ids(kind))
        assert 0 < sum(idx.store.counts().values()) < 74
    for p in tmp_path.joinpath("p").glob("*.jpg"):
        if int(p.stem[3:]) >= N_IMAGES:
            p.unlink()
    s = _rerun(bundle, inputs)  # with space again
    assert s.total == N_IMAGES + 12
    assert faultlib.compare(faultlib.snapshot(bundle), _same_paths(ref, ref_root, tmp_path)) == []


def test_storage_errors_are_recognised_from_python_sqlite_and_faiss(tmp_path):
    import faiss
    import numpy as np

    from searchkit.errors import StorageError
    from searchkit.fsutil import atomic_write_bytes, storage_error

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(StorageError, match="File too large"):
            atomic_write_bytes(tmp_path / "m.json", b"x" * 10_000)
        ix = faiss.IndexFlatIP(8)
        ix.add(np.ones((1000, 8), np.float32))
        with pytest.raises(RuntimeError) as e:
            faiss.write_index(ix, str(tmp_path / "x.faiss"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "File too large" in str(storage_error(e.value, tmp_path))
    assert os.listdir(tmp_path) == ["x.faiss"]  # (the failed atomic write left no temporary)
    assert storage_error(ValueError("no"), tmp_path) is None
    assert storage_error(sqlite3.OperationalError("no such table: x"), tmp_path) is None
