"""Result objects; their `to_dict()` is exactly the CLI's JSON output."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SearchResult:
    rank: int
    score: float
    kind: str  # "image" | "text"
    id: int
    path: str  # the image file, or the corpus file a text item came from
    text: str | None = None
    line: int | None = None
    #: calibrated probability in [0, 1] that this is the query's true match (see confidence.py)
    confidence: float | None = None
    #: what the image's EXIF says (taken, make, model, lat, lon, width, height; known ones only)
    photo: dict | None = None

    @property
    def source(self) -> str | None:
        """`corpus-file:line` for text items."""
        return f"{self.path}:{self.line}" if self.kind == "text" else None

    def to_dict(self) -> dict:
        base = {"rank": self.rank, "score": round(float(self.score), 6)}
        if self.confidence is not None:
            base["confidence"] = round(float(self.confidence), 4)
        base.update(kind=self.kind, id=self.id)
        if self.kind == "text":
            return {**base, "text": self.text, "source": self.source}
        out = {**base, "path": self.path}
        if self.photo:
            out["photo"] = dict(self.photo)
        return out


@dataclass(frozen=True)
class ClassifyResult:
    path: str
    label: str | None
    score: float | None
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "label": self.label,
            "score": round(float(self.score or 0.0), 6),
            "scores": {k: round(float(v), 6) for k, v in self.scores.items()},
        }


@dataclass
class AddSummary:
    index: str
    model: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    total: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        keys = ("index", "model", "added", "updated", "unchanged", "removed", "failed", "total")
        return {k: getattr(self, k) for k in keys}
