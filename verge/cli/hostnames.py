"""``verge hostnames``: who owns which hostname, and the conflicts between tenants' hosts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from verge.cli.common import Api, table, with_api

if TYPE_CHECKING:
    from verge.control.client import ControlClient

HOSTNAME_COLUMNS = [
    ("host", "HOST"),
    ("tenant", "TENANT"),
    ("service", "SERVICE"),
    ("zone", "ZONE"),
    ("covered", "COVERED BY"),
    ("problems", "CONFLICTS"),
]


def _all_hostnames(client: ControlClient, conflicts_only: bool) -> dict[str, Any]:
    """Every page of GET /hostnames: {"items", "conflicts", "zones"}."""
    first = client.hostnames(limit=1000, offset=0, conflicts_only=conflicts_only)
    items = list(first.get("items", []))
    while len(items) < first.get("total", 0):
        page = client.hostnames(limit=1000, offset=len(items), conflicts_only=conflicts_only)
        if not page.get("items"):
            break
        items.extend(page["items"])
    return {**first, "items": items}


def _hostname_row(item: dict[str, Any]) -> dict[str, Any]:
    covered = [f"{w['host']} ({w['service']}, {w['tenant']})" for w in item.get("covered_by", [])]
    kinds = [c.get("kind", "") for c in item.get("conflicts", [])]
    return {**item, "covered": covered, "problems": kinds}


@with_api
def hostnames(
    api: Api,
    conflicts: Annotated[
        bool, typer.Option("--conflicts", help="Only hosts with a conflict.")
    ] = False,
) -> None:
    """Who owns which hostname: every service host with its tenant, service, zone, the
    wildcards covering it, and conflicts (hosts outside their tenant's zones, inside another
    tenant's zone, or under another tenant's wildcard). Resolve a conflict by moving or
    deleting the service (`verge service edit|rm`) or with `verge tenant zone add|rm`."""
    report = api.call(lambda client: _all_hostnames(client, conflicts))
    if api.printed_json(report):
        return
    table("Hostnames", [_hostname_row(item) for item in report["items"]], HOSTNAME_COLUMNS)
    found = report.get("conflicts") or []
    for conflict in found:
        typer.echo(f"conflict ({conflict.get('kind')}): {conflict.get('message')}")
    if not found:
        typer.echo("no conflicts")
