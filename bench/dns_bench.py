"""`make bench-dns`: the request router's DNS server against NSD, side by side, on this machine.

Why it is built this way: NSD is the authoritative server people would otherwise put in
front of a CDN, and dnsperf is the load generator DNS operators use, so both numbers can be
rerun by anyone. One run starts `verge router` (from a router.yaml written here) and NSD
serving the same names as a static zone — filled with what the router itself answers, so
both send answers of the same size — pins each server to CPU 0 and dnsperf to CPU 1,
alternates the contenders round by round and reports medians. NSD runs one server process,
as the router is one process, with response rate limiting off.

Two query mixes, A queries for the service hostnames and the router's own names (edges,
its nameserver, one name that does not exist):

* one resolver: plain queries from 127.0.0.1, as one busy resolver sends them. The router
  answers repeats from its packet cache, as NSD answers from its precompiled zone.
* many subnets: every query carries an EDNS Client Subnet option, one of 8192 different
  /28s in both regions (a binary dnsperf input, `-B`), so the router computes every answer
  (its packet cache holds 4096 answers for at most a second). NSD ignores the option.

Per contender and mix, each round has two dnsperf runs: a throughput run (`-l DURATION
-c CLIENTS`, no rate limit: answers/s) and a latency run at a fixed rate both servers
sustain (`-Q LATENCY_QPS -v`: dnsperf prints every query's latency; p50/p99 come from
those lines). Latency at saturation would only measure dnsperf's queue of outstanding
queries. The ratio router/NSD of the median answers/s is checked against the target
(>= 0.3).

    .venv/bin/python bench/dns_bench.py [--rounds 3] [--duration 10] [--clients 10]
                                        [--latency-qps 5000] [--only router|nsd] [--quick]

dnsperf, NSD and taskset are installed with apt-get when missing. Results are printed and
written to bench/results/dns.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rdatatype
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from servers import Server, ServerError, spawn, wait_until
from tools import BUSY_LOAD, ToolError, add_sbin_to_path, require, tool_version

BENCH_DIR = Path(__file__).resolve().parent
NSD_DIR = BENCH_DIR / "nsd"
RESULTS_PATH = BENCH_DIR / "results" / "dns.json"
TARGET_RATIO = 0.3
ROUTER_READY = "verge router ready"
READY_TIMEOUT_S = 30.0
WARMUP_S = 1.0
SETTLE_S = 0.3
LATENCY_SECONDS = 5.0
SPREAD_SUBNETS = 8192  # twice what the router's packet cache holds
TOOLS = {"dnsperf": "dnsperf", "nsd": "nsd", "taskset": "util-linux"}

ZONE = "verge.test"
TTL = 10
ROUTER_YAML = f"""\
zone: {ZONE}
ttl: {TTL}
regions:
  - {{name: east, cidrs: [10.1.0.0/16], neighbours: [west]}}
  - {{name: west, cidrs: [10.2.0.0/16], neighbours: [east]}}
hostnames: [demo.{ZONE}, www.{ZONE}]
edges:
  - {{name: edge-1, region: east, url: "http://127.0.0.2:8080"}}
  - {{name: edge-2, region: west, url: "http://127.0.0.3:8080"}}
health: {{enabled: false}}
"""
# What is asked: the service hostnames, the router's names for its edges and itself, and a
# name that does not exist (weights: how often each appears in the query file).
QUERY_NAMES = {
    f"demo.{ZONE}": 4,
    f"www.{ZONE}": 4,
    f"edge-1.{ZONE}": 1,
    f"edge-2.{ZONE}": 1,
    f"ns1.{ZONE}": 1,
    f"missing.{ZONE}": 1,
}
MIXES = {"one-resolver": "one resolver", "many-subnets": "many subnets (ECS)"}
CONTENDERS = {"router": "verge router", "nsd": "NSD"}

console = Console(width=None if sys.stdout.isatty() else 120)


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy numbers; the message says why."""


@dataclass
class DnsperfRun:
    """One dnsperf run, as parsed from its output."""

    qps: float
    sent: int
    lost: int
    rcodes: dict[str, int]
    response_bytes: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> dict:
        data = asdict(self)
        del data["latencies_ms"]
        data["p50_ms"], data["p99_ms"] = self.percentile(0.5), self.percentile(0.99)
        return data


@dataclass
class Contender:
    key: str
    server: Server
    port: int


# --- options and tools -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/dns_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (every figure is a median)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    parser.add_argument("--clients", type=int, default=10, help="dnsperf clients (-c)")
    parser.add_argument(
        "--latency-qps", type=int, default=5_000, help="fixed query rate of the latency runs (-Q)"
    )
    parser.add_argument("--only", choices=tuple(CONTENDERS), help="run only one contender")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 3 s runs")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON results file")
    opts = parser.parse_args(argv)
    opts.latency_s = LATENCY_SECONDS
    if opts.quick:
        opts.rounds, opts.duration, opts.latency_s = 1, 3.0, 2.0
    if opts.rounds < 1 or opts.duration < 1 or opts.clients < 1 or opts.latency_qps < 1:
        parser.error("--rounds, --duration, --clients and --latency-qps must be at least 1")
    return opts


def cpu_plan() -> tuple[str | None, str | None]:
    """(server CPUs, dnsperf CPUs): one core each when there are two, else unpinned."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return str(allowed[0]), str(allowed[1])


# --- query files ------------------------------------------------------------------------------


def write_query_files(workdir: Path) -> dict[str, tuple[Path, bool]]:
    """The dnsperf input of each mix: (path, binary)."""
    names = [name for name, weight in QUERY_NAMES.items() for _ in range(weight)]
    text = workdir / "queries.txt"
    text.write_text("".join(f"{name} A\n" for name in names))
    spread = workdir / "queries-ecs.bin"
    with spread.open("wb") as out:
        for index in range(SPREAD_SUBNETS):
            option = dns.edns.ECSOption(spread_subnet(index), 28)
            message = dns.message.make_query(
                names[index % len(names)], "A", use_edns=0, options=[option]
            )
            wire = message.to_wire()
            out.write(len(wire).to_bytes(2, "big") + wire)
    return {"one-resolver": (text, False), "many-subnets": (spread, True)}


def spread_subnet(index: int) -> str:
    """The index-th of 8192 distinct /28s inside the two regions (10.1.0.0/16, 10.2.0.0/16)."""
    region, third, fourth = 1 + index % 2, (index // 2) % 256, (index // 512) % 16 * 16
    return f"10.{region}.{third}.{fourth}"


def free_dns_port() -> int:
    """A loopback port free for both UDP and TCP a moment ago."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise BenchError("no free port for UDP and TCP")


# --- servers ------------------------------------------------------------------------------------


def start_router(workdir: Path, cpus: str | None) -> Contender:
    config = workdir / "router.yaml"
    config.write_text(ROUTER_YAML)
    port = free_dns_port()
    argv = [
        sys.executable,
        "-m",
        "verge.cli",
        "router",
        "--dns",
        f"127.0.0.1:{port}",
        "--config",
        str(config),
    ]
    server = spawn("verge router", argv, workdir / "router.log", port, cpus)
    wait_until(server, lambda: ROUTER_READY in _read(server.log_path), READY_TIMEOUT_S)
    return Contender("router", server, port)


def start_nsd(workdir: Path, records: dict[str, list[str]], cpus: str | None) -> Contender:
    nsd_dir = workdir / "nsd"
    nsd_dir.mkdir()
    port = free_dns_port()
    lines = [
        f"{name}. IN A {address}" for name, addresses in records.items() for address in addresses
    ]
    zone_text = (
        (NSD_DIR / "zone.template").read_text().format(zone=ZONE, ttl=TTL, records="\n".join(lines))
    )
    (nsd_dir / f"{ZONE}.zone").write_text(zone_text)
    conf = nsd_dir / "nsd.conf"
    conf.write_text(
        (NSD_DIR / "nsd.conf.template").read_text().format(port=port, workdir=nsd_dir, zone=ZONE)
    )
    check = subprocess.run(["nsd-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"nsd-checkconf {conf}: {check.stdout}{check.stderr}")
    server = spawn("nsd", ["nsd", "-d", "-c", str(conf)], nsd_dir / "stdout.log", port, cpus)
    wait_until(server, lambda: _answers(port, f"demo.{ZONE}") is not None, READY_TIMEOUT_S)
    return Contender("nsd", server, port)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _answers(port: int, name: str) -> list[str] | None:
    """The A records of `name` (empty for NXDOMAIN), or None when the server does not answer."""
    try:
        response = dns.query.udp(
            dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=0.5
        )
    except (OSError, dns.exception.DNSException):
        return None
    return [
        rdata.address
        for rrset in response.answer
        for rdata in rrset
        if rrset.rdtype == dns.rdatatype.A
    ]


def zone_records(router: Contender | None) -> dict[str, list[str]]:
    """Each queried name's A records: what the router answers 127.0.0.1 (what dnsperf is), or
    without a router, the first edge's address for service names as a stand-in."""
    records = {}
    for name in QUERY_NAMES:
        if name.startswith("missing."):
            continue
        if router is not None:
            found = _answers(router.port, name)
            if found is None:
                raise BenchError(f"the router does not answer {name}")
            records[name] = found
        else:
            records[name] = {"edge-2": ["127.0.0.3"], "ns1": ["127.0.0.1"]}.get(
                name.split(".")[0], ["127.0.0.2"]
            )
    return records


# --- dnsperf --------------------------------------------------------------------------------------


def dnsperf(
    port: int,
    query_file: tuple[Path, bool],
    *,
    seconds: float,
    clients: int,
    cpus: str | None,
    qps: int | None = None,
) -> DnsperfRun:
    """Run dnsperf once; with `qps`, at that fixed rate and collecting every latency."""
    path, binary = query_file
    argv = [
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(path),
        "-l",
        f"{seconds:g}",
        "-c",
        str(clients),
        "-t",
        "2",
    ]
    if binary:
        argv.append("-B")
    if qps is not None:
        argv += ["-Q", str(qps), "-v"]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    latencies: list[float] = []
    lines: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            if line.startswith("> "):
                parts = line.split()
                if parts[1] not in ("T", "I"):
                    latencies.append(float(parts[-1]) * 1000)
            else:
                lines.append(line)
    if proc.returncode != 0:
        raise BenchError(f"dnsperf failed ({proc.returncode}):\n{''.join(lines[-20:])}")
    return parse_dnsperf("".join(lines), latencies)


def parse_dnsperf(text: str, latencies_ms: list[float] | None = None) -> DnsperfRun:
    """The statistics block of dnsperf's output."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            values[key.strip()] = value.strip()
    try:
        qps = float(values["Queries per second"])
        sent = int(values["Queries sent"])
        lost = int(values["Queries lost"].split()[0])
    except (KeyError, ValueError, IndexError) as exc:
        raise BenchError(f"cannot read dnsperf output ({exc}):\n{text[-2000:]}") from exc
    rcodes = {}
    words = values.get("Response codes", "").replace(",", " ").split()
    for code, count in zip(words[::3], words[1::3], strict=False):
        rcodes[code] = int(count)
    size = values.get("Average packet size", "")
    response_bytes = float(size.rpartition("response")[2].strip() or 0)
    return DnsperfRun(qps, sent, lost, rcodes, response_bytes, latencies_ms or [])


# --- measuring --------------------------------------------------------------------------------------


def round_order(items: list, round_index: int) -> list:
    """Rotate the contenders each round so no one always runs first."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def measure(
    contenders: list[Contender], queries: dict, opts: argparse.Namespace, dnsperf_cpus: str | None
) -> dict[str, dict[str, list[tuple[DnsperfRun, DnsperfRun]]]]:
    """Every round: per mix, each contender's throughput run and latency run."""
    results = {mix: {c.key: [] for c in contenders} for mix in MIXES}
    for contender in contenders:  # warm-up, discarded
        for mix in MIXES:
            dnsperf(
                contender.port,
                queries[mix],
                seconds=WARMUP_S,
                clients=opts.clients,
                cpus=dnsperf_cpus,
            )
    total = opts.rounds * len(MIXES) * len(contenders)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=total)
        for round_index in range(opts.rounds):
            for mix in MIXES:
                for contender in round_order(contenders, round_index):
                    progress.update(
                        task,
                        description=f"round {round_index + 1}/{opts.rounds} "
                        f"{MIXES[mix]:<20} {CONTENDERS[contender.key]}",
                    )
                    results[mix][contender.key].append(
                        measure_once(contender, queries[mix], opts, dnsperf_cpus)
                    )
                    progress.advance(task)
    return results


def measure_once(
    contender: Contender, query_file: tuple[Path, bool], opts: argparse.Namespace, cpus: str | None
) -> tuple[DnsperfRun, DnsperfRun]:
    if not contender.server.alive():
        raise BenchError(f"{contender.key} died:\n{contender.server.log_tail()}")
    time.sleep(SETTLE_S)
    throughput = dnsperf(
        contender.port, query_file, seconds=opts.duration, clients=opts.clients, cpus=cpus
    )
    time.sleep(SETTLE_S)
    latency = dnsperf(
        contender.port,
        query_file,
        seconds=opts.latency_s,
        clients=opts.clients,
        cpus=cpus,
        qps=opts.latency_qps,
    )
    return throughput, latency


def summarize(runs: list[tuple[DnsperfRun, DnsperfRun]]) -> dict:
    """Medians over rounds."""

    def median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    return {
        "answers_per_s": median([t.qps for t, _ in runs]),
        "p50_ms": median([lat.percentile(0.5) for _, lat in runs]),
        "p99_ms": median([lat.percentile(0.99) for _, lat in runs]),
        "lost": sum(t.lost + lat.lost for t, lat in runs),
        "sent": sum(t.sent + lat.sent for t, lat in runs),
        "response_bytes": median([t.response_bytes for t, _ in runs]),
        "rcodes": runs[-1][0].rcodes,
    }


# --- report --------------------------------------------------------------------------------------------


def report(summary: dict, opts: argparse.Namespace) -> None:
    table = Table(
        title="Authoritative DNS, A queries over UDP (medians)",
        caption="one resolver: repeated queries from one address (the router's packet cache "
        "answers repeats)\nmany subnets: 8192 ECS subnets, the router computes every answer "
        "(its worst case); NSD ignores ECS",
    )
    for column in (
        "queries",
        "server",
        "answers/s",
        f"p50 ms @{opts.latency_qps}/s",
        f"p99 ms @{opts.latency_qps}/s",
        "lost",
        "answer bytes",
    ):
        table.add_column(column, justify="left" if column in ("queries", "server") else "right")
    for mix, by_contender in summary["mixes"].items():
        for key, row in by_contender.items():
            table.add_row(
                MIXES[mix],
                CONTENDERS[key],
                f"{row['answers_per_s']:,.0f}",
                _ms(row["p50_ms"]),
                _ms(row["p99_ms"]),
                f"{row['lost']}/{row['sent']}",
                f"{row['response_bytes']:.0f}",
            )
        ratio = summary["ratios"].get(mix)
        if ratio is not None:
            verdict = "ok" if ratio >= TARGET_RATIO else "MISSED"
            table.add_row(
                "",
                f"router/NSD {ratio:.2f}",
                f"target >= {TARGET_RATIO}: {verdict}",
                "",
                "",
                "",
                "",
                end_section=True,
            )
    console.print(table)
    for mix, by_contender in summary["mixes"].items():
        codes = {key: row["rcodes"] for key, row in by_contender.items()}
        shares = {key: _shares(c) for key, c in codes.items()}
        if len(set(map(str, shares.values()))) > 1:
            console.print(f"[yellow]note: response codes differ in {MIXES[mix]}: {codes}[/]")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _shares(codes: dict[str, int]) -> dict[str, int]:
    total = sum(codes.values()) or 1
    return {code: round(100 * count / total) for code, count in codes.items()}


def build_summary(results: dict, opts: argparse.Namespace, environment: dict) -> dict:
    mixes = {mix: {key: summarize(runs) for key, runs in by.items()} for mix, by in results.items()}
    ratios = {}
    for mix, rows in mixes.items():
        if "router" in rows and "nsd" in rows and rows["nsd"]["answers_per_s"]:
            ratios[mix] = rows["router"]["answers_per_s"] / rows["nsd"]["answers_per_s"]
    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": environment,
        "options": {
            "rounds": opts.rounds,
            "duration_s": opts.duration,
            "clients": opts.clients,
            "latency_qps": opts.latency_qps,
            "latency_s": opts.latency_s,
        },
        "mixes": mixes,
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "runs": {
            mix: {
                key: [{"throughput": t.summary(), "latency": lat.summary()} for t, lat in runs]
                for key, runs in by.items()
            }
            for mix, by in results.items()
        },
    }


# --- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    add_sbin_to_path()
    try:
        require(TOOLS, console.print)
    except ToolError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    server_cpus, dnsperf_cpus = cpu_plan()
    load = os.getloadavg()[0]
    environment = {
        "cpus": os.cpu_count(),
        "pinned": server_cpus is not None,
        "load_1m": load,
        "nsd": tool_version(["nsd", "-v"]),
        "dnsperf": tool_version(["dnsperf", "-h"]),
        "python": sys.version.split()[0],
    }
    console.print(
        f"DNS bench: {environment['nsd']}, {environment['dnsperf']}; "
        f"{opts.rounds} round(s) x {opts.duration:g} s, {opts.clients} clients; "
        f"servers on CPU {server_cpus or 'any'}, dnsperf on CPU {dnsperf_cpus or 'any'}"
    )
    if load > BUSY_LOAD:
        console.print(f"[yellow]load average {load:.2f}: other work may skew the numbers[/]")
    workdir = Path(tempfile.mkdtemp(prefix="verge-bench-dns-"))
    contenders: list[Contender] = []
    try:
        queries = write_query_files(workdir)
        router = start_router(workdir, server_cpus) if opts.only != "nsd" else None
        if router is not None:
            contenders.append(router)
        if opts.only != "router":
            contenders.append(start_nsd(workdir, zone_records(router), server_cpus))
        results = measure(contenders, queries, opts, dnsperf_cpus)
        summary = build_summary(results, opts, environment)
        report(summary, opts)
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"results written to {opts.output}")
        return 0
    except (BenchError, ServerError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    finally:
        for contender in contenders:
            with contextlib.suppress(Exception):
                contender.server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
