"""``verge cert ...``: certificate helpers for operators (the logic lives in verge.certs).

``verge cert dev`` works offline; ``verge cert add|rotate|list|rm`` manage certificates on
the control plane (they live in verge.cli_control with the other control-plane commands).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from verge.certs import DEFAULT_DEV_HOSTS, dev_certificates


def cert_dev(
    out: Annotated[
        Path, typer.Option(help="Directory for ca.pem, ca-key.pem and one cert+key per host.")
    ] = Path("certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Host name, *.wildcard or IP address (repeatable). "
            f"Default: {', '.join(DEFAULT_DEV_HOSTS)}.",
        ),
    ] = None,
) -> None:
    """Make a local development CA (reused if it exists) and certificates it signs."""
    hosts = tuple(host) if host else DEFAULT_DEV_HOSTS
    try:
        made = dev_certificates(out, hosts)
    except (OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"CA:  {made.ca.cert_file}  (key {made.ca.key_file}, mode 0600)")
    for name, files in made.hosts.items():
        typer.echo(f"{name}:  {files.cert_file}  {files.key_file}")
    typer.echo(f"Trust it with e.g.: curl --cacert {made.ca.cert_file} https://{hosts[0]}:PORT/")


def register(app: typer.Typer) -> None:
    """Add the ``cert`` command group to the ``verge`` app."""
    from verge.cli_control import register_cert_commands

    cert_app = typer.Typer(
        help="TLS certificates: a local dev CA, and certificates on the control plane.",
        no_args_is_help=True,
    )
    cert_app.command("dev")(cert_dev)
    register_cert_commands(cert_app)
    app.add_typer(cert_app, name="cert")
