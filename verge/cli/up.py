"""``verge up``: the whole platform locally (control plane, edges, router, stream server, a
sample origin); the logic is verge.up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from verge.cli.common import fail


def up(
    state_dir: Annotated[
        Path, typer.Option(help="Where state lives; up.json is written here when ready.")
    ] = Path(".verge-up"),
    control_port: Annotated[int, typer.Option(help="Control plane port on 127.0.0.1.")] = 7000,
    edge_port: Annotated[
        int, typer.Option(help="Port every edge listens on (127.0.0.2, .3, ...); admin on port+1.")
    ] = 8080,
    https_port: Annotated[
        int, typer.Option(help="HTTPS port of every edge (dev CA certificates).")
    ] = 8443,
    origin_port: Annotated[int, typer.Option(help="Sample origin port on 127.0.0.1.")] = 9000,
    edges: Annotated[int, typer.Option(help="How many edges.")] = 2,
    dns_port: Annotated[
        int, typer.Option(help="Router's DNS port (UDP and TCP) on 127.0.0.1.")
    ] = 5353,
    router_port: Annotated[
        int, typer.Option(help="Router's HTTP redirect port on 127.0.0.1.")
    ] = 8053,
    rtmp_port: Annotated[int, typer.Option(help="Stream server's RTMP port on 127.0.0.1.")] = 1935,
    stream_port: Annotated[
        int,
        typer.Option(help="Stream server's HTTP port on 127.0.0.1 (the edges' origin for /live/)."),
    ] = 8090,
    geoip: Annotated[
        Path | None,
        typer.Option(
            help="GeoIP database (MaxMind format) for the router and the edges (deny.countries)."
        ),
    ] = None,
) -> None:
    """The whole platform locally: control plane, edges, a sample origin; prints URLs and an admin token."""
    from verge.up import UpOptions, run_up

    if not 1 <= edges <= 50:
        fail("--edges must be between 1 and 50")
    run_up(
        UpOptions(
            state_dir=state_dir,
            control_port=control_port,
            edge_port=edge_port,
            origin_port=origin_port,
            edges=edges,
            https_port=https_port,
            dns_port=dns_port,
            router_port=router_port,
            rtmp_port=rtmp_port,
            stream_port=stream_port,
            geoip=geoip,
        )
    )
