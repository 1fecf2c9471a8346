"""Calibrated confidence: the formula on known embeddings, the shipped calibrations and their
fallback, --min-confidence and "no good match", and the measures the benchmark relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from searchkit import open_index
from searchkit.cli.main import app
from searchkit.confidence import (
    CALIBRATION_DIR,
    auroc,
    expected_calibration_error,
    fit_logistic,
    load_calibration,
)
from searchkit.errors import UsageError
from tests import fakes


@pytest.fixture
def shades(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 240 - 20 * i, 60 + 10 * i)).save(folder / f"s{i:02d}.png")
    with open_index("s", create=True, model=fakes.SPEC) as idx:
        idx.add([folder])
    return folder


def test_confidence_is_the_calibrated_z_of_the_score(shades):
    cal = load_calibration(fakes.SPEC)
    with open_index("s") as idx:
        _, vecs = next(idx.store.iter_vectors("image", fakes.DIM))
        res = idx.search("red", k=12)
    q = fakes.text_vector("red")
    all_scores = vecs @ q
    mu, sigma = all_scores.mean(), all_scores.std()
    for r in res:
        want = 1 / (1 + np.exp(-(cal.a * (r.score - mu) / sigma + cal.b)))
        assert r.confidence == pytest.approx(want, abs=1e-5)
        assert 0.0 <= r.confidence <= 1.0
    assert [r.confidence for r in res] == sorted((r.confidence for r in res), reverse=True)
    assert res[0].to_dict()["confidence"] == round(res[0].confidence, 4)


def test_min_confidence_drops_weak_results(shades):
    with open_index("s") as idx:
        res = idx.search("red", k=12)
        cut = res[3].confidence
        kept = idx.search("red", k=12, min_confidence=cut)
        assert [r.id for r in kept] == [r.id for r in res if r.confidence >= cut]
        assert idx.search("red", k=12, min_confidence=1.0) == []
        with pytest.raises(UsageError, match="between 0 and 1"):
            idx.search("red", min_confidence=1.5)


def test_cli_confidence_and_no_good_match(shades):
    runner = CliRunner()
    r = runner.invoke(app, ["query", "red", "--index", "s", "--json", "-k", "3"])
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 3 and all(0 <= x["confidence"] <= 1 for x in rows)
    r = runner.invoke(app, ["query", "red", "--index", "s", "--min-confidence", "1"])
    assert r.exit_code == 0 and "no good match" in r.stdout
    r = runner.invoke(app, ["query", "red", "--index", "s", "--min-confidence", "1", "--json"])
    assert r.exit_code == 0 and r.stdout == ""
    r = runner.invoke(app, ["query", "red", "--index", "s"])
    assert "confidence" in r.stdout
    assert runner.invoke(app, ["query", "red", "--index", "s", "--min-confidence", "2"]).exit_code == 2


def test_shipped_calibrations_and_fallback():
    assert (CALIBRATION_DIR / "default.json").is_file()
    fallback = load_calibration("open_clip:nothing-fitted@random")
    assert fallback.fallback and fallback.a > 0
    mini = CALIBRATION_DIR / "mini.json"
    if mini.is_file():
        cal = load_calibration("mini")
        assert not cal.fallback and cal.a == json.loads(mini.read_text())["a"]
    assert load_calibration(None).fallback


def test_measures():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(2.0 * x - 1.0)))
    a, b = fit_logistic(x, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-1.0, abs=0.1)
    ece, bins = expected_calibration_error(np.array([0.9, 0.9, 0.1, 0.1]), np.array([1, 0, 0, 0]))
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1) and len(bins) == 2


@pytest.mark.parametrize("feature", ["cosine", "z_top", "z"])
def test_each_feature_of_a_calibration_file(shades, tmp_path, monkeypatch, feature):
    from searchkit import confidence

    folder = tmp_path / "cal"
    folder.mkdir()
    (folder / "fake.json").write_text(json.dumps({"a": 3.0, "b": -1.0, "feature": feature}))
    monkeypatch.setattr(confidence, "CALIBRATION_DIR", folder)
    confidence.load_calibration.cache_clear()
    try:
        cal = load_calibration(fakes.SPEC)  # found by family: fake.json
        assert (cal.feature, cal.a, cal.fallback) == (feature, 3.0, False)
        with open_index("s") as idx:
            _, vecs = next(idx.store.iter_vectors("image", fakes.DIM))
            res = idx.search("red", k=3, where={"path": str(shades)})  # a filter: top 10 searched apart
        all_scores = np.sort(vecs @ fakes.text_vector("red"))[::-1]
        mu, sigma = all_scores.mean(), all_scores.std()
        x = {"cosine": res[0].score, "z": (res[0].score - mu) / sigma, "z_top": (res[0].score - all_scores[:10].mean()) / sigma}[feature]
        assert res[0].confidence == pytest.approx(1 / (1 + np.exp(-(3.0 * x - 1.0))), abs=1e-5)
        (folder / "fake.json").write_text(json.dumps({"a": 1, "b": 0, "feature": "nope"}))
        confidence.load_calibration.cache_clear()
        with pytest.raises(ValueError, match="unknown confidence feature"):
            load_calibration(fakes.SPEC)
    finally:
        confidence.load_calibration.cache_clear()
