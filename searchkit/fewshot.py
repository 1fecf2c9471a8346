"""Few-shot classification: zero-shot text prototypes plus a handful of labelled example images.

`FewShotClassifier.fit(encoder, examples, labels)` embeds the examples (`DIR/<label>/*.jpg`, or a
mapping label -> image paths) and trains a linear probe on their frozen image features with the
zero-shot classifier as a prior: an image's logits are its zero-shot logits, weighted down as
examples grow, plus a learned linear function of its features,

    logits = prior(k) * logit_scale * (e @ T.T) + PROBE_SCALE * (g(f) @ W.T),   prior(k) = 1/(1+k)

where e is the joint embedding, T the label prompts' embeddings, k the examples per label, f the
encoder's few-shot features (`Encoder.encode_images_with_features`: for `mini` and checkpoints
the image tower's own features, on torch or from their ONNX export alike, which separate classes
far better than the 256-d joint space; for open_clip the embedding itself) and g SimpleShot's centring
where it applies: l2normalize(x - m), x the tower features, m the image head's training mean
(`feature_scale`); g is the identity elsewhere. W starts at zero (the zero-shot classifier) and
is fitted by full-batch Adam on the cross-entropy of the examples with a small L2 penalty.

Chosen by `bench/fewshot.py` (the README's table) over a training-free cache model in the manner
of Tip-Adapter, mixing each label's text prototype with its examples' mean, the probe with or
without an unweighted prior, and centring on the examples' own mean: on flowers-dev and
clothing-dev (mini, torch tower) centring on the head's mean with the shrinking prior is ahead
at 4 shots and more (16 shots: 82.9 % / 76.5 %, against 78.1 % / 73.4 % uncentred with prior 1).

Example embeddings are cached per encoder fingerprint under `$SEARCHKIT_CACHE/fewshot/` keyed by
path, size and mtime, so repeated calls only embed new or changed files. A classifier saves to
one `.npz` file and loads back without the encoder (`FewShotClassifier.load`); applying it checks
the encoder's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, ModelMismatchError, UsageError

LOG = logging.getLogger(__name__)

FORMAT = "searchkit.fewshot"
#: saved-classifier format: 2 added the feature scale and the prior weight (a version-1 file
#: reads as no scale, prior 1, which is exactly what it computed)
VERSION = 2
#: what the example cache holds per image; part of its key, so a change never mixes old rows in
FEATURES_VERSION = 3  # 3: mini's ONNX image tower gives its tower features too
#: the probe's logit multiplier (features are unit rows), its L2 penalty, Adam steps and rate
PROBE_SCALE, PROBE_L2, PROBE_STEPS, PROBE_LR = 10.0, 1e-3, 300, 0.05


def rescale(feats: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Rows times `scale`, L2-normalized again (None: as they are)."""
    if scale is None:
        return np.asarray(feats, np.float32)
    x = np.asarray(feats, np.float32) * np.asarray(scale, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def feature_scale(encoder, dim: int) -> np.ndarray | None:
    """The image head's training std when the encoder's features are its tower's, standardized
    by the head (`DualEncoder` on torch): l2normalize(f * std) is then l2normalize(x - mean),
    the tower features x centred on the head's training mean (SimpleShot's centring) without
    the standardization, which bench/fewshot.py measured 2-5 points better at 16 shots.
    mini's ONNX image export carries the same std (`feature_std`). None for every other encoder
    (open_clip: its features are its embeddings)."""
    head = getattr(vars(encoder).get("heads"), "image", None)  # vars: never builds a lazy torch model
    std = getattr(head, "std", None)
    if std is not None:
        std = std.detach().cpu().numpy()
    else:  # the ONNX image export of such a tower carries the same std
        std = vars(encoder).get("feature_std")
    if std is None or std.shape[0] != dim:
        return None
    return np.asarray(std, np.float32)


def prior_weight(shots: float) -> float:
    """Weight of the zero-shot logits with `shots` examples per label: 1/(1 + shots). The text
    prior helps most at one shot and costs accuracy from two on (bench/fewshot.py)."""
    return 1.0 / (1.0 + float(shots))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def fit_probe(zero_logits: np.ndarray, feats: np.ndarray, targets: np.ndarray, n_labels: int) -> np.ndarray:
    """W (n_labels, feature dim) minimizing the examples' cross-entropy of
    `zero_logits + PROBE_SCALE * feats @ W.T` + PROBE_L2/2 |W|^2, from W = 0 (full-batch Adam)."""
    feats = np.asarray(feats, dtype=np.float64)
    onehot = np.eye(n_labels)[targets]
    w = np.zeros((n_labels, feats.shape[1]))
    m, v = np.zeros_like(w), np.zeros_like(w)
    n = len(targets)
    for t in range(1, PROBE_STEPS + 1):
        p = _softmax(zero_logits + PROBE_SCALE * feats @ w.T)
        g = PROBE_SCALE * (p - onehot).T @ feats / n + PROBE_L2 * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= PROBE_LR * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return w.astype(np.float32)


@dataclass
class FewShotClassifier:
    labels: list[str]
    text: np.ndarray  # (n_labels, dim) zero-shot prototypes
    weights: np.ndarray  # (n_labels, feature dim) the probe
    logit_scale: float
    fingerprint: str
    examples: int = 0
    scale: np.ndarray | None = None  # (feature dim,) see `feature_scale`; None: features as they are
    prior: float = 1.0  # weight of the zero-shot logits

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        encoder,
        examples: str | os.PathLike | Mapping[str, Sequence[str | os.PathLike]],
        labels: str | Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
    ) -> FewShotClassifier:
        """Embed the examples and the label prompts, then fit the probe."""
        from .zeroshot import check_templates, label_embeddings, parse_labels

        groups = example_groups(examples)
        labels = parse_labels(labels) if labels is not None else parse_labels(list(groups))
        unknown = sorted(set(groups) - set(labels))
        if unknown:
            raise UsageError(f"examples for labels not in --labels: {', '.join(unknown)}")
        paths = [p for label in labels for p in groups.get(label, [])]
        targets = np.array([i for i, label in enumerate(labels) for _ in groups.get(label, [])], dtype=np.int64)
        emb, feats = embed_cached(encoder, paths)
        text = label_embeddings(encoder, labels, check_templates(templates))
        clf = cls.from_embeddings(labels, text, emb, feats, targets, float(encoder.logit_scale), encoder.fingerprint,
                                  scale=feature_scale(encoder, feats.shape[1]))
        LOG.info("few-shot: %d examples for %d labels", len(targets), len(labels))
        return clf

    @classmethod
    def from_embeddings(cls, labels, text, emb, feats, targets, logit_scale: float, fingerprint: str,
                        scale: np.ndarray | None = None) -> FewShotClassifier:
        """A classifier from embeddings already computed (label prototypes, examples): the
        features through `rescale(feats, scale)`, the prior weighted by `prior_weight` of the
        mean number of examples per label that has any."""
        text = np.asarray(text, np.float32)
        targets = np.asarray(targets, np.int64)
        prior = prior_weight(len(targets) / max(1, len(np.unique(targets))))
        zero = prior * logit_scale * (np.asarray(emb, np.float32) @ text.T)
        weights = fit_probe(zero, rescale(feats, scale), targets, len(labels))
        return cls(list(labels), text, weights, float(logit_scale), fingerprint, int(len(targets)), scale, prior)

    # -- applying ----------------------------------------------------------------------------
    def logits(self, emb: np.ndarray, feats: np.ndarray) -> np.ndarray:
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.weights.shape[1]:
            raise ModelMismatchError(
                f"this classifier was fitted on {self.weights.shape[1]}-d features, these are "
                f"{feats.shape[-1]}-d (another model or image-tower backend); fit it again with this one"
            )
        feats = rescale(feats, self.scale)
        zero = self.logit_scale * (np.asarray(emb, np.float32) @ self.text.T)
        return self.prior * zero + PROBE_SCALE * (feats @ self.weights.T)

    def probabilities(self, emb: np.ndarray, feats: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(emb, feats))

    def check_encoder(self, encoder) -> None:
        if encoder.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"this classifier was built with {self.fingerprint}, not {encoder.fingerprint}; fit it again with this model"
            )

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from .fsutil import atomic_write

        path = Path(path)
        meta = {"format": FORMAT, "version": VERSION, "labels": self.labels, "logit_scale": self.logit_scale,
                "fingerprint": self.fingerprint, "examples": self.examples, "prior": self.prior}
        arrays = {"text": self.text, "weights": self.weights}
        if self.scale is not None:
            arrays["scale"] = self.scale

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, meta=np.array(json.dumps(meta)))

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FewShotClassifier:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT:
                    raise ValueError("not a searchkit few-shot classifier")
                version = int(meta.get("version", 1))
                if version > VERSION:
                    raise ValueError(f"format version {version} is newer than this searchkit reads ({VERSION}); upgrade searchkit")
                scale = z["scale"] if "scale" in z.files else None
                return cls(meta["labels"], z["text"], z["weights"], float(meta["logit_scale"]), meta["fingerprint"],
                           int(meta["examples"]), scale, float(meta.get("prior", 1.0)))  # version 1: prior 1
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot read classifier {path}: {e}") from e


def example_groups(examples) -> dict[str, list[str]]:
    """label -> image paths, from `DIR/<label>/` folders (underscores read as spaces) or a mapping."""
    from .images import image_paths_under

    if isinstance(examples, Mapping):
        groups = {str(k): [str(p) for p in v] for k, v in examples.items()}
    else:
        root = Path(examples)
        if not root.is_dir():
            raise InputError(f"examples folder {root} does not exist")
        groups = {
            sub.name.replace("_", " "): image_paths_under(sub)
            for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        }
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise InputError(f"no example images in {examples} (expected one sub-folder of images per label)")
    return groups


def embed_cached(encoder, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, few-shot features) of `paths`, reusing those cached for this encoder (same
    path, size, mtime)."""
    from .encoders.onnx import cache_dir
    from .fsutil import atomic_write

    paths = [os.path.abspath(p) for p in paths]
    keys = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise InputError(f"cannot read example {p}: {e.strerror}") from e
        keys.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
    # the encoder's class is part of the key: one fingerprint's torch and ONNX image towers give
    # different features (ONNX: the embeddings again), which must not share rows
    key = f"{encoder.fingerprint}|{type(encoder).__name__}|features-v{FEATURES_VERSION}"
    cache = cache_dir() / "fewshot" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".npz")
    known: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with np.load(cache, allow_pickle=False) as z:
            known = {k: (e, f) for k, e, f in zip(z["keys"].tolist(), z["emb"], z["feats"])}
    except (OSError, ValueError, KeyError):
        pass
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        from .errors import DecodeError

        try:
            emb, feats = encoder.encode_images_with_features([paths[i] for i in todo])
        except DecodeError as e:
            raise InputError(f"cannot read an example image: {e}") from e
        known.update((keys[i], (e, f)) for i, e, f in zip(todo, emb, feats))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.array(list(known)), emb=np.stack([e for e, _ in known.values()]),
                         feats=np.stack([f for _, f in known.values()]))

        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, write)
        except OSError as e:  # a cache that cannot be written only costs time
            LOG.debug("could not write %s: %s", cache, e)
    if not keys:
        raise InputError("no example images")
    return (np.stack([known[k][0] for k in keys]).astype(np.float32), np.stack([known[k][1] for k in keys]).astype(np.float32))
