"""`searchkit query` and `classify`: nearest items to a text or an image; zero-shot labels."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .options import IndexOpt, JsonOpt
from .output import EXIT_PARTIAL, handle_errors, print_json, rel_path, stderr, table


class Kind(str, Enum):
    image = "image"
    text = "text"


@handle_errors
def query_cmd(
    text: Optional[str] = typer.Argument(None, help="Query text; 'W:text' weighs it (e.g. '2:a beach')."),
    image: Optional[List[str]] = typer.Option(
        None, "--image", help="Query by this image (repeatable; mixes with TEXT); 'W:path' weighs it (e.g. '0.5:./x.jpg')."
    ),
    not_text: Optional[List[str]] = typer.Option(None, "--not", help="Subtract this text (repeatable; 'W:text' weighs it)."),
    not_image: Optional[List[str]] = typer.Option(None, "--not-image", help="Subtract this image (repeatable; 'W:path' weighs it)."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Number of results."),
    kind: Kind = typer.Option(Kind.image, "--kind", help="What to return: images or text items."),
    where_path: Optional[str] = typer.Option(
        None, "--where-path", help="Only items under this folder/file prefix, or matching this glob (e.g. '*.png', '~/Pictures/2023/*')."
    ),
    min_size: Optional[str] = typer.Option(None, "--min-size", help="Only files of at least this size (bytes, or 500K, 2M...)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Only files of at most this size."),
    after: Optional[str] = typer.Option(None, "--after", help="Only files modified at or after DATE (ISO, e.g. 2024-05-01, local time)."),
    before: Optional[str] = typer.Option(None, "--before", help="Only files modified before DATE."),
    taken_after: Optional[str] = typer.Option(
        None, "--taken-after", help="Only photos taken at or after DATE (EXIF date; a file without one: its modification time)."
    ),
    taken_before: Optional[str] = typer.Option(
        None, "--taken-before", help="Only photos taken before DATE (EXIF date; a file without one: its modification time)."
    ),
    camera: Optional[str] = typer.Option(None, "--camera", help="Only photos whose EXIF camera make/model contains TEXT (any case)."),
    near: Optional[str] = typer.Option(None, "--near", help="Only photos whose EXIF GPS position is within KM of LAT,LON (e.g. 48.8584,2.2945,5)."),
    min_confidence: Optional[float] = typer.Option(
        None, "--min-confidence", min=0.0, max=1.0,
        help="Drop results whose calibrated confidence (probability of being the true match) is below P; none left: 'no good match'.",
    ),
    index: Optional[str] = IndexOpt,
    json_out: bool = JsonOpt,
):
    """Nearest images (or text items with --kind text) to a text, images, or a weighted mix of
    them minus --not / --not-image terms (the normalised weighted sum of the term embeddings)."""
    from searchkit import open_index
    from searchkit.errors import UsageError
    from searchkit.filters import Filter
    from searchkit.terms import Query

    if text is None and not image:
        raise UsageError("give query TEXT and/or --image PATH")
    query = Query.parse(texts=[text] if text is not None else [], images=image or [], not_texts=not_text or [], not_images=not_image or [])
    where = Filter.of(
        path=where_path, min_size=min_size, max_size=max_size, after=after, before=before,
        taken_after=taken_after, taken_before=taken_before, camera=camera, near=near,
    )
    if where is not None:
        where.sql()  # refuse a bad size or date before loading anything
    with open_index(index) as idx:
        results = idx.search(query, k=k, kind=kind.value, where=where, min_confidence=min_confidence)
    if json_out:
        for r in results:
            print_json(r.to_dict())
        return
    if not results and min_confidence is not None:
        print(f"no good match (no result reaches confidence {min_confidence:g})")
        return
    if kind is Kind.text:
        table("", ["rank", "score", "confidence", "text", "source"], [[r.rank, f"{r.score:.4f}", f"{r.confidence:.3f}", r.text, r.source] for r in results])
    else:
        table("", ["rank", "score", "confidence", "path"], [[r.rank, f"{r.score:.4f}", f"{r.confidence:.3f}", rel_path(r.path)] for r in results])


@handle_errors
def classify_cmd(
    paths: List[Path] = typer.Argument(..., help="Images or folders of images."),
    labels: Optional[str] = typer.Option(
        None, "--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car". \\[default with --examples: its folder names]'
    ),
    examples: Optional[Path] = typer.Option(
        None, "--examples", "-e", help="Folder with a sub-folder of a few example images per label (DIR/<label>/): few-shot.",
    ),
    template: Optional[List[str]] = typer.Option(
        None, "--template", "-t", help='Prompt template with {} for the label; repeat for an ensemble. \\[default: a built-in ensemble]'
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec. \\[default: the --index bundle's model if it exists, else auto]"),
    index: Optional[str] = IndexOpt,
    json_out: bool = JsonOpt,
):
    """Classify images: zero-shot by the nearest label prompt, or few-shot with --examples."""
    from searchkit import classify_images, get_encoder, open_index
    from searchkit.errors import IndexNotFoundError, UsageError

    if labels is None and examples is None:
        raise UsageError('give --labels (e.g. --labels "cat,dog") or --examples DIR')
    images = [str(p) for p in paths]
    results = None
    if not model:
        try:
            with open_index(index) as idx:
                results = idx.classify(images, labels, template, examples=examples)
        except IndexNotFoundError:
            model = "auto"
    if results is None:
        results = classify_images(get_encoder(model), images, labels, template, examples=examples)
    if json_out:
        for r in results:
            print_json(r.to_dict())
    else:
        table(
            "",
            ["path", "label", "score"],
            [[rel_path(r.path), r.label or "-", f"{r.score:.3f}" if r.error is None else f"error: {r.error}"] for r in results],
        )
    failed = [r for r in results if r.error is not None]
    for r in failed:
        stderr(f"failed: {r.path}: {r.error}")
    if failed:
        raise typer.Exit(EXIT_PARTIAL)
