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
    text: Optional[str] = typer.Argument(None, help="Query text."),
    image: Optional[Path] = typer.Option(None, "--image", help="Query by this image instead of text."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Number of results."),
    kind: Kind = typer.Option(Kind.image, "--kind", help="What to return: images or text items."),
    where_path: Optional[str] = typer.Option(
        None, "--where-path", help="Only items under this folder/file prefix, or matching this glob (e.g. '*.png', '~/Pictures/2023/*')."
    ),
    min_size: Optional[str] = typer.Option(None, "--min-size", help="Only files of at least this size (bytes, or 500K, 2M...)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Only files of at most this size."),
    after: Optional[str] = typer.Option(None, "--after", help="Only files modified at or after DATE (ISO, e.g. 2024-05-01, local time)."),
    before: Optional[str] = typer.Option(None, "--before", help="Only files modified before DATE."),
    index: Optional[str] = IndexOpt,
    json_out: bool = JsonOpt,
):
    """Nearest images (or text items with --kind text) to a text or an image."""
    from searchkit import open_index
    from searchkit.errors import UsageError
    from searchkit.filters import Filter

    if (text is None) == (image is None):
        raise UsageError("give either query TEXT or --image PATH (exactly one)")
    where = Filter.of(path=where_path, min_size=min_size, max_size=max_size, after=after, before=before)
    if where is not None:
        where.sql()  # refuse a bad size or date before loading anything
    with open_index(index) as idx:
        results = idx.search(text if text is not None else Path(image), k=k, kind=kind.value, where=where)
    if json_out:
        for r in results:
            print_json(r.to_dict())
        return
    if kind is Kind.text:
        table("", ["rank", "score", "text", "source"], [[r.rank, f"{r.score:.4f}", r.text, r.source] for r in results])
    else:
        table("", ["rank", "score", "path"], [[r.rank, f"{r.score:.4f}", rel_path(r.path)] for r in results])


@handle_errors
def classify_cmd(
    paths: List[Path] = typer.Argument(..., help="Images or folders of images."),
    labels: Optional[str] = typer.Option(
        None, "--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car". [default with --examples: its folder names]'
    ),
    examples: Optional[Path] = typer.Option(
        None, "--examples", "-e", help="Folder with a sub-folder of a few example images per label (DIR/<label>/): few-shot.",
    ),
    template: Optional[List[str]] = typer.Option(
        None, "--template", "-t", help='Prompt template with {} for the label; repeat for an ensemble. [default: a built-in ensemble]'
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec. [default: the --index bundle's model if it exists, else auto]"),
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
