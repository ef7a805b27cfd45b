"""The protect phase: a service's deny lists, rate limits, cookie challenge and WAF, applied
to one request.

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

A service with a ``challenge`` (verge.protect.challenge) runs it after the rate limits:
a client over its rate without a valid cookie gets the challenge (a 307 or a script page) as
the refusal, and a request carrying the cookie goes on without it (``Admission.strip_cookie``:
the pipeline continues with :meth:`ServiceProtection.stripped`). A service without one pays
nothing for it: its ``admit`` is the plain one.

Every refusal is also kept as an event (``ServiceProtection.record``): the newest
``EVENTS_KEPT`` per service and worker, taken by the node agent (the worker's
``protection_events`` command, :func:`take_events`) and shipped to the control plane, where
``verge protection events SERVICE`` shows them. An event holds what the access log holds
(the client address, method, host and the target as the pipeline used it: a signed URL's
token is already out) plus why it was refused; never a header value.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from verge.http.response import Response
from verge.http.server import CLOCK, text_response
from verge.protect.challenge import (
    Challenge,
    challenge_answer,
    node_secret,
    refusal_answer,
    without_cookie,
)
from verge.protect.deny import ConnectionCap, CountryLookup, DenyList
from verge.protect.flood import FloodGuard
from verge.protect.ratelimit import ALLOW, RateLimiter, too_many_requests
from verge.protect.settings import DenySettings, Protection
from verge.protect.shared import SharedTable
from verge.protect.waf import Waf, WafResult, WafUnavailable

log = logging.getLogger("verge.protect")


class Admission(NamedTuple):
    """The protect phase's outcome: answer ``refusal`` instead (403, 429, a challenge's 307),
    ``drop`` the connection without an answer, or go on and add ``fields`` to the response
    (and, with ``strip_cookie``, go on with ``guard.stripped(request)``: the challenge cookie
    taken out). A refusal or a drop says why: ``kind`` ("deny", "rate-limit", "challenge",
    "drop") and ``detail`` (the deny reason, the rule's name, the challenge's reason)."""

    refusal: Response | None = None
    drop: bool = False
    fields: tuple[tuple[str, str], ...] = ()
    kind: str = ""
    detail: str = ""
    strip_cookie: bool = False


ADMITTED = Admission()
FLOODED = Admission(drop=True, kind="flood", detail="the network is over the node's flood rate")
"""A request the node's flood guard refused (verge.protect.flood): its connection is dropped."""
_monotonic = time.monotonic
_wall = time.time  # the challenge tokens' clock (their expiry is Unix time, node-wide)
REFUSALS_KEPT = 1024  # distinct 429 answers memoised per service

EVENTS_KEPT = 200
"""Refusals kept per service and worker until the agent takes them (the newest)."""
MAX_EVENT_CLIENT = 64
MAX_EVENT_METHOD = 32
MAX_EVENT_HOST = 255
MAX_EVENT_TARGET = 512
MAX_EVENT_DETAIL = 200
"""Bounds of an event's texts: the control plane refuses longer ones (verge.control.protection
has the same numbers; tests/edge/test_protection_events.py checks that they agree)."""
MAX_TAKE_BYTES = 48 * 1024
"""Most JSON bytes of events one ``protection_events`` answer carries: a worker's answer is
one line, read by the supervisor with asyncio's 64 KiB line limit. The rest waits."""
_UNPRINTABLE = {code: "?" for code in (*range(0x20), 0x7F)}


@dataclass(frozen=True, slots=True)
class ProtectSharing:
    """What a worker's protect phases share: the node's rate table (None: each worker counts
    alone), whether each client address's connections are steered to one worker (then
    client-IP keys are exact in the worker's own memory), and the node's GeoIP database as
    a country lookup (None: no database, so ``deny.countries`` cannot apply)."""

    table: SharedTable | None = None
    steered: bool = False
    country_of: CountryLookup | None = None
    workers: int = 1
    """The node's workers: the flood guard's rate is shared among them."""
    secret_file: str | None = None
    """Where the node keeps its challenge secret (verge.protect.challenge.node_secret; None:
    a secret of this process alone)."""
    listeners: list = field(default_factory=list, compare=False)
    """The worker's listening sockets (filled as they open), where the flood guard puts its
    kernel filter."""


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
        self._proxied = self.addresses.trusts_proxies  # else the peer is the client
        self.limiter = RateLimiter(settings.rule_specs(), addresses=self.addresses,
                                   shared=sharing.table, steered=sharing.steered,
                                   scope=service) \
            if settings.rate_limits else None
        self.deny, self.unapplied = _deny_list(service, settings.deny, sharing.country_of)
        self.denied = 0
        self._refusals: dict[tuple, Response] = {}  # 429s by their fields (_too_many)
        self._penalised = {rule.name for rule in settings.rate_limits if rule.penalty}
        self.waf = self._load_waf(settings)
        self.events: deque[tuple] = deque(maxlen=EVENTS_KEPT)
        self._gate: ConnectionGate | None = None  # set when its cap is below the node's
        # The rule admit() runs inline when the limiter is one rule keyed by the client
        # address (the common shape; RateLimiter.client_rule), skipping the general walk.
        # Why: on a hit each further call and object the check touches is a CPU-cache miss
        # after the kernel's network work (caches cold: 3.5 µs for the walk, 1.7 inline).
        self._inline_rule = self.limiter.client_rule() if self.limiter is not None else None
        self.challenge = self._load_challenge(settings, sharing)
        if self.challenge is not None:  # the others keep the plain admit: nothing to pay
            self.admit = self._admit_challenged

    def bind_gate(self, gate: ConnectionGate | None) -> None:
        """Check this service's own connection cap per request when the node's gate lets
        more connections in than it allows (see :class:`ConnectionGate`)."""
        cap = self.settings.connections_per_ip
        self._gate = gate if gate is not None and gate.cap is not None and cap is not None \
            and (gate.limit is None or cap < gate.limit) else None

    def _load_challenge(self, settings: Protection, sharing: ProtectSharing) -> Challenge | None:
        if settings.challenge is None:
            return None
        return Challenge(self.service, settings.challenge.spec(), self.addresses,
                         node_secret(sharing.secret_file), shared=sharing.table,
                         steered=sharing.steered)

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
        """The connection cap, deny lists, then rate limits (the first rule that refuses
        decides)."""
        gate = self._gate
        if gate is not None and gate.beyond(request.client, self.settings.connections_per_ip):
            return Admission(drop=True, kind="drop", detail="connections_per_ip")
        deny = self.deny
        if deny is not None:
            client = request.client  # the address as the kernel gave it is canonical IPv4
            if self._proxied or ":" in client:
                client = self.addresses.address(request)
            reason = deny.check(client, request.hmap.get("user-agent"))
            if reason is not None:
                self.denied += 1
                return Admission(text_response(403, f"forbidden ({reason})\n",
                                               [("Cache-Control", "no-store")]),
                                 kind="deny", detail=reason)
        rule = self._inline_rule
        if rule is not None and ":" not in request.client:  # an IPv4 peer is its own key
            if not request.target.startswith(rule.prefix):
                return ADMITTED
            ahead = rule.limit.update(request.client, _monotonic() if now is None else now)
            if ahead >= 0.0:
                rule.counters.allowed += 1
                return ADMITTED
            return self._admission(self.limiter.refused(rule, -ahead))
        limiter = self.limiter
        if limiter is None:
            return ADMITTED
        return self._admission(limiter.evaluate(request, _monotonic() if now is None else now))

    def _admit_challenged(self, request, now: float | None = None) -> Admission:
        """:meth:`admit`, then the challenge (services with one; see the module docstring)."""
        now = _monotonic() if now is None else now
        admission = ServiceProtection.admit(self, request, now)
        if admission.refusal is not None or admission.drop:
            return admission
        verdict = self.challenge.check(request, now, _wall())
        if verdict.action == "pass":
            return admission._replace(strip_cookie=True) if verdict.strip else admission
        if verdict.action == "challenge":
            status, fields, body = challenge_answer(self.challenge.spec, verdict.token,
                                                    request.target,
                                                    secure=request.scheme == "https")
            return Admission(Response(status, [("Date", CLOCK.date), *fields], body),
                             kind="challenge", detail=verdict.reason)
        return Admission(self._challenge_refusal(verdict.retry_after), kind="challenge",
                         detail=verdict.reason)

    def _challenge_refusal(self, retry_after: float) -> Response:
        """The 429 of a client that ignored its challenges, memoised by its Retry-After (as
        :meth:`_too_many`); its connection is closed, as a penalty box's."""
        status, fields, body = refusal_answer(retry_after)
        key = ("challenge", fields[0][1])
        response = self._refusals.get(key)
        if response is None:
            if len(self._refusals) >= REFUSALS_KEPT:
                self._refusals.clear()
            response = self._refusals[key] = Response(status, fields, body, close=True)
        return response

    @staticmethod
    def stripped(request):
        """The request without the challenge cookie (the pipeline goes on with it when the
        admission says ``strip_cookie``): neither the cache's variants nor the origin see it."""
        return request.replace(headers=without_cookie(request.headers))

    def _admission(self, verdict) -> Admission:
        """The protect phase's answer to a rate-limit verdict."""
        if verdict is ALLOW:  # the common case: within every limit, no fields to add
            return ADMITTED
        if verdict.action == "block":
            return Admission(self._too_many(verdict), kind="rate-limit", detail=verdict.rule)
        if verdict.action == "drop":
            return Admission(drop=True, kind="drop", detail=verdict.rule)
        return Admission(fields=verdict.headers) if verdict.headers else ADMITTED

    def _too_many(self, verdict) -> Response:
        """The 429 of a verdict, memoised by its fields (the rule and the seconds to wait):
        under a flood most refusals repeat one of a few answers, and a refusal must cost
        less than the hit it refuses (the Response memoises its rendering too). A client in
        a rule's penalty box also loses its connection: whatever it pipelined behind the
        refused request is not parsed and answered one by one."""
        key = verdict.headers
        response = self._refusals.get(key)
        if response is None:
            status, fields, body = too_many_requests(verdict)
            if len(self._refusals) >= REFUSALS_KEPT:
                self._refusals.clear()
            response = self._refusals[key] = Response(
                status, fields, body, close=verdict.rule in self._penalised)
        return response

    def refused(self, request, admission: Admission) -> None:
        """Record the refusal (or drop: status 0) the protect phase decided."""
        status = admission.refusal.status if admission.refusal is not None else 0
        self.record(request, status, admission.kind, admission.detail)

    def refused_by_waf(self, request, status: int, result: WafResult | None = None) -> None:
        """Record a WAF refusal: the rule ids that matched, else the WAF's reason
        ("oversize", "timeout", "overload", "error"); no result: a body too large to inspect
        was refused before the WAF saw it (``oversize: block``)."""
        if result is not None and result.rule_ids:
            detail = ",".join(map(str, result.rule_ids))
        else:
            detail = result.reason if result is not None and result.reason else "oversize"
        self.record(request, status, "waf", detail)

    def record(self, request, status: int, kind: str, detail: str) -> None:
        """Keep one refused request (the newest EVENTS_KEPT stay): texts cut to their bounds
        here, so a flood of long targets holds a bounded amount of memory."""
        self.events.append((time.time(), self.addresses.address(request)[:MAX_EVENT_CLIENT],
                            request.method[:MAX_EVENT_METHOD], request.host[:MAX_EVENT_HOST],
                            request.target[:MAX_EVENT_TARGET], status, kind,
                            detail[:MAX_EVENT_DETAIL]))

    def sweep(self) -> None:
        if self.limiter is not None:
            self.limiter.sweep(time.monotonic())
        if self.challenge is not None:
            self.challenge.sweep(time.monotonic())

    def stats(self) -> dict:
        """Plain counters for /metrics (summed over workers by verge.observe.metrics), and
        the settings this edge cannot apply (``unapplied``: the admin API's /stats shows
        them, e.g. "deny.countries" on an edge without a GeoIP database)."""
        waf = self.waf.counters if self.waf is not None else None
        rules = self.limiter.stats() if self.limiter is not None else {}
        if self.challenge is not None:  # beside the rules (the name is reserved for it)
            rules[self.challenge.spec.rule.name] = self.challenge.stats()
        return {
            "rules": rules,
            "denied": self.denied,
            "waf": {} if waf is None else {
                "inspected": waf.inspected, "blocked": waf.blocked, "detected": waf.detected,
                "timeouts": waf.timeouts, "errors": waf.errors + waf.overloads,
            },
            "unapplied": list(self.unapplied),
        }

    def close(self) -> None:
        if self.waf is not None:
            self.waf.close()


COUNTRIES_UNAPPLIED = "deny.countries"
"""What ``ServiceProtection.unapplied`` names when a service denies countries on an edge
without a GeoIP database (``verge edge --geoip PATH``, the config's ``geoip``)."""


def _deny_list(service: str, deny: DenySettings,
               country_of: CountryLookup | None) -> tuple[DenyList | None, tuple[str, ...]]:
    """A service's deny list (None: it denies nothing) and what of it cannot apply here.

    Countries need the node's GeoIP database. Without one they are left out, loudly: a
    warning at load and ``unapplied`` in the stats, never a list that seems to work."""
    unapplied: tuple[str, ...] = ()
    countries = deny.countries
    if countries and country_of is None:
        log.warning("service %s: deny.countries %s needs a GeoIP database on the edge "
                    "(verge edge --geoip PATH); not applied", service, ",".join(countries))
        unapplied, countries = (COUNTRIES_UNAPPLIED,), []
    if not (deny.cidrs or deny.user_agents or countries):
        return None, unapplied
    return DenyList(deny.cidrs, countries, deny.user_agents, country_of=country_of), unapplied


def take_events(protections: Iterable[ServiceProtection],
                budget: int = MAX_TAKE_BYTES) -> list[dict]:
    """The events kept so far, oldest first per service, removed from the rings; the
    services take turns, and at most ``budget`` bytes of JSON are taken (the rest stays for
    the next call)."""
    rings = [(guard.service, guard.events) for guard in protections if guard.events]
    taken: list[dict] = []
    while rings and budget > 0:
        for service, ring in rings:
            event = _event(service, ring[0])
            budget -= len(json.dumps(event)) + 2
            if budget < 0 and taken:
                break
            ring.popleft()
            taken.append(event)
        rings = [(service, ring) for service, ring in rings if ring]
    return taken


def _event(service: str, kept: tuple) -> dict:
    t, client, method, host, target, status, kind, detail = kept
    return {"service": service, "t": t, "client": _printable(client), "method": _printable(method),
            "host": _printable(host), "target": _printable(target), "status": status,
            "kind": kind, "detail": _printable(detail)}


def _printable(text: str) -> str:
    """Control characters as "?" (the control plane refuses them in an event)."""
    return text.translate(_UNPRINTABLE) if not text.isprintable() else text


class ConnectionGate:
    """What a new connection passes before the handshake: the node's flood guard (its
    network is not in the penalty box: verge.protect.flood) and the per-address connection
    cap (``connections_per_ip``).

    A connection has no service when it is accepted, and the services are different
    tenants', so the accept-time cap is the *largest* of the services' caps (none when one
    service sets none): no tenant's cap can narrow another's. A service whose own cap is
    smaller drops the connections beyond it when they ask it for something
    (:meth:`beyond`, from its protect phase). The services' trusted proxies are exempt (many
    clients share their address). IPv6 clients count per /64 (or the configured prefix), as
    their rate limits do."""

    def __init__(self, services: list[Protection | None],
                 flood: FloodGuard | None = None) -> None:
        """``services``: the protection block of every service of the node (None: none)."""
        capped = [p for p in services if p is not None and p.connections_per_ip is not None]
        self.flood = flood
        self.limit = max(p.connections_per_ip for p in capped) \
            if capped and len(capped) == len(services) else None
        exempt = sorted({cidr for p in services if p is not None for cidr in p.trusted_proxies})
        self.key = (self.limit, tuple(exempt), id(flood), bool(capped))
        self.cap = ConnectionCap(self.limit or UNCAPPED, exempt=exempt) if capped else None
        self.addresses = capped[0].client_addresses() if capped else None
        self.refused_late = 0  # connections a service with a smaller cap dropped

    @classmethod
    def of(cls, services: list[Protection | None], previous: ConnectionGate | None,
           flood: FloodGuard | None = None):
        """The gate for a config (None: no flood guard and no service caps connections);
        the previous one is kept, with its counts, when nothing about it changed."""
        if flood is None and not any(p is not None and p.connections_per_ip is not None
                                     for p in services):
            return None
        gate = cls(services, flood)
        if previous is not None and previous.key == gate.key:
            return previous
        return gate

    @property
    def refused(self) -> int:
        """Connections refused by a cap, at accept or later (the flood guard counts its own)."""
        return (self.cap.refused if self.cap is not None else 0) + self.refused_late

    def opened(self, peer: str) -> bool:
        flood = self.flood
        if flood is not None and not flood.accept(peer, _monotonic()):  # counted too
            return False
        cap = self.cap
        return cap is None or cap.opened(self.addresses.peer_key(peer))

    def closed(self, peer: str) -> None:
        if self.cap is not None:
            self.cap.closed(self.addresses.peer_key(peer))

    def beyond(self, peer: str, limit: int) -> bool:
        """Whether ``peer`` holds more than ``limit`` open connections (counted: the caller
        drops the one asking)."""
        key = self.addresses.peer_key(peer)
        if key in self.cap.exempt or self.cap.count(key) <= limit:
            return False
        self.refused_late += 1
        return True


UNCAPPED = 1 << 62  # a count that is never reached: connections counted, never refused


VARIANTS_KEPT = 8
"""Copies with more fields memoised per response: a rate limit's fields repeat (one verdict
per remaining count and whole second, verge.protect.ratelimit), and a hit's Response is shared
for a second, so a rate-limited hit is rendered once per variant, not per request (a render
costs ~10 µs, the whole rate-limit budget of a hit is 2 µs)."""


def with_fields(response: Response, fields) -> Response:
    """A copy of ``response`` with more fields (a hit's shared Response is left alone); for a
    response with a bytes body, memoised on it (a file body is sent once and never shared)."""
    if type(response.body) is not bytes and response.body is not None:
        return _copy_with(response, fields)
    variants = response.variants
    if variants is None:
        variants = response.variants = {}
    else:
        copy = variants.get(fields)
        if copy is not None:
            return copy
        if len(variants) >= VARIANTS_KEPT:
            variants.clear()
    copy = variants[fields] = _copy_with(response, fields)
    return copy


def _copy_with(response: Response, fields) -> Response:
    return Response(response.status, [*response.headers, *fields], response.body,
                    response.length, reason=response.reason, close=response.close)


class FieldsWriter:
    """A writer that adds fields to the response it sends (the allowed responses' RateLimit
    fields on the async path); everything else goes to the protocol's writer."""

    def __init__(self, writer, fields) -> None:
        self._writer = writer
        self._fields = tuple(fields)

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
