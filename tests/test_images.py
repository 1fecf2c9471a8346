"""Every format and mode decodes to correct RGB; every kind of bad file fails with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from searchkit.errors import DecodeError
from searchkit.images import image_paths_under, load_image, to_rgb


def _px(img, xy=(0, 0)):
    return img.getpixel(xy)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "gif", "bmp", "tiff"])
def test_every_format_loads_as_rgb(tmp_path, ext):
    src = Image.new("RGB", (30, 20), (200, 40, 40))
    p = tmp_path / f"a.{ext}"
    src.save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (30, 20)
    r, g, b = _px(img, (15, 10))
    assert r > 150 and g < 90 and b < 90


def test_cmyk_jpeg_converts(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    r, g, b = _px(load_image(p), (8, 8))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("ext", ["png", "tiff"])
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path, ext):
    arr = np.full((10, 10), 32768, dtype=np.uint16)  # mid grey in 16 bits
    p = tmp_path / f"g16.{ext}"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    r, g, b = _px(load_image(p))
    assert 120 <= r <= 135 and r == g == b


def test_float_image(tmp_path):
    p = tmp_path / "f.tiff"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(p)
    r, _, _ = _px(load_image(p))
    assert 120 <= r <= 135


def test_palette_with_transparency_composites_on_white(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0] * 256)
    p = tmp_path / "t.png"
    img.save(p, transparency=0)
    assert _px(load_image(p)) == (255, 255, 255)


@pytest.mark.parametrize("mode,ext", [("RGBA", "png"), ("LA", "png"), ("RGBA", "webp")])
def test_alpha_composites_on_white(tmp_path, mode, ext):
    color = (0, 0, 0, 0) if mode == "RGBA" else (0, 0)
    p = tmp_path / f"a.{ext}"
    Image.new(mode, (10, 10), color).save(p)
    assert _px(load_image(p)) == (255, 255, 255)


def test_one_bit_and_grayscale(tmp_path):
    Image.new("1", (8, 8), 1).save(tmp_path / "b.bmp")
    Image.new("L", (8, 8), 10).save(tmp_path / "l.png")
    assert _px(load_image(tmp_path / "b.bmp")) == (255, 255, 255)
    assert _px(load_image(tmp_path / "l.png")) == (10, 10, 10)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)
    r, g, b = _px(load_image(p))
    assert r > 200 and b < 60


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    assert load_image(p).size == (20, 40)


def test_draft_mode_decodes_large_jpeg_reduced(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1600), (10, 200, 10)).save(p, quality=90)
    small = load_image(p, draft_size=224)
    assert small.size[0] < 2000 and min(small.size) >= 224
    assert load_image(p).size == (2000, 1600)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.png", b"this is not an image at all", "not a recognised image"),
    ],
)
def test_bad_files(tmp_path, name, content, reason):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DecodeError, match=reason):
        load_image(p)


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "trunc.jpg"
    Image.effect_noise((256, 256), 60).convert("RGB").save(p, quality=95)
    p.write_bytes(p.read_bytes()[:800])
    with pytest.raises(DecodeError, match="cannot decode"):
        load_image(p)


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    Image.new("1", (3000, 3000)).save(p)  # tiny file, 9 MP
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(DecodeError, match="decompression bomb"):
        load_image(p)


def test_broken_symlink_and_missing(tmp_path):
    link = tmp_path / "dangling.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(DecodeError, match="broken symlink"):
        load_image(link)
    with pytest.raises(DecodeError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_to_rgb_rejects_non_images():
    with pytest.raises(DecodeError):
        to_rgb("not an image")  # type: ignore[arg-type]


def test_walk_finds_images_recursively_sorted(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for rel in ["b/c/z.PNG", "a.jpg", "b/y.webp", "notes.txt", ".hidden.jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    found = [p[len(str(tmp_path)) + 1 :] for p in image_paths_under(tmp_path)]
    assert found == ["a.jpg", "b/c/z.PNG", "b/y.webp"]
