"""What every command group prints and how it exits: JSON lines on stdout, rich tables, messages
on stderr, the progress bar, logging, and library errors turned into one line and an exit code.

Exit codes: 0 success; 1 error (message on stderr); 2 usage error; 3 finished, but some inputs
failed (they are recorded in the index, see `searchkit info`); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import warnings

import typer

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def print_json(obj) -> None:
    # a path that is not UTF-8 holds surrogate escapes: written as JSON \udcNN escapes, which
    # keep the output valid UTF-8 and give Python's json.loads the exact os.fsdecode path back
    text = json.dumps(obj, ensure_ascii=False)
    sys.stdout.write(re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    from searchkit.fsutil import display_path

    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[display_path(str(x)) for x in r])
    Console().print(t)


def rel_path(path: str) -> str:
    """`path` relative to the working folder when it lies below it, else as it is."""
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path


def setup_logging(verbose: bool = False) -> None:
    from searchkit.fsutil import show_undecodable

    show_undecodable(sys.stdout)  # file names that are not UTF-8 print as \xNN
    show_undecodable(sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("searchkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False
    # `auto` says which model it chose and why
    logging.getLogger("searchkit.encoders").setLevel(logging.DEBUG if verbose else logging.INFO)
    warnings.showwarning = lambda message, category, *a, **k: stderr(f"warning: {message}")
    # third-party chatter (hub retries, tokenizer notices) stays out of the way
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    logging.getLogger().addHandler(logging.NullHandler())


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from searchkit.errors import SearchkitError, UsageError

        setup_logging(os.environ.get("SEARCHKIT_VERBOSE") == "1")
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            stderr(f"error: {e}")
            raise typer.Exit(EXIT_USAGE) from None
        except SearchkitError as e:
            stderr(f"error: {e}")
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            stderr("interrupted; finished batches are saved, re-run the command to complete")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def progress_bar(enabled: bool):
    """A rich progress bar with rate and ETA on stderr when it is a terminal, else a no-op."""
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
