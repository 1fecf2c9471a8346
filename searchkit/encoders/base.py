"""The one encoder contract every model family implements.

An encoder turns images and texts into rows of one shared embedding space: float32 numpy arrays
of shape (n, dim), each row L2-normalized, so inner product is cosine similarity. Image encoding is
split in two steps so the indexing pipeline can run `preprocess` in decode workers and batch the
model call: `preprocess(PIL image) -> CHW tensor`, then `encode_image_tensors(NCHW batch)`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

ImageInput = Union["Image.Image", str, Path]


def default_device() -> str:
    """`SEARCHKIT_DEVICE` if set, else CUDA when available, else CPU."""
    forced = os.environ.get("SEARCHKIT_DEVICE")
    if forced:
        return forced
    if _cuda_driver_absent():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_driver_absent() -> bool:
    """True when this Linux machine has no NVIDIA or AMD GPU driver, so torch could not use CUDA
    (saves importing torch, ~2 s and ~800 MB of peak RSS, just to learn that)."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    return not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd"))


def stack_batch(items: list):
    """Preprocessed CHW images to one NCHW batch: numpy for numpy items (the ONNX image
    tower), a torch tensor otherwise."""
    if items and isinstance(items[0], np.ndarray):
        return np.stack(items)
    import torch

    return torch.stack(items)


def as_numpy(batch) -> np.ndarray:
    """An NCHW batch (numpy or torch) as contiguous float32 numpy."""
    if not isinstance(batch, np.ndarray):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, returned as contiguous float32 numpy."""
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


class Encoder(ABC):
    """A dual encoder mapping images and texts into one normalized embedding space."""

    #: canonical spec string; `get_encoder(spec)` rebuilds this exact encoder
    spec: str
    #: embedding dimension
    dim: int
    #: side of the square input the image tower expects (decoders may draft-decode to it)
    image_size: int
    #: multiplier applied to cosine similarities before a softmax (CLIP's learned temperature)
    logit_scale: float = 100.0
    #: torch device the model runs on
    device: str = "cpu"
    #: images per model call the pipeline should aim for (on CPU, bench/index_throughput.py on 2
    #: idle cores: ViT-B-32 and mini both run best at 8-16 and 10-40 % slower at 32-64)
    image_batch_size: int = 16
    #: texts per model call
    text_batch_size: int = 256

    @property
    def name(self) -> str:
        return self.spec

    @property
    def fingerprint(self) -> str:
        """Identity of the weights; bundles refuse to mix embeddings of two fingerprints."""
        return self.spec

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image to the CHW float tensor the image tower takes."""

    @property
    def image_transform(self):
        """`preprocess` as a picklable callable that does not hold the model, for decode workers
        in other processes or on other machines (the ray engine). Families override this when
        `preprocess` is a bound method of an object holding weights."""
        return self.preprocess

    @abstractmethod
    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """A preprocessed NCHW batch to (n, dim) normalized float32 embeddings."""

    @abstractmethod
    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        """One batch of texts to (n, dim) normalized float32 embeddings."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts to (n, dim) normalized float32 embeddings, batched."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [
            self._encode_text_batch(texts[i : i + self.text_batch_size])
            for i in range(0, len(texts), self.text_batch_size)
        ]
        return np.concatenate(parts, axis=0)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """PIL images or image paths to (n, dim) normalized float32 embeddings, batched.

        Paths are opened with searchkit's loader (EXIF orientation, any mode to RGB); an
        unreadable path raises `searchkit.errors.DecodeError`.
        """
        parts = [self.encode_image_tensors(batch) for batch in self._image_batches(images)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.dim), dtype=np.float32)

    def encode_images_with_features(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, features) of images: the features are what few-shot learning compares
        examples by, normalized rows; an encoder whose tower features hold more than its
        embedding gives those (see `DualEncoder`), others their embeddings again."""
        embs, feats = [], []
        for batch in self._image_batches(images):
            e, f = self.encode_image_tensors_with_features(batch)
            embs.append(e)
            feats.append(f)
        if not embs:
            return np.zeros((0, self.dim), dtype=np.float32), np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(embs, axis=0), np.concatenate(feats, axis=0)

    def encode_image_tensors_with_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        emb = self.encode_image_tensors(batch)
        return emb, emb

    def _image_batches(self, images: Sequence[ImageInput]):
        """Preprocessed NCHW batches of `image_batch_size` images."""
        from ..images import load_image, to_rgb

        images = list(images)
        for i in range(0, len(images), self.image_batch_size):
            tensors = []
            for item in images[i : i + self.image_batch_size]:
                img = to_rgb(item) if not isinstance(item, (str, Path)) else load_image(
                    item, draft_size=self.image_size
                )
                tensors.append(self.preprocess(img))
            yield stack_batch(tensors)
