"""Zero-shot classification by the nearest label prompt (CLIP's recipe).

Each label's text embedding is the mean of the normalized embeddings of its prompts (one per
template), normalized again; image embeddings are compared with these by cosine, scaled by the
encoder's logit scale, and a softmax gives the probabilities. An encoder may bring its own
scorer (`zeroshot_scorer(labels, templates, text_encoder=None)`): mini adds its image tower's ImageNet classifier
(encoders/conse_zeroshot.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import UsageError

#: the default prompt ensemble (a short subset of CLIP's ImageNet templates)
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
    "a blurry photo of a {}.",
)


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        labels = labels.split(",")
    out = [str(x).strip() for x in labels if str(x).strip()]
    if len(out) < 2:
        raise UsageError("give at least two labels, e.g. --labels \"cat,dog\"")
    if len(set(out)) != len(out):
        raise UsageError("labels must be distinct")
    return out


def check_templates(templates: Sequence[str] | None) -> tuple[str, ...]:
    if not templates:
        return DEFAULT_TEMPLATES
    for t in templates:
        if "{}" not in t:
            raise UsageError(f"template {t!r} has no '{{}}' where the label goes")
    return tuple(templates)


def label_embeddings(encoder, labels: Sequence[str], templates: Sequence[str], *, max_prompts: int = 2048) -> np.ndarray:
    """(n_labels, dim) normalized mean prompt embeddings, embedded at most `max_prompts` prompts
    at a time, so 1,000 labels x 10 templates never hold all their prompt embeddings at once."""
    step = max(1, max_prompts // max(1, len(templates)))
    parts = []
    for start in range(0, len(labels), step):
        chunk = labels[start : start + step]
        prompts = [t.replace("{}", label) for label in chunk for t in templates]
        parts.append(encoder.encode_texts(prompts).reshape(len(chunk), len(templates), -1).mean(axis=1))
    emb = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), dtype=np.float32)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def probabilities(image_emb: np.ndarray, label_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    logits = logit_scale * (image_emb @ label_emb.T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def label_scorer(encoder, labels: Sequence[str], templates: Sequence[str], text_encoder=None):
    """A function from RGB PIL images to (n, n_labels) label probabilities: the encoder's own
    zero-shot scorer when it has one (it needs its text tower's pre-head features: from
    `text_encoder` when that has them, else from its own), else the nearest label prompt, the
    prompts embedded by `text_encoder` (default `encoder`)."""
    own = getattr(encoder, "zeroshot_scorer", None)
    scorer = own(labels, templates, text_encoder=text_encoder) if own is not None else None
    if scorer is not None:
        return scorer
    text_emb = label_embeddings(text_encoder or encoder, labels, templates)
    return lambda images: probabilities(encoder.encode_images(images), text_emb, encoder.logit_scale)
