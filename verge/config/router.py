"""The request router's configuration (`verge router --config router.yaml`), one validated model.

The file says what a router needs that the control plane does not hold: the CDN zone it is
authoritative for, the regions (cache groups) with the client networks that belong to them
and their neighbour order for fallback, and how edges are health-checked. Edges and service
hostnames come from the control plane (`--control`); without one they are listed here,
which is also how the router runs on its own (benchmarks, tests).

Example::

    zone: verge.test
    ttl: 10
    regions:
      - {name: east, cidrs: [10.1.0.0/16], neighbours: [west]}
      - {name: west, cidrs: [10.2.0.0/16], neighbours: [east]}
    edges:                                   # only without --control
      - {name: edge-1, region: east, url: "http://127.0.0.2:8080"}
    hostnames: [demo.verge.test]             # only without --control
    health: {interval: 1s, fails: 2, passes: 2}
    affinity: true                           # same URL -> same edge within a region
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from verge.config.base import Model, Slug, config_host, conflict
from verge.config.loader import load_model_file
from verge.config.units import Duration

_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _dns_name(value: str) -> str:
    """A lower-case DNS name without the trailing dot."""
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r} is not a DNS name (letters, digits, '-', dots)")
    return name


DnsName = Annotated[str, AfterValidator(_dns_name)]


class RegionSpec(Model):
    """A region (cache group): its client networks and the regions to fall back to, in order."""

    name: Slug
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    countries: list[str] = Field(default_factory=list)
    """ISO 3166 country codes that the GeoIP database maps to this region ("DE", "FR")."""
    continents: list[str] = Field(default_factory=list)
    """Continent codes for the GeoIP database ("EU", "NA", "AS", ...)."""
    neighbours: list[Slug] = Field(default_factory=list)

    @field_validator("countries", "continents")
    @classmethod
    def _upper_codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not re.fullmatch(r"[A-Za-z]{2}", code):
                raise ValueError(f"{code!r} is not a two-letter code")
        return [code.upper() for code in codes]


class EdgeSpec(Model):
    """A statically listed edge (routers without a control plane)."""

    name: Slug
    region: Slug | None = None
    url: str
    """Where clients reach the edge, e.g. http://127.0.0.2:8080 (the host must be an IP)."""
    admin_url: str | None = None
    """Its admin listener: health is checked at ADMIN_URL/healthz."""
    health_url: str | None = None
    """Overrides the health check URL; with neither, a TCP connect to `url` is the check."""


class Nameserver(Model):
    name: DnsName
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = Field(min_length=1)


class HealthSettings(Model):
    enabled: bool = True
    interval: Duration = 1.0
    timeout: Duration = 1.0
    fails: int = Field(2, ge=1, le=100)
    """Consecutive failed checks that mark an edge down."""
    passes: int = Field(2, ge=1, le=100)
    """Consecutive good checks that bring it back."""


class RouterConfig(Model):
    zone: DnsName
    """The CDN zone the DNS router is authoritative for; service hostnames live inside it."""
    ttl: int = Field(10, ge=0, le=3600)
    """TTL of A/AAAA answers: short, so clients move soon after an edge goes down."""
    nameservers: list[Nameserver] = Field(default_factory=list)
    """NS records of the zone; default: ns1.ZONE at the DNS listen address."""
    regions: list[RegionSpec] = Field(default_factory=list)
    default_region: Slug | None = None
    """Where clients that match no network go (default: the first region)."""
    geoip: Path | None = None
    """A MaxMind-format database (GeoLite2-Country/City) for clients outside every CIDR."""
    edges: list[EdgeSpec] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    health: HealthSettings = Field(default_factory=HealthSettings)
    affinity: bool = False
    """Within a region, send the same URL (HTTP) or hostname (DNS) to the same edge."""
    redirect: Literal["name", "address"] = "name"
    """HTTP router Location: EDGE.SERVICE-HOST (resolved by this router) or the edge's address."""
    answers: int = Field(1, ge=1, le=8)
    """Addresses per DNS answer: the best edge, then the next ones in failover order."""

    @field_validator("hostnames")
    @classmethod
    def _check_hostnames(cls, names: list[str]) -> list[str]:
        return [config_host(name) for name in names]

    @model_validator(mode="after")
    def _check_references(self) -> RouterConfig:
        names = [region.name for region in self.regions]
        _unique(names, "regions", "region")
        for index, region in enumerate(self.regions):
            for position, neighbour in enumerate(region.neighbours):
                if neighbour not in names or neighbour == region.name:
                    raise conflict(
                        ("regions", index, "neighbours", position),
                        f"{neighbour!r} is not another region",
                    )
        if self.default_region is not None and self.default_region not in names:
            raise conflict(("default_region",), f"no region named {self.default_region!r}")
        _unique([edge.name for edge in self.edges], "edges", "edge")
        for index, edge in enumerate(self.edges):
            if edge.region is not None and edge.region not in names:
                raise conflict(("edges", index, "region"), f"no region named {edge.region!r}")
        for index, host in enumerate(self.hostnames):
            bare = host.removeprefix("*.")
            if bare != self.zone and not bare.endswith("." + self.zone):
                raise conflict(("hostnames", index), f"{host!r} is outside the zone {self.zone}")
        return self


def _unique(names: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            raise conflict((where, index, "name"), f"another {what} is already named {name!r}")
        seen.add(name)


def load_router_config(path: str | Path) -> RouterConfig:
    """Read and validate router.yaml; ConfigError names file:line and the reason."""
    return load_model_file(path, RouterConfig)
