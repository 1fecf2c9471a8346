"""The encoder contract and the registry."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from searchkit import encoders, get_encoder
from searchkit.errors import ModelUnavailableError, UnknownModelError
from tests.conftest import TINY, make_images


def test_contract_normalized_float32(tmp_path):
    enc = get_encoder(TINY)
    assert enc.spec == TINY and enc.dim == 32 and enc.image_size == 32
    paths = make_images(tmp_path, 3)
    from PIL import Image

    for out in (enc.encode_texts(["a", "b c d"]), enc.encode_images(paths), enc.encode_images([Image.open(paths[0])])):
        assert out.dtype == np.float32 and out.shape[1] == 32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, 32)
    assert get_encoder(TINY) is enc  # cached


def test_random_init_is_deterministic():
    a = get_encoder(TINY).encode_texts(["hello"])
    encoders._CACHE.clear()
    b = get_encoder(TINY).encode_texts(["hello"])
    np.testing.assert_array_equal(a, b)


def test_text_truncated_to_longest_prompt_matches_full_context():
    enc = get_encoder(TINY)
    texts = ["a", "a photo of a cat sitting on a red sofa next to a window", "dog"]
    tokens = enc.tokenizer(texts)
    with torch.inference_mode():
        full = enc.model.encode_text(tokens)
        short = enc._encode_tokens(tokens)
    np.testing.assert_allclose(short.numpy(), full.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nope", "unknown model spec"),
        ("open_clip:ViT-B-32", "expected open_clip:ARCH@PRETRAINED"),
        ("open_clip:NoSuchArch@random", "unknown open_clip architecture"),
        ("open_clip:ViT-B-32@not-a-tag", "unknown pretrained tag"),
    ],
)
def test_unknown_specs(spec, match):
    with pytest.raises(UnknownModelError, match=match):
        get_encoder(spec)


def test_unavailable_weights_fail_fast_with_the_alternative(monkeypatch):
    t = time.time()
    with pytest.raises(ModelUnavailableError, match="--model mini"):
        get_encoder("open_clip:ViT-B-32@laion2b_s34b_b79k")
    assert time.time() - t < 10  # no minute of hub retries


def test_auto_tries_candidates_in_order(monkeypatch, caplog):
    monkeypatch.setattr(encoders, "AUTO_CANDIDATES", ["open_clip:ViT-B-32@laion2b_s34b_b79k", TINY])
    enc, why = encoders.resolve_auto()
    assert enc.spec == TINY and "not cached" in why
    monkeypatch.setattr(encoders, "AUTO_CANDIDATES", ["open_clip:ViT-B-32@laion2b_s34b_b79k"])
    with pytest.raises(ModelUnavailableError, match="no model for 'auto'"):
        encoders.resolve_auto()
