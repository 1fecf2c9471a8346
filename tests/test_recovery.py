"""A writer finishes what a killed writer left: derived files (the text-tower export) made when
missing or stale, and temporary files of dead writers removed."""

from __future__ import annotations

import os
import subprocess
import sys


import searchkit
from searchkit import recovery
from tests.conftest import TINY, make_images


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    make_images(tmp_path / "p", 2)
    with searchkit.open_index("t", create=True, model=TINY) as idx:
        idx.add([tmp_path / "p"])
        bundle = idx.path
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = [f".manifest.json.{dead}.tmp", f".image.faiss.{dead}.tmp", f".text.shard0.{dead}.tmp", "image.ab12.faiss.tmp"]
        kept = [f".manifest.json.{sleeper.pid}.tmp", "manifest.json", "meta.db", "image.faiss"]
        for name in gone[:-1] + kept[:1]:
            (bundle / name).write_bytes(b"partial")
        (bundle / gone[-1]).write_bytes(b"partial")
        for d in (f".text-onnx-{dead}-x1y2", ".text-onnx-k3j4_z"):  # (the second: an older name without a PID)
            (bundle / d).mkdir()
            (bundle / d / "text.onnx").write_bytes(b"partial")
            gone.append(d)
        with searchkit.open_index("t", create=True) as idx:  # taking the writer lock cleans up
            pass
        names = set(os.listdir(bundle))
        assert not names & set(gone)
        assert set(kept) <= names
        with searchkit.open_index("t") as idx:  # a reader touches nothing
            (bundle / gone[0]).write_bytes(b"x")
        assert gone[0] in os.listdir(bundle)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert recovery.temp_pid("meta.db") is False and recovery.temp_pid(".x.12.tmp") == 12


def test_a_missing_derived_file_is_made_on_the_next_run_without_anything_to_index(tmp_path, monkeypatch):
    built = []

    def current(path, fingerprint):
        return path.exists() and path.read_text() == fingerprint

    def build(enc, path):
        built.append(path.name)
        path.write_text(enc.fingerprint)
        return True

    monkeypatch.setattr(recovery, "DERIVED", [recovery.Derived("probe.txt", current, build)])
    make_images(tmp_path / "p", 2)
    with searchkit.open_index("t", create=True, model=TINY) as idx:
        idx.add([tmp_path / "p"])
        probe = idx.path / "probe.txt"
    assert built == ["probe.txt"] and probe.exists()
    with searchkit.open_index("t", create=True) as idx:
        idx.add([tmp_path / "p"])  # current: nothing built, the model never loads
        assert idx._encoder is None
    assert built == ["probe.txt"]
    probe.unlink()  # what a kill between the last commit and the export leaves
    with searchkit.open_index("t", create=True) as idx:
        assert idx.add([tmp_path / "p"]).unchanged == 2
    assert built == ["probe.txt"] * 2 and probe.read_text() == searchkit.get_encoder(TINY).fingerprint

    # an encoder that cannot have it is recorded, so later runs do not load the model for it
    def unsupported(enc, path):
        built.append("none")
        return False

    recovery.register_derived(recovery.Derived("probe.txt", lambda p, f: False, unsupported))
    for _ in range(2):
        with searchkit.open_index("t", create=True) as idx:
            idx.add([tmp_path / "p"])
            loaded = idx._encoder is not None
    assert built.count("none") == 1 and not loaded
    recovery.register_derived(recovery.Derived("probe.txt", lambda p, f: False, unsupported, version=2))
    with searchkit.open_index("t", create=True) as idx:
        idx.add([tmp_path / "p"])  # a new version (support added) tries again
    assert built.count("none") == 2
