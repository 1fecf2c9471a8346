"""Write a real, minimal DNG file: IFD0 the JPEG preview (where Adobe's converter puts a
preview, with the DNG and camera tags and the EXIF block), its SubIFD the raw image, a tiny
uncompressed 16-bit RGGB Bayer mosaic. LibRaw reads it as a DNG and returns the preview
unchanged from `extract_thumb()`; Pillow reads its tags as a TIFF.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_FMT = {BYTE: "B", SHORT: "H", LONG: "I", RATIONAL: "I", SRATIONAL: "i"}  # a rational: two of them


def _rationals(values, denominator=10_000):
    out = []
    for v in values:
        out += [round(v * denominator), denominator]
    return out


class _Tiff:
    """A little-endian TIFF laid out as: header, the IFDs one after another, then the data."""

    def __init__(self):
        self.ifds: list[list[tuple[int, int, object]]] = []

    def ifd(self, entries) -> int:
        self.ifds.append(sorted(entries, key=lambda e: e[0]))
        return len(self.ifds) - 1

    @staticmethod
    def _count(typ, value) -> int:
        if typ == ASCII:
            return len(value) + 1
        n = len(value)
        return n // 2 if typ in (RATIONAL, SRATIONAL) else n

    @staticmethod
    def _pack(typ, value) -> bytes:
        if typ == ASCII:
            return value.encode() + b"\x00"
        if isinstance(value, bytes):
            return value
        return struct.pack("<" + _FMT[typ] * len(value), *value)

    def tobytes(self, links: dict[tuple[int, int], object]) -> bytes:
        """`links[(ifd, tag)]`: an IFD index or bytes placed in the data area; the entry (type
        LONG, count 1) gets its offset."""
        offsets, pos = [], 8
        for entries in self.ifds:
            offsets.append(pos)
            pos += 2 + 12 * len(entries) + 4
        data = bytearray()

        def place(b: bytes) -> int:
            if len(data) % 2:  # TIFF offsets are word-aligned
                data.append(0)
            data.extend(b)
            return pos + len(data) - len(b)

        linked = {k: offsets[v] if isinstance(v, int) else place(v) for k, v in links.items()}
        out = bytearray(b"II*\x00" + struct.pack("<I", offsets[0]))
        for i, entries in enumerate(self.ifds):
            out += struct.pack("<H", len(entries))
            for tag, typ, value in entries:
                if (i, tag) in linked:
                    out += struct.pack("<HHII", tag, LONG, 1, linked[(i, tag)])
                    continue
                raw = self._pack(typ, value)
                head = struct.pack("<HHI", tag, typ, self._count(typ, value))
                out += head + (raw.ljust(4, b"\x00") if len(raw) <= 4 else struct.pack("<I", place(raw)))
            out += struct.pack("<I", 0)  # one IFD in the chain: SubIFDs and the EXIF IFD hang off IFD0
        return bytes(out + data)


def bayer(preview: Image.Image, width: int = 64, height: int = 48) -> np.ndarray:
    """An RGGB mosaic of the preview (16-bit), so the raw pixels look like the photo (LibRaw
    refuses raw images under 22 pixels a side)."""
    rgb = np.asarray(preview.convert("RGB").resize((width, height)), dtype=np.uint16) * 257
    out = np.empty((height, width), dtype=np.uint16)
    out[0::2, 0::2] = rgb[0::2, 0::2, 0]
    out[0::2, 1::2] = rgb[0::2, 1::2, 1]
    out[1::2, 0::2] = rgb[1::2, 0::2, 1]
    out[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return out


def write_dng(path, preview: Image.Image, *, make="Searchkit", model="Test DNG", taken="2021:07:14 18:02:03",
              quality=90) -> bytes:
    """Write a DNG whose embedded preview is `preview` as a baseline JPEG; return those JPEG bytes."""
    buf = io.BytesIO()
    preview.convert("RGB").save(buf, "JPEG", quality=quality)
    jpeg = buf.getvalue()
    w, h = preview.size
    mosaic = bayer(preview)
    raw = mosaic.astype("<u2").tobytes()
    t = _Tiff()
    camera = f"{make} {model}"
    ifd0 = t.ifd([
        (0x00FE, LONG, [1]),  # NewSubfileType: reduced-resolution (preview) image
        (0x0100, LONG, [w]), (0x0101, LONG, [h]),
        (0x0102, SHORT, [8, 8, 8]),
        (0x0103, SHORT, [7]),  # JPEG
        (0x0106, SHORT, [6]),  # YCbCr
        (0x010F, ASCII, make), (0x0110, ASCII, model),
        (0x0111, LONG, [0]),  # StripOffsets (linked)
        (0x0115, SHORT, [3]),
        (0x0116, LONG, [h]),
        (0x0117, LONG, [len(jpeg)]),
        (0x011C, SHORT, [1]),
        (0x014A, LONG, [0]),  # SubIFDs (linked)
        (0x8769, LONG, [0]),  # EXIF IFD (linked)
        (0xC612, BYTE, bytes([1, 4, 0, 0])),  # DNGVersion
        (0xC613, BYTE, bytes([1, 1, 0, 0])),  # DNGBackwardVersion
        (0xC614, ASCII, camera),  # UniqueCameraModel
        (0xC621, SRATIONAL, _rationals([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])),  # ColorMatrix1
        (0xC628, RATIONAL, _rationals([0.5, 1.0, 0.7])),  # AsShotNeutral
        (0xC65A, SHORT, [21]),  # CalibrationIlluminant1: D65
    ])
    sub = t.ifd([
        (0x00FE, LONG, [0]),  # the main (raw) image
        (0x0100, LONG, [mosaic.shape[1]]), (0x0101, LONG, [mosaic.shape[0]]),
        (0x0102, SHORT, [16]),
        (0x0103, SHORT, [1]),  # uncompressed
        (0x0106, SHORT, [32803]),  # CFA
        (0x0111, LONG, [0]),
        (0x0115, SHORT, [1]),
        (0x0116, LONG, [mosaic.shape[0]]),
        (0x0117, LONG, [len(raw)]),
        (0x011C, SHORT, [1]),
        (0x828D, SHORT, [2, 2]),  # CFARepeatPatternDim
        (0x828E, BYTE, bytes([0, 1, 1, 2])),  # CFAPattern: RGGB
        (0xC61D, LONG, [65535]),  # WhiteLevel
    ])
    exif = t.ifd([(0x9003, ASCII, taken)])  # DateTimeOriginal
    data = t.tobytes({(ifd0, 0x0111): jpeg, (ifd0, 0x014A): sub, (ifd0, 0x8769): exif, (sub, 0x0111): raw})
    with open(path, "wb") as f:
        f.write(data)
    return jpeg
