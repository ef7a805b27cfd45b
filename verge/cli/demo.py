"""``verge demo`` and ``verge demo-origin``: the sample origin, alone or behind an edge with
the built-in demo config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from verge.cli.common import split_hostport


def demo_origin(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:9000",
) -> None:
    """Run the sample origin (static files, API, dynamic pages) used by the demo."""
    from verge.demo.origin import run_origin

    host, port = split_hostport(listen, "--listen")
    run_origin(host, port)


def demo(
    listen: Annotated[str, typer.Option(help="HOST:PORT of the demo edge.")] = "127.0.0.1:8080",
    origin_listen: Annotated[
        str, typer.Option(help="HOST:PORT of the sample origin.")
    ] = "127.0.0.1:9000",
    state_dir: Annotated[Path, typer.Option(help="Where the demo keeps its cache.")] = Path(
        ".demo"
    ),
) -> None:
    """Start the sample origin and an edge in front of it, with the built-in demo config."""
    from verge.demo.run import run_demo

    run_demo(
        split_hostport(listen, "--listen"),
        split_hostport(origin_listen, "--origin-listen"),
        state_dir,
    )
