"""Options the bundle and search commands share."""

from __future__ import annotations

import typer

IndexOpt = typer.Option(
    None, "--index", "-i", help="Index name (under $SEARCHKIT_HOME, default ./indexes) or bundle folder. \\[default: default]"
)
JsonOpt = typer.Option(False, "--json", help="Machine-readable output (JSON / JSON Lines) on stdout.")
