"""Combined and negative query terms, checked against hand-computed vectors (fake encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from searchkit import open_index
from searchkit.cli.main import app
from searchkit.errors import UsageError
from searchkit.terms import Query, split_weight
from tests import fakes


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def colours(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    paths = {}
    for name, rgb in {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (10, 30, 220), "purple": (160, 20, 180)}.items():
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (24, 24), rgb).save(paths[name])
    with open_index("c", create=True, model=fakes.SPEC) as idx:
        idx.add([folder])
    return paths


def expected_scores(query_vec, paths):
    return {str(p): float(query_vec @ unit(fakes.image_vector(Image.open(p)))) for p in paths.values()}


def test_split_weight():
    assert split_weight("2:a beach") == (2.0, "a beach")
    assert split_weight("0.5:./x.jpg") == (0.5, "./x.jpg")
    assert split_weight("-1.5: fruit") == (-1.5, " fruit")
    assert split_weight("a beach") == (1.0, "a beach")
    assert split_weight("beach: sunny") == (1.0, "beach: sunny")


@pytest.mark.parametrize(
    "terms,match",
    [
        ([], "at least one term"),
        ([(0, "x")], "non-zero"),
        ([(float("nan"), "x")], "finite"),
        ([("2", "x")], "must be a number"),
        ([(-1, "x")], "positive term"),
        ([(1, "  ")], "empty query text"),
        (["x"], r"\(weight, term\) pair"),
    ],
)
def test_bad_queries(terms, match):
    with pytest.raises(UsageError, match=match):
        Query(terms)


def test_weighted_sum_with_negatives_matches_hand_computed(colours):
    blue = unit(fakes.image_vector(Image.open(colours["blue"])))
    want = unit(2 * unit(fakes.text_vector("red")) + 1 * blue - 1 * unit(fakes.text_vector("green")))
    exp = expected_scores(want, colours)
    with open_index("c") as idx:
        for q in (
            Query([(2, "red"), (1, colours["blue"]), (-1, "green")]),
            [(2, "red"), (1.0, Image.open(colours["blue"])), (-1, "green")],
            Query.parse(texts=["2:red"], images=[str(colours["blue"])], not_texts=["green"]),
        ):
            res = idx.search(q, k=4)
            assert [r.path for r in res] == sorted(exp, key=exp.get, reverse=True)
            for r in res:
                assert r.score == pytest.approx(exp[r.path], abs=1e-5)
        # red + a blue image puts purple first; red alone puts red first
        assert idx.search([(1, "red"), (1, colours["blue"]), (-1, "green")], k=1)[0].path == str(colours["purple"])
        assert idx.search("red", k=1)[0].path == str(colours["red"])
        # an embedding term is normalised like the others
        res = idx.search([(1, np.array([0, 0, 0] + [0] * 13 + [0, 0, 5, 0], dtype=np.float32))], k=1)
        assert res[0].path == str(colours["blue"])
        with pytest.raises(UsageError, match="cancel out"):
            idx.search([(1, "red"), (-1, "red")])
        with pytest.raises(UsageError, match="dimensions"):
            idx.search([(1, np.ones(3, dtype=np.float32))])


def test_cli_terms_image_and_text_kinds(colours, tmp_path):
    (tmp_path / "notes.txt").write_text("red\ngreen\nblue\n")
    runner = CliRunner()
    assert runner.invoke(app, ["index", str(tmp_path / "notes.txt"), "--index", "c"]).exit_code == 0
    want = unit(0.5 * unit(fakes.text_vector("red")) + unit(fakes.image_vector(Image.open(colours["blue"]))) - 2 * unit(fakes.text_vector("green")))
    exp = expected_scores(want, colours)
    args = ["query", "0.5:red", "--image", str(colours["blue"]), "--not", "2:green", "--index", "c", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["path"] for x in rows] == sorted(exp, key=exp.get, reverse=True)
    assert all(x["score"] == pytest.approx(exp[x["path"]], abs=1e-5) for x in rows)
    # image-only, two images, a subtracted image; and text results with --kind text
    r = runner.invoke(app, ["query", "--image", str(colours["red"]), "--image", str(colours["blue"]), "--not-image", str(colours["purple"]), "--kind", "text", "--index", "c", "--json"])
    assert r.exit_code == 0, r.stderr
    texts = [json.loads(x)["text"] for x in r.stdout.splitlines()]
    assert sorted(texts) == ["blue", "green", "red"]
    r = runner.invoke(app, ["query", "red", "--not", "-1:green", "--index", "c"])
    assert r.exit_code == 2 and "positive weight" in r.stderr
    r = runner.invoke(app, ["query", "--index", "c"])
    assert r.exit_code == 2 and "give query TEXT" in r.stderr


def test_weighted_file_name_is_that_file(tmp_path):
    odd = tmp_path / "2:odd.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(odd)
    q = Query.parse(images=[str(odd)])
    assert q.terms == ((1.0, Path(str(odd))),)
