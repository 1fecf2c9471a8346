"""The ray engine (`--engine ray`): a real local Ray instance (one per test session) and a real
two-node cluster on this machine, against the local engine as the reference.

Without Ray installed these tests skip, except the one checking the missing-extra error.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_images, noise_image



def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: hidden as sys.modules[name] = None
        return False


HAVE_RAY = _installed("ray") and _installed("pyarrow")
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'searchkit[ray]')")
#: Ray's start-up cost on a 2-core machine: no usage stats, no dashboard, a small object store
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "RAY_AUTH_MODE": "disabled"}
#: a dead node is noticed in about 2 s instead of Ray's default 15-30 s
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "2"}


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance for the whole session (2 CPUs, no dashboard)."""
    if not HAVE_RAY:
        pytest.skip("Ray is not installed")
    import ray

    os.environ.update(RAY_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def _bundle_items(idx) -> dict[tuple[str, int | None], np.ndarray]:
    rows = idx.store.db.execute("SELECT f.path, i.locator, i.vector FROM items i JOIN files f ON f.id = i.file_id").fetchall()
    return {(p, loc): np.frombuffer(v, dtype=np.float32) for p, loc, v in rows}


def _index(bundle: Path, paths, engine, **kw):
    import searchkit

    with searchkit.open_index(bundle, create=True, model=TINY) as idx:
        summary = idx.add([str(p) for p in paths], engine=engine, batch_size=4, **kw)
        return summary, _bundle_items(idx), {(f["path"], f["reason"]) for f in idx.failures()}


def _counts(s) -> tuple:
    return (s.added, s.updated, s.unchanged, s.removed, s.failed, s.total)


def _assert_same_vectors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert float(a[key] @ b[key]) >= 0.9999, key


def _inputs(root: Path) -> tuple[Path, Path]:
    photos = root / "photos"
    make_images(photos, 9)
    make_images(photos / "sub", 2, start=20, ext="png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "empty.png").write_bytes(b"")
    corpus = root / "captions.csv"
    corpus.write_text("id,text\n1,a red square\n2,a blue circle\n3\n")  # row 3 lacks its text
    return photos, corpus


@needs_ray
def test_ray_engine_builds_the_same_bundle_as_the_local_engine(tmp_path, local_ray):
    from searchkit.pipeline_ray import RayEngine

    photos, corpus = _inputs(tmp_path)
    remote = tmp_path / "bucket"
    make_images(remote, 3, start=40)
    # a folder named by a file:// URL: listed, sized and read (by the workers) through pyarrow
    inputs = [photos, corpus, remote.as_uri()]
    s_local, v_local, f_local = _index(tmp_path / "local", inputs, "local")
    engine = RayEngine(decode_batch=3)
    s_ray, v_ray, f_ray = _index(tmp_path / "ray", inputs, engine)
    assert _counts(s_ray) == _counts(s_local)
    assert (s_local.added, s_local.failed) == (11 + 3 + 2, 3)  # images, URL images, captions; 2 bad files, 1 bad row
    assert sum(p.startswith("file://") for p, _ in v_ray) == 3
    _assert_same_vectors(v_local, v_ray)
    assert f_ray == f_local
    assert engine.cluster_times["decode"] > 0 and engine.cluster_times["encode"] > 0


@needs_ray
def test_ray_engine_reruns_moves_and_deletions_like_the_local_engine(tmp_path, local_ray):
    photos = tmp_path / "photos"
    paths = make_images(photos, 8)
    (photos / "broken.jpg").write_bytes(b"junk")
    corpus = tmp_path / "notes.txt"
    corpus.write_text("a red square\na blue circle\na green star\n")
    first = {}
    for engine in ("local", "ray"):
        first[engine] = _index(tmp_path / engine, [photos, corpus], engine)
    assert _counts(first["ray"][0]) == _counts(first["local"][0])

    paths[0].rename(photos / "moved.jpg")  # moved: keeps its vector
    paths[1].unlink()  # deleted
    noise_image(99).save(paths[2])  # changed
    make_images(photos, 1, start=50)  # new
    (photos / "broken.jpg").unlink()  # a failure that went away
    corpus.write_text("a red square\na BLUE circle\na green star\na white moon\n")  # one edited, one new line
    again = {engine: _index(tmp_path / engine, [photos, corpus], engine) for engine in ("local", "ray")}
    s_local, v_local, f_local = again["local"]
    s_ray, v_ray, f_ray = again["ray"]
    # images: 1 new; moved + changed; 5 untouched; 1 deleted. Lines: 2 new, 2 kept, 1 gone
    assert _counts(s_local) == (1 + 2, 2, 5 + 2, 1 + 1, 0, 8 + 4)
    assert _counts(s_ray) == _counts(s_local)
    _assert_same_vectors(v_local, v_ray)
    assert f_ray == f_local == set()
    unchanged = _index(tmp_path / "ray", [photos, corpus], "ray")[0]
    assert _counts(unchanged) == (0, 0, 12, 0, 0, 12)


def _exif(taken: str, make: str, model: str, gps: tuple[float, float] | None = None, orientation: int | None = None) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    if orientation:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = taken  # DateTimeOriginal
    if gps:
        g = exif.get_ifd(0x8825)
        g[1], g[2] = ("N" if gps[0] >= 0 else "S"), (float(int(abs(gps[0]))), float(round(abs(gps[0]) % 1 * 60, 4)), 0.0)
        g[3], g[4] = ("E" if gps[1] >= 0 else "W"), (float(int(abs(gps[1]))), float(round(abs(gps[1]) % 1 * 60, 4)), 0.0)
    return exif.tobytes()


def _photo_facts(bundle: Path) -> dict[str, tuple]:
    conn = sqlite3.connect(bundle / "meta.db")
    try:
        rows = conn.execute(
            "SELECT f.path, p.taken, p.taken_ns, p.make, p.model, p.lat, p.lon, p.width, p.height "
            "FROM photos p JOIN files f ON f.id = p.file_id"
        ).fetchall()
    finally:
        conn.close()
    return {os.path.basename(r[0]): r[1:] for r in rows}


@needs_ray
def test_ray_engine_records_the_same_exif_facts_as_the_local_engine(tmp_path, local_ray):
    photos = tmp_path / "photos"
    photos.mkdir()
    noise_image(1).save(photos / "paris.jpg", exif=_exif("2023:06:01 14:30:05", "Apple", "iPhone 14 Pro", (48.8584, 2.2945), orientation=6))
    noise_image(2).save(photos / "lyon.jpg", exif=_exif("2022:12:24 09:00:00", "Canon", "Canon EOS R5", (-45.764, -4.8357)))
    noise_image(3, size=(40, 30)).save(photos / "plain.png")  # no EXIF: only its pixel size
    (photos / "broken.jpg").write_bytes(b"junk")
    facts = {}
    for engine in ("local", "ray"):
        assert _index(tmp_path / engine, [photos], engine)[0].failed == 1
        facts[engine] = _photo_facts(tmp_path / engine)
    assert facts["ray"] == facts["local"]
    local = facts["local"]
    assert set(local) == {"paris.jpg", "lyon.jpg", "plain.png"}
    assert local["paris.jpg"][0] == "2023-06-01T14:30:05" and local["paris.jpg"][2:4] == ("Apple", "iPhone 14 Pro")
    assert local["paris.jpg"][6:] == (48, 64)  # orientation 6: displayed portrait
    assert local["lyon.jpg"][3] == "EOS R5" and local["lyon.jpg"][4] == pytest.approx(-45.764, abs=1e-3) and local["lyon.jpg"][5] < 0
    assert local["plain.png"] == (None, None, None, None, None, None, 40, 30)
    # a bundle indexed before EXIF facts were recorded: the ray engine reads them once, re-encoding nothing
    conn = sqlite3.connect(tmp_path / "ray" / "meta.db")
    conn.execute("DELETE FROM photos")
    conn.commit()
    conn.close()
    again = _index(tmp_path / "ray", [photos], "ray")[0]
    assert (again.added, again.updated, again.unchanged) == (0, 0, 3)
    assert _photo_facts(tmp_path / "ray") == local


@needs_ray
def test_killed_ray_driver_loses_only_batches_in_flight_and_a_local_rerun_completes(tmp_path, local_ray):
    photos = tmp_path / "photos"
    make_images(photos, 24)
    bundle = tmp_path / "bundle"
    address = local_ray.get_runtime_context().gcs_address  # a second driver on the session's Ray
    # slow:0.5 sleeps after every commit (tests/faultlib.py), so the run is surely still going when
    # it is killed: unslowed, all 6 batches could land within one 0.1 s poll (seen once)
    faultlib = Path(__file__).resolve().parent / "faultlib.py"
    driver = subprocess.Popen(
        [sys.executable, str(faultlib), "slow:0.5", "--", "index", str(photos), "--index", str(bundle), "--model", TINY,
         "--engine", "ray", "--ray-address", address, "--batch-size", "4"],
        env={**os.environ, **RAY_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    t = time.time()
    while _items_in(bundle) < 4 and driver.poll() is None and time.time() - t < 120:
        time.sleep(0.1)
    assert driver.poll() is None, driver.stderr.read()
    driver.kill()
    driver.wait(timeout=30)
    kept = _items_in(bundle)
    assert 4 <= kept < 24
    summary, items, failures = _index(bundle, [photos], "local")
    assert (summary.added, summary.unchanged, summary.total, failures) == (24 - kept, kept, 24, set())
    _assert_same_vectors(_index(tmp_path / "reference", [photos], "local")[1], items)


def test_ray_engine_without_ray_fails_in_one_line_naming_the_extra(tmp_path):
    make_images(tmp_path / "photos", 1)
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['ray.data'] = None\n"
        "from searchkit.cli.main import main\n"
        f"sys.argv = ['searchkit', 'index', 'photos', '--index', 'b', '--model', {TINY!r}, '--engine', 'ray']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: the optional dependency 'ray' is not installed; install it with: pip install 'searchkit[ray]'"
    ]
    assert not (tmp_path / "b").exists()  # refused before any bundle was created
    # the library raises the same typed error before anything changes; the rest needs no Ray
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import searchkit.cli.main, searchkit.index, searchkit.pipeline\n"
        "from searchkit.errors import MissingDependencyError\n"
        "from searchkit.pipeline_ray import RayEngine\n"
        "try:\n    RayEngine.coerce('ray').start()\nexcept MissingDependencyError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'searchkit[ray]'" in proc.stdout


# -- a real two-node cluster on this machine ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(*args: str, env: dict) -> subprocess.Popen:
    """`ray start ... --block` in its own process group, so the test can kill that node alone."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    return subprocess.Popen(
        [ray_bin, "start", "--block", "--disable-usage-stats", *args],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL everything in the node's session (raylet, its workers, the object store)."""
    for pid in [proc.pid, *_leftovers([proc])]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _leftovers(procs: list[subprocess.Popen]) -> list[int]:
    """Live processes in the sessions of the nodes this test started (Ray's workers stay in
    their raylet's session)."""
    sessions = {p.pid for p in procs}
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sessions:  # state, ppid, pgrp, session
            out.append(int(entry.name))
    return out


def _wait_for_nodes(address: str, n: int, env: dict, timeout: float = 60) -> None:
    code = (
        "import ray, sys, time\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        f"t = time.time()\nwhile len([x for x in ray.nodes() if x['Alive']]) < {n}:\n"
        f"    assert time.time() - t < {timeout}, 'nodes did not join'\n    time.sleep(0.5)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=timeout + 30)


def _items_in(bundle: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{bundle / 'meta.db'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@needs_ray
@pytest.mark.slow
def test_two_node_cluster_survives_losing_its_worker_node(tmp_path):
    """`searchkit index --engine ray --ray-address` on a head plus a worker node (two `ray start`
    on this machine); the worker node is killed mid-run and the run still completes, with every
    image once and the same vectors as the local engine."""
    photos = tmp_path / "photos"
    make_images(photos, 24)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, **RAY_ENV, **FAST_HEALTH_CHECKS, "RAY_ADDRESS": ""}
    # logical CPUs (oversubscribing the 2 real cores): the head keeps one for the encoder actor
    # and one for a decoder, so losing the worker node never leaves decoding without a CPU
    # a private temp dir keeps the cluster's sockets, logs and address file out of /tmp/ray
    temp_dir = tempfile.mkdtemp(prefix="skray", dir="/tmp")  # (short: socket paths are limited)
    common = ["--num-cpus=2", "--object-store-memory=100000000", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
    nodes = [_ray_start("--head", f"--port={port}", "--include-dashboard=false", *common, env=env)]
    try:
        _wait_for_nodes(address, 1, env)
        nodes.append(_ray_start(f"--address={address}", *common, env=env))
        _wait_for_nodes(address, 2, env)

        bundle = tmp_path / "bundle"
        args = ["index", str(photos), "--index", str(bundle), "--model", TINY, "--engine", "ray",
                "--ray-address", address, "--batch-size", "4", "--json"]
        driver = subprocess.Popen([sys.executable, "-m", "searchkit.cli", *args],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t = time.time()
        while _items_in(bundle) < 4 and driver.poll() is None and time.time() - t < 120:
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before the worker node could be killed"
        _kill_node(nodes[1])  # the worker node dies mid-run, with whatever it was decoding
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, err
        assert '"added": 24' in out and '"failed": 0' in out
        with sqlite3.connect(bundle / "meta.db") as con:  # nothing lost, nothing twice
            assert con.execute("SELECT COUNT(*), COUNT(DISTINCT file_id) FROM items").fetchone() == (24, 24)
            assert con.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 24
    finally:
        for node in reversed(nodes):
            _kill_node(node)
        time.sleep(0.5)
        left = _leftovers(nodes)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes outlived their node: {left}"
    import searchkit

    with searchkit.open_index(bundle) as idx:
        v_ray = _bundle_items(idx)
    _assert_same_vectors(_index(tmp_path / "local", [photos], "local")[1], v_ray)


HAVE_PYARROW = _installed("pyarrow")


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed (pip install 'searchkit[ray]')")
def test_url_inputs_rerun_incrementally_and_bad_urls_fail_in_one_line(tmp_path):
    from searchkit.errors import UsageError
    from searchkit.sources import resolve_roots

    photos = tmp_path / "photos"
    make_images(photos, 3)
    (photos / ".hidden.jpg").write_bytes(b"x")  # hidden names are skipped, as in local folders
    url = photos.as_uri() + "/"
    first = _index(tmp_path / "b", [url], "local")[0]
    assert (first.added, first.failed) == (3, 0)
    noise_image(7).save(photos / "img001.jpg")
    (photos / "img002.jpg").unlink()
    again, items, _ = _index(tmp_path / "b", [url], "local")
    assert _counts(again) == (0, 1, 1, 1, 0, 2)
    assert sorted(p for p, _ in items) == [f"{url}img000.jpg", f"{url}img001.jpg"]
    with pytest.raises(UsageError, match="no such file or folder"):
        resolve_roots([(tmp_path / "nothing").as_uri()])
    with pytest.raises(UsageError, match="nope://x"):
        resolve_roots(["nope://x"])
