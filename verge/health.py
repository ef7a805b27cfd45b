"""Edge health, as Traffic Monitor keeps it: N failed checks mark an edge down, M good ones up.

``HealthState`` is the pure state machine (hysteresis keeps a flapping edge from bouncing
clients back and forth); ``HealthMonitor`` polls every edge on an interval — HTTP GET of its
health URL, or a TCP connect when it has none — and reports transitions. The control plane
runs one for the fleet (the verdict is stored with each node, shown in the dashboard and
read by the routers); a router without a control plane runs its own.

It lives outside both ``verge.control`` and ``verge.routing`` because both run it: the
router already depends on the control plane's client, so the control plane must not depend
on the router (see ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("verge.health")


@dataclass(slots=True)
class HealthState:
    fails_to_down: int = 2
    passes_to_up: int = 2
    up: bool = True
    fail_streak: int = 0
    pass_streak: int = 0
    checked_at: float = 0.0
    error: str = ""

    def record(self, ok: bool, error: str = "", at: float | None = None) -> bool:
        """Count one check; True when the verdict (up/down) changed."""
        self.checked_at = time.time() if at is None else at
        self.error = "" if ok else error
        if ok:
            self.fail_streak, self.pass_streak = 0, self.pass_streak + 1
            if not self.up and self.pass_streak >= self.passes_to_up:
                self.up = True
                return True
        else:
            self.pass_streak, self.fail_streak = 0, self.fail_streak + 1
            if self.up and self.fail_streak >= self.fails_to_down:
                self.up = False
                return True
        return False

    def view(self) -> dict:
        return {"state": "up" if self.up else "down", "fails": self.fail_streak,
                "passes": self.pass_streak, "checked_at": self.checked_at, "error": self.error}


@dataclass(frozen=True, slots=True)
class Target:
    """What to check for one edge: an HTTP URL (2xx = healthy) or, without one, host:port."""

    name: str
    health_url: str | None
    address: str  # a URL whose host:port takes a TCP connect when there is no health_url


Listener = Callable[[str, HealthState], None]


class HealthMonitor:
    def __init__(self, *, interval: float = 1.0, timeout: float = 1.0, fails: int = 2,
                 passes: int = 2, on_change: Listener | None = None,
                 on_check: Listener | None = None) -> None:
        self.interval, self.timeout = interval, timeout
        self.fails, self.passes = fails, passes
        self.on_change, self.on_check = on_change, on_check
        self.targets: dict[str, Target] = {}
        self.states: dict[str, HealthState] = {}
        self._client = httpx.AsyncClient(timeout=timeout, trust_env=False)
        self._task: asyncio.Task | None = None
        self._round = asyncio.Event()

    def set_targets(self, targets: Mapping[str, Target]) -> None:
        """Replace the watched set; edges that stay keep their state (and streaks)."""
        self.targets = dict(targets)
        for name in list(self.states):
            if name not in self.targets:
                del self.states[name]
        for name in self.targets:
            self.states.setdefault(name, HealthState(self.fails, self.passes))

    def is_up(self, name: str) -> bool:
        state = self.states.get(name)
        return state is None or state.up

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()

    async def wait_round(self) -> None:
        """Until the next full round of checks has finished (for tests and start-up)."""
        self._round.clear()
        await self._round.wait()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.check_all()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def check_all(self) -> None:
        targets = list(self.targets.values())
        results = await asyncio.gather(*(self._check(t) for t in targets))
        for target, (ok, error) in zip(targets, results, strict=True):
            state = self.states.get(target.name)
            if state is None:  # removed while being checked
                continue
            if state.record(ok, error):
                log.warning("edge %s is %s%s", target.name, "up" if state.up else "down",
                            f" ({error})" if error else "")
                if self.on_change:
                    self.on_change(target.name, state)
            if self.on_check:
                self.on_check(target.name, state)
        self._round.set()

    async def _check(self, target: Target) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(self.timeout):
                if target.health_url:
                    response = await self._client.get(target.health_url)
                    ok = 200 <= response.status_code < 300
                    return ok, "" if ok else f"HTTP {response.status_code}"
                await _tcp_connect(target.address)
                return True, ""
        except TimeoutError:
            return False, "timed out"
        except (httpx.HTTPError, OSError) as exc:
            return False, type(exc).__name__ + (f": {exc}" if str(exc) else "")


async def _tcp_connect(url: str) -> None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    _reader, writer = await asyncio.open_connection(parts.hostname, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
