"""`make bench-compute`: what an edge function costs, next to a plain cache hit on the same edge.

One Verge edge (one worker, pinned to CPU 0) serves a cached object and a "hello" function
written in C (built here with clang --target=wasm32-wasi). Measured, alternating the two
paths, medians over rounds:

* latency: sequential keep-alive requests; p50/p99 of each path and the added p50/p99 of the
  function (targets: added p50 <= 0.2 ms, added p99 <= 0.5 ms);
* throughput: wrk on CPU 1, requests/s of each path (target: function >= 0.2 x cache hit), and
  the edge's CPU time per request of each path (all its processes, from /proc: less sensitive
  to other load on the machine than requests/s);
* cold start: the first request to the function after the edge starts, with the compiled
  artefact already cached on disk (target < 5 ms over a cache hit), and with an empty artefact
  cache (a compile) for reference.

    .venv/bin/python bench/compute_bench.py [--rounds 3] [--requests 2000] [--duration 5] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from servers import free_port

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "compute.json"
VERGE = [sys.executable, "-m", "verge.cli"]
HELLO_C = r"""
#include <stdio.h>
int main(void) { fputs("Content-Type: text/plain\n\nhello from wasm\n", stdout); return 0; }
"""
console = Console(width=None if sys.stdout.isatty() else 120)


def build_hello(out: Path) -> Path:
    return build_wasm(out, "hello", HELLO_C)


def build_wasm(out: Path, name: str, c_source: str, include: Path | None = None) -> Path:
    """``c_source`` compiled with clang for wasm32-wasi to out/NAME.wasm (``include``: a
    directory of headers, e.g. examples/functions for verge.h)."""
    clang = next((c for c in ("clang-14", "clang") if shutil.which(c)), None)
    if clang is None:
        raise SystemExit(
            "clang not installed: apt-get install clang-14 lld-14 wasi-libc "
            "libclang-rt-14-dev-wasm32"
        )
    source, target = out / f"{name}.c", out / f"{name}.wasm"
    source.write_text(c_source)
    flags = [f"-I{include}"] if include is not None else []
    subprocess.run(
        [clang, "--target=wasm32-wasi", "-O2", "-Wl,--strip-all", *flags, str(source), "-o",
         str(target)],
        check=True,
    )
    return target


class Edge:
    def __init__(self, workdir: Path, config: str, cache_dir: Path) -> None:
        self.port, self.admin = free_port(), free_port()
        path = workdir / "verge.yaml"
        path.write_text(config)
        self.args = [
            *VERGE,
            "edge",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin",
            f"127.0.0.1:{self.admin}",
            "--admin-token",
            "bench",
            "--workers",
            "1",
            "--cache-dir",
            str(cache_dir),
            "--config",
            str(path),
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait until ready; returns the monotonic time it became ready."""
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for line in self.proc.stdout:
            if "verge edge ready" in line:
                return time.monotonic()
        raise SystemExit("edge did not start")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every process of the edge (its session) so far."""
        assert self.proc is not None
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[3]) == self.proc.pid:  # the session id: the edge leads its session
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


def timed_requests(port: int, path: str, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        times.append((time.perf_counter() - t0) * 1000)
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}")
    conn.close()
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wrk(port: int, path: str, duration: int, edge: Edge) -> tuple[float, float]:
    """(requests/s, the edge's CPU µs per request) of a wrk run."""
    cpu0 = edge.cpu_seconds()
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            "-c20",
            f"-d{duration}s",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = edge.cpu_seconds() - cpu0
    line = next(line for line in out.splitlines() if line.startswith("Requests/sec"))
    done = next(line for line in out.splitlines() if "requests in" in line)
    return float(line.split()[1]), cpu * 1e6 / max(1, int(done.split()[0]))


def run(opts: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="verge-bench-compute-") as tmp:
        work = Path(tmp)
        hello = build_hello(work)
        origin_port = free_port()
        origin = subprocess.Popen(
            [*VERGE, "demo-origin", "--listen", f"127.0.0.1:{origin_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        config = f"""
services:
  - name: bench
    hosts: ["*"]
    origins: ["http://127.0.0.1:{origin_port}"]
functions:
  - {{name: hello, service: bench, routes: [/fn/hello], module: {hello}}}
"""
        edge = Edge(work, config, work / "cache")
        try:
            time.sleep(0.5)
            cold = first_request_ms(edge)  # empty artefact cache: compiles
            edge.stop()
            warm_cold = first_request_ms(edge)  # artefact cached on disk
            hit, fn = Measured("/static/app.js"), Measured("/fn/hello")
            for _ in range(opts.rounds):
                for path in (hit, fn):
                    timed_requests(edge.port, path.url, 200)  # warm
                    path.latencies.append(timed_requests(edge.port, path.url, opts.requests))
                    rps, cpu_us = wrk(edge.port, path.url, opts.duration, edge)
                    path.rps.append(rps)
                    path.cpu_us.append(cpu_us)
        finally:
            edge.stop()
            os.killpg(origin.pid, signal.SIGTERM)
    return summarize(hit, fn, cold, warm_cold)


@dataclass
class Measured:
    """One measured path's samples, a list per round."""

    url: str
    latencies: list[list[float]] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def first_request_ms(edge: Edge) -> float:
    edge.start()
    timed_requests(edge.port, "/static/app.js", 1)
    return timed_requests(edge.port, "/fn/hello", 1)[0]


def summarize(hit: Measured, fn: Measured, cold: float, warm_cold: float) -> dict:
    med = statistics.median
    p = {
        name: {
            "p50": med(percentile(r, 0.5) for r in path.latencies),
            "p99": med(percentile(r, 0.99) for r in path.latencies),
        }
        for name, path in (("hit", hit), ("function", fn))
    }
    return {
        "latency_ms": p,
        "added_ms": {q: p["function"][q] - p["hit"][q] for q in ("p50", "p99")},
        "rps": {"hit": med(hit.rps), "function": med(fn.rps)},
        "rps_ratio": med(fn.rps) / med(hit.rps),
        "rps_rounds": {"hit": hit.rps, "function": fn.rps},
        "cpu_us_per_request": {"hit": med(hit.cpu_us), "function": med(fn.cpu_us)},
        "cpu_rounds": {"hit": hit.cpu_us, "function": fn.cpu_us},
        "cold_start_ms": {"cached_artefact": warm_cold, "compile": cold},
        "hit_p50_ms": p["hit"]["p50"],
    }


def report(result: dict) -> None:
    table = Table(title="Edge function (C, wasm32-wasi) vs a cache hit, one worker on CPU 0")
    for column in ("measure", "cache hit", "function", "added / ratio", "target"):
        table.add_column(column, justify="right")
    lat, added = result["latency_ms"], result["added_ms"]
    ok = lambda good: "[green]ok[/]" if good else "[red]MISSED[/]"  # noqa: E731
    table.add_row(
        "p50 ms",
        f"{lat['hit']['p50']:.3f}",
        f"{lat['function']['p50']:.3f}",
        f"+{added['p50']:.3f}",
        f"<= 0.2 {ok(added['p50'] <= 0.2)}",
    )
    table.add_row(
        "p99 ms",
        f"{lat['hit']['p99']:.3f}",
        f"{lat['function']['p99']:.3f}",
        f"+{added['p99']:.3f}",
        f"<= 0.5 {ok(added['p99'] <= 0.5)}",
    )
    table.add_row(
        "requests/s",
        f"{result['rps']['hit']:,.0f}",
        f"{result['rps']['function']:,.0f}",
        f"{result['rps_ratio']:.2f}×",
        f">= 0.2× {ok(result['rps_ratio'] >= 0.2)}",
    )
    cpu = result["cpu_us_per_request"]
    table.add_row(
        "edge CPU µs / request",
        f"{cpu['hit']:.0f}",
        f"{cpu['function']:.0f}",
        f"+{cpu['function'] - cpu['hit']:.0f} ({cpu['hit'] / cpu['function']:.2f}×)",
        "",
    )
    cold = result["cold_start_ms"]
    table.add_row(
        "first request ms",
        "",
        f"{cold['cached_artefact']:.2f} (artefact cached)",
        f"+{cold['cached_artefact'] - result['hit_p50_ms']:.2f}",
        f"< 5 {ok(cold['cached_artefact'] - result['hit_p50_ms'] < 5)}",
    )
    table.add_row("", "", f"{cold['compile']:.2f} (compiled at start)", "", "")
    console.print(table)
    load = os.getloadavg()[0]
    if load > 0.5:
        console.print(f"load average {load:.2f}: other work may skew the numbers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 round, 500 requests, 2 s wrk")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.requests, opts.duration = 1, 500, 2
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} missing: bash bench/setup.sh installs it")
    result = run(opts)
    report(result)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"results written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
