"""Store and forward through a real edge: devices POST readings, a wasm function filters them,
the edge spools them durably and forwards them to the sink — across a sink outage and a kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.compute.conftest import build_examples
from tests.conftest import EdgeProcess, free_port
from verge.config import IngestRoute
from verge.edge.ingest import EdgeIngest
from verge.http.message import Request

pytestmark = pytest.mark.timeout(120)


class Sink:
    """The reference sink (python -m verge.compute.sink) as a process that can go away."""

    def __init__(self, db: Path) -> None:
        self.db, self.port, self.proc = db, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Sink:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verge.compute.sink", "--db", str(self.db), "--listen",
             f"127.0.0.1:{self.port}"], stdout=subprocess.PIPE, text=True, start_new_session=True)
        ready = threading.Event()
        threading.Thread(target=lambda: (self.proc.stdout.readline(), ready.set()),
                         daemon=True).start()
        assert ready.wait(20)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def records(self) -> list[dict]:
        text = httpx.get(self.url + "/records", timeout=10).text
        return [r for line in text.splitlines() if line for r in _records(json.loads(line))]


def _records(item):
    return item if isinstance(item, list) else [item]


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def post(edge: EdgeProcess, first: int, count: int, negative_every: int = 10) -> httpx.Response:
    lines = [json.dumps({"device": f"d{i % 7}", "value": -1 if i % negative_every == 0 else i,
                         "n": i}) for i in range(first, first + count)]
    return httpx.post(edge.url + "/ingest", content="\n".join(lines).encode(), timeout=20,
                      headers={"Content-Type": "application/x-ndjson",
                               "Idempotency-Key": f"batch-{first}"})


def test_readings_are_filtered_spooled_and_forwarded_exactly_once(tmp_path, origin):
    modules = build_examples(tmp_path)
    sink = Sink(tmp_path / "sink.db").start()
    config = f"""
services:
  - name: iot
    hosts: ["*"]
    origins: ["{origin.url}"]
functions:
  - {{name: filter, service: iot, routes: [/never], module: {modules["filter"]}}}
ingest:
  - {{name: readings, service: iot, path: /ingest, sink: "{sink.url}/batches", function: filter,
     batch_records: 100, max_age: 0.2}}
"""
    edge = EdgeProcess(tmp_path, config=config, workers=1).start()
    try:
        for first in range(0, 300, 100):
            r = post(edge, first, 100)
            assert r.status_code == 202, r.text
        kept = [i for i in range(300) if i % 10]
        wait_for(lambda: len(sink.records()) >= len(kept), what="the first 270 readings")
        sink.stop()  # the sink goes away; devices keep posting, the edge keeps accepting
        for first in range(300, 600, 100):
            assert post(edge, first, 100).status_code == 202
        edge.kill9()  # and the edge crashes with unsent readings in its spool
        edge.start()
        sink.start()
        kept = [i for i in range(600) if i % 10]
        wait_for(lambda: len(sink.records()) >= len(kept), what="everything after the outage")
        records = sink.records()
        numbers = sorted(r["n"] for r in records)
        assert numbers == kept  # every kept reading exactly once, no negatives
        assert all(r["filtered"] is True for r in records)
        bad = httpx.post(edge.url + "/ingest", content=b"not json", timeout=10)
        assert bad.status_code == 400
    finally:
        edge.stop()
        sink.stop()


# ----- no reading slips past the spool: at start-up and while a route is (re)mounted ----------
def ingest_config(origin, sink: Sink, batch_records: int = 10) -> str:
    return f"""
services:
  - name: iot
    hosts: ["*"]
    origins: ["{origin.url}"]
ingest:
  - {{name: readings, service: iot, path: /ingest, sink: "{sink.url}/batches",
     batch_records: {batch_records}, max_age: 0.2}}
"""


class SlowSpools:
    """Makes every worker's ingest mount slow, the same way every time: the route's spool
    files are locked (SQLite EXCLUSIVE, rollback journal) until a worker has had its file
    open for `hold` seconds. A worker that accepted requests before its mount was done
    would pass the POST to the origin."""

    def __init__(self, cache_dir: Path, route: str, workers: int, hold: float = 1.0) -> None:
        (cache_dir / "ingest").mkdir(parents=True, exist_ok=True)
        self.hold = hold
        self.held: dict[str, sqlite3.Connection] = {}
        for index in range(workers):
            path = cache_dir / "ingest" / f"{route}-w{index}.db"
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=DELETE")  # readers wait too (not so in WAL)
            conn.execute("CREATE TABLE IF NOT EXISTS held (x)")
            conn.execute("BEGIN EXCLUSIVE")
            self.held[str(path)] = conn
        threading.Thread(target=self._release_when_opened, daemon=True).start()

    def _release_when_opened(self) -> None:
        deadline = time.monotonic() + 60
        while self.held and time.monotonic() < deadline:
            for path in _opened_elsewhere(set(self.held)):
                threading.Timer(self.hold, self.held.pop(path).close).start()
            time.sleep(0.02)


def _opened_elsewhere(paths: set[str]) -> set[str]:
    """Which of `paths` another process has open (from /proc/PID/fd)."""
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        if fd_dir.parent.name == str(os.getpid()):
            continue
        try:
            found.update(p for p in (os.readlink(fd) for fd in fd_dir.iterdir()) if p in paths)
        except OSError:  # gone, or not ours to look at
            continue
    return found


def test_the_first_post_after_a_start_is_spooled_not_proxied(tmp_path, origin):
    origin.route("/ingest", body=b"the origin must never see a reading\n")
    sink = Sink(tmp_path / "sink.db").start()
    edge = EdgeProcess(tmp_path, config=ingest_config(origin, sink), workers=2)
    try:
        for start in range(3):
            if start:
                edge.stop()
            SlowSpools(edge.cache_dir, "readings", workers=2)
            edge.start()  # returns as soon as the edge accepts requests
            r = post(edge, start * 10, 10, negative_every=1000)
            assert r.status_code == 202, f"start {start}: {r.status_code} {r.text}"
        wait_for(lambda: len(sink.records()) >= 30, what="every reading at the sink")
        assert sorted(r["n"] for r in sink.records()) == list(range(30))
        assert origin.hits("/ingest") == 0
    finally:
        edge.stop()
        sink.stop()


def test_posts_during_a_reload_that_remounts_the_route_never_reach_the_origin(tmp_path, origin):
    origin.route("/ingest", body=b"the origin must never see a reading\n")
    sink = Sink(tmp_path / "sink.db").start()
    edge = EdgeProcess(tmp_path, config=ingest_config(origin, sink), workers=1).start()
    statuses: list[int] = []
    stop = threading.Event()

    def keep_posting() -> None:
        first = 0
        while not stop.is_set():
            statuses.append(post(edge, first, 1, negative_every=1000).status_code)
            first += 1

    def some_more_posts() -> None:
        seen = len(statuses)
        wait_for(lambda: len(statuses) > seen + 5, what="posts")

    poster = threading.Thread(target=keep_posting)
    try:
        poster.start()
        with edge.admin() as admin:
            for batch_records in (11, 12, 13, 14, 15):  # a changed route: unmount + mount
                some_more_posts()
                (tmp_path / "verge.yaml").write_text(ingest_config(origin, sink, batch_records))
                assert admin.post("/config/reload").json()["ok"]
        some_more_posts()
        stop.set()
        poster.join(30)
        assert set(statuses) <= {202, 503}, sorted(set(statuses))
        assert origin.hits("/ingest") == 0
        accepted = statuses.count(202)
        wait_for(lambda: len(sink.records()) >= accepted, what="the accepted readings")
    finally:
        stop.set()
        edge.stop()
        sink.stop()


class Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read_all(self, limit: int | None = None) -> bytes:
        return self.data


class Writer:
    """What EdgeIngest.handle writes to: one whole response."""

    def __init__(self) -> None:
        self.keep_alive, self.status, self.response = True, 0, None

    async def send(self, response) -> None:
        self.status, self.response = response.status, response


def reading_request() -> Request:
    return Request("POST", "/ingest", headers=[("Host", "iot"), ("Content-Type",
                   "application/json")], body=Body(b'{"device": "d", "value": 1}'))


async def test_a_route_claims_its_path_before_its_spool_is_open(tmp_path):
    ingest = EdgeIngest(tmp_path, 0)
    spec = IngestRoute(name="r", service="iot", path="/ingest", sink="http://127.0.0.1:9/b")
    try:
        mounting = ingest.schedule([spec])
        assert ingest.claim("iot", "/ingest") == spec and not mounting.done()
        assert ingest.claim("iot", "/other") is None and ingest.claim("x", "/ingest") is None
        writer = Writer()
        await ingest.handle(spec, reading_request(), writer)  # waits for the mount
        assert writer.status == 202
        changed = spec.model_copy(update={"batch_records": 7})
        ingest.schedule([changed])  # a changed route: the old spool goes, a new one opens
        writer = Writer()
        await ingest.handle(ingest.claim("iot", "/ingest"), reading_request(), writer)
        assert writer.status == 202 and ingest.routes["r"].spec == changed
        ingest.schedule([])
        assert ingest.claim("iot", "/ingest") is None  # removed: the origin's path again
    finally:
        await ingest.close()


async def test_a_route_that_cannot_mount_answers_503_with_retry_after(tmp_path):
    (tmp_path / "ingest").write_text("not a directory")  # its spool cannot be opened
    ingest = EdgeIngest(tmp_path, 0)
    spec = IngestRoute(name="r", service="iot", path="/ingest", sink="http://127.0.0.1:9/b")
    try:
        ingest.schedule([spec])
        writer = Writer()
        await ingest.handle(ingest.claim("iot", "/ingest"), reading_request(), writer)
        assert writer.status == 503 and not writer.keep_alive
        assert ("Retry-After", "1") in writer.response.headers
        assert b"not ready" in writer.response.body and writer.response.close
        assert "r" not in ingest.routes
        (tmp_path / "ingest").unlink()  # the disk is fixed: a retry mounts the route
        while "r" not in ingest.routes:
            await asyncio.sleep(0.05)
        writer = Writer()
        await ingest.handle(ingest.claim("iot", "/ingest"), reading_request(), writer)
        assert writer.status == 202
    finally:
        await ingest.close()
