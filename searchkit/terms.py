"""Combined queries: weighted text and image terms, negatives subtracted.

    from searchkit.terms import Query
    idx.search(Query([(2, "a dog"), (1, Path("a.jpg")), (-1, "fruit")]))
    idx.search([(2, "a dog"), (-1, "fruit")])          # the same, as (weight, term) pairs
    Query.parse(texts=["2:a beach"], images=["./sunset.jpg"], not_texts=["people"])

The query vector is the normalised weighted sum of the normalised term embeddings (negative
weights subtract), the algebra rclip users know as `"2:dog" + ./a.jpg - fruit`. A term is text
(str), an image (pathlib.Path or PIL image), or an embedding (1-D numpy array, normalised here).
On the command line a term may carry a weight prefix, `2:a beach` or `0.5:./x.jpg`; a text that
starts with a number and a colon (`10:30 meeting`) is read as weighted, so write `1:10:30 meeting`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:(.*)$", re.DOTALL)


def split_weight(raw: str) -> tuple[float, str]:
    """`"2:a beach"` -> (2.0, "a beach"); no prefix -> (1.0, raw)."""
    m = _WEIGHT.match(raw)
    if not m:
        return 1.0, raw
    return float(m.group(1)), m.group(2)


@dataclass(frozen=True)
class Query:
    """A weighted sum of terms; `terms` are (weight, term) pairs, weights non-zero and finite."""

    terms: tuple[tuple[float, Any], ...]

    def __init__(self, terms: Iterable[tuple[float, Any]]):
        checked = []
        for pair in terms:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise UsageError(f"a query term must be a (weight, term) pair, not {pair!r}")
            w, term = pair
            if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)):
                raise UsageError(f"a term's weight must be a number, not {w!r}")
            w = float(w)
            if not math.isfinite(w) or w == 0:
                raise UsageError(f"a term's weight must be finite and non-zero, not {w}")
            if isinstance(term, str) and not term.strip():
                raise UsageError("empty query text")
            checked.append((w, term))
        if not checked:
            raise UsageError("a query needs at least one term")
        if all(w < 0 for w, _ in checked):
            raise UsageError("a query needs at least one positive term (negatives only subtract)")
        object.__setattr__(self, "terms", tuple(checked))

    @classmethod
    def of(cls, query) -> Query:
        """A Query from a Query, a list of (weight, term) pairs, or one plain term (weight 1)."""
        if isinstance(query, Query):
            return query
        if isinstance(query, list) and query and all(isinstance(p, tuple) for p in query):
            return cls(query)
        return cls([(1.0, query)])

    @classmethod
    def parse(
        cls,
        texts: Sequence[str] = (),
        images: Sequence[str | Path] = (),
        not_texts: Sequence[str] = (),
        not_images: Sequence[str | Path] = (),
    ) -> Query:
        """The command line's terms: each may carry a `W:` weight prefix; `not_*` are subtracted."""
        terms: list[tuple[float, Any]] = []
        for group, sign, is_image in ((texts, 1, False), (images, 1, True), (not_texts, -1, False), (not_images, -1, True)):
            for raw in group:
                # an image file whose own name looks weighted (`2:x.jpg`) is that file
                w, term = (1.0, str(raw)) if is_image and Path(raw).exists() else split_weight(str(raw))
                if w < 0 and sign < 0:
                    raise UsageError(f"'{raw}': give a negative term a positive weight (it is subtracted)")
                terms.append((sign * w, Path(term) if is_image else term))
        return cls(terms)

    def embed(self, text: Callable[[list[str]], np.ndarray], image: Callable[[Any], np.ndarray]) -> np.ndarray:
        """The (1, dim) query vector; `text(list)` embeds texts in one batch, `image(term)` one image."""
        texts = [t for _, t in self.terms if isinstance(t, str)]
        text_rows = iter(text(texts)) if texts else iter(())
        total = None
        for w, term in self.terms:
            if isinstance(term, str):
                v = next(text_rows)
            elif isinstance(term, np.ndarray):
                v = term.astype(np.float32).reshape(-1)
            else:
                v = image(term).reshape(-1)
            n = float(np.linalg.norm(v))
            if n == 0 or not math.isfinite(n):
                raise UsageError("a query embedding has zero or non-finite length")
            total = w * (v / n) if total is None else total + w * (v / n)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise UsageError("the query terms cancel out (their weighted sum is zero)")
        return (total / norm).astype(np.float32)[None, :]
