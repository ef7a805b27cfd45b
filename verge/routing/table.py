"""The routing table: which edge serves a client, as one immutable snapshot (no I/O).

The router rebuilds a table whenever the fleet changes (an edge joins, goes down, comes
back) and swaps it in with one assignment, so the DNS and HTTP routers read a consistent
picture without locks. The choice, per request:

1. the client's region: CIDR map, then GeoIP, then the default region (``RegionMap``);
2. the regions to try, in order: the client's own, its neighbours as configured, then
   every other region, then edges that belong to no region;
3. in the first of those with a healthy edge, the edges ranked by rendezvous hashing — of
   the URL or hostname when cache affinity is on (one edge per object keeps caches
   disjoint), of the client address otherwise (spreading clients, each one sticking) —
   followed by the other candidates as failover order.

When no edge is healthy, all of them are candidates in the same order: a wrong health
verdict must not take the whole CDN off the air.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from verge.routing.dns import DnsAnswer
from verge.routing.geo import IPAddress, RegionMap
from verge.routing.hashing import rank


@dataclass(frozen=True, slots=True)
class Edge:
    name: str
    region: str | None
    url: str
    addresses: tuple[IPAddress, ...]
    up: bool = True
    load: dict = field(default_factory=dict, compare=False)

    @property
    def ipv4(self) -> tuple[str, ...]:
        return tuple(str(a) for a in self.addresses if a.version == 4)

    @property
    def ipv6(self) -> tuple[str, ...]:
        return tuple(str(a) for a in self.addresses if a.version == 6)


ANSWER_MEMO_SIZE = 65536

# Without affinity, clients spread over a region's edges by network of this size (so the
# DNS answer's ECS scope can say which clients share it).
SPREAD_PREFIX = {4: 24, 6: 56}


def _client_network(client: IPAddress | None) -> str:
    """The client's spreading network as a hash key (its /24 or /56 prefix bits)."""
    if client is None:
        return ""
    bits = 32 if client.version == 4 else 128
    return f"{client.version}/{int(client) >> (bits - SPREAD_PREFIX[client.version])}"


def _spread_within(candidates: list[Edge]) -> bool:
    """Did the choice depend on the client's network: several edges in the winning region?"""
    return len(candidates) > 1 and candidates[0].region == candidates[1].region and \
        candidates[1].up == candidates[0].up


def edge_addresses(url: str) -> tuple[IPAddress, ...]:
    """The addresses an edge URL names (the host must be an IP literal: DNS answers need one)."""
    host = urlsplit(url).hostname or ""
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        return ()


class RoutingTable:
    """One snapshot of zone, regions, edges and health; implements the DNS ``Resolver``."""

    def __init__(self, *, zone: str, ttl: int, serial: int, regions: RegionMap,
                 neighbours: dict[str, list[str]], edges: Iterable[Edge],
                 hostnames: Iterable[str], nameservers: Sequence[tuple[str, tuple[str, ...]]],
                 affinity: bool = False, answers: int = 1) -> None:
        self.zone = zone
        self.ttl = ttl
        self.serial = serial
        self.nameservers = tuple(nameservers)
        self.regions = regions
        self.affinity = affinity
        self.answers = answers
        self.edges = {edge.name: edge for edge in edges}
        self.hostnames = frozenset(hostnames)
        self._exact = set()
        self._suffixes = set()
        for host in self.hostnames:
            (self._suffixes.add(host[1:]) if host.startswith("*.") else self._exact.add(host))
        self._region_order = {region: self._order_from(region, neighbours)
                              for region in [*regions.names, None]}
        self._ns_addresses = {name: addrs for name, addrs in self.nameservers}
        self._answers: dict[tuple[str, IPAddress | None], DnsAnswer | None] = {}

    def _order_from(self, region: str | None, neighbours: dict[str, list[str]]) -> list[str | None]:
        order: list[str | None] = [] if region is None else [region]
        for name in [*neighbours.get(region or "", []), *sorted(self.regions.names)]:
            if name not in order:
                order.append(name)
        return [*order, None]  # edges without a region come last

    # ----- choosing ------------------------------------------------------------------------
    def choose(self, client: IPAddress | None, key: str | None = None) -> list[Edge]:
        """Candidate edges for a client, best first (failover order after it).

        `key` is what affinity hashes (a URL path or hostname); without affinity, or without
        a key, the client address spreads clients over a region's edges.
        """
        placement = self.regions.place(client)
        return self._candidates(placement.region, key, client)

    def _candidates(self, region: str | None, key: str | None,
                    client: IPAddress | None) -> list[Edge]:
        spread = key if (self.affinity and key) else _client_network(client)
        groups = self._grouped()
        order = self._region_order.get(region, self._region_order[None])
        ranked = [rank(spread, groups.get(name, []), name=lambda e: e.name) for name in order]
        healthy = [edge for group in ranked for edge in group if edge.up]
        if healthy:
            return healthy
        return [edge for group in ranked for edge in group]

    def _grouped(self) -> dict[str | None, list[Edge]]:
        groups: dict[str | None, list[Edge]] = {}
        known = set(self.regions.names)
        for edge in self.edges.values():
            groups.setdefault(edge.region if edge.region in known else None, []).append(edge)
        return groups

    # ----- DNS -------------------------------------------------------------------------------
    def resolve(self, name: str, client: IPAddress | None) -> DnsAnswer | None:
        """A/AAAA for a name in the zone; None when it does not exist (NXDOMAIN).

        Memoised per (name, client) for the life of this snapshot: a table never changes,
        and a router answers the same few names for the same resolvers over and over.
        """
        key = (name, client)
        try:
            return self._answers[key]
        except KeyError:
            pass
        if len(self._answers) >= ANSWER_MEMO_SIZE:
            self._answers.clear()
        answer = self._answers[key] = self._resolve(name, client)
        return answer

    def _resolve(self, name: str, client: IPAddress | None) -> DnsAnswer | None:
        if name == self.zone:
            return DnsAnswer((), ())
        if name in self._ns_addresses:
            addresses = self._ns_addresses[name]
            return DnsAnswer(tuple(a for a in addresses if ":" not in a),
                             tuple(a for a in addresses if ":" in a))
        if self.is_service_host(name):
            placement = self.regions.place(client)
            candidates = self._candidates(placement.region, name, client)
            chosen = candidates[: self.answers]
            scope = placement.scope
            if not self.affinity and client is not None and _spread_within(candidates):
                # the answer depends on the client's own network, not only on its region
                scope = max(scope, SPREAD_PREFIX[client.version])
            return DnsAnswer(tuple(a for e in chosen for a in e.ipv4),
                             tuple(a for e in chosen for a in e.ipv6), scope)
        edge = self.named_edge(name)
        if edge is not None:
            return DnsAnswer(edge.ipv4, edge.ipv6)
        return None

    def is_service_host(self, name: str) -> bool:
        if name in self._exact:
            return True
        dot = name.find(".")
        while dot != -1:
            if name[dot:] in self._suffixes:
                return True
            dot = name.find(".", dot + 1)
        return False

    def named_edge(self, name: str) -> Edge | None:
        """`EDGE.ZONE` or `EDGE.SERVICE-HOST`: one edge by name (where HTTP redirects point)."""
        label, _, rest = name.partition(".")
        edge = self.edges.get(label)
        if edge is None or not (rest == self.zone or self.is_service_host(rest)):
            return None
        return edge
