"""The edge node's request pipeline, as named phases (compare Varnish VCL and Pingora).

    route    Host -> service, path -> rule; redirects; bypass decision; cache key
    lookup   memory tier (in ``handle_fast``, no task), then disk tier
    fetch    on miss or revalidation: one collapsed fill per key (verge.edge.fetch)
    store    RFC 9111 decides (verge.cache.policy); body streamed to clients while stored
    deliver  304/206/HEAD, compression, Age, Cache-Status (verge.edge.deliver)

``handle_fast`` answers fresh memory hits synchronously; everything else goes through the
async ``handle``. Requests that may not be cached (other methods, bypass rules) are proxied
with their bodies streamed both ways, and unsafe methods invalidate the URL (§4.4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from verge.cache import keys, policy
from verge.cache.filllock import NodeFillLocks
from verge.cache.keys import CacheKey
from verge.cache.store import CacheEntry, TieredCache
from verge.compute.wagi import Answer, Pass
from verge.edge.compress import choose_encoding, compress_bytes, is_compressible
from verge.edge.compute import (
    FUNCTION_BODY_LIMIT,
    CapturedResponse,
    EdgeCompute,
    ResponseTooLarge,
)
from verge.edge.deliver import (
    HeaderPlan,
    Source,
    add_vary,
    after_upstream,
    deliver,
    encoded_etag,
    entry_head,
)
from verge.edge.fetch import Fetcher, proxy_request_headers, relayed
from verge.edge.ingest import EdgeIngest
from verge.edge.origins import OriginSet, ParentSet
from verge.edge.protect import (
    ADMITTED,
    ALONE,
    FLOODED,
    ConnectionGate,
    FieldsWriter,
    ProtectSharing,
    ServiceProtection,
    with_fields,
)
from verge.edge.signing import admit, take_param
from verge.edge.tunnel import TunnelError, open_tunnel, wants_tunnel
from verge.http.client import OriginPool, UpstreamError
from verge.http.message import Request
from verge.http.response import FileBody, Response
from verge.http.server import ResponseWriter, close_connections, text_response
from verge.http.target import BadTarget, normalize_target
from verge.observe.accesslog import AccessLog
from verge.observe.metrics import EdgeMetrics
from verge.observe.records import RequestRecords
from verge.protect.flood import FloodGuard
from verge.protect.waf import Waf
from verge.uri import has_encoded_separator

log = logging.getLogger("verge.edge")
_monotonic = time.monotonic  # the clock of request durations and of the guards (rates)

CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
SERVABLE = (policy.Verdict.FRESH, policy.Verdict.STALE_OK)
ROUTE_MEMO_SIZE = 8192
MAX_AGE = policy.MAX_DELTA


@dataclass(slots=True)
class Route:
    """The route phase's result for one request."""

    service: object
    rule: object | None
    key: CacheKey | None  # None: not cacheable (bypass, method)
    plan: HeaderPlan
    origins: OriginSet
    policy: policy.PolicyOptions = policy.DEFAULT_OPTIONS  # the rule's RFC 9111 settings
    strip_cookies: bool = False
    function: object | None = None  # the edge function that claims this request, if any
    signed: object | None = None  # the rule's SignedUrls: every request is checked (_signed)
    admission: object | None = None  # a signed request's admission (verge.edge.signing)
    protection: ServiceProtection | None = None  # the service's protect phase


class Answered(NamedTuple):
    """A phase's answer to the client instead of going on (and its access-log result)."""

    response: Response
    result: str

    @property
    def sent(self) -> int:
        return 0 if self.result == "error" else _body_bytes(self.response)


class Passed(NamedTuple):
    """The compute phase let the request go on, maybe rewritten (a new route)."""

    route: Route
    body: bytes
    request: Request


def _failed(status: int, message: str) -> Answered:
    return Answered(text_response(status, f"{message}\n"), "error")


@dataclass(slots=True)
class ServiceRuntime:
    """What the edge builds once per service per config generation."""

    service: object
    origins: OriginSet
    plans: dict  # (rule index or None, secure) -> HeaderPlan
    policies: dict  # rule index or None -> policy.PolicyOptions
    rule_origins: dict = field(default_factory=dict)  # rule index -> OriginSet (rule.origins)
    protection: ServiceProtection | None = None  # deny lists, rate limits, WAF

    def all_origin_sets(self) -> list[OriginSet]:
        return [self.origins, *self.rule_origins.values()]


class EdgeApp:
    def __init__(self, config, cache: TieredCache, pool: OriginPool, *, metrics: EdgeMetrics,
                 access_log: AccessLog, node: str = "verge", name: str | None = None,
                 parents: Sequence[str] = (), compute: EdgeCompute | None = None,
                 ingest: EdgeIngest | None = None,
                 protect: ProtectSharing = ALONE) -> None:
        self.protect = protect  # rate-limit state across workers (verge.edge.protect)
        self.cache = cache
        self.pool = pool
        self.metrics = metrics
        self.records = RequestRecords(metrics, access_log)
        self._records = self.records.pending  # the hot path appends here
        self._id_prefix = os.urandom(4).hex()
        self._request_ids = itertools.count()
        self.node = node  # the Cache-Status identifier
        self.name = name or node  # this node's name in the fleet (Via, EDGE.HOST names)
        self._name_prefix = self.name + "."
        self.parents = ParentSet(parents, pool, self.name) if parents else None
        self.compute = compute
        self._functions: list | None = None
        self.ingest = ingest
        self._ingest_routes: list | None = None
        self.https_port: int | None = None  # where plain-HTTP requests are redirected to
        self.alt_svc: str | None = None  # advertised on HTTPS responses when HTTP/3 is up
        self.generation = 0
        self.runtimes: dict[str, ServiceRuntime] = {}
        disk_root = getattr(getattr(cache, "disk", None), "root", None)
        self.fetcher = Fetcher(self, NodeFillLocks(disk_root / "locks") if disk_root else None)
        self.apply_config(config)

    # ----- configuration -------------------------------------------------------------------
    def apply_config(self, config) -> None:
        """Switch to a new validated config atomically (one assignment per structure)."""
        old = self.runtimes
        runtimes = {}
        for service in config.services:
            previous = old.get(service.name)
            origins = OriginSet(service.origins, self.pool, service.health_check)
            if previous is not None and _same_origins(previous.service, service):
                origins = previous.origins
            plans, policies = {}, {}
            for index, rule in [(None, None), *enumerate(service.rules)]:
                for secure in (False, True):
                    plans[index, secure] = self._plan(config, service, rule, secure)
                policies[index] = policy_options(config, rule)
            rule_origins = {index: OriginSet(rule.origins, self.pool, service.health_check)
                            for index, rule in enumerate(service.rules) if rule.origins}
            if previous is not None and _same_origins(previous.service, service):
                rule_origins = previous.rule_origins or rule_origins
            runtimes[service.name] = ServiceRuntime(service, origins, plans, policies,
                                                    rule_origins,
                                                    self._protection(service, previous))
        self.config = config
        self.runtimes = runtimes
        flood = getattr(config, "flood", None)
        self.flood = FloodGuard.of(flood.spec() if flood is not None else None,
                                   getattr(self, "flood", None), workers=self.protect.workers,
                                   listeners=self.protect.listeners)
        if self.flood is not None:
            self.flood.on_box = close_connections
        self.connection_gate = ConnectionGate.of(
            [s.protection for s in config.services],
            getattr(self, "connection_gate", None), self.flood)
        for runtime in runtimes.values():
            if runtime.protection is not None:
                runtime.protection.bind_gate(self.connection_gate)
        if self.compute is not None and config.functions != self._functions:
            self.compute.apply(config.functions)
            self._functions = list(config.functions)
        self._mount_ingest()
        self._routes: dict[tuple[str, str], Route | bytes] = {}
        self.generation += 1
        self.compression = config.compression
        kept = {id(o) for r in runtimes.values() for o in r.all_origin_sets()}
        guards = {id(r.protection) for r in runtimes.values()}
        for runtime in old.values():
            for origins in runtime.all_origin_sets():
                if id(origins) not in kept:
                    origins.stop()
            if runtime.protection is not None and id(runtime.protection) not in guards:
                runtime.protection.close()

    def _protection(self, service, previous: ServiceRuntime | None) -> ServiceProtection | None:
        """The service's protect phase; kept across reloads that leave its block alone (the
        rate-limit state with it)."""
        if service.protection is None:
            return None
        if previous is not None and previous.protection is not None and \
                previous.service.protection == service.protection and \
                previous.protection.sharing == self.protect:
            return previous.protection
        return ServiceProtection(service.name, service.protection, self.protect)

    def set_protect_sharing(self, *, steered: bool) -> None:
        """The listeners could not steer clients to workers (or now can): rebuild the rate
        limits with their state where it is exact (worker-local or the shared table)."""
        self.protect = dataclasses.replace(self.protect, steered=steered)
        self.apply_config(self.config)

    def protection_stats(self) -> dict:
        """{service: counters} of the services with a protection block (for /metrics)."""
        return {name: runtime.protection.stats() for name, runtime in self.runtimes.items()
                if runtime.protection is not None}

    def sweep_protection(self) -> None:
        for runtime in self.runtimes.values():
            if runtime.protection is not None:
                runtime.protection.sweep()

    def _mount_ingest(self) -> asyncio.Task | None:
        """(Re)mount the ingest routes when they changed; returns the mounting task.

        The new routes claim their paths at once, with the config they come with (a POST
        for one still mounting waits for it or gets 503, never the origin). Mounting needs
        the running loop (spools and forwarders are tasks), so before start() this waits."""
        if self.ingest is None or self.config.ingest == self._ingest_routes:
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None  # start() mounts them
        self._ingest_routes = list(self.config.ingest)
        return self.ingest.schedule(self._ingest_routes)

    def start(self) -> asyncio.Task | None:
        """Start health checks and mount the ingest routes. Returns the mounting task (None:
        nothing to mount): a worker awaits it before it accepts its first request."""
        mounting = self._mount_ingest()
        for runtime in self.runtimes.values():
            for origins in runtime.all_origin_sets():
                origins.start_health_checks()
        return mounting

    def _plan(self, config, service, rule, secure: bool) -> HeaderPlan:
        """Response header edits of a service + rule; HSTS only over HTTPS (RFC 6797 §7.2)."""
        remove = [*service.headers.response_remove]
        add = list(service.headers.response_add.items())
        if secure and service.hsts is not None:
            add.append(("Strict-Transport-Security", service.hsts.header()))
        if secure and self.alt_svc:
            add.append(("Alt-Svc", self.alt_svc))
        if rule is not None:
            remove += rule.headers.response_remove
            add += list(rule.headers.response_add.items())
        return HeaderPlan(
            remove=frozenset(n.lower() for n in remove) | frozenset(n.lower() for n, _ in add),
            add=tuple(add),
            vary_accept_encoding=False,
        )

    # ----- route phase ------------------------------------------------------------------------
    def route(self, request) -> Route | Response:
        service = self.config.service_for_host(request.host)
        if service is None:
            return text_response(404, "no service is configured for this host\n")
        runtime = self.runtimes[service.name]
        if service.https_redirect and request.scheme == "http":
            return self._to_https(request)
        if service.encoded_slashes == "reject" and has_encoded_separator(request.path):
            return text_response(400, "encoded '/' or '\\' in the path (%2F, %5C)\n")
        rule = service.match_rule(request.path)
        index = service.rules.index(rule) if rule is not None else None
        if rule is not None and rule.redirect is not None:
            return self._redirect(request, rule.redirect)
        # a GET or HEAD with a body goes to the origin whole and is never cached: the body
        # could change the answer, and it must never be dropped while its framing is sent
        cacheable = request.method in CACHEABLE_METHODS and request.body is None and \
            not (rule is not None and rule.bypass)
        signed = rule.signed if rule is not None else None
        key = None
        if cacheable:
            query = request.query
            if signed is not None:  # every viewer's token maps to the same entry
                query = take_param(query, signed.param)[1]
            key = CacheKey.under(rule, self.config.key_host(service, request.host),
                                 request.path, query, request.hmap)
        route = Route(service, rule, key, runtime.plans[index, request.scheme == "https"],
                      runtime.rule_origins.get(index, runtime.origins), signed=signed,
                      protection=runtime.protection)
        if self.compute is not None and self.compute.by_service:
            route.function = self.compute.match(service.name, request.path)
        route.policy = runtime.policies[index]
        if rule is not None:
            route.strip_cookies = rule.ignore_cookies
        return route

    def _to_https(self, request) -> Response:
        port = "" if self.https_port in (None, 443) else f":{self.https_port}"
        location = f"https://{request.host}{port}{request.target}"
        return text_response(308, f"use {location}\n", [("Location", location)])

    def _redirect(self, request, redirect) -> Response:
        location = redirect.location(request.path, request.query)
        return text_response(redirect.status, f"redirecting to {location}\n",
                             [("Location", location)])

    # ----- fast path: fresh memory hits -----------------------------------------------------------
    def cached_route(self, request: Request) -> tuple[Route | Response, Request]:
        """The route phase for one request: route() memoised per (host, target) of GET/HEAD
        for the current config generation, and the request as the rest of the pipeline sees
        it (an EDGE.HOST name served as HOST; a signed URL's token taken out, so that it goes
        neither upstream nor into the log).

        Routes whose cache key depends on request headers (rule key_headers) are not memoised.
        Also records the service on the request, for per-service stats.
        """
        host = request.hmap.get("host")
        if host is not None and host.startswith(self._name_prefix):
            host = host[len(self._name_prefix):]
            request = _without_node_label(request, host)
        if request.method not in CACHEABLE_METHODS or request.body is not None:
            route = self.route(request)  # the key depends on the method and the body
        else:
            memo_key = (host, request.target, request.scheme)
            route = self._routes.get(memo_key)
            if route is None:
                route = self.route(request)
                if type(route) is not Route or not (route.rule is not None
                                                    and route.rule.key_headers):
                    if len(self._routes) >= ROUTE_MEMO_SIZE:
                        self._routes.clear()
                    self._routes[memo_key] = route
        if type(route) is Route:
            request.service = route.service.name
            if route.signed is not None:
                return self._signed(request, route)
        return route, request

    def _signed(self, request: Request, route: Route) -> tuple[Route | Response, Request]:
        """The signed-URL check of the route phase, per request (routes are memoised): 403
        before any cache lookup, else a route of the request's own that sets the cookie when
        the token came in the query. Either way the request goes on without the token."""
        admission = admit(route.signed, request.path, request.query, request.headers, time.time())
        if type(admission) is str:
            _, query = take_param(request.query, route.signed.param)
            request = request.replace(target=f"{request.path}?{query}" if query else request.path)
            return text_response(403, f"forbidden: {admission}\n"), request
        plan = route.plan
        if admission.set_cookie is not None:
            plan = dataclasses.replace(plan, add=(*plan.add, ("Set-Cookie", admission.set_cookie)))
        return dataclasses.replace(route, plan=plan, admission=admission), \
            request.replace(target=admission.target, headers=admission.headers)

    def handle_fast(self, request) -> Response | None:
        """Answer a fresh memory hit without a task; None sends the request down the async path."""
        started = _monotonic()  # one clock read serves the guards and the log's duration
        flood = self.flood
        if flood is not None and not flood.admit(request.client, started):
            request.admitted = FLOODED
            return None  # handle() drops the connection
        if request.method not in CACHEABLE_METHODS:
            return None
        original = request
        route, request = self.cached_route(request)
        if type(route) is not Route:
            self._log(request, route.status, _body_bytes(route), "none", started)
            return route
        admitted = ADMITTED
        guard = route.protection
        if guard is not None:  # the protect phase: once per request
            admitted = original.admitted = guard.admit(request, started)
            if admitted is not ADMITTED:
                if admitted.refusal is not None:
                    guard.refused(request, admitted)
                    self._log(request, admitted.refusal.status, _body_bytes(admitted.refusal),
                              "protect", started)
                    return admitted.refusal
                if admitted.drop:
                    return None  # handle() drops the connection
                if admitted.strip_cookie:  # the challenge cookie is the edge's alone
                    request = guard.stripped(request)
            if guard.waf is not None and self._waf_for(route, request, cache_hit=True):
                return None  # handle() inspects
        if route.function is not None:
            return self._function_fast(original, request, route, admitted, started)
        key = route.key
        if key is None or "upgrade" in request.hmap:
            return None  # (Upgrade: a WebSocket is tunnelled by handle())
        hmap = request.hmap
        entry = self.cache.lookup_memory(key.text, hmap)
        if entry is None:
            return None
        now = time.time()
        freshness = entry.freshness
        if ("cache-control" in hmap or "pragma" in hmap or freshness.no_cache
                or now >= freshness.fresh_until()) and \
                policy.evaluate(freshness, hmap, now) not in SERVABLE:
            return None
        if entry.compressible is None:
            entry.compressible = self._compressible(entry)
        if entry.compressible:
            entry = self._encoded_variant(entry, route, hmap)
        body = entry.body
        if body is not None and request.method == "GET" and not (
                "if-none-match" in hmap or "if-modified-since" in hmap or "range" in hmap):
            hot = entry.hot
            if hot is not None and now < hot[0] and hot[1] is route.plan \
                    and hot[2] == self.generation:
                response = hot[3]
            else:
                response = self._full_hit(entry, freshness, route.plan, now)
        else:
            try:
                response = self.deliver_entry(entry, request, route, now, f"{self.node}; hit")
            except OSError:  # the disk file went away: fetch again (handle)
                self.cache.purge_memory("url", entry.key, soft=False)
                return None
        if admitted.fields:
            response = with_fields(response, admitted.fields)
        self._log(request, response.status, _body_bytes(response), "hit", started)
        return response

    def _function_fast(self, original: Request, request: Request, route: Route, admitted,
                       started: float) -> Response | None:
        """A request-phase function that may run inline answers here, without a task (most
        small functions do); its run is kept on the request when the request goes on, so
        the async path does not run it again."""
        if route.function.spec.phase != "request" or "upgrade" in request.hmap:
            return None
        invocation = self.compute.invoke_now(route.function, request, self.new_request_id())
        if invocation is None:
            return None
        outcome = self._function_outcome(request, route, invocation)
        if type(outcome) is not Answered:
            original.computed = invocation
            return None
        response = outcome.response
        if admitted.fields:
            response = with_fields(response, admitted.fields)
        self._log(request, response.status, outcome.sent, outcome.result, started)
        return response

    def _full_hit(self, entry: CacheEntry, freshness, plan, now: float) -> Response:
        """The Response of a plain full hit, memoised on the entry (``entry.hot``) until its
        Age changes: hits in the same second share it, and with it each protocol's
        rendering (verge.http.response)."""
        headers = entry_head(entry, plan, self.generation)
        age = max(0.0, now - freshness.response_time + freshness.corrected_initial_age)
        if age < MAX_AGE:
            valid_until = now + 1.0 - age % 1.0
        else:
            age, valid_until = MAX_AGE, now + 1.0
        response = Response(entry.status, [
            *headers, ("Age", str(int(age))),
            ("Cache-Status", after_upstream(entry.headers, f"{self.node}; hit"))],
            entry.body, entry.body_size, reason=entry.reason)
        entry.hot = (valid_until, plan, self.generation, response)
        return response

    def deliver_entry(self, entry: CacheEntry, request, route: Route, now: float,
                      cache_status: str) -> Response:
        """The deliver phase for a stored entry (verge.edge.deliver). Raises OSError when its
        disk file is gone (the caller fetches again)."""
        freshness = entry.freshness
        source = Source(entry.status, entry.reason, entry_head(entry, route.plan, self.generation),
                        freshness.etag, freshness.last_modified, freshness.response_time,
                        entry.body_size, lambda start, end: _entry_body(entry, start, end))
        extra = [("Age", str(int(policy.age_value(freshness, now)))),
                 ("Cache-Status", after_upstream(entry.headers, cache_status))]
        return deliver(source, request.hmap, request.method, extra)

    def _compressible(self, entry: CacheEntry) -> bool:
        """Whether the edge may compress this entry's body (decided once per entry)."""
        settings = self.compression
        if not settings.enabled or entry.encoding is not None or entry.body is None \
                or entry.status != 200:
            return False
        headers = entry.headers
        if _field(headers, "content-encoding") is not None or \
                not is_compressible(_field(headers, "content-type"), settings.types):
            return False
        if not settings.min_bytes <= entry.body_size <= settings.max_bytes:
            return False
        # identity responses of a compressible type vary by Accept-Encoding too
        entry.headers = add_vary(entry.headers, "Accept-Encoding")
        entry.rendered = entry.hot = None
        return True

    def _encoded_variant(self, entry: CacheEntry, route: Route, hmap) -> CacheEntry:
        """The entry itself, or its compressed variant when the client accepts one."""
        if entry.compressible is None:
            entry.compressible = self._compressible(entry)
        if not entry.compressible or "range" in hmap:
            return entry
        settings = self.compression
        encoding = choose_encoding(hmap.get("accept-encoding"), settings.algorithms)
        if encoding is None:
            return entry
        derived = self.cache.derived(entry, encoding)
        if derived is None:
            derived = self._compress_entry(entry, encoding)
            self.cache.put_derived(entry, encoding, derived)
        return derived

    def _compress_entry(self, entry: CacheEntry, encoding: str) -> CacheEntry:
        settings = self.compression
        level = {"gzip": settings.gzip_level, "br": settings.brotli_quality,
                 "zstd": settings.zstd_level}[encoding]
        body = compress_bytes(entry.body, encoding, level)
        headers = [(n, encoded_etag(v, encoding) if n.lower() == "etag" else v)
                   for n, v in entry.headers]
        headers = add_vary([*headers, ("Content-Encoding", encoding)], "Accept-Encoding")
        freshness = entry.freshness
        return CacheEntry(
            key=entry.key, variant=entry.variant, status=entry.status, reason=entry.reason,
            headers=headers, freshness=freshness, tags=entry.tags, body_size=len(body),
            body=body, encoding=encoding, compressible=False,
        )

    # ----- async path --------------------------------------------------------------------------
    async def handle(self, request, writer: ResponseWriter) -> None:
        started = _monotonic()
        admitted = request.admitted
        if self.flood is not None and (admitted is FLOODED or request.body is not None and
                                       not self.flood.admit(request.client, started)):
            self._log(request, 0, 0, "flood", started)  # (with a body: handle_fast never saw it)
            raise ConnectionResetError("dropped by the flood guard")
        route, request = self.cached_route(request)
        if type(route) is not Route:
            writer.keep_alive = False
            await writer.send(route)
            self._log(request, route.status, _body_bytes(route), "none", started)
            return
        if route.protection is not None:
            if admitted is None:  # (handle_fast took it for requests without a body)
                admitted = route.protection.admit(request, started)
            if admitted.drop:
                route.protection.refused(request, admitted)
                self._log(request, 0, 0, "protect", started)
                raise ConnectionResetError("dropped by a rate limit")
            if admitted.refusal is not None:
                route.protection.refused(request, admitted)
                await self._refuse(request, writer, admitted.refusal, started)
                return
            if admitted.strip_cookie:  # the challenge cookie is the edge's alone
                request = route.protection.stripped(request)
            if admitted.fields:
                writer = FieldsWriter(writer, admitted.fields)
        if self.ingest is not None and self.ingest.wanted and request.method == "POST":
            claimed = self.ingest.claim(route.service.name, request.path)
            if claimed is not None:  # mounted or not: never the origin's (verge.edge.ingest)
                await self.ingest.handle(claimed, request, writer)
                self._log(request, writer.status, 0, "ingest", started)
                return
        if wants_tunnel(request, writer):
            await self._tunnel(request, writer, route, started)
            return
        body = None
        if route.function is not None:
            if route.function.spec.phase == "response":
                await self._response_phase(request, writer, route, started)
                return
            outcome = await self._compute(request, route)
            if type(outcome) is Answered:
                await writer.send(outcome.response)
                self._log(request, outcome.response.status, outcome.sent, outcome.result,
                          started)
                return
            route, body, request = outcome
        await self._fetch_or_proxy(request, writer, route, started, body)

    async def _fetch_or_proxy(self, request, writer, route: Route, started: float,
                              body: bytes | None = None) -> None:
        if route.key is None:
            waf = self._waf_for(route, request, cache_hit=False)
            if waf is not None:
                inspected = await self._inspect(waf, request, body, route.protection)
                if type(inspected) is Response:
                    await self._refuse(request, writer, inspected, started)
                    return
                body = inspected
            await self._proxy(request, writer, route, started, body)
            return
        await self._cached(request, writer, route, started)

    @staticmethod
    def _waf_for(route: Route, request, *, cache_hit: bool) -> Waf | None:
        """The service's WAF when it inspects this request (its ``on`` setting)."""
        guard = route.protection
        if guard is None or guard.waf is None:
            return None
        waf = guard.waf
        return waf if waf.applies(request, cache_hit=cache_hit,
                                  has_body=request.body is not None) else None

    async def _inspect(self, waf: Waf, request, body: bytes | None,
                       guard: ServiceProtection) -> bytes | None | Response:
        """The WAF's verdict: a refusal (recorded on ``guard``), or the body to forward (read
        whole when it is small enough to inspect; a larger or unsized one is inspected by its
        head only, or refused with 413 when the WAF's ``oversize`` says block)."""
        limit = waf.settings.max_body_bytes
        if body is None and request.body is not None:
            length = request.body.length
            if length is not None and length <= limit:
                body = await request.body.read_all(limit=limit)
            elif waf.settings.oversize == "block":
                guard.refused_by_waf(request, 413)
                return text_response(413, "request body too large to inspect\n")
        result = await waf.inspect(request, body)
        if result.blocked:
            guard.refused_by_waf(request, result.status, result)
            return text_response(result.status, "forbidden by the web application firewall\n",
                                 [("Cache-Control", "no-store")])
        return body

    async def _refuse(self, request, writer, response: Response, started: float) -> None:
        if request.body is not None and not request.body.complete:
            writer.keep_alive = False  # the body was not read
        await writer.send(response)
        self._log(request, response.status, 0, "protect", started)

    async def _response_phase(self, request, writer, route: Route, started: float) -> None:
        """A response-phase function: the pipeline answers into a capture, the function sees
        that response and answers instead (Answer) or edits its headers (Pass)."""
        deployed = route.function
        capture = CapturedResponse(deployed.function.limits.max_response_bytes)
        try:
            await self._fetch_or_proxy(request, capture, route, started)
        except ResponseTooLarge as exc:
            await self._error(request, writer, 502, f"edge function {deployed.spec.name}: {exc}",
                              started)
            return
        response = (capture.status, capture.headers, bytes(capture.body))
        invocation = await self.compute.invoke(deployed, request, b"", self.new_request_id(),
                                               response=response)
        result = invocation.result
        if isinstance(result, Answer):
            status, headers, body = result.status, result.headers, result.body
        elif isinstance(result, Pass):
            status, headers, body = capture.status, result.edit_headers(capture.headers), \
                response[2]
        else:
            await self._error(request, writer, invocation.error_status,
                              f"edge function {deployed.spec.name} failed: {invocation.error}",
                              started)
            return
        await writer.send(Response(status, headers, body))

    async def _compute(self, request, route: Route) -> Answered | Passed:
        """The compute phase: the function's answer (or the 5xx of its failure), or the
        request as it passes on — its new route, its body (read for the function) and the
        request as the function rewrote it. A run the fast path made is not made again."""
        body = b""
        if request.body is not None:
            body = await request.body.read_all(limit=FUNCTION_BODY_LIMIT)
        invocation = request.computed
        if invocation is None:
            invocation = await self.compute.invoke(route.function, request, body,
                                                   self.new_request_id())
        return self._function_outcome(request, route, invocation, body)

    def _function_outcome(self, request, route: Route, invocation,
                          body: bytes = b"") -> Answered | Passed:
        """What a function's run means for the request (see :meth:`_compute`)."""
        deployed = route.function
        result = invocation.result
        if isinstance(result, Answer):  # (a small GET answer's Response is shared: Deployed)
            return Answered(deployed.response(result, self.node, request.method), "function")
        if not isinstance(result, Pass):
            return _failed(invocation.error_status,
                           f"edge function {deployed.spec.name} failed: {invocation.error}")
        target, headers = result.edit_request(request.target, request.headers)
        try:  # the function's rewrite is normalised like a client's target
            target = normalize_target(request.method, target)[0]
        except BadTarget as exc:
            return _failed(502, f"edge function {deployed.spec.name} rewrote to a bad target: "
                                f"{exc}")
        request = request.replace(target=target, headers=headers)
        route = self.route(request)
        if type(route) is not Route:
            return Answered(route, "none")
        route.function = None
        return Passed(route, body, request)

    async def _cached(self, request, writer, route: Route, started: float) -> None:
        hmap = request.hmap
        entry = self.cache.lookup(route.key.text, hmap)
        now = time.time()
        only_if_cached = "only-if-cached" in policy.parse_cache_control(hmap.get("cache-control"))
        waf = self._waf_for(route, request, cache_hit=entry is not None)
        if waf is not None:
            refusal = await self._inspect(waf, request, None, route.protection)
            if type(refusal) is Response:
                await self._refuse(request, writer, refusal, started)
                return
        if entry is not None:
            verdict = policy.evaluate(entry.freshness, hmap, now)
            if verdict in SERVABLE:
                await self._deliver_entry(request, writer, route, entry, "hit", started)
                return
            if verdict is policy.Verdict.STALE_WHILE_REVALIDATE:
                self.fetcher.background_refresh(request, route, entry)
                await self._deliver_entry(request, writer, route, entry, "hit-stale", started,
                                          f"{self.node}; hit; detail=stale-while-revalidate")
                return
        if only_if_cached:
            await self._error(request, writer, 504, "not in cache (only-if-cached)", started)
            return
        # RFC 9211: fwd=request when only the client's directives sent a usable entry back
        forced = entry is not None and not entry.freshness.no_cache and \
            policy.evaluate(entry.freshness, {}, now) is policy.Verdict.FRESH
        await self._from_origin(request, writer, route, entry, started,
                                "request" if forced else "stale")

    async def _deliver_entry(self, request, writer, route: Route, entry: CacheEntry, result: str,
                             started: float, cache_status: str | None = None) -> None:
        entry_for_client = self._encoded_variant(entry, route, request.hmap)
        try:
            response = self.deliver_entry(entry_for_client, request, route, time.time(),
                                          cache_status or f"{self.node}; hit")
        except OSError:  # disk body evicted under us: fetch again
            self.cache.purge_memory("url", entry.key, soft=False)
            await self._from_origin(request, writer, route, None, started)
            return
        await writer.send(response)
        self._log(request, response.status, _body_bytes(response), result, started)

    async def _from_origin(self, request, writer, route: Route, stale: CacheEntry | None,
                           started: float, why: str = "stale") -> None:
        """Fetch (collapsed, verge.edge.fetch), then deliver what the fetch phase returned."""
        fetched = await self.fetcher.fetch(request, route, stale, why)
        if fetched.kind == "entry":
            await self._deliver_entry(request, writer, route, fetched.entry, fetched.result,
                                      started, fetched.cache_status)
            return
        if fetched.kind == "error":
            exc = fetched.error
            await self._error(request, writer, getattr(exc, "status", 502),
                              f"origin unavailable: {exc}", started)
            return
        if fetched.kind == "pass":
            response = relayed(request, fetched.head.response, route.plan,
                               fetched.head.cache_status)
        else:
            source = self.fetcher.fill_source(request, route.plan, fetched.fill, fetched.head)
            response = deliver(source, request.hmap, request.method,
                               [("Age", "0"), ("Cache-Status", fetched.cache_status)])
        try:
            await writer.send(response)
        finally:
            self._log(request, response.status, writer.bytes_sent, fetched.result, started)

    async def _error(self, request, writer, status: int, message: str, started: float) -> None:
        await writer.send(text_response(status, f"{message}\n"))
        self._log(request, status, 0, "error", started)

    # ----- pass-through ----------------------------------------------------------------------------
    async def _proxy(self, request, writer: ResponseWriter, route: Route, started: float,
                     body: bytes | None = None) -> None:
        """Forward a request that must not be cached, bodies streamed both ways (or the body
        an edge function already read)."""
        headers = proxy_request_headers(request, route, conditional=True, via=self.name)
        body = request.body if body is None else body
        result = "bypass" if request.method in CACHEABLE_METHODS else "pass"
        t0 = time.perf_counter()
        try:
            response, _ = await route.origins.request(request.method, request.target, headers,
                                                      body if body is not None else None)
        except UpstreamError as exc:
            self.metrics.origin_errors += 1
            await self._error(request, writer, exc.status, f"origin unavailable: {exc}", started)
            return
        self.metrics.origin_latency(time.perf_counter() - t0, request.service)
        fwd = "bypass" if result == "bypass" else "method"
        if request.method not in SAFE_METHODS and response.status < 400:
            self._invalidate(request, route.service, response.headers)
        answer = relayed(request, response, route.plan,
                         after_upstream(response.headers, f"{self.node}; fwd={fwd}"))
        try:
            await writer.send(answer)
        finally:
            self._log(request, response.status, writer.bytes_sent, result, started)

    async def _tunnel(self, request, writer: ResponseWriter, route: Route, started: float) -> None:
        """A WebSocket upgrade: spliced to an origin of the route, never cached."""
        headers = proxy_request_headers(request, route, conditional=True, via=self.name)
        try:
            result = await open_tunnel(request, writer, route.origins, headers)
        except TunnelError as exc:
            self.metrics.origin_errors += 1
            await self._error(request, writer, exc.status, f"origin unavailable: {exc}", started)
            return
        self._log(request, result.status, result.to_client, "pass", started)

    def _invalidate(self, request, service, response_headers) -> None:
        """RFC 9111 §4.4: the target URI and same-host Location/Content-Location, each under
        the key its own rule gives it (the route phase's CacheKey), every stored variant:
        with key headers, every key that starts with the URL's part."""
        targets = [request.target]
        for name in ("location", "content-location"):
            value = _field(response_headers, name)
            if value:
                targets.append(value)
        for target in targets:
            if "://" in target:
                host = target.split("://", 1)[1].split("/", 1)[0].split(":")[0].lower()
                if host != request.host:
                    continue
                target = "/" + target.split("://", 1)[1].partition("/")[2]
            path, _, query = target.partition("?")
            rule = service.match_rule(keys.normalize_path(path))
            if rule is not None and rule.signed is not None:
                query = take_param(query, rule.signed.param)[1]
            key_host = self.config.key_host(service, request.host)
            kind, value = CacheKey.under(rule, key_host, path, query).scope()
            if kind == "url":
                self.cache.invalidate(value)
            else:
                self.cache.purge_memory(kind, value, soft=False)
                self.cache.purge_disk(kind, value, soft=False)

    # ----- reporting ----------------------------------------------------------------------------------
    def _log(self, request, status, sent: int, result: str, started: float) -> None:
        """Record the request (metrics and access log are fed in batches: observe.records)."""
        pending = self._records
        pending.append((time.time(), _monotonic() - started, request.client,
                        request.method, request.host, request.target, status, sent, result,
                        request.service))
        if len(pending) >= RequestRecords.BATCH:
            self.records.drain()

    def report_error(self, request, exc: BaseException) -> None:
        log.error("error serving %s %s: %r", request.method, request.target, exc, exc_info=exc)

    def report_protocol_error(self, client: str, status: int, message: str) -> None:
        self.records.add((time.time(), 0.0, client, "-", "-", "-", status, 0, "error", ""))

    def new_request_id(self) -> str:
        """16 hex digits, unique per worker run: a random prefix and a counter (uuid4 costs
        several times more, and a request id needs uniqueness, not secrecy)."""
        return f"{self._id_prefix}{next(self._request_ids) & 0xFFFFFFFF:08x}"


def policy_options(config, rule) -> policy.PolicyOptions:
    """The RFC 9111 settings of one rule (or a service's default), built once per config:
    micro-caching forces its TTL, else the rule's TTL (forced with ``override``)."""
    ttl, override = (rule.micro_cache, True) if rule is not None and rule.micro_cache else \
        (rule.ttl, rule.override) if rule is not None else (None, False)
    return policy.PolicyOptions(
        rule_ttl=ttl, rule_override=override,
        heuristic_fraction=config.cache.heuristic_fraction,
        heuristic_max=config.cache.heuristic_max,
    )


def _entry_body(entry: CacheEntry, start: int, end: int | None):
    """Bytes [start, end) of an entry's body: from memory, or a FileBody of its disk file
    (OSError when the file is gone)."""
    body = entry.body
    end = entry.body_size if end is None else end
    if body is not None:
        return body if start == 0 and end == len(body) else body[start:end]
    return FileBody(entry.disk.open(), start, end - start)


def _body_bytes(response: Response) -> int:
    """The body bytes a response sends (for the access log)."""
    return (response.length or 0) if response.body is not None else 0


def _field(headers, name: str) -> str | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _same_origins(old_service, new_service) -> bool:
    return old_service.origins == new_service.origins and \
        old_service.health_check == new_service.health_check and \
        [r.origins for r in old_service.rules] == [r.origins for r in new_service.rules]


def _without_node_label(request: Request, host: str) -> Request:
    """EDGE.SERVICE-HOST (where the HTTP router sends users) is served as SERVICE-HOST: same
    service, same cache entries, and the origin sees the service's own Host."""
    return request.replace(headers=[(n, host) if n.lower() == "host" else (n, v)
                                    for n, v in request.headers])
