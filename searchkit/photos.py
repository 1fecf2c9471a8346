"""Photo-library formats and facts: HEIC/HEIF (pillow-heif), AVIF (Pillow's own plugin), the
embedded JPEG preview of RAW files (rawpy, the `raw` extra), and the EXIF facts searchkit
records per file: date taken, camera make and model, GPS position, pixel size.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from datetime import datetime

from .errors import DecodeError

LOG = logging.getLogger(__name__)

HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
AVIF_EXTENSIONS = frozenset({".avif"})
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".nef", ".arw"})

_HEIF_READY: bool | None = None

# EXIF tags (TIFF/EXIF 2.3)
_MAKE, _MODEL, _DATETIME, _ORIENTATION = 0x010F, 0x0110, 0x0132, 0x0112
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4


def enable_heif() -> bool:
    """Register pillow-heif's HEIF opener with Pillow once; False (logged) if it is missing."""
    global _HEIF_READY
    if _HEIF_READY is None:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            _HEIF_READY = True
        except ImportError:
            LOG.warning("pillow-heif is not installed; HEIC/HEIF files cannot be read (pip install pillow-heif)")
            _HEIF_READY = False
    return _HEIF_READY


def raw_preview(data: bytes) -> bytes:
    """The embedded JPEG preview of a RAW file; DecodeError when rawpy is missing or there is none."""
    try:
        import rawpy
    except ImportError:
        raise DecodeError("RAW file: install the raw extra (pip install 'searchkit[raw]') to index its embedded preview") from None
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            thumb = raw.extract_thumb()
    except (rawpy.LibRawError, ValueError, OSError) as e:
        detail = e.args[0] if e.args else ""
        if isinstance(detail, bytes):  # LibRaw's messages come as bytes
            detail = detail.decode("utf-8", "replace")
        detail = str(detail).splitlines()[0] if str(detail).strip() else "unreadable"
        raise DecodeError(f"cannot read RAW file: {type(e).__name__}: {detail}") from e
    if thumb.format != rawpy.ThumbFormat.JPEG:
        raise DecodeError("RAW file has no embedded JPEG preview")
    return bytes(thumb.data)


@dataclass(frozen=True)
class PhotoMeta:
    """What EXIF says about a photo (None: not recorded). `taken` is an ISO datetime as the
    camera wrote it (local time, no zone); `width`/`height` are the displayed pixel size
    (EXIF orientation applied)."""

    taken: str | None = None
    make: str | None = None
    model: str | None = None
    lat: float | None = None
    lon: float | None = None
    width: int | None = None
    height: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def taken_ns(self) -> int | None:
        """`taken` in nanoseconds since the epoch, read as this machine's local time (as the
        date filters read a naive date)."""
        if not self.taken:
            return None
        try:
            dt = datetime.fromisoformat(self.taken).astimezone()
            return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
        except (ValueError, OverflowError, OSError):
            return None

    @property
    def camera(self) -> str | None:
        parts = [p for p in (self.make, self.model) if p]
        return " ".join(parts) or None


def _text(v) -> str | None:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        return None
    v = v.replace("\x00", "").strip()
    return v or None


def _exif_datetime(v) -> str | None:
    s = _text(v)
    if not s:
        return None
    try:  # "2023:06:01 14:30:05"; a few cameras write "-" or "/" in the date
        dt = datetime.strptime(s[:19].replace("-", ":").replace("/", ":"), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    return dt.isoformat()


def _degrees(v, ref) -> float | None:
    try:
        d, m, s = (float(x) for x in v)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    deg = d + m / 60.0 + s / 3600.0
    if _text(ref) in ("S", "W"):
        deg = -deg
    return deg if deg == deg else None


def photo_meta(img) -> PhotoMeta:
    """EXIF facts of a just-opened PIL image (before draft scaling: its size is the full size)."""
    try:
        exif = img.getexif()
    except Exception:  # a broken EXIF block costs the facts, not the photo
        exif = {}
    w, h = img.size
    if exif.get(_ORIENTATION) in (5, 6, 7, 8):
        w, h = h, w
    taken = make = model = lat = lon = None
    try:
        sub = exif.get_ifd(_EXIF_IFD) if exif else {}
        taken = _exif_datetime(sub.get(_DATETIME_ORIGINAL) or sub.get(_DATETIME_DIGITIZED) or exif.get(_DATETIME))
        make, model = _text(exif.get(_MAKE)), _text(exif.get(_MODEL))
        if make and model and model.lower().startswith(make.lower()):
            model = model[len(make):].strip() or model  # "Canon" + "Canon EOS R5": say it once
        gps = exif.get_ifd(_GPS_IFD) if exif else {}
        if gps:
            lat, lon = _degrees(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF)), _degrees(gps.get(_GPS_LON), gps.get(_GPS_LON_REF))
            if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
                lat = lon = None
    except Exception as e:
        LOG.debug("unreadable EXIF (%s)", e)
    return PhotoMeta(taken, make, model, lat, lon, int(w), int(h))
