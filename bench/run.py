"""Side-by-side benchmark: Verge against nginx proxy_cache on cache hits, in one run.

Why it is built this way: a number for Verge alone says nothing, and numbers taken at
different times on a shared 2-core machine drift. So one run starts an origin, nginx with
proxy_cache (`sendfile on` and `sendfile off`) and Verge, pins each measured server to CPU 0
and wrk to CPU 1, warms every cache, then alternates the contenders round by round and
reports medians. Verge is compared with the better of the two nginx configs.

    .venv/bin/python bench/run.py [--rounds N] [--duration S] [--connections C]
                                  [--only verge|nginx] [--quick]

Results are printed as tables and written to bench/results/latest.json.
See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import os
import platform
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadgen import WrkError, WrkResult, run_wrk, wrk_command
from report import SIZES, TARGETS, Contender, Size, build_summary, print_report, write_json
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from servers import (
    Server,
    ServerError,
    start_nginx_cache,
    start_origin,
    start_verge,
)
from tools import BUSY_LOAD, add_sbin_to_path, install_signal_handlers, tool_version

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results" / "latest.json"
REQUIRED_TOOLS = ("nginx", "wrk", "taskset")
WARMUP_S = 1.0
SETTLE_S = 0.3
RSS_SAMPLE_S = 0.2

console = Console(width=None if sys.stdout.isatty() else 120)


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy numbers; the message says why."""


@dataclass(frozen=True)
class CpuPlan:
    """Where servers and wrk run. `server`/`wrk` are taskset lists; `everything` is all CPUs."""

    server: str
    wrk: str
    everything: str
    pinned: bool


@dataclass
class Live:
    """A contender together with its running server and how wrk is run against it."""

    info: Contender
    server: Server
    wrk_cpus: str
    wrk_threads: int

    def url(self, size: Size) -> str:
        return f"{self.server.base_url}/bench/{size.key}.bin"


# --- options and environment ---------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="Verge vs nginx proxy_cache, cache hits, side by side."
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per contender (median)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--only", choices=("verge", "nginx"), help="run only one side")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    parser.add_argument(
        "--verge-bin",
        default=str(Path(sys.executable).parent / "verge"),
        help="the verge executable (default: the one next to this Python)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON results file")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 1, 2.0
    if opts.rounds < 1 or opts.duration < 1 or opts.connections < 1:
        parser.error("--rounds, --duration and --connections must be at least 1")
    return opts


def missing_tools(opts: argparse.Namespace) -> list[str]:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if opts.only != "nginx" and not os.access(opts.verge_bin, os.X_OK):
        missing.append(f"verge ({opts.verge_bin})")
    return missing


def plan_cpus() -> CpuPlan:
    """Servers on the first allowed CPU, wrk on the second; unpinned on a 1-CPU machine."""
    allowed = sorted(os.sched_getaffinity(0))
    everything = ",".join(map(str, allowed))
    if len(allowed) < 2:
        return CpuPlan(everything, everything, everything, pinned=False)
    return CpuPlan(str(allowed[0]), str(allowed[1]), everything, pinned=True)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --- setup -------------------------------------------------------------------------------


def write_origin_files(files_dir: Path) -> None:
    """Incompressible bodies, so no one wins by compressing."""
    bench = files_dir / "bench"
    bench.mkdir(parents=True)
    for size in SIZES:
        (bench / f"{size.key}.bin").write_bytes(os.urandom(size.nbytes))


def start_contenders(
    opts: argparse.Namespace, tmp: Path, origin: Server, cpus: CpuPlan, stack: contextlib.ExitStack
) -> list[Live]:
    """Start every server the options ask for; each is stopped when `stack` closes."""
    live: list[Live] = []

    def keep(info: Contender, server: Server, wrk_cpus: str, threads: int) -> None:
        stack.callback(server.stop)
        live.append(Live(info, server, wrk_cpus, threads))

    if opts.only != "verge":
        for key, label, sendfile in (
            ("nginx-sendfile", "nginx sendfile on", True),
            ("nginx-nosendfile", "nginx sendfile off", False),
        ):
            server = start_nginx_cache(
                key, tmp / key, origin.port, sendfile=sendfile, cpus=cpus.server
            )
            keep(Contender(key, label, "nginx", 1, True), server, cpus.wrk, 1)
    if opts.only != "nginx":
        token = secrets.token_hex(16)
        for key, label, workers, pinned in (
            ("verge", "Verge", 1, True),
            ("verge-w2", "Verge --workers 2", 2, False),
        ):
            server_cpus = cpus.server if pinned else cpus.everything
            server = start_verge(
                key,
                tmp / key,
                opts.verge_bin,
                origin.port,
                workers=workers,
                cpus=server_cpus,
                admin_token=token,
            )
            wrk_cpus = cpus.wrk if pinned else cpus.everything
            keep(Contender(key, label, "verge", workers, pinned), server, wrk_cpus, workers)
    return live


# --- warm-up -----------------------------------------------------------------------------


def fetch(url: str) -> tuple[int, str, int]:
    """GET `url`; return status, the Cache-Status header and the body length."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        length = 0
        while chunk := response.read(1 << 16):
            length += len(chunk)
        return response.status, response.getheader("Cache-Status", ""), length
    finally:
        conn.close()


def warm_until_hit(url: str, size: Size, attempts: int = 50) -> None:
    """Request `url` until the server says it answered from cache (`Cache-Status: ...hit`)."""
    cache_status = ""
    for _ in range(attempts):
        status, cache_status, length = fetch(url)
        if status != 200 or length != size.nbytes:
            raise BenchError(f"{url}: status {status}, {length} bytes (want 200, {size.nbytes})")
        if "hit" in cache_status.lower():
            return
        time.sleep(0.05)
    raise BenchError(f"{url} never became a cache hit (last Cache-Status: {cache_status!r})")


def warm(live: Sequence[Live], opts: argparse.Namespace) -> None:
    """Fill every cache, then a short wrk run per URL so all workers and the page cache are hot."""
    for contender in live:
        for size in SIZES:
            warm_until_hit(contender.url(size), size)
            run_wrk(
                contender.url(size),
                duration_s=WARMUP_S,
                connections=opts.connections,
                threads=contender.wrk_threads,
                cpus=contender.wrk_cpus,
            )


# --- measurement -------------------------------------------------------------------------


@contextlib.contextmanager
def peak_rss(server: Server) -> Iterator[list[int]]:
    """Sample the server's RSS in the background; the yielded list holds the peak at exit."""
    peak = [server.rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(RSS_SAMPLE_S):
            peak[0] = max(peak[0], server.rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def round_order(live: Sequence[Live], round_index: int) -> list[Live]:
    """Rotate the contenders each round so no one always runs first (or last)."""
    shift = round_index % len(live)
    return [*live[shift:], *live[:shift]]


def measure(
    live: Sequence[Live], opts: argparse.Namespace
) -> tuple[dict[str, dict[str, list[WrkResult]]], dict[str, int], list[dict[str, Any]]]:
    """All rounds: for each size, every contender once, order rotating by round."""
    samples = {c.info.key: {s.key: [] for s in SIZES} for c in live}
    peaks = {c.info.key: 0 for c in live}
    runs: list[dict[str, Any]] = []
    total = opts.rounds * len(SIZES) * len(live)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=total)
        for round_index in range(opts.rounds):
            for size in SIZES:
                for contender in round_order(live, round_index):
                    progress.update(
                        task,
                        description=f"round {round_index + 1}/{opts.rounds} "
                        f"{size.label:>7} {contender.info.label}",
                    )
                    result, peak = measure_once(contender, size, opts)
                    samples[contender.info.key][size.key].append(result)
                    peaks[contender.info.key] = max(peaks[contender.info.key], peak)
                    runs.append(
                        {
                            "round": round_index + 1,
                            "contender": contender.info.key,
                            "size": size.key,
                            "rss_peak_bytes": peak,
                            **result.as_dict(),
                        }
                    )
                    progress.advance(task)
    return samples, peaks, runs


def measure_once(contender: Live, size: Size, opts: argparse.Namespace) -> tuple[WrkResult, int]:
    if not contender.server.alive():
        raise BenchError(f"{contender.info.label} died:\n{contender.server.log_tail()}")
    time.sleep(SETTLE_S)
    with peak_rss(contender.server) as peak:
        result = run_wrk(
            contender.url(size),
            duration_s=opts.duration,
            connections=opts.connections,
            threads=contender.wrk_threads,
            cpus=contender.wrk_cpus,
        )
    return result, peak[0]


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


# --- the run -----------------------------------------------------------------------------


def collect_warnings(
    samples: dict[str, dict[str, list[WrkResult]]],
    origin_hits: int,
    cpus: CpuPlan,
    load_before: float,
) -> list[str]:
    warnings = []
    if load_before > BUSY_LOAD:
        warnings.append(
            f"the machine was busy before the run (1-min load average {load_before:.2f}): "
            "other processes shared the CPUs, so these numbers are noisy"
        )
    if origin_hits:
        warnings.append(
            f"the origin got {origin_hits} requests during measurement: not all were cache hits"
        )
    for key, per_size in samples.items():
        for size, runs in per_size.items():
            errors = sum(r.errors for r in runs)
            if errors:
                warnings.append(f"{key} {size}: {errors} socket errors or non-2xx responses")
    if not cpus.pinned:
        warnings.append("fewer than 2 CPUs allowed: servers and wrk were NOT pinned apart")
    return warnings


def describe(opts: argparse.Namespace, cpus: CpuPlan, live: Sequence[Live]) -> dict[str, Any]:
    example = wrk_command(
        "URL",
        duration_s=opts.duration,
        connections=opts.connections,
        threads=1,
        cpus=cpus.wrk if cpus.pinned else None,
    )
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "tools": {"nginx": tool_version(["nginx", "-v"]), "wrk": tool_version(["wrk", "-v"])},
        "options": {
            "rounds": opts.rounds,
            "duration_s": opts.duration,
            "connections": opts.connections,
            "only": opts.only,
            "quick": opts.quick,
        },
        "cpu_plan": asdict(cpus),
        "wrk_command": " ".join(example),
        "sizes": {s.key: s.nbytes for s in SIZES},
        "targets": TARGETS,
        "contenders": {
            c.info.key: {**asdict(c.info), "wrk_cpus": c.wrk_cpus, "wrk_threads": c.wrk_threads}
            for c in live
        },
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    cpus = plan_cpus()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="verge-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        files = tmp / "files"
        write_origin_files(files)
        console.print("[bold]starting[/bold] origin and contenders …")
        origin = start_origin(tmp / "origin", files)
        stack.callback(origin.stop)
        live = start_contenders(opts, tmp, origin, cpus, stack)
        console.print("[bold]warming[/bold] caches …")
        warm(live, opts)
        time.sleep(1.0)
        idle = {c.info.key: c.server.rss_bytes() for c in live}
        origin_before = count_lines(tmp / "origin" / "access.log")
        samples, peaks, runs = measure(live, opts)
        origin_hits = count_lines(tmp / "origin" / "access.log") - origin_before
        contenders = [c.info for c in live]
        memory = {k: {"idle_bytes": idle[k], "peak_load_bytes": peaks[k]} for k in idle}
        summary = build_summary(
            samples, contenders, memory, collect_warnings(samples, origin_hits, cpus, load_before)
        )
        placement = (
            f"servers on CPU {cpus.server}, wrk on CPU {cpus.wrk}" if cpus.pinned else "NOT pinned"
        )
        title = (
            f"Cache hits, median of {opts.rounds} round(s) × {opts.duration:g}s, "
            f"{opts.connections} connections; {placement}"
        )
        print_report(console, summary, contenders, title)
        return {
            **describe(opts, cpus, live),
            **summary,
            "origin_requests_during_measurement": origin_hits,
            "runs": runs,
        }


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    add_sbin_to_path()
    missing = missing_tools(opts)
    if missing:
        console.print(f"[red]missing:[/red] {', '.join(missing)}; run `bash bench/setup.sh`")
        return 2
    install_signal_handlers()
    try:
        document = run(opts)
    except (BenchError, ServerError, WrkError) as error:
        console.print(f"[red]benchmark failed:[/red] {error}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; all servers stopped[/yellow]")
        return 130
    write_json(opts.output, document)
    console.print(f"results written to {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
