"""Zero-shot that keeps what an image tower's own ImageNet classifier knows (ConSE-style scoring).

mini's heads were trained on Flickr8k captions, so they know little outside people and dogs,
while the frozen EfficientNet-Lite under them classifies 1,000 ImageNet classes well. For an
encoder whose image tower carries that classifier, each label's zero-shot logit is

    logit_scale · cos(image embedding, label embedding)          the heads (CLIP's recipe)
  + BETA · log(EPS + Σ_c p(c | image) · w(label, c))             the tower's classifier

w(label, ·) spreads weight over the TOP_K ImageNet classes whose names are nearest the label in
the text tower's space: the label's prompt-ensemble embedding against "a photo of a {name}." for
every synonym of the class (the best synonym counts), as a softmax of those cosines at TAU. A
label far from every class name gets weights on loosely related classes, so its tower term
varies little between images and the heads decide.

The four settings were chosen once on flowers-dev and clothing-dev together, preferring a
plain setting that helps both over the best of either (docs/mini.md lists the grid).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: ImageNet classes each label looks at
TOP_K = 20
#: softmax temperature over the label-to-class-name cosines
TAU = 0.1
#: weight of the tower's log score against the heads' scaled cosine
BETA = 1.0
#: floor inside the log (a tower score of 0 must not veto a label)
EPS = 1e-6
#: the class-name prompt (the one ConSE's class vectors use)
CLASS_TEMPLATE = "a photo of a {}."
#: checkpoint file with the text tower's embeddings of every class-name synonym's prompt
NAMES_FILE = "class_names.safetensors"


def class_weights(label_text: np.ndarray, name_text: np.ndarray, name_class: np.ndarray, n_classes: int,
                  top_k: int = TOP_K, tau: float = TAU) -> np.ndarray:
    """(n_labels, n_classes) weights, each row summing to 1 over the label's `top_k` nearest classes.

    `label_text` (n_labels, d) and `name_text` (n_names, d) are unit vectors; `name_class[i]` is the
    class of name i (a class may have several names; its nearest one counts).
    """
    sims = np.asarray(label_text, np.float64) @ np.asarray(name_text, np.float64).T
    best = np.full((len(sims), n_classes), -np.inf)
    np.maximum.at(best.T, np.asarray(name_class), sims.T)
    k = min(top_k, n_classes)
    top = np.argpartition(-best, k - 1, axis=1)[:, :k]
    z = np.take_along_axis(best, top, 1) / tau
    z = np.exp(z - z.max(1, keepdims=True))
    weights = np.zeros_like(best)
    np.put_along_axis(weights, top, z / z.sum(1, keepdims=True), 1)
    return weights


def tower_scores(class_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n_images, n_labels): Σ_c p(c | image) · w(label, c)."""
    return np.asarray(class_probs, np.float64) @ weights.T


def mixed_probabilities(head_logits: np.ndarray, scores: np.ndarray, beta: float = BETA, eps: float = EPS) -> np.ndarray:
    """Softmax over labels of the heads' logits plus `beta` · log(eps + tower score)."""
    logits = np.asarray(head_logits, np.float64) + beta * np.log(eps + scores)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def label_text_features(text_features: Callable[[list[str]], np.ndarray], labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Each label's prompt-ensemble embedding in the text tower's own (pre-head) space, as unit
    rows: `text_features(prompts)` gives the tower's unit-length features."""
    prompts = [t.replace("{}", label) for label in labels for t in templates]
    raw = np.asarray(text_features(prompts), np.float32).reshape(len(labels), len(templates), -1)
    raw = (raw / np.linalg.norm(raw, axis=-1, keepdims=True).clip(1e-12)).mean(1)
    return raw / np.linalg.norm(raw, axis=-1, keepdims=True).clip(1e-12)


class ConSEZeroShot:
    """The mixed scorer for one label set: `probabilities(images) -> (n, n_labels)`.

    Built from the labels' head embeddings and pre-head text features, the class names' text
    embeddings, and `image_outputs(images) -> (unit embeddings, ImageNet class probabilities)`;
    `for_encoder` makes one from a torch `DualEncoder`, the ONNX image export another
    (encoders/onnx_image.py), so the two paths cannot drift apart.
    """

    def __init__(self, label_emb: np.ndarray, label_raw: np.ndarray, names: tuple[np.ndarray, np.ndarray],
                 logit_scale: float, image_outputs: Callable[[Sequence[Any]], tuple[np.ndarray, np.ndarray]]):
        name_text, name_class = names
        self.label_emb = label_emb
        self.weights = class_weights(label_raw, name_text, name_class, int(name_class.max()) + 1)
        self.logit_scale = logit_scale
        self.image_outputs = image_outputs

    @classmethod
    def for_encoder(cls, encoder: Any, labels: Sequence[str], templates: Sequence[str]) -> ConSEZeroShot:
        """`encoder` is a `DualEncoder` whose image tower has an ImageNet classifier (`class_logits`)."""
        from ..zeroshot import label_embeddings

        def text_features(prompts):
            return encoder.text_tower.features(prompts).float().cpu().numpy()

        def image_outputs(images):
            import torch

            from .base import l2_normalize

            tower = encoder.image_tower
            batch = torch.stack([encoder.preprocess(img) for img in images])
            with torch.no_grad():
                raw = tower.raw_features(batch)
                emb = l2_normalize(encoder.heads.image(tower.derive(raw)))
                return emb, tower.class_logits(raw).float().softmax(-1).cpu().numpy()

        return cls(label_embeddings(encoder, labels, templates), label_text_features(text_features, labels, templates),
                   class_name_text(encoder), encoder.logit_scale, image_outputs)

    def probabilities(self, images: Sequence[Any]) -> np.ndarray:
        """Label probabilities for RGB PIL images."""
        emb, class_probs = self.image_outputs(images)
        head_logits = self.logit_scale * (emb @ self.label_emb.T)
        return mixed_probabilities(head_logits, tower_scores(class_probs, self.weights))


def load_class_names(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A NAMES_FILE: (names' prompt embeddings (n, d) float32, each name's class (n,))."""
    from safetensors.numpy import load_file

    state = load_file(str(path))
    return state["text"].astype(np.float32), state["class"].astype(np.int64)


def class_name_text(encoder: Any) -> tuple[np.ndarray, np.ndarray]:
    """(names' prompt embeddings (n, d) float32, each name's class (n,)), from the checkpoint's
    NAMES_FILE when it has one (mini ships it), otherwise embedded now and kept for the process."""
    cached = getattr(encoder, "_class_name_text", None)
    if cached is not None:
        return cached
    path = Path(encoder.folder) / NAMES_FILE
    if path.is_file():
        cached = load_class_names(path)
    else:
        cached = embed_class_names(encoder.text_tower)
    encoder._class_name_text = cached
    return cached


def imagenet_synonyms() -> list[list[str]]:
    """Every ImageNet-1k class's names, as timm lists them ("tench, Tinca tinca" -> two names)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [[s.strip() for s in info.index_to_description(i).split(",") if s.strip()] for i in range(1000)]


def embed_class_names(text_tower: Any) -> tuple[np.ndarray, np.ndarray]:
    synonyms = imagenet_synonyms()
    names = [s for group in synonyms for s in group]
    owner = np.array([c for c, group in enumerate(synonyms) for _ in group], dtype=np.int64)
    text = text_tower.features([CLASS_TEMPLATE.format(n) for n in names]).float().cpu().numpy()
    return text, owner


def save_class_names(folder: str | Path, text_tower: Any) -> Path:
    """Write NAMES_FILE into a checkpoint folder (fp16 embeddings; 1.4 MB for MiniLM)."""
    from safetensors.numpy import save_file

    text, owner = embed_class_names(text_tower)
    path = Path(folder) / NAMES_FILE
    save_file({"text": text.astype(np.float16), "class": owner}, str(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file owner-only
    return path
