"""A reference central sink for ingested data: what the forwarder's other end must do.

It accepts ``POST`` batches (NDJSON, one record per line) carrying an ``Idempotency-Key``,
and stores each key once in SQLite (WAL, ``synchronous=FULL``, committed before it answers):
a retried batch gets ``200`` with ``Idempotent-Replayed: true`` and changes nothing. So a
forwarder that retries until it hears a 2xx delivers each batch exactly once, even when an
answer is lost after the batch was stored. Used by the tests, the demo and ``verge up``;
a real deployment points the forwarder at its own origin URL with the same contract.

Endpoints: ``POST /<any path>`` a batch; ``GET /stats`` counts as JSON; ``GET /records``
every stored record as NDJSON; ``POST /_faults`` (JSON ``{"status": 503, "count": 3,
"after_store": false, "retry_after": null}``) queues failures to answer, so tests can
simulate an outage or a lost answer (``after_store``: stored, then an error is answered).

    python -m verge.compute.sink --db sink.db --listen 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvloop

from verge.http.response import Response
from verge.http.server import (
    HttpApp,
    ServerLimits,
    ensure_sweeper,
    reuseport_socket,
    serve,
    text_response,
)

MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_KEY_CHARS = 200
JSON = "application/json"


class SinkStore:
    """Batches by Idempotency-Key, each stored once."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS batches (key TEXT PRIMARY KEY,"
            " received REAL NOT NULL, records INTEGER NOT NULL, body BLOB NOT NULL)"
        )

    def put(self, key: str, body: bytes) -> tuple[bool, int]:
        """(stored now, record count); False when the key was already stored."""
        records = sum(1 for line in body.splitlines() if line.strip())
        cursor = self.conn.execute(
            "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?)", (key, time.time(), records, body)
        )
        return cursor.rowcount == 1, records

    def counts(self) -> dict[str, int]:
        batches, records = self.conn.execute(
            "SELECT count(*), coalesce(sum(records), 0) FROM batches"
        ).fetchone()
        return {"batches": batches, "records": records}

    def records(self) -> Iterator[bytes]:
        for (body,) in self.conn.execute("SELECT body FROM batches ORDER BY rowid"):
            yield from (line for line in body.splitlines() if line.strip())

    def close(self) -> None:
        self.conn.close()


@dataclass(slots=True)
class Fault:
    status: int
    after_store: bool = False
    retry_after: str | None = None


class SinkApp(HttpApp):
    """The sink's HTTP side; see the module docstring."""

    def __init__(self, store: SinkStore) -> None:
        self.store = store
        self.faults: deque[Fault] = deque()
        self.attempts: list[tuple[str, int]] = []  # (Idempotency-Key, status answered)
        self.duplicates = 0

    def handle_fast(self, request):
        if request.method != "GET":
            return None
        if request.path == "/stats":
            stats = {
                **self.store.counts(),
                "duplicates": self.duplicates,
                "attempts": len(self.attempts),
            }
            return text_response(200, json.dumps(stats) + "\n", content_type=JSON)
        if request.path == "/records":
            body = b"".join(line + b"\n" for line in self.store.records())
            return text_response(200, body, content_type="application/x-ndjson")
        if request.path == "/healthz":
            return text_response(200, "ok\n")
        return text_response(404, "not found\n")

    async def handle(self, request, writer) -> None:
        if request.method != "POST":
            response = self.handle_fast(request) or text_response(405, "POST a batch\n")
        else:
            body = await request.body.read_all(MAX_BATCH_BYTES) if request.body else b""
            if request.path == "/_faults":
                response = self._add_faults(body)
            else:
                response = self._receive(request.header("idempotency-key"), body)
        await writer.send(response)

    def _add_faults(self, body: bytes) -> Response:
        spec = json.loads(body or b"{}")
        fault = Fault(
            int(spec.get("status", 503)),
            bool(spec.get("after_store", False)),
            spec.get("retry_after"),
        )
        self.faults.extend(fault for _ in range(int(spec.get("count", 1))))
        return text_response(200, "ok\n")

    def _receive(self, key: str | None, body: bytes) -> Response:
        fault = self.faults.popleft() if self.faults else None
        if fault is not None and not fault.after_store:
            return self._answer(key, _fault_response(fault))
        problem = _check_batch(key, body)
        if problem:
            return self._answer(key, text_response(400, problem + "\n"))
        stored, records = self.store.put(key, body)
        if fault is not None:
            return self._answer(key, _fault_response(fault))
        if not stored:
            self.duplicates += 1
        result = json.dumps({"stored": stored, "records": records}) + "\n"
        extra = [] if stored else [("Idempotent-Replayed", "true")]
        return self._answer(key, text_response(200, result, extra, content_type=JSON))

    def _answer(self, key: str | None, response: Response) -> Response:
        self.attempts.append((key or "", response.status))
        return response


def _fault_response(fault: Fault) -> Response:
    extra = [("Retry-After", str(fault.retry_after))] if fault.retry_after else []
    return text_response(fault.status, "injected fault\n", extra)


def _check_batch(key: str | None, body: bytes) -> str | None:
    """Why a batch is bad input (a 400: the forwarder dead-letters it), or None."""
    if not key or len(key) > MAX_KEY_CHARS:
        return "an Idempotency-Key header (1 to 200 characters) is required"
    lines = [line for line in body.splitlines() if line.strip()]
    if not lines:
        return "empty batch"
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError:
            return f"line {number} is not JSON"
    return None


@dataclass
class RunningSink:
    app: SinkApp
    server: asyncio.AbstractServer
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/batches"

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        self.app.store.close()


async def start_sink(db: str | Path, host: str = "127.0.0.1", port: int = 0) -> RunningSink:
    """Serve a sink on ``host:port`` (0: any free port) in the running loop."""
    app = SinkApp(SinkStore(db))
    sock = reuseport_socket(host, port)
    server = await serve(app, sock, ServerLimits(max_body_bytes=MAX_BATCH_BYTES))
    return RunningSink(app, server, sock.getsockname()[1])


async def _main(db: str, host: str, port: int) -> None:
    sink = await start_sink(db, host, port)
    sweeper = ensure_sweeper()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"verge sink ready: http://{host}:{sink.port}/batches db {db}", flush=True)
    await stop.wait()
    sweeper.cancel()
    await sink.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m verge.compute.sink",
        description="Reference sink for edge ingestion batches.",
    )
    parser.add_argument("--db", required=True, help="SQLite file for the received batches")
    parser.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT (port 0: any)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    uvloop.run(_main(args.db, host or "127.0.0.1", int(port)))


if __name__ == "__main__":
    main()
