"""A short flood from one /24 against a protected edge, while a legitimate client works.

The issue "Edge protection" promises that a flood from many addresses of one /24 leaves a
legitimate client from another address served, that a per-IP connection cap holds and
that the worker never runs out of file descriptors. This is the bounded, end-to-end form
of that promise (bench/flood_bench.py measures the latency side): a real one-worker edge
whose service has a rate limit per client address and ``connections_per_ip``, 50 flooding
addresses 127.0.1.1-50 (Linux routes all of 127/8 to the loopback interface, so a client
socket bound to one of them connects from it), each opening more connections than the cap
allows and pipelining more requests than its rate allows, while a client from 127.0.0.1
makes sequential requests. Every loop is bounded (a fixed number of connections and
requests per address), so the counts are exact: the edge's /metrics must agree with what
the flooders saw. Afterwards the worker is the same process, healthy, and its open
descriptors are back near where they started (no leaked sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.sockets import connects
from verge.http.server import LISTEN_BACKLOG

pytestmark = pytest.mark.timeout(90)

CONFIG = """
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    protection:
      rate_limits:
        - {{name: per-ip, match: {{path: /}}, key: client_ip, rate: 10/s, burst: {burst}}}
      connections_per_ip: {cap}
"""
BURST = 50  # the legitimate client's requests all fit in it, whatever the timing
CAP = 2
FLOODERS = [f"127.0.1.{n}" for n in range(1, 51)]
CONNECTIONS_PER_FLOODER = 4  # two over the cap: all held open until every one is resolved
PIPELINED = 30  # per connection: the CAP served ones carry 60 > BURST + refill
LEGIT_REQUESTS = 40
FD_SLACK = 4  # descriptors the worker may hold beyond its baseline once all clients left
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@dataclass
class Tally:
    """What the flooders saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    served: int = 0  # connections that got all their answers
    refused: int = 0  # connections closed or reset before any answer


async def answers(reader: asyncio.StreamReader, expected: int) -> list[int]:
    """Status codes read until ``expected`` answers, EOF or a reset."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while len(STATUS_LINE.findall(data)) < expected:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            data += chunk
    return [int(code) for code in STATUS_LINE.findall(data)]


async def flood_from(source: str, port: int, tally: Tally) -> None:
    """One flooding address: CONNECTIONS_PER_FLOODER connections, all open at once, each
    carrying PIPELINED requests; closed only when every one has its answers or was refused."""
    request = f"GET /obj HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    streams = [
        await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        for _ in range(CONNECTIONS_PER_FLOODER)
    ]
    try:
        for _, writer in streams:
            with contextlib.suppress(ConnectionError):
                writer.write(request * PIPELINED)
        results = await asyncio.wait_for(
            asyncio.gather(*(answers(reader, PIPELINED) for reader, _ in streams)), 30
        )
    finally:
        for _, writer in streams:
            writer.close()
    for statuses in results:
        tally.statuses.update(statuses)
        if len(statuses) == PIPELINED:
            tally.served += 1
        elif not statuses:
            tally.refused += 1


async def flood(port: int) -> Tally:
    tally = Tally()
    await asyncio.gather(*(flood_from(source, port, tally) for source in FLOODERS))
    return tally


def worker_pids(supervisor: int) -> list[int]:
    """The edge's worker processes: children of the supervisor running verge.edge.worker."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if (
                int(stat.rpartition(")")[2].split()[1]) == supervisor
                and b"verge.edge.worker" in cmdline
            ):
                pids.append(int(entry))
    return pids


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fds_settle(pid: int, at_most: int, timeout: float = 15.0) -> int:
    """The worker's open descriptors once they are at most ``at_most`` (the edge closes its
    side of a connection when it reads the client's FIN: asynchronously), or at the timeout."""
    deadline = time.monotonic() + timeout
    while (count := open_fds(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def metric(text: str, line_start: str) -> float:
    match = re.search(rf"^{re.escape(line_start)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{line_start} not in /metrics"
    return float(match.group(1))


@pytest.fixture
def flood_sources():
    """The flooding addresses must be bindable (every 127/8 address is, on Linux)."""
    for source in (FLOODERS[0], FLOODERS[-1]):
        with socket.socket() as sock:
            try:
                sock.bind((source, 0))
            except OSError as exc:
                pytest.fail(f"cannot bind {source} (needed to flood from a /24): {exc}")
    return FLOODERS


def test_a_flood_from_one_slash_24_is_limited_and_the_legitimate_client_is_served(
    edge_factory, origin, flood_sources
):
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"x" * 1024)
    edge = edge_factory(config=CONFIG.format(origin=origin.url, burst=BURST, cap=CAP))
    [worker] = worker_pids(edge.proc.pid)
    with edge.client() as warm:  # a memory hit from now on; the origin pool holds its socket
        assert warm.get("/obj").status_code == 200
    baseline = open_fds(worker)  # (the warm-up connection may still count: 1 more at most)

    with ThreadPoolExecutor(1) as pool, edge.client() as legit:
        flooding = pool.submit(asyncio.run, flood(edge.port))
        legit_statuses = [legit.get("/obj").status_code for _ in range(LEGIT_REQUESTS)]
        tally = flooding.result(timeout=60)
    assert legit_statuses == [200] * LEGIT_REQUESTS

    over_the_cap = len(FLOODERS) * (CONNECTIONS_PER_FLOODER - CAP)
    assert (tally.served, tally.refused) == (len(FLOODERS) * CAP, over_the_cap)
    assert sum(tally.statuses.values()) == len(FLOODERS) * CAP * PIPELINED
    assert set(tally.statuses) == {200, 429} and tally.statuses[429] > 0

    with edge.admin() as admin:
        assert admin.get("/healthz").status_code == 200
        metrics = admin.get("/metrics").text
    counted = 'verge_rate_limit_requests_total{outcome="%s",rule="per-ip",service="site"}'
    assert metric(metrics, counted % "blocked") == tally.statuses[429]
    assert metric(metrics, counted % "allowed") == 1 + LEGIT_REQUESTS + tally.statuses[200]
    assert metric(metrics, "verge_connections_refused_by_cap") == over_the_cap
    assert metric(metrics, "verge_open_files_limit") >= 1024

    assert edge.proc.poll() is None and worker_pids(edge.proc.pid) == [worker]  # no restart
    assert fds_settle(worker, baseline + FD_SLACK) <= baseline + FD_SLACK  # nothing leaked
    with edge.client() as after:
        assert after.get("/obj").status_code == 200


GUARDED = """
flood: {{rate: 100/s, burst: 100, penalty: 30s}}
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
"""


def test_the_flood_guard_refuses_the_flooding_network_whole_and_in_the_kernel(
    edge_factory, origin, flood_sources
):
    """50 addresses of 127.0.1.0/24, each below any per-address limit, pipeline 1,500
    requests at once: the node's flood guard boxes the /24, drops its connections and its
    new SYNs (a connection from an address that never sent a request does not even complete
    its handshake), while 127.0.0.1 is served throughout."""
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"x" * 1024)
    edge = edge_factory(config=GUARDED.format(origin=origin.url))
    with edge.client() as warm:
        assert warm.get("/obj").status_code == 200
    tally = Tally()

    async def one_connection_each() -> None:
        request = f"GET /obj HTTP/1.1\r\nHost: 127.0.0.1:{edge.port}\r\n\r\n".encode()

        async def flooder(source: str) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port,
                                                           local_addr=(source, 0))
            with contextlib.suppress(ConnectionError):
                writer.write(request * PIPELINED)
            tally.statuses.update(await asyncio.wait_for(answers(reader, PIPELINED), 30))
            writer.close()

        await asyncio.gather(*(flooder(source) for source in flood_sources))

    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool, edge.client() as legit:
        flooding = pool.submit(asyncio.run, one_connection_each())
        legit_statuses = [legit.get("/obj").status_code for _ in range(LEGIT_REQUESTS)]
        flooding.result(timeout=60)
    elapsed = time.monotonic() - started
    assert legit_statuses == [200] * LEGIT_REQUESTS
    served = tally.statuses[200]  # the burst and what the rate refilled, then nothing
    assert set(tally.statuses) <= {200} and 0 < served <= 101 + 100 * elapsed
    assert served < len(flood_sources) * PIPELINED / 2

    assert not connects("127.0.1.200", edge.port)  # the SYN is dropped in the kernel
    assert connects("127.0.2.1", edge.port)  # another network connects
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert metric(metrics, "verge_flood_boxes") == 1
    assert metric(metrics, "verge_flood_boxed") == 1
    assert metric(metrics, "verge_flood_dropped") >= 1
    with edge.client() as after:
        assert after.get("/obj").status_code == 200


async def open_from(source: str, port: int) -> tuple | None:
    """A connection from ``source``, or None when its handshake does not complete in 1 s."""
    try:
        return await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 1.0
        )
    except (OSError, TimeoutError):
        return None


def wait_for_metric(edge, line_start: str, at_least: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        with edge.admin() as admin:
            value = metric(admin.get("/metrics").text, line_start)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_the_flood_guard_boxes_a_network_that_opens_connections_before_it_sends_a_request(
    edge_factory, origin
):
    """250 addresses of 127.0.4.0/24 connect at once, over the guard's burst of 100 (new
    connections count like requests): the /24 is boxed at accept, the connections it got are
    aborted, and none of them is served when it then asks."""
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"x" * 1024)
    edge = edge_factory(config=GUARDED.format(origin=origin.url))
    request = f"GET /obj HTTP/1.1\r\nHost: 127.0.0.1:{edge.port}\r\n\r\n".encode()

    async def storm() -> tuple[int, list[int]]:
        streams = await asyncio.gather(
            *(open_from(f"127.0.4.{n}", edge.port) for n in range(1, 251))
        )
        opened = [stream for stream in streams if stream is not None]
        await asyncio.to_thread(wait_for_metric, edge, "verge_flood_boxes", 1)
        for _, writer in opened:
            with contextlib.suppress(ConnectionError):
                writer.write(request)
        results = await asyncio.wait_for(
            asyncio.gather(*(answers(reader, 1) for reader, _ in opened)), 30
        )
        for _, writer in opened:
            writer.close()
        return len(opened), [status for statuses in results for status in statuses]

    opened, statuses = asyncio.run(storm())
    assert opened > 101 and statuses == []  # handshakes the kernel made; nothing served
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert metric(metrics, "verge_flood_boxes") == 1
    assert metric(metrics, "verge_flood_refused") >= 1  # the rest: refused at accept
    assert not connects("127.0.4.251", edge.port)  # and now in the kernel
    with edge.client() as legit:
        assert legit.get("/obj").status_code == 200


def test_a_pipelined_read_over_the_burst_boxes_the_network_before_it_is_parsed(
    edge_factory, origin
):
    """One connection from 127.0.5.1 writes 2,000 pipelined GETs at once (~90 KB, read in a
    few large reads): the first read alone carries more requests than the /24 may still send,
    so it is boxed at that read, and next to nothing is served (at most what a first read
    under TURN_SLICE bytes could hold, were the kernel to split it there)."""
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"x" * 1024)
    edge = edge_factory(config=GUARDED.format(origin=origin.url))
    request = f"GET /obj HTTP/1.1\r\nHost: 127.0.0.1:{edge.port}\r\n\r\n".encode()

    async def pipeline() -> list[int]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", edge.port, local_addr=("127.0.5.1", 0)
        )
        with contextlib.suppress(ConnectionError):
            writer.write(request * 2000)
        statuses = await asyncio.wait_for(answers(reader, 2000), 30)
        writer.close()
        return statuses

    statuses = asyncio.run(pipeline())
    assert len(statuses) <= 2048 // len(request)
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert metric(metrics, "verge_flood_boxes") == 1
    assert metric(metrics, "verge_flood_dropped") > 101  # the read's requests, unparsed
    assert not connects("127.0.5.9", edge.port)


def test_an_upload_full_of_request_lines_is_not_taken_for_a_flood(edge_factory, origin):
    """A POST whose 100 KB body is an access log (2,000 "GET / HTTP/1.1" lines, more than the
    guard's burst) arrives in large reads: the body is not weighed as pipelined requests, so
    the upload is answered and its network is not boxed."""
    origin.route("/*", headers=[("Cache-Control", "no-store")], body=b"stored")
    edge = edge_factory(config=GUARDED.format(origin=origin.url))
    log = b'127.0.0.1 - - [07/Dec/2026] "GET / HTTP/1.1" 200 12\n' * 2000
    upload = (f"POST /logs HTTP/1.1\r\nHost: 127.0.0.1:{edge.port}\r\n"
              f"Content-Length: {len(log)}\r\n\r\n").encode() + log

    async def post() -> list[int]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", edge.port, local_addr=("127.0.6.1", 0)
        )
        writer.write(upload)
        statuses = await asyncio.wait_for(answers(reader, 1), 30)
        writer.close()
        return statuses

    assert asyncio.run(post()) == [200]
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert metric(metrics, "verge_flood_boxes") == 0
    assert connects("127.0.6.2", edge.port)


def test_the_listener_keeps_its_long_accept_queue(edge_factory, origin):
    """The worker's listening socket queues LISTEN_BACKLOG completed connections (as the
    kernel caps it), not asyncio's default of 100: a flood of connections overflowed 100 at
    once, and a legitimate client's handshake then waited a whole SYN retry (1 s)."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("ss (iproute2) is not installed")
    edge = edge_factory(config=GUARDED.format(origin=origin.url))
    listing = subprocess.run([ss, "-Hltn", f"sport = :{edge.port}"], capture_output=True,
                             text=True, check=True).stdout.split()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(listing[2]) == min(LISTEN_BACKLOG, somaxconn)  # Send-Q: the backlog
