"""The whole config (``Config``): every section, and the per-request Host -> service lookup.

Config.service_for_host is a dict lookup (exact name, then the most specific wildcard, then
"*", then the default service), built once when the config is validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field, PrivateAttr, field_validator, model_validator

from verge.config.base import FilePath, Model, conflict, request_host_name
from verge.config.bounds import MAX_FUNCTIONS, MAX_INGEST_ROUTES, MAX_SERVICES
from verge.config.compute import EdgeFunction, IngestRoute
from verge.config.service import Service
from verge.config.serving import CacheSettings, Compression, Limits, OriginTimeouts
from verge.config.stream import StreamSettings
from verge.config.tls import TlsSettings
from verge.protect.settings import MAX_TRUSTED_PROXIES, CidrText, FloodSettings


@dataclass(slots=True)
class _HostIndex:
    """Host -> service tables: exact names, wildcard suffixes (".example.com"), "*", default."""

    exact: dict[str, Service] = field(default_factory=dict)
    suffixes: dict[str, Service] = field(default_factory=dict)
    any_host: Service | None = None
    default: Service | None = None


class Config(Model):
    cache: CacheSettings = Field(default_factory=CacheSettings)
    limits: Limits = Field(default_factory=Limits)
    proxy_protocol: list[CidrText] = Field(default_factory=list, max_length=MAX_TRUSTED_PROXIES)
    """Load balancers (addresses or CIDRs) in front of the plain-HTTP port that send the
    PROXY protocol (v1 or v2): the header is then required and read, only from these peers
    (others are closed), and names the client for rate limits, deny lists, the connection
    cap and logs. Empty: off."""
    origin_timeouts: OriginTimeouts = Field(default_factory=OriginTimeouts)
    compression: Compression = Field(default_factory=Compression)
    access_log: FilePath | None = None
    """"-" for stdout, a file path, or null for no access log."""
    geoip: FilePath | None = None
    """A MaxMind-format database (GeoLite2-Country or -City; the router's ``geoip`` setting):
    where the edge looks up the country of a service's ``deny.countries``. A node setting
    (``verge edge --geoip PATH`` wins): opened once per worker at start."""
    flood: FloodSettings | None = None
    """The node's flood guard (verge.protect.flood): a network (/24, /48) sending more than
    ``rate`` requests is refused whole for ``penalty``, its new connections dropped by the
    listeners' kernel filter. The operator's setting: a tenant's service cannot set it.
    Null: off."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    functions: list[EdgeFunction] = Field(default_factory=list, max_length=MAX_FUNCTIONS)
    ingest: list[IngestRoute] = Field(default_factory=list, max_length=MAX_INGEST_ROUTES)
    """Store-and-forward routes for device data."""
    """Edge functions (WebAssembly), run before the cache for the routes they claim."""
    services: list[Service] = Field(default_factory=list, max_length=MAX_SERVICES)

    _hosts: _HostIndex = PrivateAttr(default_factory=_HostIndex)

    @field_validator("access_log")
    @classmethod
    def _check_access_log(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError('access_log must be "-", a file path, or null')
        return value

    @model_validator(mode="after")
    def _index_services(self) -> Config:
        self._check_unique_names()
        self._hosts = _index_hosts(self.services)
        return self

    def _check_unique_names(self) -> None:
        seen: set[str] = set()
        for number, service in enumerate(self.services):
            if service.name in seen:
                raise conflict(
                    ("services", number, "name"),
                    f"another service is already named {service.name!r}",
                )
            seen.add(service.name)

    def key_host(self, service: Service, host: str) -> str:
        """The host a request's objects are cached (and purged) under: the service's first
        plain host name whichever of its names, or address as the default service, the
        request used — so one purge of the service's URL clears them all. A name matched
        by one of its wildcards ("*.example.com") keeps its own objects (another site under
        the wildcard), as does a service with no plain name."""
        name = request_host_name(host)
        index: _HostIndex = self.__pydantic_private__["_hosts"]
        if index.exact.get(name) is not service and index.suffixes:
            dot = name.find(".")
            while dot != -1:
                if index.suffixes.get(name[dot:]) is service:
                    return host
                dot = name.find(".", dot + 1)
        return next((h for h in service.hosts if "*" not in h), host)

    def service_for_host(self, host: str) -> Service | None:
        """The service for a Host header: exact name, then the most specific wildcard, then "*",
        then the default service."""
        index: _HostIndex = self.__pydantic_private__["_hosts"]
        service = index.exact.get(host)
        if service is not None:
            return service
        name = request_host_name(host)
        service = index.exact.get(name)
        if service is not None:
            return service
        if index.suffixes:
            dot = name.find(".")
            while dot != -1:
                service = index.suffixes.get(name[dot:])
                if service is not None:
                    return service
                dot = name.find(".", dot + 1)
        return index.any_host or index.default


def _index_hosts(services: list[Service]) -> _HostIndex:
    """Host tables for service_for_host; a host may belong to one service, one service is default."""
    index = _HostIndex()
    owners: dict[str, Service] = {}
    for number, service in enumerate(services):
        if service.default:
            if index.default is not None:
                raise conflict(
                    ("services", number, "default"),
                    f"only one service can be the default; {index.default.name!r} already is",
                )
            index.default = service
        for position, host in enumerate(service.hosts):
            if host in owners:
                owner = owners[host]
                where = "this service" if owner is service else repr(owner.name)
                raise conflict(
                    ("services", number, "hosts", position),
                    f"host {host!r} is already listed for {where}",
                )
            owners[host] = service
            _add_host(index, host, service)
    return index


def _add_host(index: _HostIndex, host: str, service: Service) -> None:
    if host == "*":
        index.any_host = service
    elif host.startswith("*."):
        index.suffixes[host[1:]] = service
    else:
        index.exact[host] = service
