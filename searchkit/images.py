"""Image files to RGB PIL images: every format and mode, orientation applied, bombs refused.

`load_image` is the only way searchkit opens an image file. It reads JPEG, PNG, WebP, GIF (first
frame), BMP, TIFF, HEIC/HEIF, AVIF and the JPEG preview of RAW files (see photos.py); applies the EXIF orientation; converts any mode (CMYK, 16-bit and 32-bit
integer, float, palette with transparency, alpha) to 8-bit RGB, compositing transparency on
white; refuses images over PIL's `Image.MAX_IMAGE_PIXELS` before decoding any pixel; and, given
`draft_size`, lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding so a 12 MP photo is
never decoded at full size when the model looks at 224 pixels.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DecodeError
from .photos import AVIF_EXTENSIONS, HEIF_EXTENSIONS, RAW_EXTENSIONS, PhotoMeta, enable_heif, photo_meta, raw_preview
from .remote import is_url
from .remote import read as read_url

#: file extensions indexed as images (lower case); HEIC/HEIF, AVIF and RAW: see photos.py
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
) | HEIF_EXTENSIONS | AVIF_EXTENSIONS | RAW_EXTENSIONS


def is_image_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def is_raw_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in RAW_EXTENSIONS


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, or DecodeError naming why they cannot be had.

    Only regular files are read: the file is opened with O_NONBLOCK (so a FIFO with no writer,
    or a device, cannot block the open) and checked with fstat on the open descriptor (so a
    swap between a check and the open cannot slip a FIFO in)."""
    p = str(path)
    if is_url(p):
        return read_url(p)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError as e:
        if os.path.islink(p):
            raise DecodeError("broken symlink") from e
        raise DecodeError("file not found") from e
    except PermissionError as e:
        raise DecodeError("permission denied") from e
    except IsADirectoryError as e:
        raise DecodeError("is a directory") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DecodeError("symlink loop") from e
        try:  # a socket refuses open() itself (ENXIO): name what it is
            mode = os.stat(p).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise DecodeError(f"not a regular file ({_file_type(mode)})") from e
        raise DecodeError(f"cannot read: {e.strerror or e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise DecodeError("is a directory")
        if not stat.S_ISREG(mode):
            raise DecodeError(f"not a regular file ({_file_type(mode)})")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read()
    except IsADirectoryError as e:
        raise DecodeError("is a directory") from e
    except OSError as e:
        raise DecodeError(f"cannot read: {e.strerror or e}") from e
    finally:
        if fd >= 0:
            os.close(fd)
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return data


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def decode_image(data: bytes, *, draft_size: int | None = None, raw: bool = False) -> Image.Image:
    """Encoded image bytes to an RGB image (see the module docstring); `raw`: a RAW file,
    whose embedded JPEG preview is decoded."""
    return decode_photo(data, draft_size=draft_size, raw=raw)[0]


def decode_photo(data: bytes, *, draft_size: int | None = None, raw: bool = False) -> tuple[Image.Image, PhotoMeta]:
    """`decode_image`, plus what the file's EXIF says (photos.PhotoMeta)."""
    enable_heif()
    raw_meta = None
    if raw:
        try:  # the RAW file's own EXIF is TIFF-shaped: Pillow reads its tags without its pixels
            with Image.open(io.BytesIO(data)) as tiff:
                raw_meta = photo_meta(tiff)
        except Exception:
            raw_meta = None
        data = raw_preview(data)
    try:
        with warnings.catch_warnings():
            # we refuse oversize images ourselves below, with a clearer message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise DecodeError(
                f"decompression bomb: {img.width}x{img.height} pixels exceeds the "
                f"{limit}-pixel limit"
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        meta = photo_meta(img)
        if raw_meta is not None:  # the preview's own EXIF is often thin: prefer the RAW file's
            meta = PhotoMeta(**{**meta.__dict__, **{k: v for k, v in raw_meta.__dict__.items() if v is not None and k not in ("width", "height")}})
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img), meta
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise DecodeError("not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DecodeError(f"cannot decode image: {msg}") from e


def header_meta(data: bytes) -> PhotoMeta:
    """The EXIF facts of encoded image bytes (a RAW file's too: its tags are TIFF-shaped)
    without decoding any pixel; empty if unreadable."""
    enable_heif()
    try:
        with Image.open(io.BytesIO(data)) as img:
            return photo_meta(img)
    except Exception:
        return PhotoMeta()


def load_image(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """Open an image file as RGB; DecodeError with a one-line reason if it cannot be."""
    return decode_image(read_bytes(path), draft_size=draft_size, raw=is_raw_path(path))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if not isinstance(img, Image.Image):
        raise DecodeError(f"expected a PIL image or a path, got {type(img).__name__}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _high_depth_to_rgb(img)
    # 1, L, CMYK, YCbCr, LAB, HSV: PIL converts these correctly
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if hi <= 1.0 else 255.0 / max(hi, 1e-12)
        arr = np.nan_to_num(arr) * scale
    else:
        arr = arr.astype(np.float64)
        # 16-bit samples (also 16-bit data in PIL's 32-bit 'I' container) map 0..65535 -> 0..255
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
    gray = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")
    return gray.convert("RGB")


def image_paths_under(root: str | Path, unreadable: list[tuple[str, str]] | None = None) -> list[str]:
    """Image files below a folder, recursively, sorted; symlinked folders are not followed.

    Folders that cannot be listed are skipped; pass a list as `unreadable` to collect them as
    (folder, reason) pairs.
    """
    found = []

    def onerror(e: OSError) -> None:
        if unreadable is not None:
            reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
            unreadable.append((str(e.filename), f"cannot list folder: {reason}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and is_image_path(f)
        )
    found.sort()
    return found
