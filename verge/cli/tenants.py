"""``verge tenant ...``: tenants (the owners of services and tokens) and the DNS zones their
services may claim hosts in; only admins create tenants and delegate zones."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from verge.cli.common import (
    DEFAULT_CONTROL,
    AsJson,
    ControlUrl,
    Token,
    call,
    every,
    list_all,
    print_json,
    report,
    table,
    warn,
)

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
def tenant_add(
    name: TenantName,
    zone: Annotated[
        list[str] | None,
        typer.Option(
            "--zone",
            help="DNS zone delegated to the tenant, e.g. example.com (repeat): its tokens may "
            "create services for that name, names below it and *.NAME wildcards inside it.",
        ),
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Create a tenant, with the zones its services may claim hosts in."""
    tenant = call(control, token, lambda client: client.create_tenant(name, zone or []))
    report(
        as_json,
        tenant,
        f"tenant {tenant.get('name', name)} created (id {tenant.get('id', '-')}); zones: "
        f"{', '.join(tenant.get('zones') or []) or 'none (its tokens can claim no host yet)'}",
    )


@tenant_app.command("show")
def tenant_show(
    name: TenantName,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Show a tenant and its zones."""
    tenant = call(control, token, lambda client: client.get_tenant(name))
    report(as_json, tenant, _tenant_line(tenant))


def _report_zones(as_json: bool, tenant: dict) -> None:
    """A tenant after a zone change, and the hosts now in conflict with its zones."""
    report(as_json, tenant, _tenant_line(tenant))
    if not as_json:
        _warn_conflicts(tenant.get("conflicts") or [])


@zone_app.command("add")
def zone_add(
    tenant: TenantName,
    zones: Annotated[list[str], typer.Argument(metavar="ZONE...", help="DNS zones to delegate.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delegate zones to a tenant (refused when one nests in another tenant's zone)."""
    _report_zones(as_json, call(control, token, lambda client: client.add_zones(tenant, zones)))


@zone_app.command("rm")
def zone_rm(
    tenant: TenantName,
    zone: Annotated[str, typer.Argument(help="The zone to take back.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Take a zone back: the tenant can claim no new host there (its services keep theirs)."""
    _report_zones(as_json, call(control, token, lambda client: client.remove_zone(tenant, zone)))


@zone_app.command("list")
def zone_list(
    tenant: Annotated[
        str | None, typer.Argument(help="Tenant name (default: every tenant's zones).")
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List zones and the tenant each is delegated to."""
    tenants = call(
        control,
        token,
        lambda client: [client.get_tenant(tenant)] if tenant else every(client.list_tenants),
    )
    rows = [{"zone": z, "tenant": t["name"]} for t in tenants for z in t.get("zones") or []]
    if as_json:
        print_json(rows)
    else:
        table(
            "Zones", sorted(rows, key=lambda r: r["zone"]), [("zone", "ZONE"), ("tenant", "TENANT")]
        )


@tenant_app.command("list")
def tenant_list(
    control: ControlUrl = DEFAULT_CONTROL, token: Token = None, as_json: AsJson = False
) -> None:
    """List tenants."""
    list_all(control, token, as_json, lambda client: client.list_tenants, "Tenants", TENANT_COLUMNS)
