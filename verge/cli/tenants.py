"""``verge tenant ...``: tenants (the owners of services and tokens) and the DNS zones their
services may claim hosts in; only admins create tenants and delegate zones."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from verge.cli.common import Api, every, table, warn, with_api

tenant_app = typer.Typer(
    help="Tenants: the owners of services and tokens, and the DNS zones their services may "
    "claim hosts in (only admins create tenants and delegate zones).",
    no_args_is_help=True,
)
zone_app = typer.Typer(
    help="A tenant's zones: its tokens may create services only for hosts inside them.",
    no_args_is_help=True,
)
tenant_app.add_typer(zone_app, name="zone")

TENANT_COLUMNS = [("id", "ID"), ("name", "NAME"), ("zones", "ZONES"), ("created_at", "CREATED")]
TenantName = Annotated[str, typer.Argument(help="Tenant name.")]


def _tenant_line(tenant: dict[str, Any]) -> str:
    zones = ", ".join(tenant.get("zones") or []) or "no zones yet"
    return f"tenant {tenant.get('name', '-')}: {zones}"


def _warn_conflicts(conflicts: list[str]) -> None:
    """Hosts a zone change leaves in conflict (they keep working until an admin acts)."""
    for conflict in conflicts:
        warn(f"warning: {conflict}")
    if conflicts:
        warn("see `verge hostnames --conflicts`; move or delete those services to resolve")


@tenant_app.command("add")
@with_api
def tenant_add(
    api: Api,
    name: TenantName,
    zone: Annotated[
        list[str] | None,
        typer.Option(
            "--zone",
            help="DNS zone delegated to the tenant, e.g. example.com (repeat): its tokens may "
            "create services for that name, names below it and *.NAME wildcards inside it.",
        ),
    ] = None,
) -> None:
    """Create a tenant, with the zones its services may claim hosts in."""
    tenant = api.call(lambda client: client.create_tenant(name, zone or []))
    api.report(
        tenant,
        f"tenant {tenant.get('name', name)} created (id {tenant.get('id', '-')}); zones: "
        f"{', '.join(tenant.get('zones') or []) or 'none (its tokens can claim no host yet)'}",
    )


@tenant_app.command("show")
@with_api
def tenant_show(api: Api, name: TenantName) -> None:
    """Show a tenant and its zones."""
    tenant = api.call(lambda client: client.get_tenant(name))
    api.report(tenant, _tenant_line(tenant))


def _report_zones(api: Api, tenant: dict) -> None:
    """A tenant after a zone change, and the hosts now in conflict with its zones."""
    api.report(tenant, _tenant_line(tenant))
    if not api.as_json:
        _warn_conflicts(tenant.get("conflicts") or [])


@zone_app.command("add")
@with_api
def zone_add(
    api: Api,
    tenant: TenantName,
    zones: Annotated[list[str], typer.Argument(metavar="ZONE...", help="DNS zones to delegate.")],
) -> None:
    """Delegate zones to a tenant (refused when one nests in another tenant's zone)."""
    _report_zones(api, api.call(lambda client: client.add_zones(tenant, zones)))


@zone_app.command("rm")
@with_api
def zone_rm(
    api: Api,
    tenant: TenantName,
    zone: Annotated[str, typer.Argument(help="The zone to take back.")],
) -> None:
    """Take a zone back: the tenant can claim no new host there (its services keep theirs)."""
    _report_zones(api, api.call(lambda client: client.remove_zone(tenant, zone)))


@zone_app.command("list")
@with_api
def zone_list(
    api: Api,
    tenant: Annotated[
        str | None, typer.Argument(help="Tenant name (default: every tenant's zones).")
    ] = None,
) -> None:
    """List zones and the tenant each is delegated to."""
    tenants = api.call(
        lambda client: [client.get_tenant(tenant)] if tenant else every(client.list_tenants)
    )
    rows = [{"zone": z, "tenant": t["name"]} for t in tenants for z in t.get("zones") or []]
    if not api.printed_json(rows):
        table(
            "Zones", sorted(rows, key=lambda r: r["zone"]), [("zone", "ZONE"), ("tenant", "TENANT")]
        )


@tenant_app.command("list")
@with_api
def tenant_list(api: Api) -> None:
    """List tenants."""
    api.list_all(lambda client: client.list_tenants, "Tenants", TENANT_COLUMNS)
