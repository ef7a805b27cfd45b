"""Who owns which DNS name: tenants' zones, services' hosts, and the hostnames report.

An admin delegates zones to a tenant; a tenant's services claim hosts inside them. Tenants
(zone changes), services (host changes), certificates (which names one may serve) and
purges (the hosts a service's purge may touch) all read the claims through this module,
whose rules are the pure functions of verge.control.hostnames. Claims of hosts and zones
take ``lock_names`` first, so that two PostgreSQL replicas never claim overlapping names.
"""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from verge.control.auth import Principal
from verge.control.hostnames import Claim, Zone, hostname_report
from verge.control.models import Service, ServiceHost, Tenant, TenantZone
from verge.control.store.base import DEFAULT_TENANT, StoreBase, page_of

_NAMES_LOCK = 0x766E616D  # "vnam": held while hosts or zones are claimed (PostgreSQL)


class NameClaims(StoreBase):
    """Zones and host claims, read inside another operation's transaction."""

    def zones_of(self, session: Session, tenant_id: int) -> list[str]:
        """A tenant's zones, sorted: where its tokens may claim hosts."""
        return list(
            session.scalars(
                select(TenantZone.zone)
                .where(TenantZone.tenant_id == tenant_id)
                .order_by(TenantZone.zone)
            ).all()
        )

    def all_zones(self, session: Session) -> list[Zone]:
        """Every tenant's zones, with their tenants (for checks across tenants)."""
        rows = session.execute(
            select(TenantZone.zone, TenantZone.tenant_id, Tenant.name).join(
                Tenant, Tenant.id == TenantZone.tenant_id
            )
        ).all()
        return [Zone(zone, tenant_id, tenant) for zone, tenant_id, tenant in rows]

    def claims(self, session: Session) -> list[Claim]:
        """Every service host with its service and tenant."""
        rows = session.execute(
            select(ServiceHost.host, Service.name, Service.tenant_id, Tenant.name)
            .join(Service, ServiceHost.service_id == Service.id)
            .join(Tenant, Tenant.id == Service.tenant_id)
        ).all()
        return [
            Claim(host, service, tenant_id, tenant) for host, service, tenant_id, tenant in rows
        ]

    def lock_names(self, session: Session) -> None:
        """Serialise claims of hosts and zones across PostgreSQL replicas (SQLite writers are
        serialised already): the overlap checks read all claims, which no unique key covers."""
        if self.is_postgres:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _NAMES_LOCK})

    # -- hostnames ------------------------------------------------------------------------------

    def hostnames(
        self, principal: Principal, limit: int = 50, offset: int = 0, conflicts_only: bool = False
    ) -> dict:
        """Every service host -> tenant, service, zone, the wildcards covering it, conflicts.

        Admins (and tenant-less readers) see every host and all ``conflicts``; a tenant's
        token sees its own hosts, the wildcards of its own services and the hosts of its own
        outside its zones.
        """
        with self.reading() as session:
            claims = self.claims(session)
            zones = self.all_zones(session)
            fleet = session.scalar(select(Tenant.id).where(Tenant.name == DEFAULT_TENANT))
        rows = hostname_report(claims, zones, fleet)
        if not principal.sees_all:
            rows = [_own_view(row) for row in rows if row["tenant_id"] == principal.tenant_id]
            zones = [zone for zone in zones if zone.tenant_id == principal.tenant_id]
        conflicts = [
            {"host": row["host"], "service": row["service"], "tenant": row["tenant"], **found}
            for row in rows
            for found in row["conflicts"]
        ]
        if conflicts_only:
            rows = [row for row in rows if row["conflicts"]]
        items = [_hostname_view(row) for row in rows[offset : offset + limit]]
        page = page_of(items, len(rows), limit, offset)
        page["conflicts"] = conflicts
        page["zones"] = [
            {"zone": z.zone, "tenant": z.tenant} for z in sorted(zones, key=lambda z: z.zone)
        ]
        return page


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


def _own_view(row: dict) -> dict:
    """A hostname row as its tenant may see it: nothing about other tenants."""
    tenant_id = row["tenant_id"]
    return {
        **row,
        "covered_by": [w for w in row["covered_by"] if w["tenant_id"] == tenant_id],
        "conflicts": [c for c in row["conflicts"] if c["kind"] == "outside_zones"],
    }


def _hostname_view(row: dict) -> dict:
    covered = [{k: v for k, v in w.items() if k != "tenant_id"} for w in row["covered_by"]]
    view = {k: v for k, v in row.items() if k != "tenant_id"}
    return {**view, "covered_by": covered}
