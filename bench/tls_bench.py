"""TLS benchmark: Verge against nginx on handshakes and HTTP/2, side by side, in one run.

What it answers: does terminating TLS in Verge cost much more than in nginx? OpenSSL does
the crypto in both, so handshake rates should be close; HTTP/2 request rates show the cost
of Verge's Python protocol layer. One run starts an origin (a small nginx), nginx with
``proxy_cache`` behind ``listen ... ssl http2``, and ``verge edge --https``, both with the
same certificate (ECDSA P-256 from verge.certs) and the same cached 1 KiB object, then
alternates the contenders round by round and reports medians:

- full TLS 1.3 handshakes/s: ``openssl s_time -new -tls1_3 -www /bench/obj`` (each
  connection a fresh handshake plus one small HTTP/1.0 GET), ``--clients`` of them at once;
- resumed TLS 1.3 handshakes/s: the same with ``-reuse`` (session tickets; every connection
  must show as reused, or the run is flagged);
- HTTP/2 requests/s on 100 concurrent streams over 10 connections:
  ``h2load -c 10 -m 10 -D S --warm-up-time 1``.

Targets (issue 4): ≥ 0.7 × nginx on handshakes, ≥ 0.5 × nginx on HTTP/2 requests/s.

    .venv/bin/python bench/tls_bench.py [--rounds N] [--duration S] [--workers W]
                                        [--clients P] [--only verge|nginx] [--quick]

Both contenders get W worker processes (default 2); servers and load generators are not
pinned (a 2-core machine has no spare core for the client). Missing tools (nginx, h2load
from nghttp2-client, openssl) are installed with apt-get. Results go to
bench/results/tls.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from servers import Server, ServerError, free_port, port_open, spawn, start_origin, wait_until
from tools import (
    BUSY_LOAD,
    ToolError,
    add_sbin_to_path,
    install_signal_handlers,
    require,
    tool_version,
)

from verge.certs import dev_certificates

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results" / "tls.json"
OBJECT_PATH = "/bench/obj"
OBJECT_BYTES = 1024
TOOLS = {"nginx": "nginx-light", "h2load": "nghttp2-client", "openssl": "openssl"}
TARGETS = {"full_handshakes": 0.7, "resumed_handshakes": 0.7, "h2_requests": 0.5}
LABELS = {
    "full_handshakes": "full TLS 1.3 handshakes/s",
    "resumed_handshakes": "resumed TLS 1.3 handshakes/s",
    "h2_requests": "HTTP/2 req/s (10 conns × 10 streams)",
}
SETTLE_S = 0.5

console = Console(width=None if sys.stdout.isatty() else 120)


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy numbers; the message says why."""


@dataclass
class Sample:
    """One measurement: a rate, and whatever makes it suspect."""

    rate: float
    detail: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Contender:
    key: str  # "nginx" or "verge"
    label: str
    server: Server
    https_port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}{OBJECT_PATH}"


# --- options and tools ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/tls_bench.py",
        description="Verge vs nginx: TLS 1.3 handshakes/s (full, resumed), HTTP/2 req/s.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per contender (median)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per server")
    parser.add_argument(
        "--clients", type=int, default=4, help="parallel `openssl s_time` clients for handshakes"
    )
    parser.add_argument("--only", choices=("verge", "nginx"), help="run only one side")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON results file")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 1, 2.0
    if min(opts.rounds, opts.workers, opts.clients) < 1 or opts.duration < 1:
        parser.error("--rounds, --duration, --workers and --clients must be at least 1")
    return opts


# --- servers -------------------------------------------------------------------------------


def nginx_tls_conf(
    workdir: Path, port: int, origin_port: int, cert: Path, key: str, workers: int
) -> str:
    """nginx's defaults plus TLS + HTTP/2 and proxy_cache; buffered access log as in run.py."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / ('tmp_' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes {workers};
daemon off;
master_process on;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    keepalive_requests 1000000000;
{temp}
    access_log {workdir / "access.log"} combined buffer=64k flush=1s;
    proxy_cache_path {workdir / "cache"} levels=1:2 keys_zone=bench:16m max_size=1g
                     inactive=24h use_temp_path=off;
    upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            add_header Cache-Status "nginx; $upstream_cache_status" always;
        }}
    }}
}}
"""


def start_nginx_tls(
    workdir: Path, origin_port: int, cert: Path, key: Path, workers: int
) -> Contender:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_tls_conf(workdir, port, origin_port, cert, str(key), workers))
    argv = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log")]
    server = spawn("nginx", argv, workdir / "stdout.log", port, cpus=None)
    server.log_path = workdir / "error.log"
    wait_until(server, port_open(port), 30)
    return Contender("nginx", f"nginx {tool_version(['nginx', '-v']).split('/')[-1]}", server, port)


def start_verge_tls(
    workdir: Path, origin_port: int, cert: Path, key: Path, workers: int
) -> Contender:
    """`verge edge --https` with the same certificate; ready when the TLS port accepts."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, https_port, admin_port = free_port(), free_port(), free_port()
    argv = [
        sys.executable, "-m", "verge.cli", "edge",
        "--listen", f"127.0.0.1:{port}",
        "--https", f"127.0.0.1:{https_port}",
        "--tls-cert", str(cert),
        "--tls-key", str(key),
        "--origin", f"http://127.0.0.1:{origin_port}",
        "--cache-dir", str(workdir / "cache"),
        "--admin", f"127.0.0.1:{admin_port}",
        "--admin-token", secrets.token_hex(16),
        "--workers", str(workers),
        "--access-log", str(workdir / "access.log"),
    ]  # fmt: skip
    server = spawn("verge", argv, workdir / "verge.log", https_port, cpus=None)
    wait_until(server, lambda: "verge edge ready" in server.log_tail(), 60)
    wait_until(server, port_open(https_port), 30)
    return Contender("verge", f"Verge --workers {workers}", server, https_port)


def write_origin_files(files_dir: Path) -> None:
    path = files_dir / OBJECT_PATH.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(OBJECT_BYTES))


def warm_until_hit(contender: Contender, ca_file: Path, attempts: int = 50) -> None:
    """GET the object over TLS until the contender answers it from its cache."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    cache_status = ""
    for _ in range(attempts):
        conn = http.client.HTTPSConnection(
            "127.0.0.1", contender.https_port, context=ctx, timeout=30
        )
        try:
            conn.request("GET", OBJECT_PATH, headers={"Host": authority(contender.https_port)})
            response = conn.getresponse()
            body = response.read()
            cache_status = response.getheader("Cache-Status", "")
        finally:
            conn.close()
        if response.status != 200 or len(body) != OBJECT_BYTES:
            raise BenchError(f"{contender.label}: status {response.status}, {len(body)} bytes")
        if "hit" in cache_status.lower():
            return
        time.sleep(0.05)
    raise BenchError(f"{contender.label} never answered from cache ({cache_status!r})")


# --- load generators -----------------------------------------------------------------------

_S_TIME_COUNT = re.compile(r"^(\d+) connections in [\d.]+s;", re.M)
_H2_FINISHED = re.compile(r"^finished in ([\d.]+)(m?s), ([\d.]+) req/s", re.M)
_H2_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored",
    re.M,
)
_H2_2XX = re.compile(r"^status codes: (\d+) 2xx", re.M)


def authority(port: int) -> str:
    """The Host every tool sends (h2load's :authority is this too), so all hit one cache key."""
    return f"127.0.0.1:{port}"


def s_time_command(port: int, reuse: bool, duration_s: float) -> list[str]:
    """s_time sends ``GET <www> HTTP/1.0`` and no Host; the -www value slips one in."""
    www = f"{OBJECT_PATH} HTTP/1.0\r\nHost: {authority(port)}\r\nX-Bench:"
    return [
        "openssl",
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-tls1_3",
        "-reuse" if reuse else "-new",
        "-www",
        www,
        "-time",
        str(max(1, round(duration_s))),
    ]


def parse_s_time(text: str, reuse: bool) -> tuple[int, int]:
    """(connections, of which resumed): s_time prints one mark per connection, 'r' if reused."""
    counts = _S_TIME_COUNT.findall(text)
    if not counts:
        raise BenchError(f"cannot read openssl s_time output:\n{text[-800:]}")
    connections = int(counts[-1])
    body = text.split("Now timing with session id reuse.", 1)[-1] if reuse else text
    marks = "".join(line for line in body.splitlines() if re.fullmatch(r"[r*tvVsS]+", line))
    return connections, marks.count("r")


def run_handshakes(contender: Contender, reuse: bool, opts: argparse.Namespace) -> Sample:
    """``--clients`` s_time processes at once; rate = connections / wall time, summed."""
    argv = s_time_command(contender.https_port, reuse, opts.duration)
    started = time.monotonic()
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(opts.clients)
    ]
    rate, connections, resumed, problems = 0.0, 0, 0, []
    for proc in procs:
        out, _ = proc.communicate(timeout=opts.duration * 4 + 30)
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            problems.append(f"s_time exited {proc.returncode}: {out[-300:]}")
            continue
        count, reused = parse_s_time(out, reuse)
        rate += count / elapsed
        connections += count
        resumed += reused
    if reuse and resumed < connections:
        problems.append(f"only {resumed} of {connections} connections resumed")
    return Sample(
        rate, {"connections": connections, "resumed": resumed, "clients": opts.clients}, problems
    )


def h2load_command(url: str, duration_s: float) -> list[str]:
    return [
        "h2load",
        "-c",
        "10",
        "-m",
        "10",
        "-t",
        "1",
        "-D",
        str(max(1, round(duration_s))),
        "--warm-up-time",
        "1",
        url,
    ]


def parse_h2load(text: str) -> Sample:
    finished = _H2_FINISHED.search(text)
    requests = _H2_REQUESTS.search(text)
    ok = _H2_2XX.search(text)
    if not (finished and requests and ok):
        raise BenchError(f"cannot read h2load output:\n{text[-800:]}")
    done, succeeded = int(requests.group(3)), int(requests.group(4))
    failed, errored = int(requests.group(5)), int(requests.group(6))
    problems = []
    if failed or errored:
        problems.append(f"h2load: {failed} failed, {errored} errored, {ok.group(1)}/{done} 2xx")
    return Sample(float(finished.group(3)), {"requests": done, "succeeded": succeeded}, problems)


def run_h2(contender: Contender, opts: argparse.Namespace) -> Sample:
    argv = h2load_command(contender.url, opts.duration)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=opts.duration * 4 + 30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"h2load failed ({done.returncode}):\n{done.stderr[-800:]}")
    return parse_h2load(done.stdout)


METRICS: dict[str, Callable[[Contender, argparse.Namespace], Sample]] = {
    "full_handshakes": lambda c, o: run_handshakes(c, False, o),
    "resumed_handshakes": lambda c, o: run_handshakes(c, True, o),
    "h2_requests": run_h2,
}


# --- the run -------------------------------------------------------------------------------


def measure(live: Sequence[Contender], opts: argparse.Namespace) -> dict[str, dict[str, list]]:
    """Every metric, every contender, ``--rounds`` times; the order rotates each round."""
    samples: dict[str, dict[str, list[Sample]]] = {c.key: {m: [] for m in METRICS} for c in live}
    for round_index in range(opts.rounds):
        shift = round_index % len(live)
        order = [*live[shift:], *live[:shift]]
        for metric, run_one in METRICS.items():
            for contender in order:
                if not contender.server.alive():
                    raise BenchError(f"{contender.label} died:\n{contender.server.log_tail()}")
                console.print(
                    f"  round {round_index + 1}/{opts.rounds} {LABELS[metric]:<38} "
                    f"{contender.label}",
                    end="",
                )
                time.sleep(SETTLE_S)
                sample = run_one(contender, opts)
                samples[contender.key][metric].append(sample)
                console.print(
                    f"  {sample.rate:10.0f}" + (" [yellow]![/yellow]" if sample.problems else "")
                )
    return samples


def summarize(samples: dict[str, dict[str, list[Sample]]]) -> dict[str, Any]:
    """Medians per contender and metric, Verge/nginx ratios against the targets."""
    medians = {
        key: {m: statistics.median(s.rate for s in runs) for m, runs in per.items()}
        for key, per in samples.items()
    }
    ratios: dict[str, dict[str, Any]] = {}
    if "verge" in medians and "nginx" in medians:
        for metric, target in TARGETS.items():
            nginx = medians["nginx"][metric]
            ratio = medians["verge"][metric] / nginx if nginx else 0.0
            ratios[metric] = {"ratio": ratio, "target": target, "met": ratio >= target}
    problems = [
        f"{key} {metric}: {p}"
        for key, per in samples.items()
        for metric, runs in per.items()
        for s in runs
        for p in s.problems
    ]
    return {"medians": medians, "ratios": ratios, "problems": problems}


def print_report(summary: dict[str, Any], live: Sequence[Contender], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    for contender in live:
        table.add_column(contender.label, justify="right")
    table.add_column("Verge / nginx", justify="right")
    table.add_column("target", justify="right")
    for metric, label in LABELS.items():
        row = [label, *(f"{summary['medians'][c.key][metric]:,.0f}" for c in live)]
        ratio = summary["ratios"].get(metric)
        if ratio:
            colour = "green" if ratio["met"] else "red"
            row += [f"[{colour}]{ratio['ratio']:.2f}×[/{colour}]", f"≥ {ratio['target']}×"]
        else:
            row += ["—", f"≥ {TARGETS[metric]}×"]
        table.add_row(*row)
    console.print(table)
    for problem in summary["problems"]:
        console.print(f"[yellow]warning:[/yellow] {problem}")


def describe(opts: argparse.Namespace) -> dict[str, Any]:
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
        },
        "tools": {
            "nginx": tool_version(["nginx", "-v"]),
            "h2load": tool_version(["h2load", "--version"]),
            "openssl": tool_version(["openssl", "version"]),
        },
        "options": {
            "rounds": opts.rounds,
            "duration_s": opts.duration,
            "workers": opts.workers,
            "clients": opts.clients,
            "only": opts.only,
        },
        "commands": {
            "full_handshakes": " ".join(s_time_command(0, False, opts.duration)),
            "resumed_handshakes": " ".join(s_time_command(0, True, opts.duration)),
            "h2_requests": " ".join(h2load_command("URL", opts.duration)),
        },
        "object_bytes": OBJECT_BYTES,
        "targets": TARGETS,
    }


def start_contenders(
    opts: argparse.Namespace, tmp: Path, origin_port: int, stack: contextlib.ExitStack
) -> tuple[list[Contender], Path]:
    certs = dev_certificates(tmp / "certs", hosts=["127.0.0.1"])
    leaf = certs.hosts["127.0.0.1"]
    live = []
    starters = {"nginx": start_nginx_tls, "verge": start_verge_tls}
    for key, start in starters.items():
        if opts.only in (None, key):
            contender = start(tmp / key, origin_port, leaf.cert_file, leaf.key_file, opts.workers)
            stack.callback(contender.server.stop)
            live.append(contender)
    return live, certs.ca.cert_file


def run(opts: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="verge-tls-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        write_origin_files(tmp / "files")
        console.print("[bold]starting[/bold] origin and contenders …")
        origin = start_origin(tmp / "origin", tmp / "files")
        stack.callback(origin.stop)
        live, ca_file = start_contenders(opts, tmp, origin.port, stack)
        console.print("[bold]warming[/bold] caches …")
        for contender in live:
            warm_until_hit(contender, ca_file)
        console.print("[bold]measuring[/bold]")
        samples = measure(live, opts)
        summary = summarize(samples)
        if load_before > BUSY_LOAD:
            summary["problems"].insert(
                0,
                f"the machine was busy before the run (1-min load "
                f"{load_before:.2f}): numbers are noisy",
            )
        title = (
            f"TLS, median of {opts.rounds} round(s) × {opts.duration:g}s, "
            f"{opts.workers} worker(s) each, cached {OBJECT_BYTES} B object"
        )
        print_report(summary, live, title)
        return {
            **describe(opts),
            "contenders": {c.key: c.label for c in live},
            **summary,
            "runs": {
                key: {m: [asdict(s) for s in runs] for m, runs in per.items()}
                for key, per in samples.items()
            },
        }


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    add_sbin_to_path()
    install_signal_handlers()
    try:
        require(TOOLS, console.print)
        document = run(opts)
    except (BenchError, ServerError, ToolError, subprocess.TimeoutExpired) as error:
        console.print(f"[red]benchmark failed:[/red] {error}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; all servers stopped[/yellow]")
        return 130
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"results written to {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
