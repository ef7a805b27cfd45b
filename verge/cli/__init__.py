"""The ``verge`` command. Wires the parts together; the logic lives in the packages.

One module per command or command group; `common` holds what they share (failing with one
line, HOST:PORT syntax, the control-plane session, tables and --json). The console script
``verge`` is `main` (pyproject: ``verge.cli:main``); ``python -m verge.cli`` runs it too.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from verge.cli import (
    cert,
    config_check,
    control,
    demo,
    edge,
    functions,
    hostnames,
    kv,
    nodes,
    origins,
    protection,
    purge,
    router,
    services,
    sign_url,
    stream,
    tenants,
    tokens,
    up,
    vod,
)

app = typer.Typer(
    name="verge",
    help="Verge: a self-hosted edge platform (CDN edge cache, streaming, edge compute).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"verge {version('verge')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Verge: a self-hosted edge platform (CDN edge cache, streaming, edge compute)."""


app.command()(edge.edge)
app.command()(control.control)
app.command()(purge.purge)
app.command("demo-origin")(demo.demo_origin)
app.command()(demo.demo)
app.command()(up.up)
app.command()(router.router)
app.command()(stream.stream)
app.command("config-check")(config_check.config_check)
app.command("sign-url")(sign_url.sign_url)
app.add_typer(tenants.tenant_app, name="tenant")
app.add_typer(tokens.token_app, name="token")
app.add_typer(services.service_app, name="service")
app.add_typer(origins.origin_app, name="origin")
app.add_typer(nodes.node_app, name="node")
app.add_typer(functions.fn_app, name="fn")
app.add_typer(kv.kv_app, name="kv")
app.add_typer(protection.protection_app, name="protection")
app.command("hostnames")(hostnames.hostnames)
cert.register(app)
app.add_typer(vod.vod_app, name="vod")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
