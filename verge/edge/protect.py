"""The protect phase: a service's deny lists, rate limits and WAF, applied to one request.

Where it runs (verge.edge.app): right after the route phase (the service is known) and
before the compute phase and the cache lookup, so cache hits are limited too. The deny
lists and the rate limits cost a microsecond or two and run inline; the WAF (~0.6 ms of CPU
per request at paranoia 1) runs only where its ``on`` setting says — by default on misses
and on requests with arguments or bodies, never on plain hits — in its thread pool, so hits
keep flowing while it works (verge.protect.waf).

Limits are per node, as nginx's ``limit_req``, Varnish's vsthrottle and Fastly's rate
limiting count: a client spread over N edges gets N times the rate. Within a node they are
exact for client-IP keys when the listening sockets steer each client to one worker
(verge.protect.steer), else per worker (``RateLimiter.placement()`` says which).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

from verge.http.response import Response
from verge.http.server import text_response
from verge.protect.deny import ConnectionCap
from verge.protect.ratelimit import RateLimiter, too_many_requests
from verge.protect.settings import Protection
from verge.protect.shared import SharedTable
from verge.protect.waf import Waf, WafUnavailable

log = logging.getLogger("verge.protect")


class Admission(NamedTuple):
    """The protect phase's outcome: answer ``refusal`` instead (403, 429), ``drop`` the
    connection without an answer, or go on and add ``fields`` to the response."""

    refusal: Response | None = None
    drop: bool = False
    fields: tuple[tuple[str, str], ...] = ()


ADMITTED = Admission()


@dataclass(frozen=True, slots=True)
class ProtectSharing:
    """How a worker's rate limits meet the other workers': the node's shared table (None:
    each worker counts alone) and whether each client address's connections are steered to
    one worker (then client-IP keys are exact in the worker's own memory)."""

    table: SharedTable | None = None
    steered: bool = False


ALONE = ProtectSharing()  # one worker's own counts (tests, single processes)


class ServiceProtection:
    """What the protect phase holds for one service (built once per config change of its
    ``protection`` block: rate-limit state survives reloads that leave it alone)."""

    def __init__(self, service: str, settings: Protection,
                 sharing: ProtectSharing = ALONE) -> None:
        self.service = service
        self.settings = settings
        self.sharing = sharing
        self.addresses = settings.client_addresses()
        self.limiter = RateLimiter(settings.rule_specs(), addresses=self.addresses,
                                   shared=sharing.table, steered=sharing.steered,
                                   scope=service) \
            if settings.rate_limits else None
        deny = settings.deny
        self.deny = deny.deny_list() if deny.cidrs or deny.user_agents or deny.countries \
            else None
        if deny.countries:
            log.warning("service %s: deny.countries needs a GeoIP database on the edge; "
                        "not applied", service)
        self.denied = 0
        self.waf = self._load_waf(settings)

    def _load_waf(self, settings: Protection) -> Waf | None:
        if settings.waf is None:
            return None
        try:
            return Waf(settings.waf)
        except WafUnavailable as exc:
            if settings.waf.fail == "closed":
                raise
            log.error("service %s: the WAF cannot run (%s); failing open", self.service, exc)
            return None

    def admit(self, request, now: float | None = None) -> Admission:
        """Deny lists, then rate limits (the first rule that refuses decides)."""
        if self.deny is not None:
            reason = self.deny.check(self.addresses.address(request),
                                     request.hmap.get("user-agent"))
            if reason is not None:
                self.denied += 1
                return Admission(text_response(403, f"forbidden ({reason})\n",
                                               [("Cache-Control", "no-store")]))
        if self.limiter is None:
            return ADMITTED
        verdict = self.limiter.evaluate(request, time.monotonic() if now is None else now)
        if verdict.action == "block":
            status, fields, body = too_many_requests(verdict)
            return Admission(Response(status, fields, body))
        if verdict.action == "drop":
            return Admission(drop=True)
        return Admission(fields=verdict.headers) if verdict.headers else ADMITTED

    def sweep(self) -> None:
        if self.limiter is not None:
            self.limiter.sweep(time.monotonic())

    def stats(self) -> dict:
        """Plain counters for /metrics (summed over workers by verge.observe.metrics)."""
        waf = self.waf.counters if self.waf is not None else None
        return {
            "rules": self.limiter.stats() if self.limiter is not None else {},
            "denied": self.denied,
            "waf": {} if waf is None else {
                "inspected": waf.inspected, "blocked": waf.blocked, "detected": waf.detected,
                "timeouts": waf.timeouts, "errors": waf.errors + waf.overloads,
            },
        }

    def close(self) -> None:
        if self.waf is not None:
            self.waf.close()


class ConnectionGate:
    """The per-address connection cap of a node (``connections_per_ip``): a connection has
    no service when it is accepted, so the smallest cap any service asks for applies, and
    the services' trusted proxies are exempt (many clients share their address). IPv6
    clients count per /64 (or the configured prefix), as their rate limits do."""

    def __init__(self, services: list[Protection]) -> None:
        capped = [p for p in services if p.connections_per_ip is not None]
        self.limit = min(p.connections_per_ip for p in capped)
        exempt = sorted({cidr for p in services for cidr in p.trusted_proxies})
        self.key = (self.limit, tuple(exempt))
        self.cap = ConnectionCap(self.limit, exempt=exempt)
        self.addresses = capped[0].client_addresses()

    @classmethod
    def of(cls, services: list[Protection], previous: ConnectionGate | None):
        """The gate for a config (None: no service caps connections); the previous one is
        kept, with its counts, when the cap is the same."""
        if not any(p.connections_per_ip is not None for p in services):
            return None
        gate = cls(services)
        if previous is not None and previous.key == gate.key:
            return previous
        return gate

    def opened(self, peer: str) -> bool:
        return self.cap.opened(self.addresses.peer_key(peer))

    def closed(self, peer: str) -> None:
        self.cap.closed(self.addresses.peer_key(peer))


def with_fields(response: Response, fields) -> Response:
    """A copy of ``response`` with more fields (a hit's shared Response is left alone)."""
    return Response(response.status, [*response.headers, *fields], response.body,
                    response.length, reason=response.reason, close=response.close)


class FieldsWriter:
    """A writer that adds fields to the response it sends (the allowed responses' RateLimit
    fields on the async path); everything else goes to the protocol's writer."""

    def __init__(self, writer, fields) -> None:
        self._writer = writer
        self._fields = list(fields)

    def start(self, status: int, headers, **kwargs) -> None:
        self._writer.start(status, [*headers, *self._fields], **kwargs)

    async def send(self, response: Response) -> None:
        await self._writer.send(with_fields(response, self._fields))

    def __getattr__(self, name: str):
        return getattr(self._writer, name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._writer, name, value)
