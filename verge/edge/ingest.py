"""Store-and-forward ingest routes on the edge (the seed's IoT case).

Devices POST readings to a route (`ingest:` in the config); the edge optionally runs an edge
function over them (NDJSON in on stdin, the readings to keep out on stdout: a filter or a
transform), then appends them to a durable local spool (SQLite WAL; a 202 means the readings
are on disk) and forwards batches to the central sink with idempotency keys, retrying through
outages. The spool, the forwarder and the aggregator are :mod:`verge.compute`'s; this module
mounts them in a worker. A spool file is owned by one process, so every worker has its own
(``CACHE_DIR/ingest/NAME-wN.db``); each forwards its own batches.
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

log = logging.getLogger("verge.ingest")

TICK_SECONDS = 1.0  # how often aggregation windows may close


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
        self.routes: dict[str, MountedRoute] = {}

    async def apply(self, specs) -> None:
        """Mount new routes, unmount removed ones; an unchanged route keeps its spool."""
        wanted = {spec.name: spec for spec in specs}
        for name in [n for n, r in self.routes.items() if wanted.get(n) != r.spec]:
            await self._unmount(self.routes.pop(name))
        for name, spec in wanted.items():
            if name not in self.routes:
                try:
                    self.routes[name] = await self._mount(spec)
                except (OSError, sqlite3.Error, ValueError) as exc:
                    log.error("ingest route %s not mounted: %s", name, exc)

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
        for task in mounted.tasks:
            task.cancel()
        await asyncio.gather(*mounted.tasks, return_exceptions=True)
        await mounted.spool.close()

    def match(self, service: str, path: str) -> IngestApp | None:
        for mounted in self.routes.values():
            if mounted.spec.service == service and path == mounted.spec.path:
                return mounted.app
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
        for mounted in self.routes.values():
            await self._unmount(mounted)
        self.routes.clear()


async def _tick(spool: AsyncSpool) -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        with contextlib.suppress(sqlite3.Error, OSError):
            await spool.tick()
