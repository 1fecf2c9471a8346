"""The `searchkit` command: assembles the app from its command groups, in the order `--help`
lists them. Each group parses, calls the library and prints through `output.py`."""

from __future__ import annotations

import typer

from . import bundle, dupes, fusion, search, serve, train_eval

app = typer.Typer(
    help="Cross-modal search: index photos and text, query by text or image, classify zero-shot.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("index")(bundle.index_cmd)
app.command("query")(search.query_cmd)
app.command("classify")(search.classify_cmd)
app.command("dupes")(dupes.dupes_cmd)
app.command("info")(bundle.info_cmd)
app.command("reindex")(bundle.reindex_cmd)
train_eval.register(app)
fusion.register(app)
serve.register(app)


def main() -> None:
    from searchkit.machine import bound_heap_growth

    bound_heap_growth()
    app()


if __name__ == "__main__":
    main()
