"""Near-duplicate groups on generated photos and their variants (fake encoder with known embeddings)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from searchkit import open_index
from searchkit.cli.main import app
from searchkit.dupes import DEFAULT_PIXEL_SIMILARITY, DEFAULT_THRESHOLD, candidate_pairs, pixel_similarity, thumbnail
from tests import fakes


def scene(seed: int, size=(120, 90)) -> Image.Image:
    """A smooth random picture (low-resolution noise, upscaled), like a photo's large shapes."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


def variants(img: Image.Image, folder, stem):
    w, h = img.size
    out = {}
    img.save(folder / f"{stem}.jpg", quality=92)
    out["orig"] = folder / f"{stem}.jpg"
    img.save(folder / f"{stem}_q30.jpg", quality=30)
    img.resize((w // 2, h // 2), Image.BILINEAR).save(folder / f"{stem}_half.jpg", quality=90)
    img.crop((w * 0.05, h * 0.05, w * 0.95, h * 0.95)).save(folder / f"{stem}_crop.jpg", quality=90)
    img.save(folder / f"{stem}_resaved.png")
    ImageEnhance.Brightness(img).enhance(1.1).save(folder / f"{stem}_bright.jpg", quality=90)
    shutil.copy(folder / f"{stem}.jpg", folder / f"{stem}_copy.jpg")
    return [folder / f"{stem}{s}" for s in (".jpg", "_q30.jpg", "_half.jpg", "_crop.jpg", "_resaved.png", "_bright.jpg", "_copy.jpg")]


def test_groups_variants_and_keeps_other_photos_apart(tmp_path):
    folder = tmp_path / "lib"
    folder.mkdir()
    family_a = variants(scene(1), folder, "a")
    family_b = variants(scene(2), folder, "b")
    for extra in family_b[3:]:
        extra.unlink()
    family_b = family_b[:3]
    # EXIF rotation stripped: one file carries orientation 6, the other the rotated pixels
    rot = scene(3)
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(folder / "r_tagged.jpg", quality=92, exif=exif)
    rot.transpose(Image.Transpose.ROTATE_270).save(folder / "r_pixels.jpg", quality=92)
    singles = [folder / f"single{i}.jpg" for i in range(4)]
    for i, p in enumerate(singles):
        scene(10 + i).save(p, quality=90)
    with open_index("dupes-idx", create=True, model=fakes.SPEC) as idx:
        idx.add([folder])
        groups = idx.dupes()
    got = [sorted(g.paths) for g in groups]
    assert got == [sorted(map(str, family_a)), sorted(map(str, family_b)), sorted([str(folder / "r_pixels.jpg"), str(folder / "r_tagged.jpg")])]
    a = groups[0]
    copy = next(p for p in a.pairs if {p.a, p.b} == {str(family_a[0]), str(family_a[-1])})
    assert copy.identical and copy.pixels is None and copy.score == pytest.approx(1.0, abs=1e-5)
    assert all(p.score >= DEFAULT_THRESHOLD and (p.identical or p.pixels >= DEFAULT_PIXEL_SIMILARITY) for g in groups for p in g.pairs)


def test_a_burst_shot_passes_the_embedding_but_not_the_pixels(tmp_path):
    base = np.asarray(scene(5), dtype=np.float32)
    burst = base.copy()
    # the subject moved: a bright block appears in the left third, the rest of the frame is the same
    burst[20:70, 10:45] = [250, 250, 240]
    Image.fromarray(base.astype(np.uint8)).save(tmp_path / "shot1.jpg", quality=92)
    Image.fromarray(burst.astype(np.uint8)).save(tmp_path / "shot2.jpg", quality=92)
    e1, e2 = (fakes.image_vector(Image.open(tmp_path / f"shot{i}.jpg")) for i in (1, 2))
    cos = float(e1 @ e2 / np.linalg.norm(e1) / np.linalg.norm(e2))
    pixels = pixel_similarity(thumbnail(str(tmp_path / "shot1.jpg")), thumbnail(str(tmp_path / "shot2.jpg")))
    with open_index("burst", create=True, model=fakes.SPEC) as idx:
        idx.add([tmp_path / "shot1.jpg", tmp_path / "shot2.jpg"])
        assert idx.dupes(threshold=min(cos, 0.99) - 0.01) == []  # a candidate, refused by the pixels
        assert len(idx.dupes(threshold=min(cos, 0.99) - 0.01, min_pixel_similarity=pixels - 0.01)) == 1
    assert pixels < DEFAULT_PIXEL_SIMILARITY


def test_candidate_pairs_is_the_range_search():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((40, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[7] = v[3]
    got = {(i, j) for i, j, _ in candidate_pairs(v, 0.7)}
    sims = v @ v.T
    want = {(i, j) for i in range(40) for j in range(i + 1, 40) if sims[i, j] >= 0.7}
    assert got == want and (3, 7) in got


def test_cli_json_and_table(tmp_path):
    folder = tmp_path / "lib"
    folder.mkdir()
    fam = variants(scene(1), folder, "a")
    for extra in fam[3:]:
        extra.unlink()
    fam = fam[:3]
    scene(9).save(folder / "other.jpg")
    runner = CliRunner()
    assert runner.invoke(app, ["index", str(folder), "--model", fakes.SPEC]).exit_code == 0
    r = runner.invoke(app, ["dupes", "--json"])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["size"] == 3 and sorted(rows[0]["paths"]) == sorted(map(str, fam))
    assert len(rows[0]["pairs"]) == 3 and set(rows[0]["pairs"][0]) == {"a", "b", "score", "pixels", "identical"}
    r = runner.invoke(app, ["dupes"])
    assert r.exit_code == 0 and "a_q30.jpg" in r.stdout and "other.jpg" not in r.stdout
    r = runner.invoke(app, ["dupes", "--threshold", "1.0", "--min-pixel-similarity", "1.0"])
    assert r.exit_code == 0 and "no near-duplicates" in r.stdout
    assert runner.invoke(app, ["dupes", "--threshold", "2"]).exit_code == 2
