"""``verge origin ...``: a service's origins (the servers edges fetch from)."""

from __future__ import annotations

from typing import Annotated

import typer

from verge.cli.common import (
    DEFAULT_CONTROL,
    AsJson,
    ControlUrl,
    ServiceName,
    Token,
    call,
    listing,
    report,
)

origin_app = typer.Typer(
    help="A service's origins (the servers edges fetch from).", no_args_is_help=True
)
ORIGIN_COLUMNS = [("url", "URL"), ("weight", "WEIGHT"), ("host_header", "HOST HEADER")]


@origin_app.command("add")
def origin_add(
    service: ServiceName,
    url: Annotated[str, typer.Argument(help="Origin URL, e.g. http://10.0.0.6:8080.")],
    weight: Annotated[int, typer.Option(min=1, help="Share of requests relative to others.")] = 1,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Add an origin to a service."""
    result = call(control, token, lambda client: client.add_origin(service, url, weight))
    report(as_json, result, f"origin {url} (weight {weight}) added to service {service}")


@origin_app.command("rm")
def origin_rm(
    service: ServiceName,
    url: Annotated[str, typer.Argument(help="Origin URL exactly as listed.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Remove an origin from a service (a service keeps at least one)."""
    result = call(control, token, lambda client: client.remove_origin(service, url))
    report(as_json, result, f"origin {url} removed from service {service}")


@origin_app.command("list")
def origin_list(
    service: ServiceName,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List a service's origins."""
    data = call(control, token, lambda client: client.get_service(service).data)
    origins = [o if isinstance(o, dict) else {"url": o} for o in data.get("origins", [])]
    listing(as_json, origins, f"Origins of {service}", ORIGIN_COLUMNS)
