"""HTTP/2 over TLS: nginx against Verge's two HTTPS engines, pinned, alternating rounds.

What it answers: how many requests/s of a cached 1 KiB object does ``verge edge --https
--h2-engine native`` (Rust TLS + HTTP/2, :mod:`verge.http.native_h2`) serve, next to nginx
(``proxy_cache`` hit) and the Python engine, on one worker each? The issue's target is
>= 0.5 x nginx. Method (as in .notes/H2_SPIKE.md): every server pinned to CPU 0, the load
generator to CPU 1; HTTP/2 loads ``-c10 -m10`` and ``-c64 -m1`` (h2load), and HTTP/1.1
over TLS ``-c64`` keep-alive (wrk, which sends no ALPN: the listener's HTTP/1.1 default);
each h2load run sized to about ``--duration`` seconds by a probe, each wrk run lasts that
long; contenders alternate round by round; medians per contender and load, and the ratio of
medians to nginx. CPU µs per request come from /proc (the server's whole process tree,
every thread).

    .venv/bin/python bench/h2_native_bench.py [--rounds 3] [--duration 3]
                                              [--engines native,python] [--quick]

Needs nginx, h2load (nghttp2-client), wrk, curl, taskset and the native extension
(scripts/build-native.sh). Results: bench/results/h2_native.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from servers import Server, free_port, port_open, spawn, start_origin, wait_until
from tls_bench import OBJECT_PATH, BenchError, nginx_tls_conf, parse_h2load, write_origin_files
from tools import add_sbin_to_path, install_signal_handlers, require, tool_version

from verge.certs import dev_certificates

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "h2_native.json"
LOADS = {"c10m10": ["-c10", "-m10"], "c64m1": ["-c64", "-m1"]}  # h2load, HTTP/2
WRK_LOADS = {"h1c64": ["-t1", "-c64"]}  # wrk, HTTP/1.1 over TLS, keep-alive
SERVER_CPU, CLIENT_CPU = "0", "1"
TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/h2_native_bench.py", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--engines", default="native,python", help="Verge engines to run")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 1, 1.0
    return opts


# --- servers (each pinned to CPU 0, one worker) ---------------------------------------------


def start_nginx(workdir: Path, origin_port: int, cert: Path, key: Path) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_tls_conf(workdir, port, origin_port, cert, str(key), 1))
    argv = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log")]
    server = spawn("nginx", argv, workdir / "stdout.log", port, cpus=SERVER_CPU)
    wait_until(server, port_open(port), 30)
    return server


def start_verge(workdir: Path, engine: str, origin_port: int, cert: Path, key: Path) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port, https_port, admin_port = free_port(), free_port(), free_port()
    argv = [
        sys.executable, "-m", "verge.cli", "edge",
        "--listen", f"127.0.0.1:{port}", "--https", f"127.0.0.1:{https_port}",
        "--h2-engine", engine, "--tls-cert", str(cert), "--tls-key", str(key),
        "--origin", f"http://127.0.0.1:{origin_port}", "--cache-dir", str(workdir / "cache"),
        "--admin", f"127.0.0.1:{admin_port}", "--admin-token", secrets.token_hex(16),
        "--workers", "1", "--access-log", str(workdir / "access.log"),
    ]  # fmt: skip
    server = spawn(f"verge-{engine}", argv, workdir / "verge.log", https_port, cpus=SERVER_CPU)
    wait_until(server, lambda: "verge edge ready" in server.log_tail(), 60)
    wait_until(server, port_open(https_port), 30)
    return server


def url(server: Server) -> str:
    return f"https://127.0.0.1:{server.port}{OBJECT_PATH}"


def warm_until_hit(server: Server, ca: Path) -> None:
    """curl over HTTP/2 until the object comes from the cache."""
    for _ in range(50):
        out = subprocess.run(
            ["curl", "-sS", "--http2", "-o", "/dev/null", "-D", "-", "--cacert", str(ca),
             url(server)],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        if "hit" in out.stdout.lower() and out.stdout.startswith("HTTP/2 200"):
            return
        time.sleep(0.05)
    raise BenchError(f"{server.name} never answered from its cache:\n{out.stdout}{out.stderr}")


# --- measurement ----------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text()
                todo.extend(int(child) for child in children.split())
        except FileNotFoundError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def h2load(server: Server, load: str, requests: int) -> dict:
    argv = ["taskset", "-c", CLIENT_CPU, "h2load", *LOADS[load], "-n", str(requests), url(server)]
    cpu_before, started = cpu_seconds(server.process.pid), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    cpu = cpu_seconds(server.process.pid) - cpu_before
    sample = parse_h2load(done.stdout)
    if sample.problems or not re.search(r"Application protocol: h2", done.stdout):
        raise BenchError(f"{server.name} {load}: {sample.problems}\n{done.stdout[-800:]}")
    served = sample.detail["succeeded"]
    return {
        "rps": sample.rate,
        "cpu_us": cpu / served * 1e6,
        "server_cpu_share": cpu / (time.monotonic() - started),
    }


def wrk(server: Server, load: str, duration: float) -> dict:
    seconds = max(1, round(duration))
    argv = ["taskset", "-c", CLIENT_CPU, "wrk", *WRK_LOADS[load], f"-d{seconds}s", url(server)]
    cpu_before, started = cpu_seconds(server.process.pid), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    cpu = cpu_seconds(server.process.pid) - cpu_before
    served = re.search(r"(\d+) requests in", done.stdout)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if not served or not rate or "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise BenchError(f"{server.name} {load}:\n{done.stdout[-800:]}{done.stderr[-400:]}")
    return {
        "rps": float(rate.group(1)),
        "cpu_us": cpu / int(served.group(1)) * 1e6,
        "server_cpu_share": cpu / (time.monotonic() - started),
    }


def run_load(server: Server, load: str, sizes: dict, opts: argparse.Namespace) -> dict:
    if load in WRK_LOADS:
        return wrk(server, load, opts.duration)
    return h2load(server, load, sizes[server.name, load])


def run(opts: argparse.Namespace, workdir: Path) -> dict:
    files = workdir / "files"
    write_origin_files(files)
    certs = dev_certificates(workdir / "certs", hosts=["127.0.0.1"])
    cert, key = certs.hosts["127.0.0.1"].cert_file, certs.hosts["127.0.0.1"].key_file
    origin = start_origin(workdir / "origin", files)
    servers = [start_nginx(workdir / "nginx", origin.port, cert, key)]
    try:
        for engine in [e for e in opts.engines.split(",") if e]:
            servers.append(start_verge(workdir / engine, engine, origin.port, cert, key))
        return measure_all(servers, certs.ca.cert_file, opts)
    finally:
        for server in [*servers, origin]:
            server.stop()


def measure_all(servers: list[Server], ca: Path, opts: argparse.Namespace) -> dict:
    sizes = {}
    for server in servers:
        warm_until_hit(server, ca)
        for load in LOADS:
            probe = h2load(server, load, 3000)
            sizes[server.name, load] = max(5000, int(probe["rps"] * opts.duration) // 1000 * 1000)
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_no in range(opts.rounds):
        for server in servers:
            for load in [*LOADS, *WRK_LOADS]:
                sample = run_load(server, load, sizes, opts)
                runs.setdefault((server.name, load), []).append(sample)
                print(
                    f"round {round_no + 1} {server.name:13s} {load:7s} {sample['rps']:9.0f} req/s"
                    f" {sample['cpu_us']:6.1f} µs/req  cpu-share {sample['server_cpu_share']:.2f}"
                    f"  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    return summarise(runs)


def summarise(runs: dict[tuple[str, str], list[dict]]) -> dict:
    summary: dict = {}
    for (name, load), samples in runs.items():
        summary.setdefault(name, {})[load] = {
            "rps": statistics.median(s["rps"] for s in samples),
            "cpu_us": statistics.median(s["cpu_us"] for s in samples),
            "runs": [round(s["rps"]) for s in samples],
        }
    for loads in summary.values():
        for load, row in loads.items():
            row["ratio_to_nginx"] = row["rps"] / summary["nginx"][load]["rps"]
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    install_signal_handlers()
    add_sbin_to_path()
    require({"nginx": "nginx-light", "h2load": "nghttp2-client", "wrk": "wrk", "curl": "curl"})
    with tempfile.TemporaryDirectory(prefix="verge-h2-native-") as tmp:
        summary = run(opts, Path(tmp))
    print("\nmedians (ratio = median req/s ÷ nginx median req/s)")
    for name, loads in summary.items():
        for load, row in loads.items():
            print(
                f"{name:13s} {load:7s} {row['rps']:9.0f} req/s {row['cpu_us']:6.1f} µs/req"
                f"  ratio {row['ratio_to_nginx']:.2f}  runs {row['runs']}"
            )
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "nginx": tool_version(["nginx", "-v"]),
        "loadavg": os.getloadavg(), "rounds": opts.rounds, "duration_s": opts.duration,
        "results": summary,
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
