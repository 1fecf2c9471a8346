"""`searchkit` commands: parse arguments, call the library, print. Nothing else lives here.

Exit codes: 0 success; 1 error (message on stderr); 2 usage error; 3 finished, but some inputs
failed (they are recorded in the index, see `searchkit info`); 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    help="Cross-modal search: index photos and text, query by text or image, classify zero-shot.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Kind(str, Enum):
    image = "image"
    text = "text"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class VectorKind(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf_pq = "ivf-pq"


VectorIndexOpt = typer.Option(
    None,
    "--vector-index",
    help="Vector index: auto (exact up to 1M vectors, then HNSW or IVF-PQ as memory allows), flat (exact), hnsw, ivf-pq. [default: the bundle's, else auto]",
)
MaxMemoryOpt = typer.Option(
    None, "--max-memory", help="Memory budget of the vector indexes, e.g. 512M or 4G. [default: the bundle's, else half of RAM]"
)
IndexOpt = typer.Option(
    None, "--index", "-i", help="Index name (under $SEARCHKIT_HOME, default ./indexes) or bundle folder. [default: default]"
)
JsonOpt = typer.Option(False, "--json", help="Machine-readable output (JSON / JSON Lines) on stdout.")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("searchkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False
    # `auto` says which model it chose and why
    logging.getLogger("searchkit.encoders").setLevel(logging.DEBUG if verbose else logging.INFO)
    warnings.showwarning = lambda message, category, *a, **k: _stderr(f"warning: {message}")
    # third-party chatter (hub retries, tokenizer notices) stays out of the way
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    logging.getLogger().addHandler(logging.NullHandler())


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from searchkit.errors import SearchkitError, UsageError

        _setup_logging(os.environ.get("SEARCHKIT_VERBOSE") == "1")
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            _stderr(f"error: {e}")
            raise typer.Exit(EXIT_USAGE) from None
        except SearchkitError as e:
            _stderr(f"error: {e}")
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            _stderr("interrupted; finished batches are saved, re-run the command to complete")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _progress_bar(enabled: bool):
    """A rich progress bar with rate and ETA on stderr when it is a terminal, else a no-op."""
    import contextlib

    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f}/s" if task.speed else "", style="cyan")

    class Bar(Progress):
        def __enter__(self):
            super().__enter__()
            self.task = self.add_task("indexing", total=None)
            return self

        def __call__(self, advance: int, total: int) -> None:
            self.update(self.task, advance=advance, total=total or None)

    return Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console().print(t)


@app.command("index")
@handle_errors
def index_cmd(
    paths: List[str] = typer.Argument(..., help="Image folders (recursive), image files, or text corpora (.txt .csv .tsv .jsonl); local paths or object-store URLs (s3://, gs://, file://)."),
    index: Optional[str] = IndexOpt,
    model: str = typer.Option("auto", "--model", "-m", help="Model spec: auto, mini, open_clip:ARCH@TAG, or a checkpoint folder."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column of .csv/.tsv/.jsonl corpora. [default: text, else caption]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per model call. [default: the model's]"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Image decode threads. [default: CPU count, 2..8]"),
    vector_index: Optional[VectorKind] = VectorIndexOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    engine: Engine = typer.Option(Engine.local, "--engine", help="Where decoding and encoding run: local (this process) or ray (a Ray cluster; needs searchkit[ray])."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster: auto, or HOST:PORT of its head. [default: $RAY_ADDRESS, else a Ray instance on this machine]"),
    encoders: Optional[int] = typer.Option(None, "--encoders", min=1, help="Ray: encoder actors, each loading the model once. [default: GPUs / --gpus-per-encoder, else CPUs / 4]"),
    gpus_per_encoder: float = typer.Option(0, "--gpus-per-encoder", min=0, help="Ray: GPUs per encoder actor (0: encode on CPU)."),
    cpus_per_decoder: float = typer.Option(1, "--cpus-per-decoder", min=0.01, help="Ray: CPUs per read/decode/preprocess task."),
    json_out: bool = JsonOpt,
):
    """Add image folders, images and text corpora to an index, incrementally."""
    from searchkit import open_index
    from searchkit.filters import parse_size
    from searchkit.sources import resolve_roots

    resolve_roots(paths)  # refuse bad paths before creating anything
    run_on: object = "local"
    if engine is Engine.ray:
        from searchkit.pipeline_ray import RayEngine

        run_on = RayEngine(address=ray_address, encoders=encoders, gpus_per_encoder=gpus_per_encoder, cpus_per_decoder=cpus_per_decoder)
        run_on.check_installed()  # the missing extra, before a model loads
        for name in ("ray", "ray.data"):  # Ray's start-up and per-dataset notices; errors still show
            logging.getLogger(name).setLevel(logging.ERROR)
    if max_memory is not None:
        parse_size(max_memory, what="memory budget")
    with open_index(index, create=True, model=model) as idx, _progress_bar(not json_out) as bar:
        if vector_index is not None or max_memory is not None:
            idx.configure_vectors(vector_index.value if vector_index else None, max_memory)
        summary = idx.add(paths, text_column=text_column, batch_size=batch_size, workers=workers, progress=bar, engine=run_on)
    if json_out:
        _print_json(summary.to_dict())
    else:
        d = summary.to_dict()
        _table(
            f"index {d['index']}  ({d['model']})",
            ["added", "updated", "unchanged", "removed", "failed", "total"],
            [[d[k] for k in ("added", "updated", "unchanged", "removed", "failed", "total")]],
        )
    for path, reason in summary.failures[:20]:
        _stderr(f"failed: {path}: {reason}")
    if len(summary.failures) > 20:
        _stderr(f"... and {len(summary.failures) - 20} more (see: searchkit info)")
    if summary.failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command("query")
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
            _print_json(r.to_dict())
        return
    if kind is Kind.text:
        _table("", ["rank", "score", "text", "source"], [[r.rank, f"{r.score:.4f}", r.text, r.source] for r in results])
    else:
        _table("", ["rank", "score", "path"], [[r.rank, f"{r.score:.4f}", _rel(r.path)] for r in results])


def _rel(path: str) -> str:
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path


@app.command("classify")
@handle_errors
def classify_cmd(
    paths: List[Path] = typer.Argument(..., help="Images or folders of images."),
    labels: str = typer.Option(..., "--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car".'),
    template: Optional[List[str]] = typer.Option(
        None, "--template", "-t", help='Prompt template with {} for the label; repeat for an ensemble. [default: a built-in ensemble]'
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec. [default: the --index bundle's model if it exists, else auto]"),
    index: Optional[str] = IndexOpt,
    json_out: bool = JsonOpt,
):
    """Zero-shot classification of images by the nearest label prompt."""
    from searchkit import classify_images, get_encoder, open_index
    from searchkit.errors import IndexNotFoundError

    if model:
        encoder = get_encoder(model)
    else:
        try:
            with open_index(index) as idx:
                encoder = idx.encoder
        except IndexNotFoundError:
            encoder = get_encoder("auto")
    results = classify_images(encoder, [str(p) for p in paths], labels, template)
    if json_out:
        for r in results:
            _print_json(r.to_dict())
    else:
        _table(
            "",
            ["path", "label", "score"],
            [[_rel(r.path), r.label or "-", f"{r.score:.3f}" if r.error is None else f"error: {r.error}"] for r in results],
        )
    failed = [r for r in results if r.error is not None]
    for r in failed:
        _stderr(f"failed: {r.path}: {r.error}")
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command("info")
@handle_errors
def info_cmd(index: Optional[str] = IndexOpt, json_out: bool = JsonOpt):
    """What an index holds: manifest, counts by kind, failures."""
    from searchkit import open_index

    with open_index(index) as idx:
        info = idx.info()
    if json_out:
        _print_json(info)
        return
    m = info["manifest"] or {}
    enc = m.get("encoder") or {}
    c = info["counts"]
    rows = [
        ["index", info["index"]],
        ["model", enc.get("spec")],
        ["dim", enc.get("dim")],
        *[[f"{k} vectors", _describe_vectors(v)] for k, v in (m.get("vectors") or {}).items() if v.get("count")],
        ["images", c["image"]],
        ["text items", c["text"]],
        ["files", c["files"]],
        ["failures", len(info["failures"])],
        ["created", m.get("created_at")],
        ["updated", m.get("updated_at")],
    ]
    _table("", ["", ""], rows)
    if info["failures"]:
        _table("failures", ["path", "reason"], [[_rel(f["path"]), f["reason"]] for f in info["failures"]])


def _describe_vectors(v: dict) -> str:
    """One line per kind's vector index for `info`: kind, structure, recall@10, search params."""
    from searchkit.vectors import format_bytes

    parts = [f"{v.get('kind', 'flat')} ({v.get('faiss', 'IDMap2,Flat')})", f"{v.get('count', 0):,} vectors"]
    if v.get("memory_bytes") is not None:
        parts.append(f"~{format_bytes(v['memory_bytes'])}")
    rec = v.get("recall") or {}
    if rec.get("exact"):
        parts.append("exact")
    elif rec.get("recall") is not None:
        parts.append(f"recall@{rec.get('k', 10)} {rec['recall']:.3f} (target {rec.get('target')})")
    else:
        parts.append("recall not measured yet")
    if v.get("search") and v.get("kind") != "flat":
        parts.append(", ".join(f"{k}={x}" for k, x in v["search"].items()))
    return "; ".join(parts)


@app.command("reindex")
@handle_errors
def reindex_cmd(
    index: Optional[str] = IndexOpt,
    vector_index: VectorKind = typer.Option(..., "--vector-index", help="auto, flat, hnsw or ivf-pq."),
    max_memory: Optional[str] = MaxMemoryOpt,
    target_recall: Optional[float] = typer.Option(None, "--target-recall", min=0.01, max=1.0, help="recall@10 to tune search parameters to. [default: 0.95]"),
    json_out: bool = JsonOpt,
):
    """Rebuild the vector indexes from the embeddings stored in the bundle (no image is re-encoded)."""
    from searchkit import open_index

    with open_index(index, write=True) as idx:
        result = idx.reindex(vector_index.value, max_memory, target_recall)
        path = str(idx.path)
    if json_out:
        _print_json({"index": path, "vectors": result})
        return
    _table(f"reindex {path}", ["kind", "vector index"], [[k, _describe_vectors(v)] for k, v in result.items() if v.get("count")])


def _register_command_groups() -> None:
    from . import fusion, train_eval

    train_eval.register(app)
    fusion.register(app)


_register_command_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
