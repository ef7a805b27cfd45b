"""Services (a name, hosts, origins and rules) in the control-plane store.

Each change writes the whole validated spec with a new service version (``If-Match``
preconditions compare it), re-claims the hosts (zones, wildcards across tenants, one host per
service: verge.control.hostnames) and bumps the config version, in one transaction with its
audit entry. ``visible_service`` is how the other aggregates (purges, functions, protection)
find a service the caller may see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from verge import config as vconfig
from verge.control.auth import Principal
from verge.control.hostnames import Claim, covers, wildcard_clashes, zone_for_host
from verge.control.models import CONFIG_VERSION, Service, ServiceHost, Tenant, utcnow
from verge.control.store.base import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    PreconditionFailed,
    validation_error,
)
from verge.control.store.tenants import Tenants


class Services(Tenants):
    """Create, read, change and delete services and their origins."""

    def create_service(
        self, principal: Principal, spec: vconfig.Service, tenant: str | None = None
    ) -> dict:
        _check_spec_rights(principal, spec)
        with self.writing() as session:
            owner = self.tenant_for_service(session, principal, tenant)
            if session.scalar(select(Service.id).where(Service.name == spec.name)) is not None:
                raise Conflict(f"a service named {spec.name!r} already exists", "name")
            self._check_hosts(session, principal, spec, None, owner)
            self._check_default(session, spec, None)
            now = utcnow()
            row = Service(
                name=spec.name,
                tenant=owner,
                spec=spec.model_dump(mode="json"),
                version=1,
                is_default=spec.default,
                created_at=now,
                updated_at=now,
                hosts=[ServiceHost(host=host) for host in spec.hosts],
            )
            session.add(row)
            session.flush()
            config_version = self.bump(session, CONFIG_VERSION)
            self.audit(
                session,
                principal,
                "service.create",
                f"service:{spec.name}",
                owner.id,
                {"version": 1, "config_version": config_version, "hosts": spec.hosts},
            )
            view = _service_view(row)
        self.emit("config")
        return view

    def list_services(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(Service).order_by(Service.name)
        return self.list_scoped(principal, query, Service.tenant_id, limit, offset, _service_view)

    def get_service(self, principal: Principal, name: str) -> dict:
        with self.reading() as session:
            return _service_view(self.visible_service(session, principal, name))

    def update_service(
        self,
        principal: Principal,
        name: str,
        spec: vconfig.Service,
        expected_version: int | None,
        tenant: str | None = None,
    ) -> dict:
        """Replace a service's spec; ``expected_version`` (from If-Match) None means any."""
        if spec.name != name:
            raise Invalid(
                f"the body names service {spec.name!r} but the URL {name!r}; "
                "services cannot be renamed",
                "name",
            )
        _check_spec_rights(principal, spec)
        with self.writing() as session:
            row = self.visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            owner = row.tenant
            if tenant is not None and tenant != owner.name:
                owner = self.tenant_for_service(session, principal, tenant)
            view = self._replace_spec(session, principal, row, spec, owner, "service.update")
        self.emit("config")
        return view

    def delete_service(
        self, principal: Principal, name: str, expected_version: int | None = None
    ) -> None:
        with self.writing() as session:
            row = self.visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            tenant_id = row.tenant_id
            session.delete(row)
            session.flush()
            config_version = self.bump(session, CONFIG_VERSION)
            self.audit(
                session,
                principal,
                "service.delete",
                f"service:{name}",
                tenant_id,
                {"config_version": config_version},
            )
        self.emit("config")

    def add_origin(
        self, principal: Principal, name: str, origin: dict, expected_version: int | None = None
    ) -> dict:
        with self.writing() as session:
            row = self.visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            new = _validate_origin(origin)
            if any(_same_origin(existing["url"], new["url"]) for existing in row.spec["origins"]):
                raise Conflict(f"origin {new['url']} is already in service {name!r}", "url")
            spec = _revalidate(row.spec, origins=[*row.spec["origins"], new])
            view = self._replace_spec(
                session, principal, row, spec, row.tenant, "origin.add", {"url": new["url"]}
            )
        self.emit("config")
        return view

    def remove_origin(
        self, principal: Principal, name: str, url: str, expected_version: int | None = None
    ) -> dict:
        with self.writing() as session:
            row = self.visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            kept = [o for o in row.spec["origins"] if not _same_origin(o["url"], url)]
            if len(kept) == len(row.spec["origins"]):
                raise NotFound(f"service {name!r} has no origin {url}", "url")
            if not kept:
                raise Conflict(f"{url} is the only origin of {name!r}; a service needs one", "url")
            spec = _revalidate(row.spec, origins=kept)
            view = self._replace_spec(
                session, principal, row, spec, row.tenant, "origin.remove", {"url": url}
            )
        self.emit("config")
        return view

    def visible_service(
        self, session: Session, principal: Principal, name: str, lock: bool = False
    ) -> Service:
        """The service ``name`` if the caller may see it (``lock``: FOR UPDATE), else
        NotFound: how purges, functions and protection find the service a request names."""
        return self.visible_named(session, principal, Service, name, "service", lock)

    def _replace_spec(
        self,
        session: Session,
        principal: Principal,
        row: Service,
        spec: vconfig.Service,
        owner: Tenant,
        action: str,
        detail: dict | None = None,
    ) -> dict:
        """Write a new spec (hosts, version, config version, audit) to a locked service row."""
        self._check_hosts(session, principal, spec, row, owner)
        self._check_default(session, spec, row.id)
        wanted = set(spec.hosts)
        for host_row in list(row.hosts):
            if host_row.host not in wanted:
                row.hosts.remove(host_row)
        have = {host_row.host for host_row in row.hosts}
        session.flush()  # removed hosts go before new ones may take them over
        row.hosts.extend(ServiceHost(host=host) for host in spec.hosts if host not in have)
        previous_tenant = row.tenant_id
        row.tenant = owner
        row.spec = spec.model_dump(mode="json")
        row.is_default = spec.default
        row.version += 1
        row.updated_at = utcnow()
        session.flush()
        config_version = self.bump(session, CONFIG_VERSION)
        detail = {**(detail or {}), "version": row.version, "config_version": config_version}
        if previous_tenant != owner.id:
            detail["moved_from_tenant_id"] = previous_tenant
        self.audit(session, principal, action, f"service:{row.name}", owner.id, detail)
        return _service_view(row)

    def _check_hosts(
        self,
        session: Session,
        principal: Principal,
        spec: vconfig.Service,
        row: Service | None,
        owner: Tenant,
    ) -> None:
        """May ``owner`` have ``spec.hosts``? (hostnames.py has the rules.)

        Hosts the service already has in the same tenant are not claimed again (they may
        predate zones; GET /hostnames lists them): only new ones must be inside the tenant's
        zones (tenant tokens) and must not cover, or be covered by, another tenant's
        wildcard (anyone). A host of another service is a 409 for everyone.
        """
        self.lock_names(session)
        kept = (
            {h.host for h in row.hosts} if row is not None and row.tenant_id == owner.id else set()
        )
        new = [(index, host) for index, host in enumerate(spec.hosts) if host not in kept]
        if principal.role != "admin":
            zones = self.zones_of(session, owner.id)
            for index, host in new:
                if zone_for_host(host, zones) is None:
                    raise Forbidden(_outside_zones(host, zones), f"hosts[{index}]")
        others = [c for c in self.claims(session) if row is None or c.service != row.name]
        taken = {claim.host: claim for claim in others}
        for index, host in enumerate(spec.hosts):
            if host in taken:
                where = self._service_named_for(principal, taken[host])
                raise Conflict(f"host {host!r} already belongs to {where}", f"hosts[{index}]")
        for index, host in new:
            clashes = wildcard_clashes(host, owner.id, others)
            if clashes:
                other = clashes[0]
                where = self._service_named_for(principal, other)
                relation = "covers" if covers(host, other.host) else "is covered by"
                raise Conflict(
                    f"host {host!r} {relation} {other.host!r} of {where}: a wildcard cannot "
                    "span hosts of two tenants",
                    f"hosts[{index}]",
                )

    def _service_named_for(self, principal: Principal, claim: Claim) -> str:
        """How an error names another service: by name if the caller may see it."""
        if principal.can_see_tenant(claim.tenant_id):
            return f"service {claim.service!r} (tenant {claim.tenant!r})"
        return "another tenant's service"

    def _check_default(self, session: Session, spec: vconfig.Service, own_id: int | None) -> None:
        if not spec.default:
            return
        query = select(Service.name).where(Service.is_default.is_(True))
        if own_id is not None:
            query = query.where(Service.id != own_id)
        other = session.scalar(query)
        if other is not None:
            raise Conflict(f"service {other!r} is already the default service", "default")


# ---------------------------------------------------------------------------------------------
# Views and checks
# ---------------------------------------------------------------------------------------------


def _outside_zones(host: str, zones: Sequence[str]) -> str:
    if host == "*":
        return "only an admin can serve every host ('*')"
    if not zones:
        return (
            f"host {host!r} is outside your tenant's zones: it has none yet; an admin "
            "delegates them (verge tenant zone add TENANT ZONE)"
        )
    wildcard = " (a wildcard *.NAME needs NAME inside a zone)" if host.startswith("*.") else ""
    return (
        f"host {host!r} is outside your tenant's zones ({', '.join(zones)}){wildcard}; "
        "an admin delegates zones (verge tenant zone add TENANT ZONE)"
    )


def _service_view(row: Service) -> dict:
    return {**row.spec, "tenant": row.tenant.name, "version": row.version}


def _check_version(row: Service, expected: int | None) -> None:
    if expected is not None and row.version != expected:
        raise PreconditionFailed(
            f"service {row.name!r} is at version {row.version}, not {expected}: someone changed "
            "it; fetch it again"
        )


def _check_spec_rights(principal: Principal, spec: vconfig.Service) -> None:
    """Tenant tokens may not take traffic meant for everyone (default service, host "*")."""
    if principal.role == "admin":
        return
    if spec.default:
        raise Forbidden("only an admin can make a service the default", "default")
    if "*" in spec.hosts:
        raise Forbidden(
            "only an admin can serve every host ('*')", f"hosts[{spec.hosts.index('*')}]"
        )


def _validate_origin(origin: dict) -> dict:
    try:
        return vconfig.OriginSpec.model_validate(origin).model_dump(mode="json")
    except ValidationError as exc:
        raise validation_error(exc) from None


def _same_origin(a: str, b: str) -> bool:
    """Whether two origin URLs name the same server (http://h and http://h:80 do)."""

    def identity(url: str) -> tuple | str:
        try:
            origin = vconfig.OriginSpec.model_validate(url)
        except ValidationError:
            return url
        return origin.scheme, origin.host, origin.port

    return identity(a) == identity(b)


def _revalidate(spec: dict, **changes: Any) -> vconfig.Service:
    try:
        return vconfig.Service.model_validate({**spec, **changes})
    except ValidationError as exc:
        raise validation_error(exc) from None
