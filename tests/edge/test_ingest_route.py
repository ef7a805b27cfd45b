"""Store and forward through a real edge: devices POST readings, a wasm function filters them,
the edge spools them durably and forwards them to the sink — across a sink outage and a kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.compute.conftest import build_examples
from tests.conftest import EdgeProcess, free_port

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
