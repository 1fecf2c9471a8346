"""Photo libraries: HEIC and AVIF files, EXIF facts in meta.db (and their migration), the
--taken-after/--taken-before/--camera/--near pre-filters, RAW files with and without rawpy."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from datetime import datetime

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from searchkit import open_index
from searchkit.cli.main import app
from searchkit.errors import UsageError
from searchkit.filters import Filter
from tests import fakes

PARIS = (48.8584, 2.2945)
LYON = (45.7640, 4.8357)


def exif_of(taken=None, make=None, model=None, gps=None, orientation=None) -> bytes:
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if orientation:
        exif[0x0112] = orientation
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    if gps:
        lat, lon = gps
        g = exif.get_ifd(0x8825)

        def dms(x):
            x = abs(x)
            d, m = int(x), int((abs(x) - int(x)) * 60)
            return (float(d), float(m), round((x - d - m / 60) * 3600, 4))

        g[1], g[2], g[3], g[4] = ("N" if lat >= 0 else "S"), dms(lat), ("E" if lon >= 0 else "W"), dms(lon)
    return exif.tobytes()


@pytest.fixture
def library(tmp_path):
    import pillow_heif

    pillow_heif.register_heif_opener()
    lib = tmp_path / "lib"
    lib.mkdir()
    rgb = lambda i: (30 + 40 * i, 200 - 30 * i, 90)  # noqa: E731
    Image.new("RGB", (40, 30), rgb(0)).save(lib / "paris.heic", exif=exif_of("2023:06:01 14:30:05", "Apple", "iPhone 14 Pro", PARIS, orientation=6))
    Image.new("RGB", (40, 30), rgb(1)).save(lib / "lyon.avif", exif=exif_of("2022:12:24 09:00:00", "Canon", "Canon EOS R5", LYON))
    Image.new("RGB", (40, 30), rgb(2)).save(lib / "old.jpg", quality=90, exif=exif_of("2019:01:01 10:00:00", "NIKON CORPORATION", "NIKON D750"))
    Image.new("RGB", (40, 30), rgb(3)).save(lib / "shot.png")  # no EXIF: dates fall back to mtime
    stamp = datetime(2024, 3, 1, 12, 0).timestamp()
    os.utime(lib / "shot.png", (stamp, stamp))
    with open_index("photolib", create=True, model=fakes.SPEC) as idx:
        summary = idx.add([lib])
    assert summary.added == 4 and summary.failed == 0
    return lib


def paths(results):
    return sorted(os.path.basename(r.path) for r in results)


def test_heic_avif_indexed_and_exif_recorded(library):
    with open_index("photolib") as idx:
        res = {os.path.basename(r.path): r for r in idx.search("red", k=10)}
        assert set(res) == {"paris.heic", "lyon.avif", "old.jpg", "shot.png"}
        paris = res["paris.heic"].to_dict()["photo"]
        assert paris["taken"] == "2023-06-01T14:30:05" and paris["make"] == "Apple" and paris["model"] == "iPhone 14 Pro"
        assert paris["lat"] == pytest.approx(PARIS[0], abs=1e-4) and paris["lon"] == pytest.approx(PARIS[1], abs=1e-4)
        assert (paris["width"], paris["height"]) == (30, 40)  # orientation 6: displayed portrait
        assert res["lyon.avif"].photo["model"] == "EOS R5"  # the make is not repeated
        assert res["shot.png"].photo == {"width": 40, "height": 30}
        info = idx.info()["photos"]
        assert info["with_date"] == 3 and info["with_gps"] == 2 and info["cameras"]["Apple iPhone 14 Pro"] == 1


def test_photo_filters_are_prefilters(library):
    with open_index("photolib") as idx:
        search = lambda **w: paths(idx.search("red", k=1 if w.pop("k1", False) else 10, where=w))  # noqa: E731
        assert search(taken_after="2023-01-01") == ["paris.heic", "shot.png"]  # shot.png by its mtime
        assert search(taken_before="2023-01-01") == ["lyon.avif", "old.jpg"]
        assert search(taken_after="2022-12-24", taken_before="2022-12-25") == ["lyon.avif"]
        assert search(camera="iphone") == ["paris.heic"]
        assert search(camera="eos r5") == ["lyon.avif"]
        assert search(camera="nikon") == ["old.jpg"]
        assert search(near=f"{PARIS[0]},{PARIS[1]},5") == ["paris.heic"]
        assert search(near=(45.75, 4.85, 3)) == ["lyon.avif"]
        assert search(near=(PARIS[0], PARIS[1], 400)) == ["lyon.avif", "paris.heic"]  # Paris-Lyon: 392 km
        assert search(near=(PARIS[0], PARIS[1], 380)) == ["paris.heic"]
        # the best match among the filtered files, not the best overall filtered afterwards
        everything = idx.search("red", k=10)
        assert idx.search("red", k=1, where={"camera": "nikon"})[0].path == next(r.path for r in everything if r.path.endswith("old.jpg"))
    for bad, match in [({"near": "1,2"}, "LAT,LON,KM"), ({"near": "91,0,1"}, "latitude"), ({"near": "0,0,-1"}, "positive"),
                       ({"camera": " "}, "empty camera"), ({"taken_after": "June"}, "--taken-after")]:
        with pytest.raises(UsageError, match=match):
            Filter.of(bad).sql()


def test_cli_filters_json_and_info(library):
    runner = CliRunner()
    r = runner.invoke(app, ["query", "red", "--index", "photolib", "--camera", "apple", "--json"])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["photo"]["make"] == "Apple"
    r = runner.invoke(app, ["query", "red", "--index", "photolib", "--near", "45.76,4.83,10", "--taken-after", "2022-01-01", "--json"])
    assert [os.path.basename(json.loads(x)["path"]) for x in r.stdout.splitlines()] == ["lyon.avif"]
    r = runner.invoke(app, ["query", "red", "--index", "photolib", "--near", "x"])
    assert r.exit_code == 2 and "LAT,LON,KM" in r.stderr
    help_text = runner.invoke(app, ["query", "--help"]).stdout
    assert "modification time" in help_text and "--near" in help_text
    r = runner.invoke(app, ["info", "--index", "photolib", "--json"])
    assert json.loads(r.stdout)["photos"]["with_gps"] == 2
    assert "Apple iPhone 14 Pro" in runner.invoke(app, ["info", "--index", "photolib"]).stdout


def test_migration_and_backfill_of_an_older_bundle(library):
    db = library.parent / "indexes" / "photolib" / "meta.db"
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE photos")
    conn.execute("DELETE FROM migrations WHERE name = 'm002_photo_meta'")
    conn.commit()
    conn.close()
    with open_index("photolib", create=True) as idx:  # the migration runs on open
        names = [r["name"] for r in idx.store.db["migrations"].rows]
        assert names == ["m001_initial", "m002_photo_meta"] and idx.info()["photos"]["with_date"] == 0
        summary = idx.add([library])  # unchanged files: EXIF read once, nothing re-encoded
        assert (summary.added, summary.updated, summary.unchanged) == (0, 0, 4)
        assert idx.info()["photos"]["with_date"] == 3
        again = idx.add([library])
        assert again.unchanged == 4


def test_raw_files(tmp_path, monkeypatch):
    lib = tmp_path / "raw"
    lib.mkdir()
    (lib / "broken.dng").write_bytes(b"II*\x00" + bytes(200))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(lib / "ok.jpg")
    with open_index("raw", create=True, model=fakes.SPEC) as idx:
        s = idx.add([lib])
        assert s.added == 1 and s.failed == 1
        reason = idx.failures()[0]["reason"]
    pytest.importorskip("rawpy")
    assert "cannot read RAW file" in reason or "no embedded JPEG preview" in reason
    monkeypatch.setitem(sys.modules, "rawpy", None)  # rawpy not installed
    (lib / "broken.dng").write_bytes(b"II*\x00" + bytes(201))  # changed: read again
    with open_index("raw", create=True) as idx:
        idx.add([lib])
        assert "install the raw extra" in idx.failures()[0]["reason"]


def test_exif_date_and_gps_edge_cases():
    from searchkit.photos import _degrees, _exif_datetime

    assert _exif_datetime("2023:06:01 14:30:05\x00") == "2023-06-01T14:30:05"
    assert _exif_datetime("0000:00:00 00:00:00") is None and _exif_datetime("    ") is None
    assert _degrees((10.0, 30.0, 0.0), "S") == -10.5 and _degrees("junk", "N") is None
    assert np.isfinite(_degrees((1, 2, 3), b"E"))
