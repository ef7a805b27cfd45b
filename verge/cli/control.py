"""``verge control``: run the control plane (REST API, dashboard, config and purge distribution
to edges); the commands that talk to it are the other modules of this package."""

from __future__ import annotations

from typing import Annotated

import typer

from verge.cli.common import split_hostport
from verge.cli.secrets import secret_option


def control(
    listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the API and dashboard (port 0: any free port, printed when ready)."
        ),
    ] = "127.0.0.1:7000",
    db: Annotated[
        str, typer.Option(help="Store: sqlite:///PATH (default) or postgresql://USER:PASS@HOST/DB.")
    ] = "sqlite:///verge.db",
    admin_token: Annotated[
        str | None,
        secret_option(
            "VERGE_ADMIN_TOKEN",
            "Admin API token to create on first start (default: a random one, printed once).",
        ),
    ] = None,
) -> None:
    """Run the control plane: REST API, dashboard, config and purge distribution to edges."""
    from verge.control.server import main as run_control_main

    split_hostport(listen, "--listen")
    token_args = ["--admin-token", admin_token] if admin_token else []
    raise typer.Exit(run_control_main(["--listen", listen, "--db", db, *token_args]))
