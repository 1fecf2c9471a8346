"""Inputs that are not what they claim: file names that are not UTF-8, FIFOs and other
non-regular files, broken CSV/TSV/JSONL rows, and the whole zoo in one run. Each is recorded
as a failure (or indexed, where it is valid) and the run completes."""

from __future__ import annotations

import json
import os
import stat

import pytest

import searchkit
from tests.conftest import TINY, make_images, noise_image, run_cli

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
    r = run_cli("query", "--image", str(d / os.fsdecode(b"moved-\xfe.jpg")), "--index", "t", "-k", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert os.fsencode(json.loads(r.stdout)["path"]).endswith(b"moved-\xfe.jpg")
    assert "\\udcfe" in r.stdout  # valid UTF-8 on the wire
    r = run_cli("query", "x", "--index", "t", "--where-path", "*moved*")
    assert r.returncode == 0 and "moved-\\xfe.jpg" in r.stdout, r.stdout + r.stderr


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
