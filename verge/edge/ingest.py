"""Store-and-forward ingest routes on the edge (the seed's IoT case).

Devices POST readings to a route (`ingest:` in the config); the edge optionally runs an edge
function over them (NDJSON in on stdin, the readings to keep out on stdout: a filter or a
transform), then appends them to a durable local spool (SQLite WAL; a 202 means the readings
are on disk) and forwards batches to the central sink with idempotency keys, retrying through
outages. The spool, the forwarder and the aggregator are :mod:`verge.compute`'s; this module
mounts them in a worker. A spool file is owned by one process, so every worker has its own
(``CACHE_DIR/ingest/NAME-wN.db``); each forwards its own batches.

A reading must never slip past the spool to the origin. A route claims its path from the
moment the config names it (:meth:`EdgeIngest.schedule`, synchronous, in the same step as
the config switch), not from when its spool is open: a POST that comes while its route is
being (re)mounted waits for the mount (at most ``MOUNT_WAIT_SECONDS``), and a route that is
not mounted by then answers 503 with Retry-After; one whose mount failed is tried again with
back-off. A worker mounts its routes before it accepts its first connection
(:mod:`verge.edge.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from verge.compute.forwarder import Forwarder, ForwarderSettings, IngestApp
from verge.compute.ingest import IngestError, build_aggregator, parse_readings
from verge.compute.spool import AsyncSpool
from verge.compute.wagi import Answer
from verge.http.server import text_response

log = logging.getLogger("verge.ingest")

TICK_SECONDS = 1.0  # how often aggregation windows may close
MOUNT_WAIT_SECONDS = 5.0  # a POST for a route being (re)mounted waits this long, then 503
RETRY_AFTER_SECONDS = 1
UNMOUNT_SECONDS = 5.0  # how long an unmount waits for the route's tasks to stop
MOUNT_RETRY_SECONDS = 0.5  # a route that failed to mount is tried again after this, doubling
MOUNT_RETRY_MAX_SECONDS = 30.0


@dataclass
class MountedRoute:
    spec: object  # verge.config.IngestRoute
    app: IngestApp
    spool: AsyncSpool
    tasks: list[asyncio.Task] = field(default_factory=list)


class EdgeIngest:
    """The ingest routes of one worker."""

    def __init__(self, cache_dir: str | Path, worker: int, compute=None) -> None:
        self.dir = Path(cache_dir) / "ingest"
        self.worker = worker
        self.compute = compute
        self.wanted: dict[str, object] = {}  # the config's routes by name: they claim paths
        self.routes: dict[str, MountedRoute] = {}  # the mounted ones (spool open)
        self._generation = 0  # bumped by every schedule()
        self._settled = asyncio.Event()  # set when the latest schedule() has been applied
        self._settled.set()
        self._lock = asyncio.Lock()  # one apply at a time
        self._retry: asyncio.Task | None = None  # the next try of routes that failed to mount

    def schedule(self, specs) -> asyncio.Task:
        """Claim the routes of `specs` now and mount them in the background (needs the running
        loop). Until the returned task is done, POSTs for them wait (see :meth:`handle`)."""
        self.wanted = {spec.name: spec for spec in specs}
        self._generation += 1
        self._settled.clear()
        return asyncio.get_running_loop().create_task(self._apply(self._generation))

    async def apply(self, specs) -> None:
        """Mount new routes, unmount removed ones; an unchanged route keeps its spool."""
        await self.schedule(specs)

    async def _apply(self, generation: int, attempt: int = 0) -> None:
        """Bring the mounted routes in line with `wanted`. A route that fails to mount (its
        spool still held by a worker on its way out, a full disk) answers 503 and is tried
        again later, with back-off, until it mounts or the config changes."""
        failed = False
        try:
            async with self._lock:
                if generation != self._generation:
                    return  # a newer schedule() is queued behind us and applies its routes
                failed = await self._reconcile(dict(self.wanted), attempt)
        finally:
            if generation == self._generation:
                self._settled.set()  # the POSTs waiting get their answer
        if failed and generation == self._generation:
            delay = min(MOUNT_RETRY_MAX_SECONDS, MOUNT_RETRY_SECONDS * 2**attempt)
            self._retry = asyncio.get_running_loop().create_task(
                self._apply_later(generation, attempt + 1, delay))

    async def _apply_later(self, generation: int, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._apply(generation, attempt)

    async def _reconcile(self, wanted: dict, attempt: int) -> bool:
        """Unmount what changed or went, mount what is missing; whether a mount failed."""
        for name in [n for n, r in self.routes.items() if wanted.get(n) != r.spec]:
            try:
                await self._unmount(self.routes.pop(name))
            except Exception as exc:  # its spool is closed or broken: let it go all the same
                log.error("ingest route %s not cleanly unmounted: %s", name, exc)
        failed = False
        for name, spec in wanted.items():
            if name in self.routes:
                continue
            try:
                self.routes[name] = await self._mount(spec)
            except Exception as exc:  # whatever it is, the route answers 503 (never the origin)
                log.error("ingest route %s not mounted (attempt %d): %s", name, attempt + 1, exc)
                failed = True
        return failed

    async def _mount(self, spec) -> MountedRoute:
        self.dir.mkdir(parents=True, exist_ok=True)
        spool = await AsyncSpool.open(self.dir / f"{spec.name}-w{self.worker}.db",
                                      build_aggregator(spec.aggregate),
                                      quota_records=spec.quota_records,
                                      quota_bytes=spec.quota_bytes)
        settings = ForwarderSettings(batch_records=spec.batch_records, max_age=spec.max_age)
        forwarder = Forwarder(spool, spec.sink, settings)
        transform = self._function_transform(spec.function) if spec.function else None
        app = IngestApp(spool, forwarder, path=spec.path, transform=transform)
        mounted = MountedRoute(spec, app, spool)
        loop = asyncio.get_running_loop()
        mounted.tasks = [loop.create_task(forwarder.run()), loop.create_task(_tick(spool))]
        return mounted

    async def _unmount(self, mounted: MountedRoute) -> None:
        await _cancel(mounted.tasks)
        await mounted.spool.close()

    def claim(self, service: str, path: str):
        """The configured ingest route (verge.config.IngestRoute) for this path, mounted yet
        or not: its requests are the ingest's, never the origin's."""
        for spec in self.wanted.values():
            if spec.service == service and path == spec.path:
                return spec
        return None

    async def handle(self, spec, request, writer) -> None:
        """A request for a claimed route: to its spool once mounted, else 503 (not ready)."""
        mounted = await self._mounted(spec)
        if mounted is None:
            writer.keep_alive = False  # the body was not read
            body = json.dumps({"error": f"ingest route {spec.name} is not ready"}) + "\n"
            await writer.send(text_response(503, body, [("Retry-After", str(RETRY_AFTER_SECONDS))],
                                            close=True, content_type="application/json"))
            return
        await mounted.app.handle(request, writer)

    async def _mounted(self, spec) -> MountedRoute | None:
        """The mounted route of `spec`, waiting (briefly) for a mount in progress."""
        mounted = self.routes.get(spec.name)
        if mounted is not None and mounted.spec == spec:
            return mounted
        if not self._settled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), MOUNT_WAIT_SECONDS)
        mounted = self.routes.get(spec.name)
        if mounted is not None and mounted.spec == self.wanted.get(spec.name):
            return mounted
        return None

    def _function_transform(self, name: str):
        """The readings as NDJSON through an edge function; its NDJSON output is kept."""
        async def transform(request, readings: list[dict]) -> list[dict]:
            deployed = self._deployed(name)
            if deployed is None:
                raise IngestError(503, f"edge function {name} is not deployed")
            body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in readings)
            invocation = await self.compute.invoke(deployed, request, body.encode(), "")
            result = invocation.result
            if not isinstance(result, Answer):
                raise IngestError(invocation.error_status if not invocation.ok else 502,
                                  f"edge function {name}: {invocation.error or 'no answer'}")
            if not 200 <= result.status < 300:
                raise IngestError(result.status, result.body.decode(errors="replace").strip()
                                  or f"refused by {name}")
            if not result.body.strip():
                return []
            return parse_readings(result.body, "application/x-ndjson")
        return transform

    def _deployed(self, name: str):
        if self.compute is None:
            return None
        return next((d for ds in self.compute.by_service.values() for d in ds
                     if d.spec.name == name), None)

    async def close(self) -> None:
        self.wanted = {}
        self._generation += 1
        if self._retry is not None:
            self._retry.cancel()
        async with self._lock:
            for mounted in self.routes.values():
                await self._unmount(mounted)
            self.routes.clear()
        self._settled.set()


async def _cancel(tasks: list[asyncio.Task], patience: float = UNMOUNT_SECONDS) -> None:
    """Cancel the tasks and wait for them to end. A cancellation can be swallowed (httpx on
    anyio turns one that lands in a connect into a ConnectError, and the forwarder then
    sleeps before its next retry), so it is repeated until they end or `patience` runs out."""
    pending = {task for task in tasks if not task.done()}
    deadline = asyncio.get_running_loop().time() + patience
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)
        if pending and asyncio.get_running_loop().time() > deadline:
            log.error("ingest tasks did not stop: %s", pending)
            return


async def _tick(spool: AsyncSpool) -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        with contextlib.suppress(sqlite3.Error, OSError):
            await spool.tick()
