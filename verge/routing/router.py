"""`verge router`: the request router process — DNS (GeoDNS) and HTTP 302 routing.

The router keeps one :class:`RoutingTable` snapshot and swaps it whenever the fleet changes.
Where the fleet comes from:

* with ``--control``: the control plane's node list (each node's region, URL, heartbeat
  status, load, and the health monitor's verdict) and its services' hostnames, polled every
  ``poll`` seconds. The control plane runs the health monitor, so every router sees the
  same verdicts (as Traffic Router reads Traffic Monitor);
* without it: the edges and hostnames listed in router.yaml, checked by the router's own
  :class:`HealthMonitor`.

If the control plane cannot be reached the router keeps answering from its last table.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from verge.config.router import RouterConfig
from verge.health import HealthMonitor, Target
from verge.http.message import Request
from verge.http.response import Response
from verge.http.server import HttpApp, ServerLimits, reuseport_socket, serve, text_response
from verge.routing.dns import start_dns_server
from verge.routing.geo import RegionMap
from verge.routing.table import Edge, RoutingTable, edge_addresses

log = logging.getLogger("verge.router")

POLL_SECONDS = 1.0


@dataclass(slots=True)
class RouterOptions:
    dns_host: str
    dns_port: int
    http_host: str | None = None
    http_port: int = 0
    control_url: str | None = None
    token: str | None = None


class Router:
    def __init__(self, config: RouterConfig, options: RouterOptions) -> None:
        self.config = config
        self.options = options
        self.regions = RegionMap(config.regions, config.default_region, config.geoip)
        self.neighbours = {region.name: list(region.neighbours) for region in config.regions}
        self.serial = 0
        self.monitor: HealthMonitor | None = None
        self.dns = None
        self.http_server: asyncio.AbstractServer | None = None
        self.http_port = 0
        self._tasks: list[asyncio.Task] = []
        self.table = self._build([], [])

    # ----- the table --------------------------------------------------------------------------
    def _build(self, edges: Iterable[Edge], hostnames: Iterable[str]) -> RoutingTable:
        self.serial = max(self.serial + 1, int(time.time())) % (1 << 32)
        return RoutingTable(
            zone=self.config.zone, ttl=self.config.ttl, serial=self.serial,
            regions=self.regions, neighbours=self.neighbours, edges=edges,
            hostnames=hostnames, nameservers=self._nameservers(),
            affinity=self.config.affinity, answers=self.config.answers)

    def _nameservers(self) -> list[tuple[str, tuple[str, ...]]]:
        if self.config.nameservers:
            return [(ns.name, tuple(str(a) for a in ns.addresses))
                    for ns in self.config.nameservers]
        host = self.options.dns_host
        address = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return [(f"ns1.{self.config.zone}", (address,))]

    def update(self, edges: list[Edge], hostnames: list[str]) -> None:
        """Swap in a new table if anything routing-relevant changed."""
        current = self.table
        by_name = {edge.name: edge for edge in edges}
        same = by_name == current.edges and frozenset(hostnames) == current.hostnames
        if not same:
            self.table = self._build(edges, hostnames)
            log.info("routing table %d: %s", self.serial, ", ".join(
                f"{e.name}({e.region or '-'}:{'up' if e.up else 'down'})" for e in edges))

    # ----- fleet sources ---------------------------------------------------------------------
    def _static_edges(self) -> list[Edge]:
        monitor = self.monitor
        return [Edge(spec.name, spec.region, spec.url, edge_addresses(spec.url),
                     up=monitor is None or monitor.is_up(spec.name))
                for spec in self.config.edges]

    def _start_static(self) -> None:
        health = self.config.health
        if health.enabled and self.config.edges:
            self.monitor = HealthMonitor(
                interval=health.interval, timeout=health.timeout, fails=health.fails,
                passes=health.passes,
                on_change=lambda *_: self.update(self._static_edges(), self.config.hostnames))
            self.monitor.set_targets({spec.name: Target(spec.name, _health_url(spec), spec.url)
                                      for spec in self.config.edges})
            self.monitor.start()
        self.update(self._static_edges(), self.config.hostnames)

    async def _poll_control(self) -> None:
        from verge.control.client import ControlClient, ControlError, iter_all

        client = ControlClient(self.options.control_url, self.options.token, timeout=5)
        try:
            while True:
                try:
                    nodes, services = await asyncio.to_thread(
                        lambda: (list(iter_all(client.list_nodes)),
                                 list(iter_all(client.list_services))))
                except ControlError as exc:
                    log.warning("control plane: %s (keeping the last routing table)", exc)
                else:
                    self.update(_edges_from_nodes(nodes), self._hostnames(services))
                await asyncio.sleep(POLL_SECONDS)
        finally:
            client.close()

    def _hostnames(self, services: list[dict]) -> list[str]:
        zone = self.config.zone
        hosts = {host for service in services for host in service.get("hosts", [])}
        return sorted(h for h in hosts
                      if h.removeprefix("*.") == zone or h.removeprefix("*.").endswith("." + zone))

    # ----- serving ----------------------------------------------------------------------------
    async def start(self) -> None:
        opts = self.options
        if opts.control_url:
            self._tasks.append(asyncio.get_running_loop().create_task(self._poll_control()))
        else:
            self._start_static()
        self.dns = await start_dns_server(opts.dns_host, opts.dns_port, lambda: self.table)
        if opts.http_host is not None:
            sock = reuseport_socket(opts.http_host, opts.http_port)
            self.http_port = sock.getsockname()[1]
            self.http_server = await serve(RedirectApp(self), sock, ServerLimits(max_body_bytes=0))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.monitor is not None:
            await self.monitor.close()
        if self.http_server is not None:
            self.http_server.close()
        if self.dns is not None:
            await self.dns.close()
        self.regions.close()


def _health_url(spec) -> str | None:
    if spec.health_url:
        return spec.health_url
    return spec.admin_url.rstrip("/") + "/healthz" if spec.admin_url else None


def _edges_from_nodes(nodes: list[dict]) -> list[Edge]:
    """Control-plane nodes as routable edges: up = heartbeating and not failed by the monitor."""
    edges = []
    for node in nodes:
        if node.get("status") == "revoked":
            continue
        monitor = node.get("monitor") or {}
        up = node.get("status") == "up" and monitor.get("state", "up") == "up"
        edges.append(Edge(node["name"], node.get("region"), node["url"],
                          edge_addresses(node["url"]), up=up, load=node.get("load") or {}))
    return edges


class RedirectApp(HttpApp):
    """The HTTP router: 302 to the chosen edge, same path and query (Traffic Router's HTTP mode).

    The Location names the edge as ``EDGE.SERVICE-HOST`` (``redirect: name``), which this
    router's DNS answers with that edge's address and the edge maps back to the service; or
    the edge's address (``redirect: address``) for clients without the router as resolver.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    def handle_fast(self, request: Request) -> Response:
        table = self.router.table
        hostname = request.host  # lower-case, without the port
        if request.method not in ("GET", "HEAD"):
            return _text(405, "the HTTP router redirects GET and HEAD requests\n")
        if not table.is_service_host(hostname):
            return _text(404, f"no service for host {hostname or '(none)'} in {table.zone}\n")
        try:
            client = ipaddress.ip_address(request.client) if request.client else None
        except ValueError:
            client = None
        candidates = table.choose(client, key=request.path)
        if not candidates:
            return _text(503, "no edge available\n")
        location = self.location(candidates[0], hostname, request.target)
        return text_response(302, b"", [("Location", location), ("Cache-Control", "no-store")],
                             content_type="text/plain")

    def location(self, edge: Edge, hostname: str, target: str) -> str:
        parts = urlsplit(edge.url)
        port = f":{parts.port}" if parts.port else ""
        if self.router.config.redirect == "address":
            return f"{parts.scheme}://{parts.netloc}{target}"
        return f"{parts.scheme}://{edge.name}.{hostname}{port}{target}"

    async def handle(self, request, writer) -> None:  # every request is answered fast
        await writer.send(self.handle_fast(request))


def _text(status: int, message: str) -> Response:
    return text_response(status, message)


async def run_router(config: RouterConfig, options: RouterOptions) -> None:
    router = Router(config, options)
    await router.start()
    http = f" http http://{options.http_host}:{router.http_port}" if options.http_host else ""
    print(f"verge router ready: dns udp+tcp {options.dns_host}:{router.dns.port}{http}"
          f" zone {config.zone}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await router.close()
