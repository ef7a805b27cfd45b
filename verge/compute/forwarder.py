"""Store-and-forward: the ingest route, and the loop that forwards the spool to the sink.

The route (:class:`IngestApp`, ``POST /ingest``) parses a device's readings, runs them
through the aggregator and answers ``202`` only after the spool committed them (group
commit, fsync). Over quota it answers ``429`` with ``Retry-After``; a disk error gets a
``503``: the device keeps its data and retries. A device that sends an ``Idempotency-Key``
may retry a POST whose answer it never got without creating duplicates.

The forwarder (:class:`Forwarder`) sends the spool to the sink in batches: a batch is cut
when ``batch_records`` or ``batch_bytes`` are waiting or the oldest record is ``max_age``
seconds old. The body is NDJSON (``application/x-ndjson``, one record per line: records are
spooled as JSON lines, so the body is a join, not a re-encoding) with an ``Idempotency-Key``
that is the same on every retry of that batch, even after a restart (see
:mod:`verge.compute.spool`). Answers:

* 2xx, or 409 (the sink already has it): done, the batch is deleted from the spool;
* 408, 425, 429, 5xx, network errors and timeouts, 1xx/3xx (a misdirected sink URL):
  retried, with exponential back-off and jitter bounded by ``backoff_cap`` (a
  ``Retry-After`` is honoured up to that cap), forever: data only leaves the spool
  confirmed or dead-lettered, and a long outage shows as a growing spool, then 429s;
* any other 4xx: the sink calls the batch bad input; retrying cannot help, so it moves to
  the spool's ``dead`` table (logged and counted) and forwarding continues.

Batches go one at a time, oldest first, so the sink receives records in spool order.

Run the ingest route, spool and forwarder as one process (the edge mounts the same parts):

    python -m verge.compute.forwarder --spool ingest.db --sink http://central/batches \\
        --listen 127.0.0.1:8090 [--aggregate window:10] [--quota-records 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import uvloop

from verge.compute.ingest import IngestError, IngestLimits, build_aggregator, parse_readings
from verge.compute.spool import AppendResult, AsyncSpool, Batch, SpoolFull
from verge.http.response import Response
from verge.http.server import (
    HttpApp,
    ServerLimits,
    ensure_sweeper,
    reuseport_socket,
    serve,
    text_response,
)

log = logging.getLogger("verge.compute.forwarder")

DONE, RETRY, POISON = "done", "retry", "poison"
RETRYABLE_4XX = frozenset({408, 425, 429})
JSON = "application/json"
MAX_KEY_CHARS = 200


def classify(status: int | None) -> str:
    """What a sink's answer means for a batch: DONE, RETRY or POISON (None: no answer)."""
    if status is None:
        return RETRY
    if 200 <= status < 300 or status == 409:
        return DONE
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return POISON
    return RETRY


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 30.0, rand=random.random) -> float:
    """Seconds before retry number ``attempt`` (0-based): exponential, "equal jitter"
    (between half and all of ``base * 2**attempt``), never more than ``cap``."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return ceiling * (0.5 + 0.5 * rand())


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After field (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass
class ForwarderSettings:
    batch_records: int = 500
    batch_bytes: int = 1024 * 1024
    max_age: float = 1.0  # seconds a record may wait for its batch to fill
    backoff_base: float = 0.2
    backoff_cap: float = 30.0
    timeout: float = 10.0  # per POST
    idle_poll: float = 5.0  # re-check an empty spool this often even without a wake-up


@dataclass
class ForwarderCounters:
    batches: int = 0
    records: int = 0
    retries: int = 0
    dead_batches: int = 0
    last_error: str = ""
    failing_since: float | None = None
    next_attempt: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)


class Forwarder:
    """Forwards one spool to one sink URL; ``run()`` until cancelled."""

    def __init__(
        self,
        spool: AsyncSpool,
        sink_url: str,
        settings: ForwarderSettings | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        rand=random.random,
    ) -> None:
        self.spool = spool
        self.sink_url = sink_url
        self.settings = settings or ForwarderSettings()
        self.client = client or httpx.AsyncClient(timeout=self.settings.timeout)
        self._own_client = client is None
        self.rand = rand
        self.counters = ForwarderCounters()

    async def run(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    await self.step()
                    failures = 0
                except (sqlite3.Error, OSError) as exc:  # the spool's disk: log, wait, go on
                    _log("error", "forwarder step failed", error=repr(exc))
                    await asyncio.sleep(self._retry_delay(failures, None))
                    failures += 1
        finally:
            if self._own_client:
                await self.client.aclose()

    async def step(self) -> Batch | None:
        """Wait until a batch is due, then deliver it (retrying until done or poison)."""
        await self.wait_due()
        batch = await self.spool.claim(self.settings.batch_records, self.settings.batch_bytes)
        if batch is None:
            return None
        try:
            await self.deliver(batch)
        except BaseException:
            self.spool.spool.release(batch)  # in memory only: safe from the loop thread
            raise
        return batch

    async def wait_due(self) -> None:
        settings = self.settings
        while True:
            self.spool.appended.clear()
            due = self.spool.spool.due_in(
                time.time(), settings.batch_records, settings.batch_bytes, settings.max_age
            )
            if due == 0:
                return
            timeout = settings.idle_poll if due is None else due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.spool.appended.wait(), timeout)

    async def deliver(self, batch: Batch) -> str:
        """Send ``batch`` until the sink takes it (DONE) or rejects it (POISON)."""
        body = batch.body()
        attempt = 0
        while True:
            status, retry_after, detail = await self.post(batch, body)
            self._count_status(status)
            outcome = classify(status)
            if outcome == DONE:
                await self.spool.ack(batch)
                self._delivered(batch, attempt)
                return DONE
            if outcome == POISON:
                await self.spool.dead_letter(batch, status, detail)
                self.counters.dead_batches += 1
                _log(
                    "error",
                    "batch rejected by the sink, kept in the dead-letter table",
                    key=batch.key,
                    status=status,
                    records=batch.count,
                    detail=detail[:200],
                )
                return POISON
            delay = self._retry_delay(attempt, retry_after)
            self._failed(batch, attempt, status, detail, delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def post(self, batch: Batch, body: bytes) -> tuple[int | None, float | None, str]:
        """(status or None, Retry-After seconds, detail) of one attempt."""
        headers = {
            "Idempotency-Key": batch.key,
            "Content-Type": "application/x-ndjson",
            "X-Verge-Spool": batch.spool_id,
            "X-Verge-Records": str(batch.count),
        }
        try:
            response = await self.client.post(self.sink_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, None, f"{type(exc).__name__}: {exc}"
        return (
            response.status_code,
            parse_retry_after(response.headers.get("retry-after")),
            response.text[:500],
        )

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        settings = self.settings
        delay = backoff_delay(attempt, settings.backoff_base, settings.backoff_cap, self.rand)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, settings.backoff_cap)

    def _count_status(self, status: int | None) -> None:
        name = str(status) if status is not None else "error"
        self.counters.statuses[name] = self.counters.statuses.get(name, 0) + 1

    def _delivered(self, batch: Batch, attempts: int) -> None:
        counters = self.counters
        if counters.failing_since is not None:
            _log(
                "info",
                "sink reachable again",
                after_s=round(time.time() - counters.failing_since, 3),
            )
        counters.batches += 1
        counters.records += batch.count
        counters.failing_since = counters.next_attempt = None

    def _failed(
        self, batch: Batch, attempt: int, status: int | None, detail: str, delay: float
    ) -> None:
        counters = self.counters
        counters.retries += 1
        counters.last_error = f"{status or 'no answer'}: {detail[:200]}"
        counters.next_attempt = time.time() + delay
        if counters.failing_since is None:
            counters.failing_since = time.time()
            _log(
                "warning",
                "sink not taking batches, retrying",
                key=batch.key,
                error=counters.last_error,
            )
        elif attempt % 10 == 9:
            _log(
                "warning",
                "sink still failing",
                key=batch.key,
                attempts=attempt + 1,
                error=counters.last_error,
            )

    def retry_after_hint(self) -> int:
        """Seconds a refused device should wait: until the next attempt while the sink
        fails, else 1 (a healthy sink drains the spool quickly)."""
        next_attempt = self.counters.next_attempt
        if next_attempt is None:
            return 1
        return max(1, min(int(self.settings.backoff_cap), math.ceil(next_attempt - time.time())))


def _log(level: str, message: str, **fields) -> None:
    getattr(log, level)(json.dumps({"msg": message, **fields}, default=str))


# An edge function's filter/transform of one POST's readings (raises IngestError to refuse).
Transform = Callable[[Any, list[dict]], Awaitable[list[dict]]]


class IngestApp(HttpApp):
    """``POST /ingest`` plus ``GET /stats``, ``/metrics`` and ``/healthz``."""

    def __init__(
        self,
        spool: AsyncSpool,
        forwarder: Forwarder | None = None,
        limits: IngestLimits | None = None,
        path: str = "/ingest",
        transform: Transform | None = None,
    ) -> None:
        self.spool = spool
        self.forwarder = forwarder
        self.limits = limits or IngestLimits()
        self.path = path
        self.transform = transform
        self.answers: dict[int, int] = {}

    def handle_fast(self, request):
        if request.method != "GET":
            return None
        if request.path == "/stats":
            return _json(200, self.stats())
        if request.path == "/metrics":
            return text_response(200, self.metrics(), content_type="text/plain; version=0.0.4")
        if request.path == "/healthz":
            return text_response(200, "ok\n")
        return _json(404, {"error": "not found"})

    async def handle(self, request, writer) -> None:
        if request.method == "POST" and request.path == self.path:
            response = await self.ingest(request)
        else:
            response = self.handle_fast(request) or _json(405, {"error": "POST readings"})
        status = response.status
        self.answers[status] = self.answers.get(status, 0) + 1
        await writer.send(response)

    async def ingest(self, request) -> Response:
        body = await request.body.read_all(self.limits.max_body_bytes) if request.body else b""
        key = request.header("idempotency-key")
        if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
            return _json(400, {"error": "Idempotency-Key must be 1 to 200 characters"})
        try:
            readings = parse_readings(body, request.header("content-type") or "", self.limits)
            if self.transform is not None:
                readings = await self.transform(request, readings)
            result = await self.spool.append(readings, key)
        except IngestError as exc:
            return _json(exc.status, {"error": str(exc)})
        except SpoolFull as exc:
            retry = self.forwarder.retry_after_hint() if self.forwarder else exc.retry_after
            return _json(429, {"error": str(exc)}, retry_after=math.ceil(retry))
        except (sqlite3.Error, OSError) as exc:
            _log("error", "spool write failed", error=repr(exc))
            return _json(503, {"error": "spool unavailable"}, retry_after=1)
        return _json(202, _accepted(result))

    def stats(self) -> dict:
        stats = {"spool": self.spool.stats(), "answers": dict(self.answers)}
        if self.forwarder is not None:
            counters = self.forwarder.counters
            stats["forwarder"] = {
                "batches": counters.batches,
                "records": counters.records,
                "retries": counters.retries,
                "dead_batches": counters.dead_batches,
                "failing": counters.failing_since is not None,
                "last_error": counters.last_error,
            }
        return stats

    def metrics(self) -> str:
        spool = self.spool.stats()
        lines = [
            f"verge_ingest_spool_records {spool['records']}",
            f"verge_ingest_spool_bytes {spool['bytes']}",
            f"verge_ingest_dead_batches {spool['dead_batches']}",
        ]
        lines += [
            f'verge_ingest_responses_total{{status="{s}"}} {n}'
            for s, n in sorted(self.answers.items())
        ]
        if self.forwarder is not None:
            counters = self.forwarder.counters
            lines += [
                f"verge_ingest_forwarded_records_total {counters.records}",
                f"verge_ingest_forward_retries_total {counters.retries}",
            ]
        return "\n".join(lines) + "\n"


def _accepted(result: AppendResult) -> dict:
    return {
        "accepted": result.readings,
        "spooled": result.records,
        "first_seq": result.first_seq,
        "last_seq": result.last_seq,
        "replayed": result.replayed,
    }


def _json(status: int, doc: dict, *, retry_after: int | None = None) -> Response:
    extra = [("Retry-After", str(retry_after))] if retry_after is not None else []
    return text_response(status, json.dumps(doc) + "\n", extra, content_type=JSON)


# ----- the runnable node -----------------------------------------------------------------------
@dataclass
class IngestNodeOptions:
    """How ``python -m verge.compute.forwarder`` runs: route, spool and forwarder in one process
    (not the edge node's verge.edge.node.NodeOptions: an edge mounts these parts per route)."""

    spool: str
    sink: str
    listen: str = "127.0.0.1:8090"
    aggregate: str = "identity"
    quota_bytes: int = 256 * 1024 * 1024
    quota_records: int = 1_000_000
    synchronous: str = "FULL"
    tick: float = 1.0  # how often the aggregator may close windows (and old keys expire)
    settings: ForwarderSettings = field(default_factory=ForwarderSettings)
    limits: IngestLimits = field(default_factory=IngestLimits)


async def run_node(options: IngestNodeOptions) -> None:
    """Serve the ingest route and forward the spool until SIGTERM/SIGINT."""
    spool = await AsyncSpool.open(
        options.spool,
        build_aggregator(options.aggregate),
        quota_bytes=options.quota_bytes,
        quota_records=options.quota_records,
        synchronous=options.synchronous,
    )
    forwarder = Forwarder(spool, options.sink, options.settings)
    app = IngestApp(spool, forwarder, options.limits)
    host, _, port = options.listen.rpartition(":")
    sock = reuseport_socket(host or "127.0.0.1", int(port))
    server = await serve(app, sock, ServerLimits(max_body_bytes=options.limits.max_body_bytes))
    tasks = [
        ensure_sweeper(),
        asyncio.create_task(forwarder.run()),
        asyncio.create_task(_tick_forever(spool, options.tick)),
    ]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    bound = sock.getsockname()
    print(
        f"verge ingest ready: http://{bound[0]}:{bound[1]}{app.path} spool {options.spool}"
        f" sink {options.sink}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await spool.close()


async def _tick_forever(spool: AsyncSpool, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await spool.tick()
        except (sqlite3.Error, OSError) as exc:
            _log("error", "aggregator tick failed", error=repr(exc))


def parse_args(argv: list[str] | None = None) -> IngestNodeOptions:
    p = argparse.ArgumentParser(
        prog="python -m verge.compute.forwarder",
        description="Edge data ingestion: POST /ingest, durable spool,"
        " batched forwarding to a sink.",
    )
    p.add_argument("--spool", required=True, help="spool SQLite file")
    p.add_argument("--sink", required=True, help="URL batches are POSTed to")
    p.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (port 0: any)")
    p.add_argument("--aggregate", default="identity", help="identity | window:SECONDS[:GRACE]")
    p.add_argument("--quota-bytes", type=int, default=256 * 1024 * 1024)
    p.add_argument("--quota-records", type=int, default=1_000_000)
    p.add_argument(
        "--sync",
        default="FULL",
        choices=["FULL", "NORMAL", "EXTRA"],
        help="SQLite synchronous mode (FULL: a 2xx survives power loss)",
    )
    p.add_argument("--batch-records", type=int, default=500)
    p.add_argument("--batch-bytes", type=int, default=1024 * 1024)
    p.add_argument("--max-age", type=float, default=1.0, help="seconds before a partial batch goes")
    p.add_argument("--backoff-base", type=float, default=0.2)
    p.add_argument("--backoff-cap", type=float, default=30.0)
    p.add_argument("--max-body-bytes", type=int, default=1024 * 1024)
    p.add_argument("--tick", type=float, default=1.0)
    a = p.parse_args(argv)
    try:
        build_aggregator(a.aggregate)  # fail early on a bad spec
    except ValueError as exc:
        p.error(str(exc))
    return IngestNodeOptions(
        spool=a.spool,
        sink=a.sink,
        listen=a.listen,
        aggregate=a.aggregate,
        quota_bytes=a.quota_bytes,
        quota_records=a.quota_records,
        synchronous=a.sync,
        tick=a.tick,
        settings=ForwarderSettings(
            batch_records=a.batch_records,
            batch_bytes=a.batch_bytes,
            max_age=a.max_age,
            backoff_base=a.backoff_base,
            backoff_cap=a.backoff_cap,
        ),
        limits=IngestLimits(max_body_bytes=a.max_body_bytes),
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per batch
    options = parse_args(argv)
    uvloop.run(run_node(options))


if __name__ == "__main__":
    main()
