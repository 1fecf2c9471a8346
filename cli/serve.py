"""`searchkit serve`: the web gallery and JSON API (searchkit.serve) under uvicorn."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from typing import List, Optional

import typer

from .output import handle_errors

#: how `--workers N` hands the app's settings to each uvicorn worker process
CONFIG_ENV = "SEARCHKIT_SERVE_CONFIG"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as reachable from outside


def app_from_env():
    """uvicorn factory for worker processes: the app described by $SEARCHKIT_SERVE_CONFIG."""
    from searchkit.serve import create_app

    cfg = json.loads(os.environ[CONFIG_ENV])
    return create_app(cfg["indexes"], token=cfg["token"], max_upload=cfg["max_upload"], warm=True)


def serve_cmd(
    index: Optional[List[str]] = typer.Option(
        None, "--index", "-i", help="Index name (under $SEARCHKIT_HOME) or bundle folder; repeat to serve several. \\[default: default]"
    ),
    all_: bool = typer.Option(False, "--all", help="Serve every bundle under $SEARCHKIT_HOME."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs --token (or --no-auth)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port to bind."),
    token: Optional[str] = typer.Option(None, "--token", envvar="SEARCHKIT_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every API call."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Allow a non-loopback --host without a token."),
    max_upload: str = typer.Option("20M", "--max-upload", help="Largest request body (uploaded image), e.g. 20M."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes (each loads its own model)."),
):
    """Serve a web gallery and a JSON API over one or more indexes."""
    import uvicorn

    from searchkit.errors import IndexNotFoundError, UsageError
    from searchkit.filters import parse_size
    from searchkit.index import searchkit_home
    from searchkit.serve import create_app
    from searchkit.serve.bundles import bundles_under

    if not _is_loopback(host) and not token and not no_auth:
        raise UsageError(f"--host {host} is reachable from other machines: give --token TOKEN (or --no-auth to serve without one)")
    parse_size(max_upload, what="upload limit")
    specs: list[str] = list(index or [])
    if all_:
        specs += [str(p) for p in bundles_under(searchkit_home())]
        if not specs:
            raise IndexNotFoundError(f"no index under {searchkit_home()}; build one with: searchkit index PATH")
    specs = specs or [None]  # the default index
    if workers > 1:
        os.environ[CONFIG_ENV] = json.dumps({"indexes": specs, "token": token, "max_upload": max_upload})
        create_app(specs, max_upload=max_upload).state.searchkit.close()  # refuse a missing index here, once
        target, kwargs = "searchkit.cli.serve:app_from_env", {"factory": True, "workers": workers}
    else:
        target, kwargs = create_app(specs, token=token, max_upload=max_upload, warm=True), {}
    shown = f"[{host}]" if ":" in host else host
    print(f"searchkit serve: http://{shown}:{port}/  (API docs at /docs; Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(target, host=host, port=port, log_level="warning", access_log=False, **kwargs)


def register(app: typer.Typer) -> None:
    app.command("serve")(handle_errors(serve_cmd))
