"""Legitimate clients under a flood from one /24: success rate and p99, with and without protection.

Why it exists: the issue "Edge protection" promises that with a flood from many addresses
of one /24, a legitimate client from another address keeps its success rate and its p99
within 2x of the quiet p99; that a per-IP connection cap holds; and that the worker never
runs out of file descriptors. Its measure: legitimate p99 and success rate with and without
a flood of 10x the node's capacity.

What it does: a local nginx origin serving a cacheable 1 KiB object, and `verge edge`s
(1 worker by default) pinned to CPU 0: one without protection, and one per rate-limit
action (block: 429; drop: close) whose service has a rate limit per client_ip well below
what each flooding address sends, a small `connections_per_ip` and a penalty box (the
burst is at least the legitimate client's rate x timeout: after a stall it catches up at
once, and must not be limited for that). The guard edge adds the node's flood guard
(verge/protect/flood.py) at --guard-rate per /24 with the guard's own default burst (a
tenth of a second of the rate; --guard-burst to try another): the burst is what the flood
is served at its onset before its network is boxed, so it is part of what is measured, and
the default is what an operator gets. wrk first measures the node's capacity (hits/s, no
pipelining). Then, in rounds, phases:

- quiet: the legitimate client alone, against every edge;
- flood -> <edge>: the same client while the flood hits that edge.

The legitimate client (127.0.0.1) is open loop: a request every 1/rate s, each timed from
when it was due (as wrk2 does), on a pool of at most --legit-conns keep-alive connections
(a browser's handful; fewer than the cap). A request that fails or takes longer than
--timeout counts as failed, and failed requests count as infinitely slow in the
percentiles: a p99 is only finite when at least 99% succeeded. Each flood phase's line
also lists the requests at and beyond its p99 with when they were due (seconds into the
phase): a cluster at the start is the flood's onset, a spread is noise or a steady cost.

The flood comes from --addresses source addresses 127.0.1.1, 127.0.1.2, ... (every 127/8
address is local on Linux; each client socket is bound to its address before connect), in
--flood-procs processes: --conns-per-address keep-alive connections per address carrying
pipelined GETs on an open-loop schedule of --flood-factor x capacity in total (a
connection whose socket is full is skipped: those requests count as offered but unsent), a
connection the edge closes is reopened after 50 ms, and --new-conns short connections per
second (connect, one GET, reset). All numbers are what the generator saw; offered is the
schedule, sent what the kernel took into the sockets, answered what came back.

The edge's open descriptors (/proc/PID/fd of its workers) and RSS are sampled every 50 ms;
the limit is the workers' soft RLIMIT_NOFILE (/proc/PID/limits). /metrics gives the edge's
own counts (rate-limit outcomes, connections refused by the cap) per phase. After each
flood the next phase waits until the edge is at rest again (CPU idle, fds back), and the
report says how long that took: what the flooders wrote is still in the edge's receive
queues when they leave.

On a 2-core machine the generator, the legitimate client and this script share CPU 1
while the edge has CPU 0; the generator cannot produce its schedule when its core is
saturated, and the report says what it achieved. The generator runs at a lower priority
(nice +10): at a flood's onset its processes open ~1,200 connections at once, and the
legitimate client, starved of CPU 1 meanwhile, started its requests up to hundreds of ms
late, which counted as the edge's latency (the "slowest" lines and the "late p99" column
show how late the client itself was).

    .venv/bin/python bench/flood_bench.py [--rounds N] [--duration S] [--quick] [--json PATH]
        [--workers W] [--legit-rate R] [--addresses A] [--flood-factor F] [--actions block,drop]
        ... (--help lists all)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import re
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadgen import WrkError, run_wrk
from servers import (
    Server,
    ServerError,
    cpu_seconds,
    start_origin,
    start_verge,
    worker_pids,
)
from tools import BUSY_LOAD, ToolError, add_sbin_to_path, install_signal_handlers, require

PROJECT = Path(__file__).resolve().parents[1]
VERGE = str(PROJECT / ".venv" / "bin" / "verge")
OBJECT = "/obj.bin"
OBJECT_BYTES = 1024
TARGET_RATIO = 2.0
FLOOD_NET = "127.0.1."
TICK_S = 0.01  # the flood's schedule step
RECONNECT_S = 0.05  # a flooding connection the edge closed is reopened after this long
MAX_CHURN_PENDING = 1000  # short connections in flight per flood process
SAMPLE_S = 0.05  # open-descriptor sampling period
SETTLE_S = 60.0  # after a flood: wait at most this long for the edge to come to rest
IDLE_WINDOW_S, IDLE_CPU = 0.5, 0.1  # at rest: below 10% of a core over half a second
FD_SLACK = 8  # at rest: at most this many fds above the baseline
EDGE_CPU, LOAD_CPU = 0, 1
WARM_REQUESTS = 8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

PROTECTED = """
services:
  - name: bench
    hosts: [127.0.0.1]
    origins: ["http://127.0.0.1:{origin}"]
    protection:
      rate_limits:
        - {{name: per-ip, match: {{path: /}}, key: client_ip, rate: {rate}, burst: {burst},
           action: {action}, penalty: {penalty}}}
      connections_per_ip: {cap}
"""
GUARD = """
flood: {{rate: {rate}, penalty: {penalty}{burst}}}
"""


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy numbers; the message says why."""


# --- options ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/flood_bench.py",
        description="Legitimate p99 and success rate, quiet and under a flood from one /24.",
    )
    add = parser.add_argument
    add("--rounds", type=int, default=2, help="rounds of all phases (medians over rounds)")
    add("--duration", type=float, default=8.0, help="seconds per phase")
    add("--workers", type=int, default=1, help="edge workers (1 or 2)")
    add("--legit-rate", type=float, default=200.0, help="legitimate requests/s (open loop)")
    add("--legit-conns", type=int, default=4, help="legitimate keep-alive connections at most")
    add("--timeout", type=float, default=5.0, help="a legitimate request slower fails")
    add("--addresses", type=int, default=100, help="flooding addresses 127.0.1.1 ... (<= 254)")
    add("--conns-per-address", type=int, default=12, help="flooding keep-alive connections")
    add("--flood-factor", type=float, default=10.0, help="flood schedule, x measured capacity")
    add("--flood-procs", type=int, default=3, help="flood generator processes")
    add("--new-conns", type=float, default=2000.0, help="short flood connections per second")
    add("--rate", default="300/s", help="protected: the rate limit per client_ip")
    add(
        "--burst",
        type=int,
        default=None,
        help="protected: the rate limit's burst (default: legit rate x timeout, >= 300)",
    )
    add("--cap", type=int, default=8, help="protected: connections_per_ip")
    add("--penalty", default="10s", help="protected: penalty box once over the limit")
    add("--actions", default="block,drop,guard",
        help="protected edges, one per rate-limit action; guard: drop plus the node's flood "
             "guard (top-level flood:)")
    add("--guard-rate", default="2000/s", help="guard: the flood guard's rate per /24")
    add(
        "--guard-burst",
        type=int,
        default=None,
        help="guard: the flood guard's burst (default: the guard's own, a tenth of a second "
        "of the rate: what a flood is served at its onset, before its network is boxed)",
    )
    add("--json", type=Path, help="also write the results to this file")
    add("--quick", action="store_true", help="smoke test: 1 round of 3 s phases")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 1, 3.0
    opts.actions = [a for a in opts.actions.split(",") if a]
    if not set(opts.actions) <= {"block", "drop", "log", "guard"}:
        parser.error("--actions: a comma-separated list of block, drop, log, guard")
    if not 1 <= opts.addresses <= 254 or opts.workers not in (1, 2):
        parser.error("--addresses in 1..254, --workers 1 or 2")
    if (
        min(
            opts.rounds,
            opts.duration,
            opts.legit_rate,
            opts.legit_conns,
            opts.flood_procs,
            opts.conns_per_address,
            opts.flood_factor,
        )
        <= 0
        or opts.new_conns < 0
    ):
        parser.error("counts, rates and durations must be positive")
    if opts.legit_conns > opts.cap:
        parser.error("--legit-conns above --cap: the cap would refuse the legitimate client")
    # a legitimate client held up for up to --timeout catches up at once when the edge
    # answers again; a burst that absorbs that backlog keeps it from ever being limited
    backlog = math.ceil(opts.legit_rate * opts.timeout)
    if opts.burst is None:
        opts.burst = max(300, backlog)
    elif opts.burst < backlog:
        say(
            f"warning: --burst {opts.burst} < legit rate x timeout ({backlog}): the "
            "legitimate client may be limited when it catches up after a stall"
        )
    return opts


# --- the legitimate client --------------------------------------------------------------------


@dataclass
class LegitResult:
    """What one legitimate client saw against one edge."""

    sent: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # successful requests only
    timeline: list[tuple[float, float, float]] = field(default_factory=list)
    """(when it was due, seconds into the phase; its latency in ms, inf if it failed; how
    late the client itself started it, in ms: the client's own CPU, not the edge)"""

    @property
    def success_rate(self) -> float:
        return self.ok / self.sent if self.sent else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile over all sent requests, failures counted as infinite."""
        if not self.sent:
            return math.inf
        rank = max(1, math.ceil(q / 100 * self.sent))
        ordered = sorted(self.latencies_ms)
        return ordered[rank - 1] if rank <= len(ordered) else math.inf

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def late_percentile_ms(self, q: float) -> float:
        """How late the client started its requests (nearest rank): what its own scheduling
        added to their latencies."""
        late = sorted(ms for _, _, ms in self.timeline)
        return late[max(1, math.ceil(q / 100 * len(late))) - 1] if late else math.nan

    def slowest(self, n: int) -> list[tuple[float, float, float]]:
        """The ``n`` slowest requests (due at, ms), in the order they were due: where in the
        phase the p99 comes from (a flood's onset, or throughout)."""
        worst = sorted(self.timeline, key=lambda item: item[1], reverse=True)[:n]
        return sorted(worst)


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match is None:
        raise ConnectionError("response without Content-Length")
    await reader.readexactly(int(match[1]))
    return status


class LegitClient:
    """Open-loop GETs on a small pool of keep-alive connections; each timed from its due time."""

    def __init__(self, port: int, max_conns: int, timeout_s: float) -> None:
        self.port = port
        self.request = f"GET {OBJECT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        self.slots = asyncio.Semaphore(max_conns)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.timeout_s = timeout_s
        self.result = LegitResult()

    async def run(self, rate: float, duration_s: float) -> LegitResult:
        # time.perf_counter, not loop.time(): uvloop's clock has millisecond steps
        self.start = start = time.perf_counter()
        tasks = []
        for n in range(int(rate * duration_s)):
            due = start + n / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(self.one(due)))
        await asyncio.gather(*tasks)
        for _, writer in self.idle:
            writer.close()
        return self.result

    async def one(self, due: float) -> None:
        late_ms = (time.perf_counter() - due) * 1000  # the client's own scheduling
        self.result.sent += 1
        latency = math.inf
        try:
            async with asyncio.timeout(due + self.timeout_s - time.perf_counter()):
                status = await self.exchange()
        except TimeoutError:
            self.result.fail("timeout")
        except (OSError, EOFError, asyncio.IncompleteReadError, ValueError) as exc:
            self.result.fail(type(exc).__name__)
        else:
            if status != 200:
                self.result.fail(f"status {status}")
            else:
                latency = (time.perf_counter() - due) * 1000
                self.result.ok += 1
                self.result.latencies_ms.append(latency)
        self.result.timeline.append((due - self.start, latency, late_ms))

    async def exchange(self) -> int:
        async with self.slots:
            if self.idle:
                reader, writer = self.idle.pop()
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                writer.write(self.request)
                status = await read_response(reader)
            except BaseException:
                writer.close()
                raise
            self.idle.append((reader, writer))
            return status


def legit_process(ports: list[int], opts: dict, out: mp.Queue) -> None:
    """One process: a legitimate client per port, all at once; puts {port: LegitResult}."""
    use_uvloop()

    async def main() -> dict[int, LegitResult]:
        clients = [LegitClient(p, opts["legit_conns"], opts["timeout"]) for p in ports]
        results = await asyncio.gather(
            *(c.run(opts["legit_rate"], opts["duration"]) for c in clients)
        )
        return dict(zip(ports, results, strict=True))

    out.put(("legit", asyncio.run(main())))


# --- the flood --------------------------------------------------------------------------------


@dataclass
class FloodCounts:
    """What one flood process saw (summed over processes by the caller)."""

    offered: float = 0.0  # requests the schedule asked for
    written: int = 0  # requests written into a socket
    answered: dict[str, int] = field(default_factory=dict)  # by status code
    connects: int = 0  # connections attempted (kept-alive and short)
    established: int = 0
    connect_errors: dict[str, int] = field(default_factory=dict)
    closed_unanswered: int = 0  # closed or reset by the edge before any answer
    closed_by_edge: int = 0  # kept-alive connections the edge closed or reset

    def add(self, other: FloodCounts) -> None:
        self.offered += other.offered
        self.written += other.written
        self.connects += other.connects
        self.established += other.established
        self.closed_unanswered += other.closed_unanswered
        self.closed_by_edge += other.closed_by_edge
        for mine, theirs in (
            (self.answered, other.answered),
            (self.connect_errors, other.connect_errors),
        ):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d\d\d)")


class FloodConnection(asyncio.Protocol):
    """A flooding connection: counts the answers' status lines (the 1 KiB body is all 'x',
    so no body holds one); ``closed`` is set when the edge or we close it."""

    def __init__(self, flood: Flood, keep: bool, source: str) -> None:
        self.flood = flood
        self.source = source
        self.keep = keep  # kept-alive: reopened when closed; else one request, then reset
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.answers = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flood.counts.established += 1
        if not self.keep:
            transport.write(self.flood.request)  # type: ignore[attr-defined]
            self.flood.counts.written += 1

    def data_received(self, data: bytes) -> None:
        chunk = self.tail + data
        answered = self.flood.counts.answered
        for match in STATUS_LINE.finditer(chunk):
            status = match[1].decode()
            answered[status] = answered.get(status, 0) + 1
            self.answers += 1
        self.tail = chunk[-11:]
        if not self.keep and self.answers:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        counts = self.flood.counts
        if not self.answers:
            counts.closed_unanswered += 1
        if self.keep:
            self.flood.live.discard(self)
            if not self.flood.stopping:
                counts.closed_by_edge += 1
                self.flood.reconnect_later(self.source)
        else:
            self.flood.short.discard(self)


class Flood:
    """One process's share of the flood: kept-alive pipelining connections on an open-loop
    schedule, reopened when the edge closes them, plus short connections."""

    def __init__(self, port: int, addresses: list[str], opts: dict) -> None:
        self.port = port
        self.addresses = addresses
        self.request = f"GET {OBJECT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        self.rate = opts["proc_rate"]
        self.churn_rate = opts["proc_new_conns"]
        self.conns_per_address = opts["conns_per_address"]
        self.counts = FloodCounts()
        self.live: set[FloodConnection] = set()
        self.short: set[FloodConnection] = set()
        self.stopping = False
        self.next_address = 0
        self.cursor = 0

    def address(self) -> str:
        self.next_address = (self.next_address + 1) % len(self.addresses)
        return self.addresses[self.next_address]

    async def connect(self, keep: bool, source: str) -> None:
        loop = asyncio.get_running_loop()
        self.counts.connects += 1
        proto = FloodConnection(self, keep, source)
        (self.live if keep else self.short).add(proto)
        try:
            await loop.create_connection(
                lambda: proto, "127.0.0.1", self.port, local_addr=(source, 0)
            )
        except OSError as exc:
            (self.live if keep else self.short).discard(proto)
            name = type(exc).__name__
            self.counts.connect_errors[name] = self.counts.connect_errors.get(name, 0) + 1
            if keep and not self.stopping:
                self.reconnect_later(source)

    def reconnect_later(self, source: str) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(RECONNECT_S, lambda: self.spawn(self.connect(True, source)))

    def spawn(self, coro) -> None:
        if self.stopping:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, duration_s: float) -> FloodCounts:
        self.tasks: set[asyncio.Task] = set()
        for source in self.addresses:
            for _ in range(self.conns_per_address):
                self.spawn(self.connect(True, source))
        loop = asyncio.get_running_loop()
        start = last = loop.time()
        end = start + duration_s
        owed = churn_owed = 0.0
        while (now := loop.time()) < end:
            step, last = now - last, now
            owed += self.rate * step
            self.counts.offered += self.rate * step
            owed = self.pipeline(int(owed)) + owed % 1
            churn_owed += self.churn_rate * step
            churn_owed = self.churn(int(churn_owed)) + churn_owed % 1
            await asyncio.sleep(TICK_S)
        self.stopping = True
        for proto in [*self.live, *self.short]:
            if proto.transport is not None:
                proto.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.sleep(0.2)  # aborts and cancellations run
        return self.counts

    def pipeline(self, due: int) -> float:
        """Write ``due`` requests over the connections whose sockets take them; what no
        socket took is dropped (open loop: the schedule does not wait for the edge)."""
        ready = [
            p
            for p in self.live
            if p.transport is not None and not p.transport.get_write_buffer_size()
        ]
        if not ready or due <= 0:
            return 0.0
        share, extra = divmod(due, len(ready))
        first = self.cursor % len(ready)  # the remainder goes round, not to the same few
        self.cursor += extra
        for index, proto in enumerate(ready):
            n = share + ((index - first) % len(ready) < extra)
            if n:
                proto.transport.write(self.request * n)
                self.counts.written += n
        return 0.0

    def churn(self, due: int) -> float:
        """Open ``due`` short connections (fewer when too many are still in flight)."""
        for _ in range(max(0, min(due, MAX_CHURN_PENDING - len(self.short)))):
            self.spawn(self.connect(False, self.address()))
        return 0.0


FLOOD_NICE = 10
"""The flood generator's nice increment: on CPU 1 it yields to the legitimate client, whose
lateness in writing its own requests would otherwise count as the edge's latency."""


def flood_process(port: int, addresses: list[str], opts: dict, out: mp.Queue) -> None:
    os.nice(FLOOD_NICE)
    use_uvloop()
    flood = Flood(port, addresses, opts)
    out.put(("flood", asyncio.run(flood.run(opts["duration"]))))


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --- the edge's side --------------------------------------------------------------------------


def open_fds(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def open_files_limit(pid: int) -> int:
    """The soft 'Max open files' of a process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise BenchError(f"no open files limit in /proc/{pid}/limits")


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    return total


@contextlib.contextmanager
def sampler(groups: Sequence[Sequence[int]]) -> Iterator[list[list[int]]]:
    """Samples each group of workers' open descriptors and RSS every SAMPLE_S: per group,
    [peak fds, peak RSS]."""
    peaks = [[open_fds(pids), rss_bytes(pids)] for pids in groups]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            for peak, pids in zip(peaks, groups, strict=True):
                peak[0] = max(peak[0], open_fds(pids))
                peak[1] = max(peak[1], rss_bytes(pids))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()


METRIC_LINE = re.compile(
    r"^(verge_rate_limit_requests_total|verge_connections_refused_by_cap)"
    r"(?:\{([^}]*)\})? (\S+)$",
    re.MULTILINE,
)


def edge_counters(edge: Server) -> dict[str, float]:
    """Rate-limit outcomes (summed over rules) and cap refusals from the edge's /metrics."""
    with urllib.request.urlopen(f"{edge.extra['admin']}/metrics", timeout=10) as response:
        text = response.read().decode()
    counters: dict[str, float] = {}
    for _name, labels, value in METRIC_LINE.findall(text):
        outcome = re.search(r'outcome="([^"]+)"', labels or "")
        key = f"rate_limit_{outcome[1]}" if outcome else "refused_by_cap"
        counters[key] = counters.get(key, 0.0) + float(value)
    return counters


def settle(pids: Sequence[int], baseline: int) -> tuple[int, float]:
    """Wait (at most SETTLE_S) until the workers are back to rest: fds near ``baseline``
    and CPU idle. An edge can keep working long after the flooders left (what they wrote is
    still in its sockets' receive queues), and the next phase must not measure that.
    Returns (fds, seconds it took; inf when it did not within SETTLE_S)."""
    start = time.monotonic()
    while (waited := time.monotonic() - start) < SETTLE_S:
        cpu = cpu_seconds(pids)
        time.sleep(IDLE_WINDOW_S)
        busy = (cpu_seconds(pids) - cpu) / IDLE_WINDOW_S
        if busy < IDLE_CPU and (fds := open_fds(pids)) <= baseline + FD_SLACK:
            return fds, waited
    return open_fds(pids), math.inf


# --- phases -----------------------------------------------------------------------------------


@dataclass
class Edge:
    name: str  # "unprotected", "block", "drop"
    server: Server
    pids: list[int]
    limit: int
    baseline_fds: int


@dataclass
class Phase:
    """One phase of one round against one edge."""

    round: int
    phase: str  # "quiet" or "flood"
    edge: str
    legit: LegitResult
    flood: FloodCounts | None
    usage: Usage
    fd_after: int
    edge_counts: dict[str, float]
    duration_s: float
    recovery_s: float = 0.0  # after a flood: until the edge was at rest again


@dataclass
class Usage:
    """What a phase cost: the edge workers' peak open fds and CPU (cores), the load
    processes' CPU (cores), over the phase's wall time."""

    fd_peak: int
    rss_peak: int
    edge_cpu: float
    load_cpu: float


def run_processes(
    jobs: list[tuple], timeout_s: float, groups: Sequence[Sequence[int]]
) -> tuple[list[tuple[str, object]], list[Usage]]:
    """Fork one process per (target, args) job and collect what each puts on the queue,
    measuring the load processes and each group of edge workers meanwhile."""
    wall, edge_cpu = time.monotonic(), [cpu_seconds(pids) for pids in groups]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out), daemon=True) for target, args in jobs]
    for proc in procs:  # forked before the sampler thread starts
        proc.start()
    try:
        with sampler(groups) as peaks:
            results = [out.get(timeout=timeout_s) for _ in procs]
    except Exception as exc:
        raise BenchError(f"a load process gave no result in {timeout_s:.0f}s: {exc!r}") from exc
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    wall = time.monotonic() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return results, [
        Usage(peak[0], peak[1], (cpu_seconds(pids) - before) / wall, load_cpu / wall)
        for peak, pids, before in zip(peaks, groups, edge_cpu, strict=True)
    ]


def flood_jobs(port: int, opts: argparse.Namespace, rate: float) -> list[tuple]:
    addresses = [f"{FLOOD_NET}{n}" for n in range(1, opts.addresses + 1)]
    procs = min(opts.flood_procs, len(addresses))
    shared = {
        "proc_rate": rate / procs,
        "proc_new_conns": opts.new_conns / procs,
        "conns_per_address": opts.conns_per_address,
        "duration": opts.duration,
    }
    return [(flood_process, (port, addresses[i::procs], shared)) for i in range(procs)]


def legit_opts(opts: argparse.Namespace) -> dict:
    return {
        "legit_rate": opts.legit_rate,
        "legit_conns": opts.legit_conns,
        "timeout": opts.timeout,
        "duration": opts.duration,
    }


def quiet_phase(edges: list[Edge], round_: int, opts: argparse.Namespace) -> list[Phase]:
    before = {edge.name: edge_counters(edge.server) for edge in edges}
    [(_, results)], usages = run_processes(
        [(legit_process, ([e.server.port for e in edges], legit_opts(opts)))],
        opts.duration + opts.timeout + 30,
        [edge.pids for edge in edges],
    )
    return [
        Phase(
            round_,
            "quiet",
            edge.name,
            results[edge.server.port],
            None,
            usage,
            open_fds(edge.pids),
            delta(before[edge.name], edge_counters(edge.server)),
            opts.duration,
        )
        for edge, usage in zip(edges, usages, strict=True)
    ]


def flood_phase(edge: Edge, round_: int, opts: argparse.Namespace, rate: float) -> Phase:
    before = edge_counters(edge.server)
    jobs = [
        (legit_process, ([edge.server.port], legit_opts(opts))),
        *flood_jobs(edge.server.port, opts, rate),
    ]
    results, [usage] = run_processes(jobs, opts.duration + opts.timeout + 60, [edge.pids])
    legit = next(r for kind, r in results if kind == "legit")[edge.server.port]
    flood = FloodCounts()
    for kind, counts in results:
        if kind == "flood":
            flood.add(counts)
    fds_after, recovery_s = settle(edge.pids, edge.baseline_fds)
    if not edge.server.alive():
        raise BenchError(f"the {edge.name} edge died under the flood:\n{edge.server.log_tail()}")
    return Phase(
        round_,
        "flood",
        edge.name,
        legit,
        flood,
        usage,
        fds_after,
        delta(before, edge_counters(edge.server)),
        opts.duration,
        recovery_s,
    )


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters' growth; NaN for one that is missing on either side (a worker too busy to
    answer the admin's stats request in time is left out of /metrics)."""
    return {
        key: after[key] - before[key] if key in after and key in before else math.nan
        for key in before.keys() | after.keys()
    }


# --- setup ------------------------------------------------------------------------------------


def check_flood_addresses(count: int) -> None:
    """Every flooding address must be bindable (Linux routes all of 127/8 to lo)."""
    for n in (1, count):
        with socket.socket() as sock:
            try:
                sock.bind((f"{FLOOD_NET}{n}", 0))
            except OSError as exc:
                raise BenchError(f"cannot bind {FLOOD_NET}{n}: {exc}") from exc


def start_edges(root: Path, origin: Server, opts: argparse.Namespace) -> list[Edge]:
    edges = []
    cpus = str(EDGE_CPU) if pinned() else None
    common = {"workers": opts.workers, "cpus": cpus, "admin_token": "bench"}
    for name in ["unprotected", *opts.actions]:
        extra: tuple[str, ...] = ()
        if name != "unprotected":
            config = root / f"{name}.yaml"
            text = PROTECTED.format(
                origin=origin.port,
                rate=opts.rate,
                burst=opts.burst,
                action="drop" if name == "guard" else name,
                cap=opts.cap,
                penalty=opts.penalty,
            )
            if name == "guard":
                burst = "" if opts.guard_burst is None else f", burst: {opts.guard_burst}"
                text += GUARD.format(rate=opts.guard_rate, burst=burst, penalty=opts.penalty)
            config.write_text(text)
            extra = ("--config", str(config))
        try:
            server = start_verge(name, root / name, VERGE, origin.port, **common, extra_args=extra)
        except ServerError:
            for edge in edges:
                edge.server.stop()
            raise
        pids = worker_pids(server)
        edges.append(Edge(name, server, pids, open_files_limit(pids[0]), open_fds(pids)))
    return edges


def warm(edge: Edge) -> None:
    """The object becomes a memory hit (a few requests on new connections reach every
    worker; few enough that 127.0.0.1 stays under the protected edges' limits)."""
    for _ in range(WARM_REQUESTS):
        with urllib.request.urlopen(f"{edge.server.base_url}{OBJECT}", timeout=10) as answer:
            if answer.status != 200 or len(answer.read()) != OBJECT_BYTES:
                raise BenchError(f"warming {edge.name}: {answer.status}")
    edge.baseline_fds = open_fds(edge.pids)


@functools.cache
def pinned() -> bool:
    """Whether the machine has CPUs EDGE_CPU and LOAD_CPU (decided once, before this
    process pins itself to LOAD_CPU)."""
    return {EDGE_CPU, LOAD_CPU} <= os.sched_getaffinity(0)


def measure_capacity(edge: Edge) -> float:
    result = run_wrk(
        f"{edge.server.base_url}{OBJECT}",
        duration_s=3,
        connections=50,
        threads=1,
        cpus=str(LOAD_CPU) if pinned() else None,
    )
    if result.errors:
        raise BenchError(f"capacity run: {result.errors} errors")
    return result.requests_per_s


# --- the run and the report -------------------------------------------------------------------


def run(opts: argparse.Namespace) -> dict:
    check_flood_addresses(opts.addresses)
    pinned()
    tmp = Path(tempfile.mkdtemp(prefix="verge-flood-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        files = tmp / "files"
        files.mkdir()
        (files / OBJECT.lstrip("/")).write_bytes(b"x" * OBJECT_BYTES)
        origin = start_origin(tmp / "origin", files)
        stack.callback(origin.stop)
        say("starting edges …")
        edges = start_edges(tmp, origin, opts)
        for edge in edges:
            stack.callback(edge.server.stop)
            warm(edge)
        if pinned():
            os.sched_setaffinity(0, {LOAD_CPU})  # the load processes fork from here
        capacity = measure_capacity(edges[0])
        rate = opts.flood_factor * capacity
        say(
            f"capacity {capacity:,.0f} req/s (wrk -c50, no pipelining); flood schedule "
            f"{rate:,.0f} req/s from {opts.addresses} addresses"
        )
        phases: list[Phase] = []
        for round_ in range(opts.rounds):
            say(f"round {round_ + 1}/{opts.rounds}: quiet …")
            phases += quiet_phase(edges, round_, opts)
            for edge in edges:
                say(f"round {round_ + 1}/{opts.rounds}: flood -> {edge.name} …")
                phases.append(flood_phase(edge, round_, opts, rate))
                say("  " + phase_line(phases[-1]))
        summary = summarise(opts, edges, capacity, rate, phases)
        for edge in edges:
            tracebacks = log_tracebacks(edge.server)
            if tracebacks:
                summary["warnings"].append(
                    f"the {edge.name} edge logged {tracebacks} tracebacks (first: "
                    f"{first_error(edge.server)})"
                )
        return summary


def log_tracebacks(server: Server) -> int:
    return server.log_path.read_text(errors="replace").count("Traceback (most recent")


def first_error(server: Server) -> str:
    """The exception line that ends the log's first traceback."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Traceback (most"))
    return next((line for line in lines[start + 1 :] if line and not line.startswith(" ")), "?")


def phase_line(phase: Phase) -> str:
    flood = phase.flood
    answered = sum(flood.answered.values()) if flood else 0
    return (
        f"legit {phase.legit.success_rate:.2%} ok, p99 {fmt_ms(phase.legit.percentile_ms(99))}"
        f"; flood written {flood.written / phase.duration_s:,.0f}/s, answered "
        f"{answered / phase.duration_s:,.0f}/s {flood.answered}; fd peak {phase.usage.fd_peak}; "
        f"edge CPU {phase.usage.edge_cpu:.2f}, load CPU {phase.usage.load_cpu:.2f}\n"
        f"  slowest (due at s: ms (client started +ms late)): {slowest_text(phase.legit)}"
        if flood
        else ""
    )


def slowest_text(legit: LegitResult) -> str:
    """The requests at and above the p99's rank: when they were due, their latency and how
    late the client itself started them (its CPU is shared with the flood generator)."""
    beyond_p99 = legit.sent - max(1, math.ceil(0.99 * legit.sent)) + 1
    return ", ".join(
        f"{due:.2f}: {fmt_ms(ms)} (+{late:.0f})" for due, ms, late in legit.slowest(beyond_p99)
    )


def fmt_count(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def fmt_s(value: float) -> str:
    return f">{SETTLE_S:.0f}s" if math.isinf(value) else f"{value:.1f}s"


def fmt_ms(value: float) -> str:
    return "fail" if math.isinf(value) else f"{value:.2f}ms"


def median(values: list[float]) -> float:
    """The median; NaN if there is nothing or a value is unknown (NaN)."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return statistics.median(values)


def summarise(
    opts: argparse.Namespace, edges: list[Edge], capacity: float, rate: float, phases: list[Phase]
) -> dict:
    rows = []
    quiet_p99 = {
        e.name: median(
            [p.legit.percentile_ms(99) for p in phases if p.phase == "quiet" and p.edge == e.name]
        )
        for e in edges
    }
    for edge in edges:
        rows.append(
            summarise_row(
                "quiet",
                edge,
                [p for p in phases if p.phase == "quiet" and p.edge == edge.name],
                quiet_p99,
            )
        )
    for edge in edges:
        rows.append(
            summarise_row(
                "flood",
                edge,
                [p for p in phases if p.phase == "flood" and p.edge == edge.name],
                quiet_p99,
            )
        )
    warnings = []
    load = os.getloadavg()[0]
    if load > BUSY_LOAD + 3:
        warnings.append(f"1-minute load average {load:.2f} at the end: others shared the CPUs")
    if not pinned():
        warnings.append("fewer than 2 CPUs: nothing pinned, the generator shares the edge's CPU")
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "capacity_rps": capacity,
        "flood_schedule_rps": rate,
        "open_files_limit": {e.name: e.limit for e in edges},
        "baseline_fds": {e.name: e.baseline_fds for e in edges},
        "rows": rows,
        "phases": [phase_dict(p) for p in phases],
        "warnings": warnings,
    }


def summarise_row(kind: str, edge: Edge, phases: list[Phase], quiet_p99: dict) -> dict:
    sent = sum(p.legit.sent for p in phases)
    ok = sum(p.legit.ok for p in phases)
    p99 = median([p.legit.percentile_ms(99) for p in phases])
    failures: dict[str, int] = {}
    for p in phases:
        for reason, n in p.legit.failures.items():
            failures[reason] = failures.get(reason, 0) + n
    row = {
        "phase": kind,
        "edge": edge.name,
        "legit_sent": sent,
        "legit_success": ok / sent if sent else 0.0,
        "legit_failures": failures,
        "p50_ms": median([p.legit.percentile_ms(50) for p in phases]),
        "p99_ms": p99,
        "p99_ratio": p99 / quiet_p99[edge.name] if quiet_p99[edge.name] else math.nan,
        "client_late_p99_ms": median([p.legit.late_percentile_ms(99) for p in phases]),
        "fd_peak": max(p.usage.fd_peak for p in phases),
        "fd_after": max(p.fd_after for p in phases),
        "recovery_s": max(p.recovery_s for p in phases),
        "edge_cpu": median([p.usage.edge_cpu for p in phases]),
        "rss_peak_mib": max(p.usage.rss_peak for p in phases) / (1 << 20),
        "load_cpu": median([p.usage.load_cpu for p in phases]),
        "open_files_limit": edge.limit,
        "edge_counts_per_s": {
            key: median([p.edge_counts.get(key, math.nan) / p.duration_s for p in phases])
            for key in sorted({key for p in phases for key in p.edge_counts})
        },
    }
    floods = [p.flood for p in phases if p.flood is not None]
    if floods:
        per_s = phases[0].duration_s
        row["flood_per_s"] = {
            "offered": median([f.offered / per_s for f in floods]),
            "written": median([f.written / per_s for f in floods]),
            "answered": median([sum(f.answered.values()) / per_s for f in floods]),
            "answered_200": median([f.answered.get("200", 0) / per_s for f in floods]),
            "answered_429": median([f.answered.get("429", 0) / per_s for f in floods]),
            "connects": median([f.connects / per_s for f in floods]),
            "closed_unanswered": median([f.closed_unanswered / per_s for f in floods]),
        }
        row["flood_connect_errors"] = floods[-1].connect_errors
    return row


def phase_dict(phase: Phase) -> dict:
    legit = phase.legit
    return {
        "round": phase.round,
        "phase": phase.phase,
        "edge": phase.edge,
        "legit": {
            "sent": legit.sent,
            "ok": legit.ok,
            "failures": legit.failures,
            "p50_ms": legit.percentile_ms(50),
            "p99_ms": legit.percentile_ms(99),
            "max_ms": legit.percentile_ms(100),
        },
        "flood": asdict(phase.flood) if phase.flood else None,
        "usage": asdict(phase.usage),
        "fd_after": phase.fd_after,
        "recovery_s": phase.recovery_s,
        "edge_counts": phase.edge_counts,
    }


def report(summary: dict) -> None:
    opts = summary["options"]
    print()
    print(
        f"edge: {opts['workers']} worker(s) pinned to CPU {EDGE_CPU}; a cacheable "
        f"{OBJECT_BYTES} B object (memory hits); capacity {summary['capacity_rps']:,.0f} "
        f"req/s (wrk -t1 -c50, no pipelining)"
    )
    print(
        f"legitimate client: 127.0.0.1, open loop {opts['legit_rate']:g} req/s on <= "
        f"{opts['legit_conns']} keep-alive connections, timed from when each was due, "
        f"timeout {opts['timeout']:g}s; failures count as infinitely slow"
    )
    print(
        f"flood: {opts['addresses']} addresses {FLOOD_NET}1-{opts['addresses']}, "
        f"{opts['flood_procs']} processes, {opts['conns_per_address']} pipelining "
        f"connections per address, schedule {summary['flood_schedule_rps']:,.0f} req/s "
        f"({opts['flood_factor']:g}x capacity) + {opts['new_conns']:g} new connections/s"
    )
    print(
        f"protected: rate limit {opts['rate']} burst {opts['burst']} per client_ip, penalty "
        f"{opts['penalty']}, connections_per_ip {opts['cap']}; {opts['rounds']} round(s) of "
        f"{opts['duration']:g}s phases, medians over rounds"
    )
    if pinned():
        print(
            f"NOTE: 2 cores here: the flood generator, the legitimate client and this script "
            f"share CPU {LOAD_CPU}; the generator competes with itself, not with the edge, "
            "but cannot produce more than one core allows (offered vs sent below)."
        )
    print()
    head = (
        f"{'phase':24} {'legit ok':>9} {'p50':>9} {'p99':>9} {'p99/quiet':>11} "
        f"{'fd peak/limit':>14} {'edge CPU':>8} {'load CPU':>8} {'RSS MiB':>8} {'late p99':>9}"
    )
    print(head)
    for row in summary["rows"]:
        name = "quiet" if row["phase"] == "quiet" else f"flood -> {row['edge']}"
        if row["phase"] == "quiet":
            name += f" ({row['edge']})"
        ratio = row["p99_ratio"]
        verdict = "" if row["phase"] == "quiet" else (" ✓" if ratio <= TARGET_RATIO else " ✗")
        print(
            f"{name:24} {row['legit_success']:9.2%} {fmt_ms(row['p50_ms']):>9} "
            f"{fmt_ms(row['p99_ms']):>9} {ratio:8.2f}x{verdict:2} "
            f"{row['fd_peak']:>7}/{row['open_files_limit']:<6} {row['edge_cpu']:8.2f} "
            f"{row['load_cpu']:8.2f} {row['rss_peak_mib']:8.0f} "
            f"{fmt_ms(row['client_late_p99_ms']):>9}"
        )
    print(
        f"  (target under a flood: success rate kept and p99 <= {TARGET_RATIO:g}x the quiet "
        "p99 of the same edge; CPU in cores over the phase, RSS peak of the workers; quiet: the "
        "client works on all edges at once, load CPU is its; late p99: how late the client "
        "itself started its requests, part of its latencies: its CPU, not the edge)"
    )
    print()
    print(
        f"{'flood, per second':24} {'offered':>9} {'sent':>9} {'answered':>9} {'200':>8} "
        f"{'429':>8} {'connects':>9} {'unanswered':>10} {'edge: 429/drop':>14} "
        f"{'cap refused':>11} {'at rest after':>13}"
    )
    for row in summary["rows"]:
        if "flood_per_s" not in row:
            continue
        f, e = row["flood_per_s"], row["edge_counts_per_s"]
        print(
            f"{'-> ' + row['edge']:24} {f['offered']:9,.0f} {f['written']:9,.0f} "
            f"{f['answered']:9,.0f} {f['answered_200']:8,.0f} {f['answered_429']:8,.0f} "
            f"{f['connects']:9,.0f} {f['closed_unanswered']:10,.0f} "
            f"{fmt_count(e.get('rate_limit_blocked', 0)):>14} "
            f"{fmt_count(e.get('refused_by_cap', 0)):>11} {fmt_s(row['recovery_s']):>13}"
        )
    print(
        "  (offered: the schedule; sent: requests the kernel took into socket buffers, which "
        "absorb a lot before they fill; answered: status lines received; unanswered: "
        "connections closed before any answer, e.g. refused by the cap or dropped; 429/drop and "
        "cap refused: the edge's own /metrics counts, n/a when its worker was too busy to report; "
        "at rest after: seconds from the flood's end until the edge's CPU and fds were back, "
        "the longest over rounds)"
    )
    for row in summary["rows"]:
        if row["legit_failures"]:
            print(f"  legit failures, {row['phase']} {row['edge']}: {row['legit_failures']}")
        if row.get("flood_connect_errors"):
            print(
                f"  flood connect errors -> {row['edge']} (last round): "
                f"{row['flood_connect_errors']}"
            )
    for warning in summary["warnings"]:
        print(f"  warning: {warning}")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    add_sbin_to_path()
    try:
        require({"wrk": "wrk", "nginx": "nginx-light", "taskset": "util-linux"}, say=say)
    except ToolError as error:
        say(f"missing tools: {error}; run `bash bench/setup.sh`")
        return 2
    install_signal_handlers()
    try:
        summary = run(opts)
    except (BenchError, ServerError, WrkError) as error:
        say(f"benchmark failed: {error}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; all servers stopped")
        return 130
    report(summary)
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"results written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
