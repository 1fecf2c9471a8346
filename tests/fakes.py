"""A fake encoder with known embeddings, registered through the normal registry as `fake:v1`.

Image embedding (dim 20, before normalisation): the 4x4 grayscale thumbnail minus its mean
(16 values, structure), the mean R, G, B in [0, 1] (3 values), and 0.1. Texts: "red", "green"
and "blue" are the unit vectors of the three colour dimensions; any other text is a
deterministic random unit vector. So a solid red image lies close to the text "red", and an
image re-encoded or resized keeps (nearly) the same embedding.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from searchkit import encoders
from searchkit.encoders.base import Encoder

SPEC = "fake:v1"
DIM = 20
COLOURS = {"red": 16, "green": 17, "blue": 18}


def text_vector(text: str) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    if text in COLOURS:
        v[COLOURS[text]] = 1.0
        return v
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def image_vector(img) -> np.ndarray:
    """The unnormalised embedding of a PIL image (see the module docstring)."""
    rgb = np.asarray(img.convert("RGB").resize((16, 16)), dtype=np.float32) / 255.0
    gray = np.asarray(img.convert("L").resize((4, 4)), dtype=np.float32).reshape(-1) / 255.0
    return np.concatenate([gray - gray.mean(), rgb.reshape(-1, 3).mean(0), [0.1]]).astype(np.float32)


class FakeEncoder(Encoder):
    spec = SPEC
    dim = DIM
    image_size = 16
    logit_scale = 10.0
    image_batch_size = 8

    def preprocess(self, image):
        return torch.from_numpy(image_vector(image))

    def encode_image_tensors(self, batch):
        x = batch.numpy().astype(np.float32)
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))

    def _encode_text_batch(self, texts):
        return np.stack([text_vector(t) for t in texts])


encoders._ensure_builtin()
encoders.register_family("fake", lambda rest, device: FakeEncoder())
