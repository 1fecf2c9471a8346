"""Queries: a query (text, image, embedding) embedded with the bundle's encoder, searched in one
kind's vector index under an optional filter; zero-shot classification of images.

Text goes through the bundle's torch-free text tower (text-onnx/, exported at the end of an
`index` run) when it matches the encoder's fingerprint, so a cold text query never imports
torch; any trouble there only costs speed: the full encoder answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .errors import EmptyIndexError, InputError, UsageError
from .results import ClassifyResult, SearchResult

LOG = logging.getLogger(__name__)


class Searcher:
    """Search over one bundle. `vectors(kind)` gives a kind's index in step with meta.db;
    `encoder()` loads the bundle's encoder, `loaded()` is it when already loaded (else None)."""

    def __init__(self, bundle: Bundle, store, vectors: Callable[[str], Any], encoder: Callable[[], Any], loaded: Callable[[], Any]):
        self.bundle = bundle
        self.store = store
        self.vectors = vectors
        self.encoder = encoder
        self.loaded = loaded
        self.text: Any = None  # the text encoder of queries, once chosen
        self._samples: dict[tuple[str, int], np.ndarray] = {}

    def text_encoder(self):
        """The bundle's torch-free text tower (text-onnx/) when it matches, else the encoder."""
        if self.loaded() is not None:
            return self.loaded()
        if self.text is None:
            fingerprint = self.store.get_meta("encoder_fingerprint")
            folder = self.bundle.text_onnx_dir
            try:
                from .encoders.onnx import OnnxTextEncoder

                if fingerprint and OnnxTextEncoder.matches(folder, fingerprint):
                    self.text = OnnxTextEncoder(folder)
            except Exception as e:  # any failure here only costs speed: fall back to torch
                LOG.info("text queries use the full encoder (%s)", e)
            if self.text is None:
                self.text = self.encoder()
        return self.text

    def embed(self, query) -> np.ndarray:
        """The (1, dim) vector of a text, an image, an embedding, or a combined `Query`
        (or list of (weight, term) pairs; see terms.py)."""
        from PIL import Image

        from .images import to_rgb
        from .terms import Query

        if isinstance(query, Query) or (isinstance(query, list) and query and all(isinstance(p, tuple) for p in query)):
            return Query.of(query).embed(self.embed_texts, self.embed)
        if isinstance(query, str):
            if not query.strip():
                raise UsageError("empty query text")
            return self.text_encoder().encode_texts([query])
        if isinstance(query, Path):
            img = load_image_or_raise(query, draft_size=self.encoder().image_size)
        elif isinstance(query, Image.Image):
            img = to_rgb(query)
        elif isinstance(query, np.ndarray):
            return np.atleast_2d(query).astype(np.float32)
        else:
            raise UsageError(f"query must be text, an image path (pathlib.Path) or a PIL image, not {type(query).__name__}")
        return self.encoder().encode_images([img])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.text_encoder().encode_texts(texts)

    def bulk_sample(self, kind: str) -> np.ndarray:
        """A fixed random sample of the kind's stored vectors (the bulk a hit is measured
        against), drawn once per generation of meta.db."""
        from .confidence import SAMPLE_SIZE

        key = (kind, self.store.generation)
        if key not in self._samples:
            ids = self.store.item_ids(kind)
            rng = np.random.default_rng(0)
            pick = np.sort(rng.choice(len(ids), min(SAMPLE_SIZE, len(ids)), replace=False))
            dim = int(self.store.get_meta("dim") or 0)
            self._samples = {k: v for k, v in self._samples.items() if k[1] == key[1]}
            self._samples[key] = self.store.vectors_by_ids(ids[pick], dim, missing_ok=True)
        return self._samples[key]

    def search(self, query, k: int = 10, kind: str = "image", *, where=None, min_confidence: float | None = None) -> list[SearchResult]:
        """See `Index.search`."""
        from .confidence import TOP, bulk_stats, confidences, load_calibration
        from .filters import Filter

        if k < 1:
            raise UsageError("k must be at least 1")
        if min_confidence is not None and not (0.0 <= float(min_confidence) <= 1.0):
            raise UsageError(f"min_confidence must be between 0 and 1, not {min_confidence}")
        flt = Filter.of(where)
        vec = self.vectors(kind)
        if len(vec) == 0:
            what = "images" if kind == "image" else "text items"
            hint = "index a folder of images" if kind == "image" else "index a text corpus (.txt .csv .tsv .jsonl)"
            raise EmptyIndexError(f"index '{self.bundle.name}' holds no {what}; {hint} first")
        allowed = None
        if flt is not None:
            allowed = self.store.matching_ids(kind, *flt.sql())
            if len(allowed) == 0:
                return []
        q = self.embed(query)
        if q.shape[-1] != vec.dim:
            raise UsageError(f"the query embedding has {q.shape[-1]} dimensions; this index holds {vec.dim}")
        scores, ids = vec.search(q, k, allowed=allowed)
        mu, sigma = bulk_stats(q, self.bulk_sample(kind))
        cal = load_calibration(self.store.get_meta("encoder_spec"))
        top_mean = None
        if cal.feature == "z_top":  # the query's own best scores over the whole index, filter or not
            top = scores[0] if allowed is None and k >= TOP else vec.search(q, TOP)[0][0]
            top = top[:TOP][np.isfinite(top[:TOP]) & (top[:TOP] > -1e30)]
            top_mean = float(top.mean()) if len(top) else mu
        conf = confidences(scores[0], mu, sigma, cal, top_mean)
        rows = self.store.item_rows(i for i in ids[0] if i >= 0)
        photos = self.store.photo_meta_of(rows) if kind == "image" else {}
        out = []
        for score, c, i in zip(scores[0], conf, ids[0]):
            row = rows.get(int(i))
            if row is None or (min_confidence is not None and c < min_confidence):
                continue
            out.append(
                SearchResult(len(out) + 1, float(score), row["kind"], row["id"], row["path"], row["text"], row["locator"], float(c), photos.get(int(i)))
            )
        return out


def load_image_or_raise(path, draft_size=None):
    from .errors import DecodeError
    from .images import load_image

    try:
        return load_image(path, draft_size=draft_size)
    except DecodeError as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def classify_images(
    encoder, images, labels, templates: Sequence[str] | None = None, examples=None, *, text_encoder=None
) -> list[ClassifyResult]:
    """Classify images (paths, folders or PIL images): zero-shot by nearest label prompt, or with
    `examples` (a folder of label sub-folders, a label -> paths mapping, or a fitted
    `FewShotClassifier`) few-shot, see searchkit/fewshot.py. `labels` may be None with examples.
    `text_encoder` embeds the label prompts instead of `encoder` (a bundle's torch-free text tower).
    Zero-shot goes through `searchkit.zeroshot.label_scorer` (mini adds its tower's classifier)."""
    from PIL import Image

    from .errors import DecodeError
    from .images import image_paths_under, load_image, to_rgb
    from .zeroshot import check_templates, label_scorer, parse_labels

    if examples is not None:
        from .fewshot import FewShotClassifier

        clf = examples if isinstance(examples, FewShotClassifier) else FewShotClassifier.fit(encoder, examples, labels, templates)
        clf.check_encoder(encoder)
        labels = clf.labels

        def scores(images):
            return clf.probabilities(*encoder.encode_images_with_features(images))
    else:
        labels = parse_labels(labels)
        scores = label_scorer(encoder, labels, check_templates(templates), text_encoder=text_encoder)
    items: list[tuple[str, Any]] = []
    for x in [images] if isinstance(images, (str, os.PathLike, Image.Image)) else images:
        if isinstance(x, Image.Image):
            items.append((getattr(x, "filename", "") or "<image>", x))
        elif os.path.isdir(x):
            items.extend((p, p) for p in image_paths_under(x))
        else:
            items.append((str(x), str(x)))
    if not items:
        raise UsageError("no images to classify")
    results: list[ClassifyResult] = []
    batch: list[tuple[str, Any]] = []

    def flush():
        if not batch:
            return
        probs = scores([img for _, img in batch])
        for (path, _), p in zip(batch, probs):
            best = int(np.argmax(p))
            results.append(ClassifyResult(path, labels[best], float(p[best]), dict(zip(labels, map(float, p)))))
        batch.clear()

    for name, x in items:
        try:
            img = to_rgb(x) if isinstance(x, Image.Image) else load_image(x, draft_size=encoder.image_size)
        except DecodeError as e:
            flush()
            results.append(ClassifyResult(name, None, None, {}, error=str(e)))
            continue
        batch.append((name, img))
        if len(batch) >= encoder.image_batch_size:
            flush()
    flush()
    return results
