"""The fetch and store phases: collapsed cache fills from the origin.

One :class:`~verge.edge.fill.Fill` per cache key is in flight at a time. The first request
that misses (or finds a stale entry needing revalidation) starts the fill as its own task;
concurrent requests for the key wait for the fill's head and then read the same body. The
fill task outlives any client, so a disconnect never leaves a half-filled object: either
the whole body is committed (disk rename, then memory) or nothing is.

Revalidation sends the stored validators; a 304 refreshes the stored headers (§4.3.4) and
everyone is answered from the entry. On origin failure a stale entry is served when
stale-if-error allows it, else 502/504 with a clear body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from verge.cache import policy
from verge.cache.filllock import NodeFillLocks
from verge.cache.store import CacheEntry, tags_of
from verge.edge.compress import Compressor, choose_encoding, is_compressible
from verge.edge.deliver import (
    HeaderPlan,
    Source,
    add_vary,
    after_upstream,
    apply_plan,
    encoded_etag,
    storable_headers,
)
from verge.edge.fill import Fill, FillAborted, FillHead
from verge.edge.signing import COOKIE
from verge.http.client import UpstreamError
from verge.http.message import header_map, replace_header, strip_hop_by_hop
from verge.http.response import Response

if TYPE_CHECKING:
    from verge.edge.app import EdgeApp, Route

log = logging.getLogger("verge.fetch")

MAX_HOPS = 8  # Via entries beyond which a request is taken for a loop
NODE_LOCK_TIMEOUT = 5.0  # seconds a miss waits for another worker's fill (nginx's default)
PASS_SECONDS = 10.0  # after an uncacheable answer, misses of the key do not wait for fills

# Request fields not sent on a cache fill: the edge wants the full, unconditional object.
FILL_DROP = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since",
                       "if-range", "range"})
# Framing is never copied from the client: the upstream client frames the body it sends
# (verge.http.client), and a fill sends none.
FRAMING = frozenset({"content-length", "transfer-encoding"})


def proxy_request_headers(request, route: Route, *, conditional: bool,
                          via: str = "verge") -> list[tuple[str, str]]:
    """Client request headers as sent to the origin: hop-by-hop and framing removed, rules
    applied."""
    drop = FRAMING if conditional else FRAMING | FILL_DROP
    headers = [(n, v) for n, v in strip_hop_by_hop(request.headers) if n.lower() not in drop]
    service, rule = route.service, route.rule
    remove = {n.lower() for n in service.headers.request_remove}
    add = dict(service.headers.request_add)
    if rule is not None:
        remove |= {n.lower() for n in rule.headers.request_remove}
        add.update(rule.headers.request_add)
        if rule.ignore_cookies:
            remove.add("cookie")
    remove |= {n.lower() for n in add}
    headers = [(n, v) for n, v in headers if n.lower() not in remove]
    headers.extend(add.items())
    forwarded = request.hmap.get("x-forwarded-for")
    client = request.client or "unknown"
    headers = [(n, v) for n, v in headers if n.lower() != "x-forwarded-for"]
    headers.append(("X-Forwarded-For", f"{forwarded}, {client}" if forwarded else client))
    upstream_via = request.hmap.get("via")
    headers = [(n, v) for n, v in headers if n.lower() != "via"]
    headers.append(("Via", f"{upstream_via}, 1.1 {via}" if upstream_via else f"1.1 {via}"))
    return headers


def visited(request, name: str) -> bool:
    """Has this request already passed through the node `name` (a tier loop), or through
    implausibly many proxies? Via (RFC 9110 §7.6.3) lists every hop's received-by."""
    via = request.hmap.get("via")
    if not via:
        return False
    hops = via.split(",")
    return len(hops) > MAX_HOPS or any(hop.split()[1:2] == [name] for hop in hops)


def response_headers_for_client(headers, plan: HeaderPlan) -> list[tuple[str, str]]:
    """Origin response headers minus hop-by-hop and framing, with the plan's edits."""
    return apply_plan([(n, v) for n, v in strip_hop_by_hop(headers)
                       if n.lower() not in ("content-length", "cache-status")], plan)


def relayed(request, response, plan: HeaderPlan, cache_status: str) -> Response:
    """One origin response for one client, nothing stored (pass-through): its body streams
    from the origin as the client reads it."""
    headers = response_headers_for_client(response.headers, plan)
    headers.append(("Cache-Status", cache_status))
    body = None
    if request.method == "HEAD":
        response.close()
    else:
        body = _upstream_body(response)
    return Response(response.status, headers, body, _content_length(response.headers),
                    reason=response.reason)


async def _upstream_body(response):
    """An origin response's body; a break mid-body resets the client's connection (the
    length it was promised is no longer true)."""
    try:
        async for chunk in response:
            yield chunk
    except UpstreamError:
        response.close()
        raise ConnectionResetError("origin broke mid-body") from None
    response.release()


class Fetcher:
    def __init__(self, app: EdgeApp, locks: NodeFillLocks | None = None) -> None:
        self.app = app
        self.fills: dict[str, Fill] = {}
        self.locks = locks  # collapsing across the node's workers (verge.cache.filllock)
        self._node_waits: dict[str, asyncio.Future] = {}  # key -> this worker's one poller

    # ----- entry points ----------------------------------------------------------------------
    async def fetch(self, request, route: Route, stale: CacheEntry | None,
                    why: str = "stale") -> Fetched:
        """The fetch phase for a miss or a stored entry that must be revalidated (why:
        'stale' or 'request', the RFC 9211 fwd reason): join or start the key's fill
        (waiting for another worker's fill of the key first). Returns what to deliver."""
        fill = self.fills.get(route.key.text)
        collapsed = fill is not None
        if collapsed and visited(request, self.app.name):
            # A tier loop came back to us: joining our own fill would wait for ourselves.
            return await self._own_fetch(request, route)
        stripe = None
        if fill is None and self.locks is not None and not visited(request, self.app.name):
            outcome = await self._node_fill(route.key.text, request)
            if isinstance(outcome, CacheEntry):
                return Fetched("entry", entry=outcome, result="collapsed",
                               cache_status=f"{self.app.node}; hit; detail=collapsed")
            stripe = outcome
            fill = self.fills.get(route.key.text)  # another waiter of this worker started it
            collapsed = fill is not None
            if collapsed and stripe is not None:
                self.locks.release(stripe)
        if fill is None:
            fill = self._start_fill(request, route, stale, why, stripe)
        head = await asyncio.shield(fill.head)
        if collapsed and not self._can_share(head, request):
            return await self._own_fetch(request, route)
        return _outcome(fill, head, collapsed)

    def background_refresh(self, request, route: Route, stale: CacheEntry) -> None:
        """stale-while-revalidate: refresh without a waiting client (collapsed as usual; a
        key another worker is filling is left to it)."""
        if route.key.text in self.fills:
            return
        stripe = None
        if self.locks is not None:
            stripe = self.locks.try_acquire(route.key.text)
            if stripe is None:
                return
        fill = self._start_fill(request, route, stale, "stale", stripe)
        fill.head.add_done_callback(lambda f: _discard_uncacheable(f))

    # ----- collapsing across workers ---------------------------------------------------------
    async def _node_fill(self, key: str, request) -> CacheEntry | int | None:
        """Take the key's node-wide fill lock (its stripe: fill it), or wait for the worker
        holding it and return the entry it stored; None: fetch without the lock (the key is
        marked uncacheable, the wait timed out, or a fill of this worker can be joined).
        One coroutine per key and worker polls; the others wait for its verdict."""
        while True:
            poller = self._node_waits.get(key)
            if poller is None:
                break
            await asyncio.shield(poller)
            if key in self.fills:
                return None
            entry = self._servable(key, request)
            if entry is not None:
                return entry
        stripe = self.locks.try_acquire(key)
        if stripe is not None:
            return stripe
        poller = self._node_waits[key] = asyncio.get_running_loop().create_future()
        try:
            return await self._poll_node_fill(key, request)
        finally:
            del self._node_waits[key]
            poller.set_result(None)

    async def _poll_node_fill(self, key: str, request) -> CacheEntry | int | None:
        locks, loop = self.locks, asyncio.get_running_loop()
        deadline = loop.time() + NODE_LOCK_TIMEOUT
        delay = 0.002
        while loop.time() < deadline and not locks.passing(key):
            await asyncio.sleep(delay)  # nginx's proxy_cache_lock polls too: no cross-process event
            delay = min(delay * 2, 0.05)
            entry = self._servable(key, request)
            if entry is not None or key in self.fills:
                return entry
            stripe = locks.try_acquire(key)
            if stripe is not None:  # the other fill ended: stored (serve it) or not (fill it)
                entry = self._servable(key, request)
                if entry is None:
                    return stripe
                locks.release(stripe)
                return entry
        return None

    def _servable(self, key: str, request) -> CacheEntry | None:
        entry = self.app.cache.lookup(key, request.hmap)
        if entry is not None and policy.evaluate(entry.freshness, request.hmap, time.time()) \
                in (policy.Verdict.FRESH, policy.Verdict.STALE_OK):
            return entry
        return None

    # ----- fills ---------------------------------------------------------------------------------
    def _start_fill(self, request, route: Route, stale: CacheEntry | None,
                    why: str = "stale", stripe: int | None = None) -> Fill:
        fill = Fill(route.key.text, self.app.cache.max_memory_object)
        self.fills[route.key.text] = fill
        task = asyncio.get_running_loop().create_task(
            self._run_fill(fill, request, route, stale, why))
        task.add_done_callback(lambda t: self._fill_done(fill, t, stripe))
        return fill

    def _fill_done(self, fill: Fill, task: asyncio.Task, stripe: int | None = None) -> None:
        if stripe is not None:
            self.locks.release(stripe)
        if self.fills.get(fill.key) is fill:
            del self.fills[fill.key]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("cache fill for %r failed: %r", fill.key, exc, exc_info=exc)
            if not fill.done:
                fill.fail(exc)

    async def _run_fill(self, fill: Fill, request, route: Route, stale: CacheEntry | None,
                        why: str = "stale") -> None:
        app = self.app
        fwd = why if stale is not None else "miss"
        headers = proxy_request_headers(request, route, conditional=False, via=app.name)
        if stale is not None:
            headers.extend(policy.revalidation_headers(stale.freshness))
        request_time = time.time()
        t0 = time.perf_counter()
        try:
            response = await self._upstream(request, route, headers)
        except UpstreamError as exc:
            app.metrics.origin_errors += 1
            self._origin_failed(fill, request, stale, exc, exc.status)
            return
        app.metrics.origin_latency(time.perf_counter() - t0, request.service)
        response_time = time.time()
        if stale is not None and response.status == 304:
            await self._refreshed(fill, request, route, stale, response, request_time,
                                  response_time, fwd)
            return
        if stale is not None and response.status >= 500 and \
                policy.stale_if_error_ok(stale.freshness, request.hmap, response_time):
            response.close()
            self._origin_failed(fill, request, stale, None, response.status)
            return
        freshness = None
        if route.strip_cookies or not any(n.lower() == "set-cookie" for n, _ in response.headers):
            freshness = policy.analyze(
                method="GET", status=response.status, request_headers=request.hmap,
                response_headers=header_map(response.headers), request_time=request_time,
                response_time=response_time, options=route.policy,
            )
        if freshness is None:
            if self.locks is not None:  # other workers' waiters: go to the origin yourselves
                self.locks.mark_pass(fill.key, PASS_SECONDS)
            fill.set_head(FillHead("uncacheable", response.status, response.reason,
                                   response.headers, response=response,
                                   cache_status=after_upstream(
                                       response.headers, f"{app.node}; fwd={fwd}"
                                       + (f"; fwd-status={response.status}" if stale else ""))))
            fill.finish(None)
            return
        await self._store(fill, request, route, response, freshness, stale, fwd)

    async def _upstream(self, request, route: Route, headers):
        """A fill's request: to the shield tier (parent chosen by the cache key, failing over
        to the next) unless this request already passed through us, then to the origin."""
        parents = self.app.parents
        if parents is not None and not visited(request, self.app.name):
            candidates = parents.order_for(route.key.text)
            if candidates:
                try:
                    response, _ = await parents.request("GET", request.target,
                                                        _with_token(headers, route),
                                                        candidates=candidates)
                except UpstreamError as exc:
                    log.warning("no parent could fill %s (%s); going to the origin",
                                request.target, exc)
                else:
                    if response.status < 500:
                        return response
                    response.close()
        response, _ = await route.origins.request("GET", request.target, headers)
        return response

    def _origin_failed(self, fill: Fill, request, stale, exc, status: int) -> None:
        now = time.time()
        if stale is not None and policy.stale_if_error_ok(stale.freshness, request.hmap, now):
            fill.set_head(FillHead("entry", entry=stale,
                                   cache_status=f"{self.app.node}; hit; detail=stale-if-error"))
            fill.finish(None)
            return
        fill.fail(exc or UpstreamError(f"origin answered {status}"))

    async def _refreshed(self, fill, request, route, stale: CacheEntry, response,
                         request_time: float, response_time: float, fwd: str) -> None:
        """A 304 to our revalidation: merge headers, renew freshness, serve the entry."""
        response.release()
        merged = policy.merge_304(stale.headers, storable_headers(response.headers, route.strip_cookies))
        freshness = policy.analyze(
            method="GET", status=stale.status, request_headers=request.hmap,
            response_headers=header_map(merged), request_time=request_time,
            response_time=response_time, options=route.policy,
        )
        if freshness is not None:
            self.app.cache.refresh(stale, merged, freshness)
        fill.set_head(FillHead("entry", entry=stale,
                               cache_status=f"{self.app.node}; fwd={fwd}; fwd-status=304"))
        fill.finish(stale)

    async def _store(self, fill: Fill, request, route: Route, response, freshness, stale,
                     fwd: str) -> None:
        """Stream the body into the fill (disk + memory) and index it when complete."""
        app = self.app
        cache = app.cache
        variant = policy.secondary_key(freshness.vary, request.hmap)
        headers = storable_headers(response.headers, route.strip_cookies)
        length = _content_length(response.headers)
        writer = cache.disk.writer(route.key.text, variant)
        fill.attach_writer(writer)
        status_note = f"; fwd-status={response.status}" if stale is not None else ""
        fill.set_head(FillHead("stream", response.status, response.reason, headers, variant,
                               freshness.vary, length,
                               cache_status=after_upstream(
                                   response.headers, f"{app.node}; fwd={fwd}{status_note}; stored")))
        try:
            async for chunk in response:
                fill.append(chunk)
        except (UpstreamError, OSError) as exc:
            writer.abort()
            response.close()
            fill.fail(exc)
            return
        response.release()
        entry = CacheEntry(
            key=route.key.text, variant=variant, status=response.status, reason=response.reason,
            headers=headers, freshness=freshness, tags=tags_of(headers), body_size=fill.size,
        )
        try:
            # the index write (and eviction) run on the disk's writer thread: hits go on
            entry.disk = await cache.commit_async(writer, entry, freshness.vary)
        except OSError as exc:
            log.error("could not store %r on disk: %r", route.key.text, exc)
            writer.abort()
        if fill.size <= cache.max_memory_object:
            entry.body = fill.buffered
        if entry.body is not None or entry.disk is not None:
            cache.put(entry, freshness.vary)
        fill.finish(entry)

    def _can_share(self, head: FillHead, request) -> bool:
        if head.kind in ("uncacheable",):
            return False
        if head.kind == "stream":
            return policy.secondary_key(head.vary, request.hmap) == head.variant
        return True

    async def _own_fetch(self, request, route: Route) -> Fetched:
        """A waiter that cannot use the collapsed response fetches on its own (uncollapsed)."""
        fill = Fill(route.key.text, self.app.cache.max_memory_object)
        await self._run_fill(fill, request, route, None)
        return _outcome(fill, fill.head.result(), False)

    def fill_source(self, request, plan: HeaderPlan, fill: Fill, head: FillHead) -> Source:
        """The deliver phase's view of a fill still arriving (the same decisions as for a
        stored entry: 304, 206, 416, HEAD): the body read from the fill as it grows,
        compressed on the way when the client accepts an encoding and wants the whole body."""
        headers = apply_plan(head.headers, plan)
        etag, body = _first(head.headers, "etag"), _from_fill
        if self._compressible(head):
            headers = add_vary(headers, "Accept-Encoding")
            encoding = self._encoding_for(request, head)
            if encoding is not None:  # as the stored compressed variant will be served
                etag = encoded_etag(etag, encoding) if etag else None
                headers = [*replace_header(headers, "etag", etag),
                           ("Content-Encoding", encoding)]
                body = partial(_compressed, encoding=encoding)
        return Source(head.status, head.reason, headers, etag,
                      _first(head.headers, "last-modified"), time.time(),
                      head.total if body is _from_fill else None,
                      lambda start, end: body(fill, start, end))

    def _compressible(self, head: FillHead) -> bool:
        """Whether the edge may compress this fill's body (its type and encoding allow)."""
        settings = self.app.compression
        return settings.enabled and head.status == 200 \
            and _first(head.headers, "content-encoding") is None \
            and is_compressible(_first(head.headers, "content-type"), settings.types)

    def _encoding_for(self, request, head: FillHead) -> str | None:
        """The encoding this client gets a compressible fill in: none for a Range request
        (ranges are of the identity body) or a body below the size worth compressing."""
        settings = self.app.compression
        if "range" in request.hmap or (head.total is not None and head.total < settings.min_bytes):
            return None
        return choose_encoding(request.hmap.get("accept-encoding"), settings.algorithms)

@dataclass(slots=True)
class Fetched:
    """The fetch phase's outcome, for the deliver phase:

    ``entry``  deliver ``entry`` (stored by another worker, refreshed by a 304, served stale
               on an origin error, or a fill that completed before this waiter looked)
    ``fill``   deliver ``fill`` as it arrives (``head`` says what it is)
    ``pass``   relay the uncacheable ``head.response`` to this one client
    ``error``  the origin failed: ``error`` says how (its ``status``: 502 or 504)
    """

    kind: str
    entry: CacheEntry | None = None
    fill: Fill | None = None
    head: FillHead | None = None
    collapsed: bool = False
    result: str = "miss"  # the access log's cache result
    cache_status: str = ""
    error: Exception | None = None


def _outcome(fill: Fill, head: FillHead, collapsed: bool) -> Fetched:
    """What a fill's head means for one of its clients."""
    if head.kind == "error":
        return Fetched("error", error=head.error)
    if head.kind == "entry":
        stale = "stale-if-error" in head.cache_status
        return Fetched("entry", entry=head.entry, result="hit-stale" if stale else "revalidated",
                       cache_status=head.cache_status)
    if head.kind == "uncacheable":
        return Fetched("pass", head=head)
    result = "collapsed" if collapsed else "miss"
    cache_status = head.cache_status + ("; collapsed" if collapsed else "")
    if fill.done and fill.entry is not None and fill.error is None:
        # completed already (a collapsed waiter arriving late): deliver like a hit
        return Fetched("entry", entry=fill.entry, result=result, cache_status=cache_status)
    return Fetched("fill", fill=fill, head=head, collapsed=collapsed, result=result,
                   cache_status=cache_status)


def _with_token(headers, route: Route):
    """A parent edge checks signed URLs too: hand it the token the client was admitted with
    (as the cookie, so that it answers without a Set-Cookie the child would not store)."""
    if route.admission is None:
        return headers
    return [*headers, ("Cookie", f"{COOKIE}={route.admission.token}")]


def _discard_uncacheable(fut: asyncio.Future) -> None:
    """A background refresh has no client to stream an uncacheable response to."""
    if fut.cancelled():
        return
    head = fut.result()
    if head.kind == "uncacheable" and head.response is not None:
        head.response.close()


async def _from_fill(fill: Fill, start: int, end: int | None):
    """A fill's body bytes [start, end) as they arrive; an origin failure mid-body cuts the
    client's response short (the connection is reset: its length is no longer true)."""
    try:
        async for chunk in fill.stream(start, end):
            yield chunk
    except FillAborted:
        raise ConnectionResetError("origin broke mid-body") from None


async def _compressed(fill: Fill, start: int, end: int | None, *, encoding: str):
    """A fill's body compressed on the way (its length becomes unknown: chunked)."""
    compressor = Compressor(encoding)
    async for chunk in _from_fill(fill, start, end):
        yield compressor.compress(chunk)
    yield compressor.finish()


def _first(headers, name: str) -> str | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _content_length(headers) -> int | None:
    value = _first(headers, "content-length")
    return int(value) if value is not None and value.strip().isdigit() else None
