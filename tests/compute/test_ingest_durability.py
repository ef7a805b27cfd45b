"""Acceptance, with real processes: readings survive a sink outage, kill -9 and a full spool.

The ingest node (``python -m verge.compute.forwarder``) and the sink
(``python -m verge.compute.sink``) run as child processes on loopback; a device is an
httpx client posting 100 numbered readings per request with an Idempotency-Key, and
retrying (same key) every request that got no 2xx.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

READY = re.compile(r"ready: http://([\d.]+):(\d+)")
PER_POST = 100
FAST_RETRY = ["--backoff-base", "0.05", "--backoff-cap", "0.3", "--max-age", "0.05"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A verge.compute module as a child process, ready once it prints its ready line."""

    def __init__(self, module: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        ready = threading.Event()
        self.port = 0

        def drain() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                match = READY.search(line)
                if match and not ready.is_set():
                    self.port = int(match.group(2))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(15) or not self.port:
            self.stop()
            raise RuntimeError(f"{module} did not start:\n{''.join(self.lines)}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_node(spool: Path, sink_url: str, *extra: str) -> Child:
    return Child(
        "verge.compute.forwarder",
        "--spool",
        str(spool),
        "--sink",
        sink_url,
        "--listen",
        "127.0.0.1:0",
        *extra,
    )


def start_sink(db: Path, port: int) -> Child:
    return Child("verge.compute.sink", "--db", str(db), "--listen", f"127.0.0.1:{port}")


@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def post_body(number: int) -> bytes:
    return "\n".join(
        json.dumps(
            {"device": f"dev{number % 7}", "value": number + i / 100, "id": number * PER_POST + i}
        )
        for i in range(PER_POST)
    ).encode()


async def post(client: httpx.AsyncClient, base: str, number: int) -> httpx.Response | None:
    try:
        return await client.post(
            f"{base}/ingest",
            content=post_body(number),
            headers={"Idempotency-Key": f"post-{number}", "Content-Type": "application/x-ndjson"},
        )
    except httpx.HTTPError:
        return None


def stats(base: str) -> dict:
    return httpx.get(f"{base}/stats", timeout=5).json()


async def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def sink_ids(sink: Child) -> collections.Counter:
    body = httpx.get(f"{sink.base}/records", timeout=10).text
    return collections.Counter(json.loads(line)["id"] for line in body.splitlines())


async def post_all(
    base: str, numbers: list[int], *, concurrency: int = 4, on_accepted=None
) -> tuple[set[int], dict[int, httpx.Response | None]]:
    """Post each request once; (accepted numbers, the other answers by number)."""
    queue = collections.deque(numbers)
    accepted: set[int] = set()
    refused: dict[int, httpx.Response | None] = {}

    async def device(client: httpx.AsyncClient) -> None:
        while queue:
            number = queue.popleft()
            response = await post(client, base, number)
            if response is not None and response.status_code == 202:
                accepted.add(number)
                if on_accepted:
                    on_accepted(len(accepted))
            else:
                refused[number] = response

    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(device(client) for _ in range(concurrency)))
    return accepted, refused


async def test_10000_readings_survive_sink_outage_and_kill9(tmp_path, children):
    """The issue's acceptance: sink down, edge killed once, every reading arrives once."""
    sink_port = free_port()
    sink_url = f"http://127.0.0.1:{sink_port}/batches"
    spool = tmp_path / "spool.db"
    node = start_node(spool, sink_url, "--batch-records", "200", *FAST_RETRY)
    children.append(node)

    def kill_after_40(count: int) -> None:
        if count == 40 and node.proc.poll() is None:
            node.kill9()  # while other devices' POSTs are in flight

    accepted, unanswered = await post_all(node.base, list(range(100)), on_accepted=kill_after_40)
    assert len(accepted) >= 40 and len(accepted) + len(unanswered) == 100
    assert all(r is None for r in unanswered.values())  # the edge died: no answer

    node = start_node(spool, sink_url, "--batch-records", "200", *FAST_RETRY)
    children.append(node)
    spooled = stats(node.base)["spool"]["records"]
    # every acknowledged reading is there; of the unanswered POSTs, whole ones or nothing
    assert spooled % PER_POST == 0
    assert len(accepted) * PER_POST <= spooled <= (len(accepted) + 4) * PER_POST

    retried, failed = await post_all(node.base, sorted(unanswered))  # devices retry, same key
    assert not failed and retried == set(unanswered)
    assert stats(node.base)["spool"]["records"] == 10_000  # retries of committed POSTs replayed

    sink = start_sink(tmp_path / "sink.db", sink_port)
    children.append(sink)
    await wait_for(lambda: httpx.get(f"{sink.base}/stats").json()["records"] >= 3000)
    node.kill9()  # once more, while batches are being forwarded
    node = start_node(spool, sink_url, "--batch-records", "200", *FAST_RETRY)
    children.append(node)
    await wait_for(lambda: stats(node.base)["spool"]["records"] == 0)

    counts = sink_ids(sink)
    assert set(counts) == set(range(10_000))
    assert max(counts.values()) == 1  # exactly once
    assert stats(node.base)["spool"]["dead_batches"] == 0


async def test_network_cut_and_sink_kill9(tmp_path, children):
    """The sink answers 503 for a while, then dies (connection refused), then comes back."""
    sink_port = free_port()
    sink = start_sink(tmp_path / "sink.db", sink_port)
    children.append(sink)
    httpx.post(f"{sink.base}/_faults", json={"status": 503, "count": 20, "retry_after": "0"})
    node = start_node(
        tmp_path / "spool.db", f"{sink.base}/batches", "--batch-records", "100", *FAST_RETRY
    )
    children.append(node)

    accepted, refused = await post_all(node.base, list(range(15)))
    await wait_for(lambda: stats(node.base)["forwarder"]["retries"] >= 5)
    sink.kill9()
    more, refused_more = await post_all(node.base, list(range(15, 30)))
    assert not refused and not refused_more  # the route keeps accepting into the spool
    await wait_for(lambda: stats(node.base)["forwarder"]["failing"])

    sink = start_sink(tmp_path / "sink.db", sink_port)
    children.append(sink)
    await wait_for(lambda: stats(node.base)["spool"]["records"] == 0)
    counts = sink_ids(sink)
    assert set(counts) == set(range(30 * PER_POST)) and max(counts.values()) == 1


async def test_full_spool_answers_429_and_drops_nothing(tmp_path, children):
    sink_port = free_port()
    node = start_node(
        tmp_path / "spool.db",
        f"http://127.0.0.1:{sink_port}/batches",
        "--quota-records",
        "1000",
        *FAST_RETRY,
    )
    children.append(node)

    accepted, refused = await post_all(node.base, list(range(15)), concurrency=1)
    assert len(accepted) == 10 and sorted(refused) == list(range(10, 15))
    for response in refused.values():
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
    assert stats(node.base)["spool"]["records"] == 1000

    sink = start_sink(tmp_path / "sink.db", sink_port)
    children.append(sink)
    await wait_for(lambda: stats(node.base)["spool"]["records"] == 0)
    retried, still_refused = await post_all(node.base, sorted(refused))  # after Retry-After
    assert not still_refused
    await wait_for(lambda: stats(node.base)["spool"]["records"] == 0)
    counts = sink_ids(sink)
    assert set(counts) == set(range(15 * PER_POST)) and max(counts.values()) == 1


async def test_window_aggregates_survive_kill9(tmp_path, children):
    """Readings folded into an open window are durable: a kill -9 loses none of them."""
    sink = start_sink(tmp_path / "sink.db", free_port())
    children.append(sink)
    spool = tmp_path / "spool.db"
    args = ("--aggregate", "window:2", "--tick", "0.1", *FAST_RETRY)
    node = start_node(spool, f"{sink.base}/batches", *args)
    children.append(node)
    ts = time.time() + 1.0  # its 2 s window stays open for at least a second
    async with httpx.AsyncClient(timeout=10) as client:
        for number in range(3):
            readings = [{"device": f"dev{i % 2}", "value": float(i), "ts": ts} for i in range(50)]
            response = await client.post(
                f"{node.base}/ingest", json=readings, headers={"Idempotency-Key": f"w-{number}"}
            )
            assert response.status_code == 202 and response.json()["spooled"] == 0
    node.kill9()
    assert httpx.get(f"{sink.base}/stats").json()["records"] == 0  # nothing sent before the kill

    node = start_node(spool, f"{sink.base}/batches", *args)
    children.append(node)
    await wait_for(lambda: httpx.get(f"{sink.base}/stats").json()["records"] == 2, timeout=10)
    windows = {
        w["device"]: w for w in map(json.loads, httpx.get(f"{sink.base}/records").text.splitlines())
    }
    assert windows["dev0"]["count"] == windows["dev1"]["count"] == 75
    assert windows["dev0"]["sum"] == 3 * sum(range(0, 50, 2))
    assert windows["dev1"]["avg"] == pytest.approx(25.0)
