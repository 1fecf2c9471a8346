"""Query filters: which items a search may return, decided in SQLite, enforced inside FAISS.

    from searchkit.filters import Filter
    idx.search("a beach", k=10, where=Filter(path="~/Pictures/2023", min_size="1M", after="2023-06-01"))

A `Filter` becomes one SQL query over `items JOIN files`; the matching item ids become a FAISS
id selector passed with the search (`faiss.SearchParameters(sel=...)`), so the k results are
the k nearest *among the matches*, not the nearest k filtered afterwards.

Path semantics (`path=`):
  - no glob characters (`* ? [`): a folder or file prefix. `~` is expanded and a relative value
    is made absolute against the current folder; it matches that path and everything below it
    (`/photos/2020` matches `/photos/2020/a.jpg`, not `/photos/2020-01/a.jpg`).
  - a glob (SQLite GLOB, case-sensitive, `*` also matches `/`): one that starts with a glob
    character is used as is (`*.png`: every PNG anywhere, `*/2020/*`); otherwise it is made
    absolute like a prefix (`photos/*.jpg` -> `$PWD/photos/*.jpg`).
Sizes are bytes or a number with a unit (`500K`, `2.5M`, `1G`; powers of 1024). Dates are
ISO dates or datetimes (`2024-05-01`, `2024-05-01T13:30`; naive ones in local time), a
`datetime`/`date`, or a POSIX timestamp; `after` is inclusive, `before` exclusive, both on the
file's modification time. Values beyond what the index can hold are clamped, as they select
the same files: a date before 1678 or after 2261 (the range of 64-bit nanosecond times) or a
size over 8 EiB; a value that is not a number or a date is refused with a UsageError.

Photo facts (from EXIF, recorded per file at indexing, see photos.py):
  - `taken_after` (inclusive) / `taken_before` (exclusive): the date the photo was taken; a file
    with no recorded date (a screenshot, a PNG, a photo whose EXIF was stripped) falls back to
    its modification time.
  - `camera`: a case-insensitive substring of "make model" (`"iphone"`, `"canon eos"`); files
    with no camera recorded never match.
  - `near`: `"LAT,LON,KM"` (or a (lat, lon, km) tuple): photos whose GPS position lies within
    KM kilometres (great-circle distance); photos without a position never match.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from datetime import date, datetime, time as dtime, timedelta, timezone
from typing import Any, Union

from .errors import UsageError
from .store import to_db

DateLike = Union[str, float, int, date, datetime]
SizeLike = Union[str, int, float]

_GLOB_CHARS = re.compile(r"[*?\[]")
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
INT64_MAX = 2**63 - 1  # SQLite INTEGER; also the latest nanosecond time (2262-04-11)
INT64_MIN = -(2**63)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _clamp(n: int) -> int:
    return max(INT64_MIN, min(INT64_MAX, n))


def parse_size(value: SizeLike, *, what: str = "size") -> int:
    """Bytes from `123`, `500K`, `2.5M`, `4G`, `4GB`, `4GiB` (powers of 1024)."""
    if isinstance(value, bool):
        raise UsageError(f"bad {what}: {value!r}")
    if isinstance(value, (int, float)):
        if value != value or value < 0:  # (NaN compares false with everything)
            raise UsageError(f"bad {what}: {value!r} is negative or not a number")
        return INT64_MAX if value > INT64_MAX else int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(value), re.IGNORECASE | re.ASCII)
    if not m:
        raise UsageError(f"bad {what} {str(value)!r}; use bytes or a number with K, M, G or T (e.g. 4G)")
    whole, _, frac = m.group(1).partition(".")
    unit = _UNITS[m.group(2).upper()]
    if len(whole.lstrip("0")) > 20:  # beyond 8 EiB whatever the unit; no need to multiply it out
        return INT64_MAX
    n = int(whole) * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)  # exact, no float
    return min(n, INT64_MAX)


def parse_time_ns(value: DateLike, *, what: str = "date") -> int:
    """Nanoseconds since the epoch from an ISO date/datetime string, date, datetime or timestamp."""
    if isinstance(value, bool):
        raise UsageError(f"bad {what}: {value!r}")
    if isinstance(value, (int, float)):
        if value != value:
            raise UsageError(f"bad {what}: {value!r} is not a number")
        if abs(value) > 10**13:  # beyond the nanosecond range either way (and inf)
            return INT64_MAX if value > 0 else INT64_MIN
        return _clamp(int(float(value) * 1e9))
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime.combine(value, dtime())
    else:
        try:
            dt = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"bad {what} {str(value)!r}; use an ISO date like 2024-05-01 or 2024-05-01T13:30") from None
    if dt.tzinfo is None:
        try:
            dt = dt.astimezone()  # naive: local time, as file dates are usually thought of
        except (OverflowError, ValueError, OSError):  # years 1 and 9999: no local offset known
            dt = dt.replace(tzinfo=timezone.utc)
    try:
        delta = dt - _EPOCH
    except OverflowError:  # an offset pushed it past year 1 or 9999: far outside anyway
        return INT64_MIN if dt.year < 1970 else INT64_MAX
    return _clamp(delta // timedelta(microseconds=1) * 1000)


def parse_near(value) -> tuple[float, float, float]:
    """(lat, lon, km) from "LAT,LON,KM" or a 3-tuple; UsageError when out of range."""
    parts = value if isinstance(value, (tuple, list)) else str(value).split(",")
    try:
        lat, lon, km = (float(x) for x in parts)
    except (TypeError, ValueError):
        raise UsageError(f"bad --near {value!r}; use LAT,LON,KM (e.g. 48.8584,2.2945,5)") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise UsageError(f"bad --near {value!r}: latitude must be in [-90, 90], longitude in [-180, 180]")
    if not (km > 0 and km == km and km != float("inf")):
        raise UsageError(f"bad --near {value!r}: the distance must be a positive number of km")
    return lat, lon, km


@dataclass(frozen=True)
class Filter:
    """Restrict a search to items whose file matches every given condition (None = any)."""

    path: str | None = None
    min_size: SizeLike | None = None
    max_size: SizeLike | None = None
    after: DateLike | None = None
    before: DateLike | None = None
    taken_after: DateLike | None = None
    taken_before: DateLike | None = None
    camera: str | None = None
    near: str | tuple | None = None

    @classmethod
    def of(cls, where: Filter | dict | None = None, **kwargs: Any) -> Filter | None:
        """A Filter from a Filter, a dict of its fields, and/or keyword fields; None if empty."""
        if where is None:
            base: dict = {}
        elif isinstance(where, Filter):
            base = {f.name: getattr(where, f.name) for f in fields(cls)}
        elif isinstance(where, dict):
            base = dict(where)
        else:
            raise UsageError(f"where= must be a searchkit.filters.Filter or a dict, not {type(where).__name__}")
        base.update({k: v for k, v in kwargs.items() if v is not None})
        unknown = set(base) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown filter field(s): {', '.join(sorted(unknown))}; use {', '.join(f.name for f in fields(cls))}")
        flt = cls(**base)
        return None if flt.is_empty() else flt

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def sql(self) -> tuple[str, list]:
        """A WHERE fragment over `files` (aliased f) and its parameters."""
        clauses: list[str] = []
        params: list = []
        if self.path is not None:
            pattern = str(self.path)
            if not pattern:
                raise UsageError("empty path filter")
            if _GLOB_CHARS.search(pattern):
                if not _GLOB_CHARS.match(pattern):
                    pattern = os.path.abspath(os.path.expanduser(pattern))
                # (CAST: keeps SQLite from turning the GLOB into a range over the path index,
                # which would skip the paths stored as BLOBs)
                clauses.append("CAST(f.path AS TEXT) GLOB ?")
                params.append(to_db(pattern))
            else:
                prefix = os.path.abspath(os.path.expanduser(pattern)).rstrip(os.sep) or os.sep
                below = prefix if prefix.endswith(os.sep) else prefix + os.sep
                # substr comparison, not LIKE: paths may hold % and _; in bytes, as a path that
                # is not UTF-8 is stored as a BLOB (see store.to_db)
                raw = os.fsencode(below)
                clauses.append("(f.path = ? OR substr(CAST(f.path AS BLOB), 1, ?) = ?)")
                params += [to_db(prefix), len(raw), raw]
        lo = parse_size(self.min_size, what="minimum size") if self.min_size is not None else None
        hi = parse_size(self.max_size, what="maximum size") if self.max_size is not None else None
        if lo is not None:
            clauses.append("f.size >= ?")
            params.append(lo)
        if hi is not None:
            clauses.append("f.size <= ?")
            params.append(hi)
        if lo is not None and hi is not None and lo > hi:
            raise UsageError(f"minimum size {lo} is larger than maximum size {hi}")
        t0 = parse_time_ns(self.after, what="--after date") if self.after is not None else None
        t1 = parse_time_ns(self.before, what="--before date") if self.before is not None else None
        if t0 is not None:
            clauses.append("f.mtime_ns >= ?")
            params.append(t0)
        if t1 is not None:
            clauses.append("f.mtime_ns < ?")
            params.append(t1)
        taken = "COALESCE((SELECT p.taken_ns FROM photos p WHERE p.file_id = f.id), f.mtime_ns)"
        if self.taken_after is not None:
            clauses.append(f"{taken} >= ?")
            params.append(parse_time_ns(self.taken_after, what="--taken-after date"))
        if self.taken_before is not None:
            clauses.append(f"{taken} < ?")
            params.append(parse_time_ns(self.taken_before, what="--taken-before date"))
        if self.camera is not None:
            cam = str(self.camera).strip()
            if not cam:
                raise UsageError("empty camera filter")
            clauses.append(
                "EXISTS (SELECT 1 FROM photos p WHERE p.file_id = f.id AND "
                "instr(lower(COALESCE(p.make, '') || ' ' || COALESCE(p.model, '')), lower(?)) > 0)"
            )
            params.append(cam)
        if self.near is not None:
            lat, lon, km = parse_near(self.near)
            box = km / 111.0 + 1e-6  # a degree of latitude is at least 110.57 km: an index-friendly pre-cut
            clauses.append(
                "EXISTS (SELECT 1 FROM photos p WHERE p.file_id = f.id AND p.lat BETWEEN ? AND ? AND "
                "2 * 6371.0088 * asin(min(1.0, sqrt(power(sin(radians(p.lat - ?) / 2), 2) + "
                "cos(radians(?)) * cos(radians(p.lat)) * power(sin(radians(p.lon - ?) / 2), 2)))) <= ?)"
            )
            params += [lat - box, lat + box, lat, lat, lon, km]
        return (" AND ".join(clauses) or "1"), params
