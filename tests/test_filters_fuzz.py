"""Filter values at and past every edge: clamped to what the index can hold or refused with a
UsageError (exit 2 in the CLI), never a traceback. The parsers are fuzzed with hypothesis and
every Filter they accept is run as SQL against a real meta.db schema."""

from __future__ import annotations

import os
import sqlite3
from datetime import date, datetime, timedelta, timezone

import pytest
import sqlite_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import searchkit
from cli.main import app
from searchkit.errors import UsageError
from searchkit.filters import INT64_MAX, INT64_MIN, Filter, parse_size, parse_time_ns
from searchkit.store import m001_initial
from tests.conftest import TINY, make_images

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

values = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"\s*[0-9]{1,30}(\.[0-9]{0,30})?\s*[kKmMgGtT]?[iI]?[bB]?\s*", fullmatch=True),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2})?)?(Z|[+-][0-9]{2}:[0-9]{2})?", fullmatch=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()) if hasattr(st, "timezones") else st.datetimes(),
    st.dates(),
    st.booleans(),
)


def _db() -> sqlite3.Connection:
    db = sqlite_utils.Database(memory=True)
    m001_initial(db)
    db.execute("INSERT INTO files(path, kind, size, mtime_ns, hash, complete) VALUES ('/a.jpg', 'image', 10, 5, 'h', 1)")
    db.execute("INSERT INTO items(file_id, kind, vector) VALUES (1, 'image', x'00')")
    return db


@FUZZ
@given(values)
def test_parse_size_and_time_give_an_int64_or_a_usage_error(value):
    for parse in (parse_size, parse_time_ns):
        try:
            n = parse(value)
        except UsageError as e:
            assert "\n" not in str(e)
            continue
        assert isinstance(n, int) and INT64_MIN <= n <= INT64_MAX


@FUZZ
@given(
    st.fixed_dictionaries({}, optional={f: values for f in ("min_size", "max_size", "after", "before")}),
    st.one_of(st.text(max_size=20), st.sampled_from([os.fsdecode(b"/x/\xff"), os.fsdecode(b"*\xfe*"), "\x00", "~", "[", "/"])),
)
def test_every_accepted_filter_runs_as_sql(fields, path):
    db = _db()
    try:
        flt = Filter.of(fields, path=path or None)
        if flt is None:
            return
        where, params = flt.sql()
    except UsageError:
        return
    db.execute(f"SELECT items.id FROM items JOIN files AS f ON f.id = items.file_id WHERE {where}", params).fetchall()


def test_edges_clamp_to_the_same_selection():
    assert parse_time_ns("0001-01-01") == INT64_MIN and parse_time_ns(date(1, 1, 1)) == INT64_MIN
    assert parse_time_ns("9999-12-31T23:59:59") == INT64_MAX and parse_time_ns("2262-04-12") == INT64_MAX
    assert parse_time_ns(float("inf")) == INT64_MAX and parse_time_ns(-1e300) == INT64_MIN
    # inside the range the arithmetic is exact (no float rounding of nanoseconds)
    t = datetime(2261, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
    assert parse_time_ns(t) == (t - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1) * 1000
    assert parse_size("99999999999999999999T") == INT64_MAX == parse_size(9223372036854775808)
    assert parse_size("1.5K") == 1536 and parse_size("0.0000001K") == 0
    for bad in (float("nan"), -1, "1e5", "1,000", "٣K"):
        with pytest.raises(UsageError):
            parse_size(bad)
    with pytest.raises(UsageError):
        parse_time_ns(float("nan"))


def test_the_cli_clamps_or_refuses_in_one_line(tmp_path):
    make_images(tmp_path / "p", 2)
    with searchkit.open_index("f", create=True, model=TINY) as idx:
        idx.add([tmp_path / "p"])
    runner = CliRunner()
    for args in (
        ["--after", "0001-01-01"],
        ["--before", "9999-12-31T23:59:59"],
        ["--min-size", "0", "--max-size", "99999999999999999999T"],
        ["--max-size", "9223372036854775808"],
        ["--after", "2300-01-01"],
    ):
        r = runner.invoke(app, ["query", "a dog", "--index", "f", "--json", *args])
        assert r.exit_code == 0 and r.exception is None, (args, r.stderr)
        expect = 0 if args[1] == "2300-01-01" else 2
        assert len(r.stdout.splitlines()) == expect, args
    for args in (["--min-size", "lots"], ["--after", "0000-01-01"], ["--before", "2024-13-01"], ["--min-size", "2G", "--max-size", "1G"]):
        r = runner.invoke(app, ["query", "a dog", "--index", "f", *args])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, (args, r.stderr)
