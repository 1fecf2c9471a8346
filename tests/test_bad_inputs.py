"""Inputs that are not what they claim: file names that are not UTF-8, FIFOs and other
non-regular files, broken CSV/TSV/JSONL rows, and the whole zoo in one run. Each is recorded
as a failure (or indexed, where it is valid) and the run completes."""

from __future__ import annotations

import json
import os
import stat

import pytest

import searchkit
from tests.conftest import TINY, make_images, noise_image

BAD_NAME = os.fsdecode(b"bad-\xff-name.jpg")  # Linux names are bytes; this one is not UTF-8


def build(paths, **kw):
    with searchkit.open_index("t", create=True, model=TINY) as idx:
        return idx.add(paths, **kw)


def test_a_name_that_is_not_utf8_is_indexed_losslessly(tmp_path):
    d = tmp_path / "u"
    make_images(d, 2)
    noise_image(9).save(d / BAD_NAME, format="JPEG")
    s = build([d], batch_size=8)  # one batch: the bad name must not sink its neighbours
    assert (s.added, s.failed) == (3, 0)
    idx = searchkit.open_index("t")
    hit = idx.search(d / BAD_NAME, k=1)[0]
    assert hit.path == str(d / BAD_NAME) and os.fsencode(hit.path).endswith(b"bad-\xff-name.jpg")
    assert os.path.exists(hit.path)  # the stored path opens the file
    assert [r.path for r in idx.search("x", k=3, where={"path": "*/bad-*"})] == [hit.path]
    assert len(idx.search("x", k=5, where={"path": str(d)})) == 3
    idx.close()
    assert build([d]).unchanged == 3  # and it is known as itself on the next run
    os.rename(d / BAD_NAME, d / os.fsdecode(b"moved-\xfe.jpg"))
    s = build([d])
    assert (s.updated, s.removed, s.added) == (1, 0, 0)  # a move of such a file keeps its vector
    # the CLI shows it readably, and its JSON gives Python the exact path back
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["query", "--image", str(d / os.fsdecode(b"moved-\xfe.jpg")), "--index", "t", "-k", "1", "--json"])
    assert r.exit_code == 0, r.stderr
    assert os.fsencode(json.loads(r.stdout)["path"]).endswith(b"moved-\xfe.jpg")
    assert "\\udcfe" in r.stdout and r.stdout_bytes.decode("utf-8")  # valid UTF-8 on the wire
    r = runner.invoke(app, ["query", "x", "--index", "t", "--where-path", "*moved*"])
    assert r.exit_code == 0 and "moved-\\xfe.jpg" in r.stdout, r.stdout + r.stderr


def test_non_regular_files_are_recorded_not_opened(tmp_path):
    d = tmp_path / "f"
    make_images(d, 2)
    os.mkfifo(d / "pipe.jpg")  # no writer: opening it for reading would block forever
    (d / "folder.jpg").mkdir()  # a folder named like an image is walked, not read
    noise_image(5).save(d / "folder.jpg" / "inner.png")
    s = build([d])
    reasons = {os.path.basename(p): r for p, r in s.failures}
    assert reasons == {"pipe.jpg": "not a regular file (a FIFO)"}
    assert s.added == 3
    from searchkit.errors import InputError

    with searchkit.open_index("t") as idx, pytest.raises(InputError, match="FIFO"):
        idx.search(d / "pipe.jpg")
    from searchkit.errors import DecodeError
    from searchkit.images import read_bytes

    with pytest.raises(DecodeError, match="character device"):
        read_bytes("/dev/null")
    assert stat.S_ISFIFO(os.stat(d / "pipe.jpg").st_mode)


UNCLOSED = 'text,n\ngood one,1\ngood two,2\n"an unclosed quoted field,3\nfour,4\nfive,5\nsix,6\nseven,7\n'


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_a_broken_row_is_recorded_and_the_rows_after_it_are_kept(tmp_path, ext):
    if ext == "jsonl":
        rows = ["good one", "good two", None, "four", "five", "six", "seven"]
        body = "".join((json.dumps({"text": r}) if r else '{"text": "an unclosed string') + "\n" for r in rows)
    else:
        body = UNCLOSED if ext == "csv" else UNCLOSED.replace(",", "\t")
    corpus = tmp_path / f"docs.{ext}"
    corpus.write_text(body)
    s = build([corpus])
    assert (s.added, s.failed) == (6, 1)
    line = 3 if ext == "jsonl" else 4  # (the CSV header is line 1)
    (path, reason), = s.failures
    assert path == f"{corpus}:{line}"
    assert ("never closed" in reason) if ext != "jsonl" else ("invalid JSON" in reason)
    with searchkit.open_index("t") as idx:
        texts = {r.text for r in idx.search("x", k=10, kind="text")}
    assert texts == {"good one", "good two", "four", "five", "six", "seven"}


def test_csv_quoting_that_is_valid_still_parses(tmp_path):
    from searchkit.sources import parse_corpus

    c = parse_corpus("x.csv", b'text\n"two\nlines"\n"a ""quote"""\n"bad"x\nlast\n')
    assert c.docs == [(2, "two\nlines"), (4, 'a "quote"'), (6, "last")]
    assert [n for n, _ in c.bad_lines] == [5]
    c = parse_corpus("x.jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b'\n{"text": {"k": 1}}\n')
    assert c.docs == [(1, "a")] and [n for n, _ in c.bad_lines] == [2, 3]


def _png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels, with almost no data: refused before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif_bomb(w: int, h: int) -> bytes:
    import struct

    screen = struct.pack("<HHBBB", w, h, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


@pytest.mark.slow
def test_the_bad_input_zoo_in_one_cli_run(tmp_path):
    """Every kind of bad input at once: each is recorded with its reason, the good files are
    indexed, the run completes with exit code 3, and a second run changes nothing."""
    import io
    import shutil
    import socket
    import subprocess
    import sys


    z = tmp_path / "zoo"
    make_images(z, 3)
    noise_image(20).save(z / BAD_NAME, format="JPEG")  # valid: indexed
    os.mkfifo(z / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(z / "sock.png"))
    (z / "loop.jpg").symlink_to(z / "loop.jpg")
    (z / "dangling.png").symlink_to(z / "gone.png")
    (z / "folder.jpg").mkdir()  # a folder: walked, not read (empty here)
    (z / "empty.webp").write_bytes(b"")
    (z / "text.gif").write_text("not an image")
    (z / "bomb.png").write_bytes(_png_bomb(40_000, 40_000))
    (z / "bomb.gif").write_bytes(_gif_bomb(60_000, 60_000))
    img = noise_image(21, size=(80, 64))
    for fmt, ext in [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tif")]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        (z / f"trunc.{ext}").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    make_images(z / "locked", 1, start=30)
    (z / "locked" / "img030.jpg").chmod(0)
    csvf, tsvf, jsonl = tmp_path / "docs.csv", tmp_path / "docs.tsv", tmp_path / "docs.jsonl"
    csvf.write_text(UNCLOSED)
    tsvf.write_text(UNCLOSED.replace(",", "\t"))
    jsonl.write_text('{"text": "one"}\n{"text": "two\n[1, 2]\n{"caption": "x"}\n{"text": "three"}\n')
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    cmd = [sys.executable, "-m", "searchkit.cli", "index", str(z), str(csvf), str(tsvf), str(jsonl), str(latin)]
    cmd += ["--index", "zoo", "--model", TINY, "--json"]
    if os.geteuid() == 0:  # give up the capabilities that let root read any file
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: root can read any file")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        sock.close()
    assert r.returncode == 3, r.stderr
    s = json.loads(r.stdout)
    expect = {
        "pipe.jpg": "not a regular file (a FIFO)",
        "sock.png": "not a regular file (a socket)",
        "loop.jpg": "symlink loop",
        "dangling.png": "broken symlink",
        "empty.webp": "empty file",
        "text.gif": "not a recognised image format",
        "bomb.png": "decompression bomb",
        "bomb.gif": "decompression bomb",
        "img030.jpg": "permission denied",
        **{f"trunc.{e}": "cannot decode image" for e in ("jpg", "png", "webp", "gif", "bmp", "tif")},
        "docs.csv:4": "never closed",
        "docs.tsv:4": "never closed",
        "docs.jsonl:2": "invalid JSON",
        "docs.jsonl:3": "not a JSON object",
        "docs.jsonl:4": "no 'text' field",
        "latin1.txt:2": "not valid UTF-8",
    }
    with searchkit.open_index("zoo") as idx:
        got = {os.path.basename(f["path"]): f["reason"] for f in idx.failures()}
        assert set(got) == set(expect), got
        for name, reason in expect.items():
            assert reason in got[name], (name, got[name])
        assert idx.store.counts() == {"image": 4, "text": 6 + 6 + 2 + 1}
    assert (s["added"], s["failed"]) == (4 + 15, len(expect))
    for name in ("pipe.jpg", "loop.jpg", "docs.csv:4"):
        assert name in r.stderr  # each named on stderr as `failed: PATH: reason`
    assert "Traceback" not in r.stderr
    assert again.returncode == 3 and json.loads(again.stdout)["added"] == 0 and json.loads(again.stdout)["unchanged"] == 19
