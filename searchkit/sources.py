"""What `index` reads: image files found under the given paths, and text corpora split into
documents (one per non-empty line of a .txt; one per row of a .csv/.tsv/.jsonl, from the text
column)."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

from .errors import DecodeError, UsageError
from . import remote
from .images import image_paths_under, is_image_path
from .remote import is_url

TEXT_EXTENSIONS = frozenset({".txt", ".csv", ".tsv", ".jsonl"})
DEFAULT_TEXT_COLUMNS = ("text", "caption")


def is_text_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in TEXT_EXTENSIONS


@dataclass
class Root:
    """One PATH argument: a folder of images, an image file, or a text corpus."""

    path: str  # absolute, normalized
    is_dir: bool

    def covers(self, path: str, kind: str) -> bool:
        """Whether a file of this kind at `path` is this root's to keep in step with the disk
        (a folder root covers the images below it; a file root covers that file)."""
        if self.is_dir:
            return kind == "image" and path.startswith(self.path.rstrip(os.sep) + os.sep)
        return path == self.path


def resolve_roots(paths) -> list[Root]:
    roots = []
    for p in paths:
        if is_url(str(p)):
            url, is_dir = remote.resolve(str(p))
            if not is_dir and not (is_image_path(url) or is_text_path(url)):
                raise UsageError(f"{p}: unsupported file type")
            roots.append(Root(url, is_dir))
            continue
        ap = os.path.abspath(os.path.expanduser(str(p)))
        if os.path.isdir(ap):
            roots.append(Root(ap, True))
        elif os.path.lexists(ap):
            if not (is_image_path(ap) or is_text_path(ap)):
                raise UsageError(
                    f"{p}: unsupported file type; index image files "
                    "(.jpg .png .webp .gif .bmp .tif), folders of them, or text corpora (.txt .csv .tsv .jsonl)"
                )
            roots.append(Root(ap, False))
        else:
            raise UsageError(f"{p}: no such file or folder")
    return roots


def discover(roots: list[Root]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Every input file under the roots -> its kind ('image' or 'text'), sorted by path; and the
    folders that could not be listed, with the reason."""
    found: dict[str, str] = {}
    unreadable: list[tuple[str, str]] = []
    for root in roots:
        if root.is_dir and is_url(root.path):
            for path in remote.list_files(root.path, unreadable):
                if is_image_path(path):
                    found[path] = "image"
        elif root.is_dir:
            for path in image_paths_under(root.path, unreadable):
                found[path] = "image"
        else:
            found[root.path] = "text" if is_text_path(root.path) else "image"
    return dict(sorted(found.items())), unreadable


@dataclass
class Corpus:
    docs: list[tuple[int, str]] = field(default_factory=list)  # (line number, text)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def parse_corpus(path: str, data: bytes, text_column: str | None = None) -> Corpus:
    """Split a corpus file's bytes into documents; undecodable lines become `bad_lines`.

    Raises DecodeError when the file as a whole cannot be read (no text column, not JSON Lines).
    """
    ext = os.path.splitext(path)[1].lower()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", errors="surrogateescape")
    corpus = Corpus()
    if ext == ".txt":
        for n, line in enumerate(text.splitlines(), start=1):
            _take(corpus, n, line)
    elif ext == ".jsonl":
        column = None
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if _has_surrogates(line):
                corpus.bad_lines.append((n, "not valid UTF-8"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                corpus.bad_lines.append((n, f"invalid JSON: {e.msg}"))
                continue
            except RecursionError:
                corpus.bad_lines.append((n, "invalid JSON: nested too deeply"))
                continue
            if not isinstance(obj, dict):
                corpus.bad_lines.append((n, "not a JSON object"))
                continue
            column = column or _pick_column(list(obj), text_column, path, strict=False)
            value = obj.get(column) if column else None
            if value is None:
                corpus.bad_lines.append((n, f"no '{text_column or 'text'}' field"))
                continue
            if isinstance(value, (dict, list)):
                corpus.bad_lines.append((n, f"the '{column}' field is a JSON {'object' if isinstance(value, dict) else 'array'}, not text"))
                continue
            _take(corpus, n, str(value))
    else:  # .csv / .tsv
        _parse_table(corpus, text, "\t" if ext == ".tsv" else ",", text_column, path)
    return corpus


def _parse_table(corpus: Corpus, text: str, delimiter: str, text_column: str | None, path: str) -> None:
    """Rows of a CSV/TSV. The csv module runs in strict mode, so a broken row (an unclosed quote
    that would otherwise swallow every row after it into one field, a quote followed by text)
    raises; it is recorded with its line number and parsing starts again on the next line."""
    lines = io.StringIO(text, newline="").readlines()  # physical lines, as csv counts them
    pos = 0  # index of the next line the current reader will take

    def feed():
        nonlocal pos
        while pos < len(lines):
            pos += 1
            yield lines[pos - 1]

    def reader():
        return csv.reader(feed(), delimiter=delimiter, strict=True)

    rows = reader()
    try:
        header = next(rows)
    except StopIteration:
        return
    except csv.Error as e:
        raise DecodeError(f"cannot parse the header row: {_csv_reason(e)}") from e
    col = header.index(_pick_column(header, text_column, path, strict=True))
    while True:
        start = pos + 1  # the line this row starts on
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            corpus.bad_lines.append((start, f"cannot parse row: {_csv_reason(e)}"))
            pos = start  # go on with the line after the one the broken row started on
            rows = reader()
            continue
        if not row:
            continue
        if col >= len(row):
            corpus.bad_lines.append((start, f"row has {len(row)} fields, the text column is #{col + 1}"))
            continue
        _take(corpus, start, row[col])


def _csv_reason(e: csv.Error) -> str:
    msg = str(e)
    if "unexpected end of data" in msg:
        return "a quoted field is never closed"
    return msg


def _take(corpus: Corpus, n: int, value: str) -> None:
    value = value.strip()
    if not value:
        return
    if _has_surrogates(value):
        corpus.bad_lines.append((n, "not valid UTF-8"))
    else:
        corpus.docs.append((n, value))


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _pick_column(columns: list[str], wanted: str | None, path: str, *, strict: bool) -> str | None:
    candidates = (wanted,) if wanted else DEFAULT_TEXT_COLUMNS
    for c in candidates:
        if c in columns:
            return c
    if not strict:
        return None
    raise DecodeError(
        f"no text column {' or '.join(repr(c) for c in candidates)} (columns: {', '.join(columns) or 'none'}); "
        "choose one with --text-column"
    )
