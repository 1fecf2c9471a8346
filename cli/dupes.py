"""`searchkit dupes`: groups of near-duplicate images from the stored embeddings."""

from __future__ import annotations

from typing import Optional

import typer

from .options import IndexOpt, JsonOpt
from .output import handle_errors, print_json, rel_path, table


@handle_errors
def dupes_cmd(
    threshold: Optional[float] = typer.Option(
        None, "--threshold", "-t", min=0.0, max=1.0,
        help="Embedding cosine a pair must reach to be checked. \\[default: 0.65]",
    ),
    min_pixels: Optional[float] = typer.Option(
        None, "--min-pixel-similarity", min=-1.0, max=1.0,
        help="Thumbnail correlation a pair must also reach (separates a re-saved photo from another shot of the scene). \\[default: 0.80]",
    ),
    index: Optional[str] = IndexOpt,
    json_out: bool = JsonOpt,
):
    """Groups of near-duplicate images: identical bytes, re-encoded, resized, slightly cropped or
    brightened copies; largest group first. No image is re-encoded."""
    from searchkit import open_index

    with open_index(index) as idx:
        groups = idx.dupes(threshold, min_pixels)
    if json_out:
        for g in groups:
            print_json(g.to_dict())
        return
    if not groups:
        print("no near-duplicates")
        return
    rows = []
    for n, g in enumerate(groups, 1):
        best = {}
        for p in g.pairs:
            for x in (p.a, p.b):
                best[x] = max(best.get(x, 0.0), p.score)
        for path in g.paths:
            rows.append([n, len(g.paths), f"{best.get(path, 0.0):.4f}", rel_path(path)])
    table("", ["group", "size", "best score", "path"], rows)
