"""Who may use which hostname: zones delegated to tenants, wildcard coverage, conflicts.

Before this, any tenant could create a service for any free hostname: `*.verge.test` or a
subdomain of another tenant's host. Then its certificates were served there and its tag
purges reached the other tenant's objects. The rules here are what the store enforces:

* An admin delegates **zones** (DNS names such as ``example.com``, at least two labels) to a
  tenant. Zones of two tenants never overlap (neither is inside the other).
* A tenant token may claim a service host only inside its own zones: the zone itself or a
  name below it; ``*.sub.zone`` only if ``sub.zone`` is inside a zone (so ``*.tld`` never).
  Admin tokens may claim any free host.
* A wildcard of one tenant must not cover a host of another tenant, and the other way round.
* A certificate of a tenant is usable only for names that tenant's services serve
  (:func:`usable_names`); its other SANs are never handed to the edges.

Two kinds of wildcard meet here. A *service* host ``*.example.com`` routes every name below
``example.com``, at any depth, unless a more specific host matches (as the edge routes,
``verge.config.Config.service_for_host``). A *certificate* name ``*.example.com`` matches
exactly one label (RFC 6125 §6.4.3): ``a.example.com`` but not ``a.b.example.com``, nor
``example.com``. Names are compared normalised: lower case, no trailing dot, A-labels.

Everything here is pure (no database): the store loads rows and asks.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
"""A DNS name of at least two labels."""


class ZoneError(ValueError):
    """A zone that cannot be delegated (the message says why)."""


def normalize_zone(text: str) -> str:
    """A zone as stored: lower case, no trailing dot, A-labels; ZoneError when unusable."""
    zone = text.strip().lower().rstrip(".")
    if zone.startswith("*"):
        raise ZoneError(f"a zone is a plain DNS name (example.com), not a wildcard: {text!r}")
    try:
        zone = zone if zone.isascii() else zone.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ZoneError(f"invalid zone {text!r}: {exc}") from None
    if _is_ip(zone) or not _NAME_RE.fullmatch(zone) or len(zone) > 253:
        raise ZoneError(
            f"invalid zone {text!r}: give a DNS name of at least two labels, like example.com "
            "(a top-level domain alone cannot be delegated)"
        )
    return zone


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def within(name: str, zone: str) -> bool:
    """``name`` is ``zone`` or a name below it."""
    return name == zone or name.endswith("." + zone)


def parent(name: str) -> str:
    """``example.com`` for ``www.example.com`` ('' for a single label)."""
    return name.partition(".")[2]


def zones_overlap(a: str, b: str) -> bool:
    return within(a, b) or within(b, a)


def zone_for_host(host: str, zones: Iterable[str]) -> str | None:
    """The most specific of ``zones`` inside which a service host may be claimed.

    ``name`` needs a zone it is within; ``*.name`` needs ``name`` within a zone; ``*`` and IP
    addresses are in no zone.
    """
    if host == "*" or _is_ip(host):
        return None
    name = host.removeprefix("*.")
    inside = [zone for zone in zones if within(name, zone)]
    return max(inside, key=len) if inside else None


def san_touches_zones(san: str, zones: Iterable[str]) -> bool:
    """Whether a certificate name matches some name inside ``zones``.

    ``*.p`` matches the names one label below ``p``: those are inside a zone when ``p`` is, or
    when one of them is the zone itself (``*.example.com`` matches the zone ``a.example.com``).
    """
    if not san.startswith("*."):
        return zone_for_host(san, zones) is not None
    below = san[2:]
    return any(within(below, zone) or parent(zone) == below for zone in zones)


def covers(wildcard: str, host: str) -> bool:
    """Whether service wildcard ``*.p`` routes some name of service host ``host`` (not "*")."""
    if not wildcard.startswith("*.") or host == "*" or wildcard == host:
        return False
    suffix = wildcard[1:]  # ".p"
    return host.removeprefix("*.").endswith(suffix)


@dataclass(frozen=True)
class Claim:
    """One service host: the pattern, its service and the service's tenant."""

    host: str
    service: str
    tenant_id: int
    tenant: str = ""


@dataclass
class HostIndex:
    """Service hosts resolved the way the edge routes a name (exact, then most specific
    wildcard at any depth); no "*" or default-service fallback: those own nothing specific."""

    exact: dict[str, Claim] = field(default_factory=dict)
    wildcards: dict[str, Claim] = field(default_factory=dict)
    """``example.com`` -> the claim of ``*.example.com``."""
    children: dict[str, dict[str, Claim]] = field(default_factory=dict)
    """``example.com`` -> exact hosts exactly one label below it."""

    @classmethod
    def of(cls, claims: Iterable[Claim]) -> HostIndex:
        index = cls()
        for claim in claims:
            if claim.host == "*":
                continue
            if claim.host.startswith("*."):
                index.wildcards[claim.host[2:]] = claim
            else:
                index.exact[claim.host] = claim
                index.children.setdefault(parent(claim.host), {})[claim.host] = claim
        return index

    @classmethod
    def of_owners(cls, owners: dict[str, int]) -> HostIndex:
        """From service host -> tenant id (no service names)."""
        return cls.of(Claim(host, "", tenant) for host, tenant in owners.items())

    def owner(self, name: str) -> Claim | None:
        """The claim that serves ``name`` (an exact name), or None."""
        claim = self.exact.get(name)
        return claim if claim is not None else self.generic_owner(parent(name))

    def generic_owner(self, below: str) -> Claim | None:
        """The claim serving a name one label below ``below`` that no exact host names."""
        while below:
            claim = self.wildcards.get(below)
            if claim is not None:
                return claim
            below = parent(below)
        return None

    def san_owner(self, san: str) -> Claim | None:
        """Who serves the names a certificate name stands for (``*.p``: the generic ones)."""
        return self.generic_owner(san[2:]) if san.startswith("*.") else self.owner(san)


def usable_names(sans: Sequence[str], tenant_id: int, index: HostIndex) -> list[str]:
    """The names a tenant's certificate may be picked for: its SANs ∩ its services' hosts.

    An exact SAN counts when the tenant's service serves that name. A wildcard SAN ``*.p``
    counts whole only when the tenant serves every name one label below ``p`` (its service
    wildcard covers them and no other tenant has an exact host there); otherwise it shrinks
    to the tenant's own exact hosts one label below ``p``.
    """
    names: list[str] = []
    for san in sans:
        if not san.startswith("*."):
            claim = index.owner(san)
            if claim is not None and claim.tenant_id == tenant_id:
                names.append(san)
            continue
        below = san[2:]
        children = index.children.get(below, {})
        generic = index.generic_owner(below)
        whole = generic is not None and generic.tenant_id == tenant_id
        if whole and all(claim.tenant_id == tenant_id for claim in children.values()):
            names.append(san)
        else:
            names.extend(host for host, claim in children.items() if claim.tenant_id == tenant_id)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Conflicts: what an admin sees and resolves
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zone:
    zone: str
    tenant_id: int
    tenant: str


def zone_owner(host: str, zones: Sequence[Zone]) -> Zone | None:
    """The delegated zone a service host lies in (the most specific), or None."""
    best = zone_for_host(host, [z.zone for z in zones])
    return next((z for z in zones if z.zone == best), None) if best else None


def wildcard_clashes(host: str, tenant_id: int, claims: Iterable[Claim]) -> list[Claim]:
    """Claims of other tenants that ``host`` would cover, or that would cover ``host``."""
    return [
        claim
        for claim in claims
        if claim.tenant_id != tenant_id and (covers(host, claim.host) or covers(claim.host, host))
    ]


def hostname_report(
    claims: Sequence[Claim], zones: Sequence[Zone], fleet_tenant_id: int | None
) -> list[dict]:
    """Every service host with its zone, the wildcards covering it and its conflicts.

    Conflicts: ``outside_zones`` (a tenant's host in none of its zones; the fleet's own
    ``default`` tenant is exempt), ``in_foreign_zone`` (inside another tenant's zone) and
    ``wildcard_overlap`` (a wildcard of one tenant covers a host of another).
    """
    wildcards = [claim for claim in claims if claim.host.startswith("*.")]
    rows = []
    for claim in sorted(claims, key=lambda c: (c.host.removeprefix("*."), c.host)):
        covering = [w for w in wildcards if covers(w.host, claim.host)]
        rows.append(
            {
                "host": claim.host,
                "service": claim.service,
                "tenant": claim.tenant,
                "tenant_id": claim.tenant_id,
                "zone": _own_zone(claim, zones),
                "covered_by": [
                    {
                        "host": w.host,
                        "service": w.service,
                        "tenant": w.tenant,
                        "tenant_id": w.tenant_id,
                    }
                    for w in covering
                ],
                "conflicts": _conflicts(claim, zones, covering, fleet_tenant_id),
            }
        )
    return rows


def _own_zone(claim: Claim, zones: Sequence[Zone]) -> str | None:
    own = [z for z in zones if z.tenant_id == claim.tenant_id]
    return zone_for_host(claim.host, [z.zone for z in own])


def _conflicts(
    claim: Claim, zones: Sequence[Zone], covering: Sequence[Claim], fleet_tenant_id: int | None
) -> list[dict]:
    found = []
    where = f"{claim.host} (service {claim.service}, tenant {claim.tenant})"
    inside = zone_owner(claim.host, zones)
    if inside is not None and inside.tenant_id != claim.tenant_id:
        found.append(
            {
                "kind": "in_foreign_zone",
                "other_tenant": inside.tenant,
                "zone": inside.zone,
                "message": f"{where} is inside zone {inside.zone} of tenant {inside.tenant}",
            }
        )
    elif (
        _own_zone(claim, zones) is None and claim.tenant_id != fleet_tenant_id and claim.host != "*"
    ):
        found.append(
            {
                "kind": "outside_zones",
                "message": f"{where} is outside every zone of tenant {claim.tenant}",
            }
        )
    for wildcard in covering:
        if wildcard.tenant_id != claim.tenant_id:
            found.append(
                {
                    "kind": "wildcard_overlap",
                    "other_tenant": wildcard.tenant,
                    "other_service": wildcard.service,
                    "other_host": wildcard.host,
                    "message": f"{wildcard.host} (service {wildcard.service}, tenant "
                    f"{wildcard.tenant}) covers {where}",
                }
            )
    return found


__all__ = [
    "Claim",
    "HostIndex",
    "Zone",
    "ZoneError",
    "covers",
    "hostname_report",
    "normalize_zone",
    "parent",
    "san_touches_zones",
    "usable_names",
    "wildcard_clashes",
    "within",
    "zone_for_host",
    "zone_owner",
    "zones_overlap",
]
