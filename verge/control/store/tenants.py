"""Tenants and their zones in the control-plane store.

A tenant owns services, certificates, functions and KV namespaces; its tokens see only what it
owns. An admin delegates zones (DNS names) to it, inside which its services may claim hosts;
zones of two tenants never nest. ``tenant_for_service`` is where every aggregate learns which
tenant a new object belongs to (the caller's own, or any for an admin, ``default`` when an
admin names none).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from verge.control.auth import Principal
from verge.control.hostnames import (
    ZoneError,
    normalize_zone,
    zone_for_host,
    zones_overlap,
)
from verge.control.models import Tenant, TenantZone, utcnow
from verge.control.store.base import (
    DEFAULT_TENANT,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    iso,
    scoped,
)
from verge.control.store.names import NameClaims


class Tenants(NameClaims):
    """Tenants, their zones, and which tenant a new object goes to."""

    def create_tenant(self, principal: Principal, name: str, zones: Sequence[str] = ()) -> dict:
        """A new tenant, with the zones (DNS names) its services may claim hosts in."""
        wanted = _normalized_zones(zones)
        with self.writing() as session:
            if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
                raise Conflict(f"a tenant named {name!r} already exists", "name")
            tenant = Tenant(name=name, created_at=utcnow())
            session.add(tenant)
            session.flush()
            self.lock_names(session)
            self._insert_zones(session, tenant, wanted)
            self.audit(
                session, principal, "tenant.create", f"tenant:{name}", tenant.id, {"zones": wanted}
            )
            return _tenant_view(tenant, wanted)

    def list_tenants(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = scoped(select(Tenant).order_by(Tenant.name), principal, Tenant.id)
        with self.reading() as session:
            page = self.paged(session, query, limit, offset, lambda tenant: tenant)
            zones = self._zones_by_tenant(session, [tenant.id for tenant in page["items"]])
        page["items"] = [_tenant_view(t, zones.get(t.id, [])) for t in page["items"]]
        return page

    def get_tenant(self, principal: Principal, name: str) -> dict:
        """A tenant and its zones (admins, or the tenant's own tokens)."""
        with self.reading() as session:
            tenant = self._visible_tenant(session, principal, name)
            return _tenant_view(tenant, self.zones_of(session, tenant.id))

    def add_zones(self, principal: Principal, name: str, zones: Sequence[str]) -> dict:
        """Delegate more zones to a tenant (admins). A zone inside or around another tenant's
        zone is refused (409 naming that tenant); one the tenant has already is kept.

        The answer's ``conflicts`` names other tenants' service hosts inside the new zones:
        they keep working until an admin moves or deletes them (see hostnames()).
        """
        wanted = _normalized_zones(zones)
        if not wanted:
            raise Invalid("give at least one zone", "zones")
        with self.writing() as session:
            tenant = self._visible_tenant(session, principal, name)
            self.lock_names(session)
            added = self._insert_zones(session, tenant, wanted)
            self.audit(
                session,
                principal,
                "tenant.zone.add",
                f"tenant:{name}",
                tenant.id,
                {"zones": added},
            )
            current = self.zones_of(session, tenant.id)
            foreign = [
                f"{c.host} (service {c.service}, tenant {c.tenant}) is inside zone "
                f"{zone_for_host(c.host, added)}"
                for c in self.claims(session)
                if c.tenant_id != tenant.id and zone_for_host(c.host, added) is not None
            ]
            return {**_tenant_view(tenant, current), "conflicts": foreign}

    def remove_zone(self, principal: Principal, name: str, zone: str) -> dict:
        """Take a zone back (admins). The tenant's services keep the hosts they have there
        (listed under ``conflicts`` as outside its zones); it cannot claim new ones."""
        try:
            zone = normalize_zone(zone)
        except ZoneError as exc:
            raise NotFound(str(exc), "zone") from None
        with self.writing() as session:
            tenant = self._visible_tenant(session, principal, name)
            row = session.get(TenantZone, zone)
            if row is None or row.tenant_id != tenant.id:
                raise NotFound(f"tenant {name!r} has no zone {zone!r}", "zone")
            session.delete(row)
            session.flush()
            self.audit(
                session,
                principal,
                "tenant.zone.remove",
                f"tenant:{name}",
                tenant.id,
                {"zones": [zone]},
            )
            current = self.zones_of(session, tenant.id)
            stranded = [
                f"{c.host} (service {c.service}) is outside every zone of tenant {name}"
                for c in self.claims(session)
                if c.tenant_id == tenant.id
                and c.host != "*"
                and zone_for_host(c.host, current) is None
                and zone_for_host(c.host, [zone])
            ]
            return {**_tenant_view(tenant, current), "conflicts": stranded}

    def _visible_tenant(self, session: Session, principal: Principal, name: str) -> Tenant:
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None or not principal.can_see_tenant(tenant.id):
            raise NotFound(f"no tenant named {name!r}")
        return tenant

    def _insert_zones(self, session: Session, tenant: Tenant, zones: list[str]) -> list[str]:
        """Add ``zones`` to ``tenant`` (those it has are skipped); the ones added.

        Call with the names lock held: the overlap check must see every committed zone.
        """
        existing = session.execute(
            select(TenantZone.zone, TenantZone.tenant_id, Tenant.name).join(
                Tenant, Tenant.id == TenantZone.tenant_id
            )
        ).all()
        added = []
        for index, zone in enumerate(zones):
            for other, owner_id, owner in existing:
                if owner_id != tenant.id and zones_overlap(zone, other):
                    relation = "is" if zone == other else "overlaps"
                    raise Conflict(
                        f"zone {zone!r} {relation} zone {other!r} of tenant {owner!r}; zones of "
                        "two tenants cannot nest",
                        f"zones[{index}]",
                    )
            if any(other == zone for other, _id, _name in existing):
                continue
            session.add(TenantZone(zone=zone, tenant_id=tenant.id, created_at=utcnow()))
            existing.append((zone, tenant.id, tenant.name))  # type: ignore[arg-type]
            added.append(zone)
        session.flush()
        return added

    def _zones_by_tenant(self, session: Session, tenant_ids: list[int]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        rows = session.execute(
            select(TenantZone.tenant_id, TenantZone.zone)
            .where(TenantZone.tenant_id.in_(tenant_ids))
            .order_by(TenantZone.zone)
        ).all()
        for tenant_id, zone in rows:
            found.setdefault(tenant_id, []).append(zone)
        return found

    def tenant_named(self, session: Session, name: str) -> Tenant:
        """The tenant a request names (400 on the ``tenant`` field if there is none)."""
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise Invalid(f"no tenant named {name!r}", "tenant")
        return tenant

    def tenant_for_service(
        self, session: Session, principal: Principal, tenant: str | None
    ) -> Tenant:
        """The tenant a service is written to: the caller's own, or any for an admin."""
        if principal.role != "admin":
            if tenant not in (None, principal.tenant):
                raise Forbidden("a tenant token can only use its own tenant", "tenant")
            return session.get_one(Tenant, principal.tenant_id)
        if tenant is not None:
            return self.tenant_named(session, tenant)
        found = session.scalar(select(Tenant).where(Tenant.name == DEFAULT_TENANT))
        if found is None:
            found = Tenant(name=DEFAULT_TENANT, created_at=utcnow())
            session.add(found)
            session.flush()
            self.audit(session, principal, "tenant.create", f"tenant:{DEFAULT_TENANT}", found.id)
        return found


# ---------------------------------------------------------------------------------------------
# Views and checks
# ---------------------------------------------------------------------------------------------


def _tenant_view(tenant: Tenant, zones: Sequence[str]) -> dict:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "zones": sorted(zones),
        "created_at": iso(tenant.created_at),
    }


def _normalized_zones(zones: Sequence[str]) -> list[str]:
    """Zones as stored, each checked (400 naming ``zones[i]``), duplicates dropped."""
    found = []
    for index, zone in enumerate(zones):
        try:
            found.append(normalize_zone(zone))
        except ZoneError as exc:
            raise Invalid(str(exc), f"zones[{index}]") from None
    return list(dict.fromkeys(found))
