"""``verge origin ...``: a service's origins (the servers edges fetch from)."""

from __future__ import annotations

from typing import Annotated

import typer

from verge.cli.common import Api, ServiceName, with_api

origin_app = typer.Typer(
    help="A service's origins (the servers edges fetch from).", no_args_is_help=True
)
ORIGIN_COLUMNS = [("url", "URL"), ("weight", "WEIGHT"), ("host_header", "HOST HEADER")]


@origin_app.command("add")
@with_api
def origin_add(
    api: Api,
    service: ServiceName,
    url: Annotated[str, typer.Argument(help="Origin URL, e.g. http://10.0.0.6:8080.")],
    weight: Annotated[int, typer.Option(min=1, help="Share of requests relative to others.")] = 1,
) -> None:
    """Add an origin to a service."""
    result = api.call(lambda client: client.add_origin(service, url, weight))
    api.report(result, f"origin {url} (weight {weight}) added to service {service}")


@origin_app.command("rm")
@with_api
def origin_rm(
    api: Api,
    service: ServiceName,
    url: Annotated[str, typer.Argument(help="Origin URL exactly as listed.")],
) -> None:
    """Remove an origin from a service (a service keeps at least one)."""
    result = api.call(lambda client: client.remove_origin(service, url))
    api.report(result, f"origin {url} removed from service {service}")


@origin_app.command("list")
@with_api
def origin_list(api: Api, service: ServiceName) -> None:
    """List a service's origins."""
    data = api.call(lambda client: client.get_service(service).data)
    origins = [o if isinstance(o, dict) else {"url": o} for o in data.get("origins", [])]
    api.listing(origins, f"Origins of {service}", ORIGIN_COLUMNS)
