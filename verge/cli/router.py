"""``verge router``: route users to the nearest healthy edge (GeoDNS, ECS-aware, and HTTP
redirects); the logic is verge.routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from verge.cli.common import control_urls, fail, split_hostport
from verge.cli.secrets import secret_option


def router(
    config: Annotated[
        Path,
        typer.Option(
            help="Router YAML: zone, regions (CIDRs, neighbours), health; edges without --control."
        ),
    ],
    dns: Annotated[
        str, typer.Option(help="HOST:PORT of the authoritative DNS server (UDP and TCP).")
    ] = "127.0.0.1:5353",
    http: Annotated[
        str | None, typer.Option(help="HOST:PORT of the HTTP 302 router (off when not given).")
    ] = None,
    control: Annotated[
        str | None,
        typer.Option(
            envvar="VERGE_CONTROL",
            help="Control plane URL (several: comma-separated replicas): edges, health and hostnames from it.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        secret_option("VERGE_TOKEN", "Control-plane token (read-only is enough)."),
    ] = None,
) -> None:
    """Route users to the nearest healthy edge: GeoDNS (ECS-aware) and HTTP redirects."""
    import uvloop

    from verge.config import ConfigError
    from verge.config.router import load_router_config
    from verge.routing.router import RouterOptions, run_router

    try:
        cfg = load_router_config(config)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    if control and not token:
        fail("--control needs --token (or VERGE_TOKEN)")
    if control:
        control = ",".join(control_urls([control]))  # checked here: a clear error, exit 2
    if not control and not cfg.edges:
        fail(f"{config}: no edges listed and no --control to take them from")
    dns_host, dns_port = split_hostport(dns, "--dns")
    http_host, http_port = split_hostport(http, "--http") if http else (None, 0)
    options = RouterOptions(dns_host, dns_port, http_host, http_port, control, token)
    try:
        uvloop.run(run_router(cfg, options))
    except ValueError as exc:  # e.g. a GeoIP database that cannot be opened
        fail(f"{config}: {exc}")
    except OSError as exc:
        fail(f"cannot listen: {exc}")
