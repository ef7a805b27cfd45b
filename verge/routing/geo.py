"""Client address -> region: the CIDR map first (longest prefix wins), then a GeoIP database.

The CIDR map is what an operator writes down for the networks they know (their own
resolvers, big ISPs' ranges); the MaxMind-format database (GeoLite2-Country or -City, read
with the `maxminddb` library) covers the rest by country or continent. The answer carries
the prefix length it holds for, which the DNS router returns as the EDNS Client Subnet
scope so resolvers cache it for the right-sized network.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from verge.config.router import RegionSpec

log = logging.getLogger("verge.routing")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Scope returned when no CIDR matched: what a resolver may share one answer across.
FALLBACK_SCOPE = {4: 24, 6: 56}


@dataclass(frozen=True, slots=True)
class Placement:
    region: str | None
    scope: int  # the prefix length this placement holds for


class RegionMap:
    def __init__(self, regions: Sequence[RegionSpec], default_region: str | None = None,
                 geoip: Path | None = None) -> None:
        self.names = [region.name for region in regions]
        self.default = default_region or (self.names[0] if self.names else None)
        networks = [(net, region.name) for region in regions for net in region.cidrs]
        # Longest prefix first, so the first containing network is the most specific one.
        self._networks = sorted(networks, key=lambda item: item[0].prefixlen, reverse=True)
        self._by_country = {c: r.name for r in regions for c in r.countries}
        self._by_continent = {c: r.name for r in regions for c in r.continents}
        self._geoip = _open_geoip(geoip) if geoip else None

    def place(self, client: IPAddress | None) -> Placement:
        """The client's region and the prefix length that decision holds for."""
        if client is None:
            return Placement(self.default, 0)
        for network, region in self._networks:
            if network.version == client.version and client in network:
                return Placement(region, network.prefixlen)
        located = self._geo_region(client)
        if located is not None:
            return located
        return Placement(self.default, FALLBACK_SCOPE[client.version])

    def _geo_region(self, client: IPAddress) -> Placement | None:
        if self._geoip is None:
            return None
        try:
            record, prefix = self._geoip.get_with_prefix_len(client)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        country = (record.get("country") or {}).get("iso_code")
        continent = (record.get("continent") or {}).get("code")
        region = self._by_country.get(country or "") or self._by_continent.get(continent or "")
        return Placement(region, prefix) if region else None

    def close(self) -> None:
        if self._geoip is not None:
            self._geoip.close()


def _open_geoip(path: Path):
    import maxminddb  # only routers given a database need it

    try:
        return maxminddb.open_database(str(path))
    except (OSError, maxminddb.InvalidDatabaseError) as exc:
        raise ValueError(f"geoip: cannot open {path}: {exc}") from None
