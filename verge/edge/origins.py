"""A service's origins: weighted choice, health (active checks + passive failures), failover.

A request goes to the healthy origins in weighted order, starting from a rotating point so
load spreads by weight; on a connect error — or a 5xx when the request can be replayed —
the next origin is tried. The rotation is smooth weighted round-robin, as in nginx: its time
and memory depend on the number of origins, never on the weights, so no weight in a
tenant's config can make an edge worker allocate or loop for it.

An origin that fails ``fails`` times in a row (checks or live requests) is marked down until
``passes`` consecutive health checks succeed. When every origin is down they are all tried
anyway: a wrong health verdict must not black-hole a site.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from verge.http.client import ConnectError, Origin, OriginPool, UpstreamError, UpstreamResponse
from verge.routing.hashing import rank

log = logging.getLogger("verge.origins")


@dataclass(slots=True)
class OriginState:
    origin: Origin
    weight: int
    host_header: str | None
    healthy: bool = True
    fail_streak: int = 0
    pass_streak: int = 0


class OriginSet:
    def __init__(self, specs, pool: OriginPool, health_check=None) -> None:
        self.pool = pool
        self.health_check = health_check
        self.states = [
            OriginState(Origin.parse(spec.url, **spec.tls_options()), spec.weight, spec.host_header)
            for spec in specs
        ]
        self._weights = [max(0, state.weight) for state in self.states]
        self._credit = [0] * len(self.states)
        self._total_weight = sum(self._weights)
        self._fails = health_check.fails if health_check else 3
        self._passes = health_check.passes if health_check else 2
        self._task: asyncio.Task | None = None

    def order(self) -> list[OriginState]:
        """Healthy origins first, starting at the weighted round-robin position."""
        start = self._next_start()
        rotated = self.states[start:] + self.states[:start]
        healthy = [s for s in rotated if s.healthy]
        return healthy + [s for s in rotated if not s.healthy]

    def _next_start(self) -> int:
        """Smooth weighted round-robin: every origin earns its weight in credit, the one with
        the most credit is picked and pays the total. Over any run of total-weight picks each
        origin is picked weight times, spread out rather than in a burst."""
        if self._total_weight == 0:
            return 0
        credit = self._credit
        for index, weight in enumerate(self._weights):
            credit[index] += weight
        chosen = max(range(len(credit)), key=credit.__getitem__)
        credit[chosen] -= self._total_weight
        return chosen

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None = None,
        candidates: list[OriginState] | None = None,
    ) -> tuple[UpstreamResponse, OriginState]:
        """Send to the best origin (or the given candidates in order), failing over; raises
        the last UpstreamError when all fail."""
        replayable = body is None or isinstance(body, bytes)
        candidates = candidates if candidates is not None else self.order()
        last_error: UpstreamError | None = None
        for i, state in enumerate(candidates):
            is_last = i == len(candidates) - 1
            try:
                response = await self.pool.request(
                    state.origin, method, target, self._with_host(headers, state), body
                )
            except ConnectError as exc:
                self._record(state, ok=False)
                last_error = exc
                continue
            except UpstreamError as exc:
                self._record(state, ok=False)
                if not replayable:
                    raise
                last_error = exc
                continue
            if response.status >= 500 and replayable and not is_last:
                self._record(state, ok=False)
                response.close()
                continue
            self._record(state, ok=response.status < 500)
            return response, state
        assert last_error is not None
        raise last_error

    def _with_host(
        self, headers: list[tuple[str, str]], state: OriginState
    ) -> list[tuple[str, str]]:
        """The origin's host_header if set; the client's Host; or (an HTTP/1.0 client sent
        none) the origin's own authority, since HTTP/1.1 requires one (RFC 9112 §3.2)."""
        if state.host_header is None:
            if any(n.lower() == "host" for n, _ in headers):
                return headers
            return [*headers, ("Host", state.origin.authority)]
        return [(n, v) for n, v in headers if n.lower() != "host"] + [("Host", state.host_header)]

    def _record(self, state: OriginState, ok: bool) -> None:
        if ok:
            state.fail_streak = 0
            state.pass_streak += 1
            if not state.healthy and state.pass_streak >= self._passes:
                state.healthy = True
                log.warning("origin %s is back up", state.origin.authority)
        else:
            state.pass_streak = 0
            state.fail_streak += 1
            if state.healthy and state.fail_streak >= self._fails:
                state.healthy = False
                log.warning("origin %s marked down", state.origin.authority)

    # ----- active health checks ------------------------------------------------------------
    def start_health_checks(self) -> None:
        if self.health_check is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._check_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _check_forever(self) -> None:
        check = self.health_check
        while True:
            await asyncio.gather(*(self._check_one(s) for s in self.states))
            await asyncio.sleep(check.interval)

    async def _check_one(self, state: OriginState) -> None:
        check = self.health_check
        headers = [
            ("Host", state.host_header or state.origin.authority),
            ("User-Agent", "verge-health"),
        ]
        ok = False
        with contextlib.suppress(UpstreamError, OSError, TimeoutError):
            async with asyncio.timeout(check.timeout):
                response = await self.pool.request(state.origin, "GET", check.path, headers)
                await response.read_all(limit=1 << 20)
                response.release()
                ok = check.is_healthy_status(response.status)
        self._record(state, ok)


@dataclass(frozen=True, slots=True)
class _ParentSpec:
    url: str
    weight: int = 1
    host_header: str | None = None

    def tls_options(self) -> dict:
        return {}  # https parents: verified against the system CAs, SNI = the parent's host


class ParentSet(OriginSet):
    """The shield tier: which parent edge fills a cache key, and the failover order after it.

    Rendezvous hashing of the cache key picks the parent, so every child sends a given
    object to the same shield, which collapses their misses into one origin request. A
    parent that fails is skipped for ``RETRY_AFTER`` seconds (there are no active checks:
    a parent is another edge, and live fills are checks enough), then tried again.
    """

    RETRY_AFTER = 5.0

    def __init__(self, urls: Sequence[str], pool: OriginPool, own_name: str) -> None:
        super().__init__([_ParentSpec(url) for url in urls], pool, None)
        self.own_name = own_name
        self._fails = 1  # one failed fill marks a parent down (until RETRY_AFTER)
        self._down_since: dict[str, float] = {}

    def order_for(self, key: str) -> list[OriginState]:
        now = time.monotonic()
        for state in self.states:
            since = self._down_since.get(state.origin.authority)
            if not state.healthy and since is not None and now - since > self.RETRY_AFTER:
                state.healthy, state.fail_streak = True, 0  # half-open: try it again
        ranked = rank(key, self.states, name=lambda s: s.origin.authority)
        return [s for s in ranked if s.healthy]

    def _record(self, state: OriginState, ok: bool) -> None:
        was_healthy = state.healthy
        super()._record(state, ok)
        if was_healthy and not state.healthy:
            self._down_since[state.origin.authority] = time.monotonic()
        if ok:
            state.healthy = True
