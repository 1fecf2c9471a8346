"""Photo libraries: HEIC and AVIF files, EXIF facts in meta.db (and their migration), the
--taken-after/--taken-before/--camera/--near pre-filters, RAW files (real DNGs, tests/dng.py)
with and without rawpy."""

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
from tests.dng import write_dng

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


def stored_vectors(idx) -> dict[str, np.ndarray]:
    ids, vecs = next(idx.store.iter_vectors("image", idx.dim))
    rows = idx.store.item_rows(ids)
    return {os.path.basename(rows[int(i)]["path"]): v for i, v in zip(ids, vecs)}


def a_photo(seed: int, size=(48, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (3, 4, 3), dtype=np.uint8)  # smooth blocks: JPEG keeps them
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def test_dng_helper_writes_a_dng_libraw_reads():
    rawpy = pytest.importorskip("rawpy")
    import io

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sk-dng-{os.getpid()}.dng")
    try:
        jpeg = write_dng(path, a_photo(0))
        with rawpy.imread(path) as raw:
            assert (raw.sizes.raw_width, raw.sizes.raw_height) == (64, 48) and raw.color_desc == b"RGBG"
            assert raw.postprocess().shape == (48, 64, 3)  # the CFA image itself demosaics
            thumb = raw.extract_thumb()
        assert thumb.format == rawpy.ThumbFormat.JPEG
        # LibRaw may prepend an EXIF segment; the JPEG's pixels are the preview's
        got, want = (np.asarray(Image.open(io.BytesIO(b))) for b in (bytes(thumb.data), jpeg))
        assert got.shape == want.shape and np.array_equal(got, want)
    finally:
        os.unlink(path)


def test_raw_files_indexed_by_their_embedded_preview(tmp_path):
    pytest.importorskip("rawpy")
    lib = tmp_path / "raw"
    lib.mkdir()
    jpeg = write_dng(lib / "IMG_0001.dng", a_photo(1), make="Searchkit", model="RAW-1", taken="2021:07:14 18:02:03")
    (tmp_path / "preview.jpg").write_bytes(jpeg)  # the same preview as a plain JPEG
    write_dng(lib / "IMG_0002.dng", a_photo(2), make="Other", model="Cam")
    with open_index("raw", create=True, model=fakes.SPEC) as idx:
        s = idx.add([lib, tmp_path / "preview.jpg"])
        assert (s.added, s.failed) == (3, 0), idx.failures()
        vecs = stored_vectors(idx)
        assert np.allclose(vecs["IMG_0001.dng"], vecs["preview.jpg"], atol=1e-5)
        assert not np.allclose(vecs["IMG_0001.dng"], vecs["IMG_0002.dng"], atol=1e-2)
        # the RAW file's own EXIF: camera and date; the pixel size is the preview's
        hit = {os.path.basename(r.path): r for r in idx.search("red", k=3)}["IMG_0001.dng"]
        assert hit.photo == {"taken": "2021-07-14T18:02:03", "make": "Searchkit", "model": "RAW-1", "width": 48, "height": 36}
        assert paths(idx.search("red", k=3, where={"camera": "raw-1"})) == ["IMG_0001.dng"]


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # Pillow, reading the cut file's tags
def test_corrupt_raw_file_is_a_one_line_failure(tmp_path):
    pytest.importorskip("rawpy")
    lib = tmp_path / "raw"
    lib.mkdir()
    (lib / "garbage.dng").write_bytes(b"II*\x00" + bytes(200))
    whole = (tmp_path / "whole.dng")
    write_dng(whole, a_photo(3))
    (lib / "truncated.nef").write_bytes(whole.read_bytes()[:300])  # inside the IFDs: no preview left
    Image.new("RGB", (20, 20), (1, 2, 3)).save(lib / "ok.jpg")
    with open_index("raw", create=True, model=fakes.SPEC) as idx:
        s = idx.add([lib])
        assert (s.added, s.failed) == (1, 2)
        reasons = {os.path.basename(f["path"]): f["reason"] for f in idx.failures()}
    assert set(reasons) == {"garbage.dng", "truncated.nef"}
    assert reasons["garbage.dng"].startswith("cannot read RAW file: LibRawFileUnsupportedError: Unsupported file format")
    for reason in reasons.values():
        assert "\n" not in reason and "b'" not in reason and ("cannot read RAW file" in reason or "no embedded JPEG preview" in reason), reason


def test_raw_file_without_rawpy_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rawpy", None)  # as if rawpy were not installed
    lib = tmp_path / "raw"
    lib.mkdir()
    write_dng(lib / "IMG_0001.dng", a_photo(4))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(lib / "ok.jpg")
    with open_index("raw", create=True, model=fakes.SPEC) as idx:
        s = idx.add([lib])
        assert (s.added, s.failed) == (1, 1)
        (failure,) = idx.failures()
    assert failure["path"].endswith("IMG_0001.dng")
    assert "\n" not in failure["reason"] and "install the raw extra" in failure["reason"] and "searchkit[raw]" in failure["reason"]


def test_exif_date_and_gps_edge_cases():
    from searchkit.photos import _degrees, _exif_datetime

    assert _exif_datetime("2023:06:01 14:30:05\x00") == "2023-06-01T14:30:05"
    assert _exif_datetime("0000:00:00 00:00:00") is None and _exif_datetime("    ") is None
    assert _degrees((10.0, 30.0, 0.0), "S") == -10.5 and _degrees("junk", "N") is None
    assert np.isfinite(_degrees((1, 2, 3), b"E"))
