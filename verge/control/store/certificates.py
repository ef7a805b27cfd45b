"""TLS certificates in the control-plane store, and the bundle's ``tls`` section.

A certificate's key is sealed at rest (verge.control.certificates.KeySealer) and opened only
to build the bundle for nodes; the API never shows it. Which host names edges pick each
certificate for by SNI (``tls_plan``) is settled per bundle from the services' host claims:
a tenant's certificate only for its own services' hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from verge.control.auth import Principal
from verge.control.certificates import (
    CertificateError,
    KeySealer,
    SecretUnavailable,
    expiry_warning,
    parse_certificate,
    sealer_for,
    sni_assignment,
    tenant_certificate_names,
)
from verge.control.hostnames import HostIndex, Zone, san_touches_zones, zone_owner
from verge.control.models import CONFIG_VERSION, Tenant, TlsCertificate, utcnow
from verge.control.store.base import (
    DEFAULT_TENANT,
    Conflict,
    Forbidden,
    Invalid,
    StoreError,
    Unavailable,
    Unprocessable,
    iso,
    log,
    scoped,
)
from verge.control.store.tenants import Tenants


class Certificates(Tenants):
    """Certificates (create, rotate, delete) and what edges get of them."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._sealer: KeySealer | None = None

    def create_certificate(
        self,
        principal: Principal,
        name: str,
        cert_pem: str,
        key_pem: str,
        tenant: str | None = None,
    ) -> dict:
        """Store a checked certificate + sealed key; edges get it with the next bundle."""
        parsed = _parse_certificate(cert_pem, key_pem)
        sealed = self._key_sealer().seal(parsed.key_pem)
        with self.writing() as session:
            owner = self.tenant_for_service(session, principal, tenant)
            if session.scalar(select(TlsCertificate.id).where(TlsCertificate.name == name)):
                raise Conflict(f"a certificate named {name!r} already exists", "name")
            self._check_cert_hosts(session, principal, parsed.hosts, owner)
            now = utcnow()
            row = TlsCertificate(
                **_cert_columns(parsed, sealed),
                name=name,
                tenant=owner,
                version=1,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            self._cert_changed(session, principal, "certificate.create", row)
            view = _certificate_view(row, self.tls_plan(session).get(row.name, []))
        self.emit("config")
        return view

    def list_certificates(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(TlsCertificate).order_by(TlsCertificate.name)
        with self.reading() as session:
            plan = self.tls_plan(session)
            return self.paged(
                session,
                scoped(query, principal, TlsCertificate.tenant_id),
                limit,
                offset,
                lambda row: _certificate_view(row, plan.get(row.name, [])),
            )

    def get_certificate(self, principal: Principal, name: str) -> dict:
        with self.reading() as session:
            row = self._visible_certificate(session, principal, name)
            return _certificate_view(row, self.tls_plan(session).get(row.name, []))

    def update_certificate(
        self, principal: Principal, name: str, cert_pem: str, key_pem: str
    ) -> dict:
        """Rotate: a new chain and key under the same name (hosts follow the new SAN)."""
        parsed = _parse_certificate(cert_pem, key_pem)
        sealed = self._key_sealer().seal(parsed.key_pem)
        with self.writing() as session:
            row = self._visible_certificate(session, principal, name, lock=True)
            self._check_cert_hosts(session, principal, parsed.hosts, row.tenant)
            for column, value in _cert_columns(parsed, sealed).items():
                setattr(row, column, value)
            row.version += 1
            row.updated_at = utcnow()
            session.flush()
            self._cert_changed(session, principal, "certificate.update", row)
            view = _certificate_view(row, self.tls_plan(session).get(row.name, []))
        self.emit("config")
        return view

    def delete_certificate(self, principal: Principal, name: str) -> None:
        with self.writing() as session:
            row = self._visible_certificate(session, principal, name, lock=True)
            session.delete(row)
            session.flush()
            config_version = self.bump(session, CONFIG_VERSION)
            self.audit(
                session,
                principal,
                "certificate.delete",
                f"certificate:{name}",
                row.tenant_id,
                {"config_version": config_version},
            )
        self.emit("config")

    def _key_sealer(self) -> KeySealer:
        if self._sealer is None:
            try:
                self._sealer = sealer_for(self.url)
            except SecretUnavailable as exc:
                raise Unavailable(str(exc)) from None
        return self._sealer

    def _visible_certificate(
        self, session: Session, principal: Principal, name: str, lock: bool = False
    ) -> TlsCertificate:
        return self.visible_named(session, principal, TlsCertificate, name, "certificate", lock)

    def _check_cert_hosts(
        self, session: Session, principal: Principal, hosts: list[str], owner: Tenant
    ) -> None:
        """Whether ``owner`` may have a certificate for ``hosts`` (its SAN names).

        A tenant's certificate must name a host inside the tenant's zones or of its services
        (else it would never be served: 403 for its token, 422 for an admin), and a tenant's
        token may not name another tenant's host or a name inside another tenant's zone
        (403). The fleet's own certificates (admin, tenant ``default``) name what they like;
        which names edges get is settled per bundle (_tls_plan).
        """
        if principal.role == "admin" and owner.name == DEFAULT_TENANT:
            return
        index = HostIndex.of(self.claims(session))
        zones = self.all_zones(session)
        if principal.role != "admin":
            for san in hosts:
                _check_san_is_not_foreign(san, owner.id, index, zones)
        own_zones = [zone.zone for zone in zones if zone.tenant_id == owner.id]
        for san in hosts:
            claim = index.san_owner(san)
            if san_touches_zones(san, own_zones) or (claim and claim.tenant_id == owner.id):
                return
        inside = f"the zones of tenant {owner.name!r} ({', '.join(own_zones) or 'none'})"
        message = (
            f"the certificate names no host inside {inside} nor of its services "
            f"({', '.join(hosts)}): it would never be served"
        )
        if principal.role == "admin":
            raise Unprocessable(message, "cert_pem")
        raise Forbidden(message, "cert_pem")

    def _cert_changed(
        self, session: Session, principal: Principal, action: str, row: TlsCertificate
    ) -> None:
        config_version = self.bump(session, CONFIG_VERSION)
        detail = {
            "version": row.version,
            "config_version": config_version,
            "hosts": list(row.hosts),
            "fingerprint_sha256": row.fingerprint_sha256,
            "not_after": iso(row.not_after),
        }
        self.audit(session, principal, action, f"certificate:{row.name}", row.tenant_id, detail)

    def tls_section(self, session: Session) -> dict:
        """The bundle's ``tls``: certificates with their keys opened (node credentials only).

        A key this replica cannot open (no VERGE_SECRET, or not the one that sealed it) makes
        the whole bundle Unavailable: an edge keeps its last good bundle rather than lose a
        certificate.
        """
        rows = session.scalars(select(TlsCertificate).order_by(TlsCertificate.name)).all()
        if not rows:
            return {}
        assigned = self.tls_plan(session, rows)
        entries = []
        for row in rows:
            if row.name not in assigned:
                continue
            try:
                key_pem = self._key_sealer().open(row.key_sealed)
            except (ValueError, StoreError) as exc:
                reason = exc.message if isinstance(exc, StoreError) else str(exc)
                log.error(
                    "config bundle %s withheld: certificate %r: %s",
                    self.counter(session, CONFIG_VERSION),
                    row.name,
                    reason,
                )
                raise Unavailable(
                    f"this control-plane replica cannot build the config bundle: the key of "
                    f"certificate {row.name!r} cannot be opened ({reason})"
                ) from None
            entries.append(
                {
                    "name": row.name,
                    "cert_pem": row.cert_pem,
                    "key_pem": key_pem,
                    "hosts": assigned[row.name],
                }
            )
        return {"certificates": entries}

    def tls_plan(
        self, session: Session, rows: Sequence[TlsCertificate] | None = None
    ) -> dict[str, list[str]]:
        """Certificate name -> the host names edges pick it for by SNI.

        A tenant's certificate only for names its own services serve (its SANs cut down by
        certificates.tenant_certificate_names); the fleet's (tenant ``default``) for all its
        SANs. Where several remain for one name, the certificate of the tenant serving it
        wins (sni_assignment).
        """
        if rows is None:
            rows = session.scalars(select(TlsCertificate).order_by(TlsCertificate.name)).all()
        index = HostIndex.of(self.claims(session))
        certs = []
        for row in rows:
            hosts = list(row.hosts)
            if row.tenant.name != DEFAULT_TENANT:
                hosts = tenant_certificate_names(hosts, row.tenant_id, index)
            certs.append((row.name, row.tenant_id, hosts))
        return sni_assignment(certs, index)


# ---------------------------------------------------------------------------------------------
# Views and checks
# ---------------------------------------------------------------------------------------------


def _check_san_is_not_foreign(
    san: str, tenant_id: int, index: HostIndex, zones: Sequence[Zone]
) -> None:
    """A tenant token's certificate may not name another tenant's host or zone (403)."""
    claim = index.san_owner(san)
    if claim is not None and claim.tenant_id != tenant_id:
        raise Forbidden(f"host {san!r} belongs to another tenant's service", "cert_pem")
    inside = zone_owner(san.removeprefix("*."), zones)
    if inside is not None and inside.tenant_id != tenant_id:
        raise Forbidden(f"host {san!r} is inside another tenant's zone", "cert_pem")


def _certificate_view(row: TlsCertificate, serving: list[str]) -> dict:
    """What the API shows of a certificate: never the key, not even sealed.

    ``hosts`` are its SAN names; ``serving`` the names edges pick it for by SNI (a tenant's
    certificate only for its own services' hosts).
    """
    view = {
        "name": row.name,
        "tenant": row.tenant.name,
        "hosts": list(row.hosts),
        "serving": serving,
        "not_after": iso(row.not_after),
        "fingerprint_sha256": row.fingerprint_sha256,
        "version": row.version,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }
    warning = expiry_warning(row.not_after)
    if warning:
        view["warning"] = warning
    return view


def _parse_certificate(cert_pem: str, key_pem: str):
    try:
        return parse_certificate(cert_pem, key_pem)
    except CertificateError as exc:
        raise Invalid(exc.message, exc.field) from None


def _cert_columns(parsed: Any, sealed: str) -> dict:
    return {
        "cert_pem": parsed.cert_pem,
        "key_sealed": sealed,
        "hosts": parsed.hosts,
        "not_after": parsed.not_after,
        "fingerprint_sha256": parsed.fingerprint_sha256,
    }
