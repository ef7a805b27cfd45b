"""A service's origins: weighted choice, health (active checks + passive failures), failover.

A request goes to the healthy origins in weighted order, starting from a rotating point so
load spreads by weight; on a connect error — or a 5xx when the request can be replayed —
the next origin is tried. An origin that fails ``fails`` times in a row (checks or live
requests) is marked down until ``passes`` consecutive health checks succeed. When every
origin is down they are all tried anyway: a wrong health verdict must not black-hole a site.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from verge.http.client import ConnectError, Origin, OriginPool, UpstreamError, UpstreamResponse

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
            OriginState(Origin.parse(spec.url), spec.weight, spec.host_header) for spec in specs
        ]
        ring = [i for i, s in enumerate(self.states) for _ in range(s.weight)]
        self._ring = itertools.cycle(ring or [0])
        self._fails = health_check.fails if health_check else 3
        self._passes = health_check.passes if health_check else 2
        self._task: asyncio.Task | None = None

    def order(self) -> list[OriginState]:
        """Healthy origins first, starting at the weighted round-robin position."""
        start = next(self._ring)
        rotated = self.states[start:] + self.states[:start]
        healthy = [s for s in rotated if s.healthy]
        return healthy + [s for s in rotated if not s.healthy]

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes | AsyncIterator[bytes] | None = None,
                      ) -> tuple[UpstreamResponse, OriginState]:
        """Send to the best origin, failing over; raises the last UpstreamError when all fail."""
        replayable = body is None or isinstance(body, bytes)
        candidates = self.order()
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

    def _with_host(self, headers: list[tuple[str, str]], state: OriginState) -> list[tuple[str, str]]:
        if state.host_header is None:
            return headers
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
        headers = [("Host", state.host_header or state.origin.authority), ("User-Agent", "verge-health")]
        ok = False
        with contextlib.suppress(UpstreamError, OSError, TimeoutError):
            async with asyncio.timeout(check.timeout):
                response = await self.pool.request(state.origin, "GET", check.path, headers)
                await response.read_all(limit=1 << 20)
                response.release()
                ok = check.is_healthy_status(response.status)
        self._record(state, ok)
