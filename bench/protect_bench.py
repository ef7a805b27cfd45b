"""What the protect phase costs a cache hit: hits/s with rate limits and a deny list on vs off.

Why it exists: the issue "Edge protection" promises that limits do not slow the hot path —
the rate-limit check adds at most 2 µs per hit and hits/s with limits on stay at ≥ 0.95× of
hits/s without them.

What it does: a local nginx origin and two one-worker `verge edge`s pinned to CPU 0, with
the same service: one plain, one whose service also has a rate limit matching every request
(rate high enough that none is refused, keyed by the client address) and a deny list (CIDR +
user agent) checked on every request. wrk on CPU 1 reads a 1 KiB memory hit from each,
alternating, for several rounds; the medians of req/s give the ratio and the added µs per
request (1/on - 1/off). The edge workers' CPU time per request is measured too: on a busy
machine it moves less than req/s does.

    .venv/bin/python bench/protect_bench.py [--rounds N] [--duration S] [--connections C]
                                            [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loadgen import WrkError, run_wrk
from servers import ServerError, cpu_seconds, start_origin, start_verge, worker_pids
from tools import ToolError, add_sbin_to_path, install_signal_handlers, require

PROJECT = Path(__file__).resolve().parents[1]
VERGE = str(PROJECT / ".venv" / "bin" / "verge")
OBJECT = "/hit.bin"
TARGET_RATIO = 0.95

PLAIN = """
services:
  - name: bench
    hosts: [127.0.0.1]
    origins: ["http://127.0.0.1:{origin}"]
"""
PROTECTED = PLAIN + """\
    protection:
      rate_limits:
        - {{name: all, match: {{path: /}}, key: client_ip, rate: 1000000/s, burst: 100000}}
      deny:
        cidrs: [203.0.113.0/24, "2001:db8::/32"]
        user_agents: ["(?i)sqlmap", "(?i)nikto"]
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 1, 2.0
    return opts


def run(opts: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="verge-protect-bench-") as tmp:
        root = Path(tmp)
        files = root / "files"
        files.mkdir()
        (files / OBJECT.lstrip("/")).write_bytes(b"x" * 1024)
        origin = start_origin(root / "origin", files)
        edges = {}
        try:
            common = {"workers": 1, "cpus": "0", "admin_token": "bench"}
            for name, text in (("off", PLAIN), ("on", PROTECTED)):
                config = root / f"{name}.yaml"
                config.write_text(text.format(origin=origin.port))
                edges[name] = start_verge(name, root / name, VERGE, origin.port, **common,
                                          extra_args=("--config", str(config)))
            rates: dict[str, list[float]] = {"off": [], "on": []}
            cpu_us: dict[str, list[float]] = {"off": [], "on": []}
            for edge in edges.values():  # warm: the object becomes a memory hit
                run_wrk(f"http://127.0.0.1:{edge.port}{OBJECT}", duration_s=1,
                        connections=4, threads=1, cpus="1")
            for _ in range(opts.rounds):
                for name, edge in edges.items():
                    workers = worker_pids(edge)
                    cpu_before = cpu_seconds(workers)
                    result = run_wrk(f"http://127.0.0.1:{edge.port}{OBJECT}",
                                     duration_s=opts.duration, connections=opts.connections,
                                     threads=1, cpus="1")
                    if result.non_2xx or result.socket_errors:
                        raise WrkError(f"{name}: {result.non_2xx} non-2xx answers, "
                                       f"{result.socket_errors} socket errors")
                    rates[name].append(result.requests_per_s)
                    cpu_us[name].append((cpu_seconds(workers) - cpu_before) * 1e6
                                        / max(1, result.requests))
        finally:
            for edge in edges.values():
                edge.stop()
            origin.stop()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    cpu_off, cpu_on = statistics.median(cpu_us["off"]), statistics.median(cpu_us["on"])
    return {"off_rps": off, "on_rps": on, "ratio": on / off,
            "added_us": (1 / on - 1 / off) * 1e6, "rounds": rates,
            "cpu_us_off": cpu_off, "cpu_us_on": cpu_on, "cpu_ratio": cpu_off / cpu_on,
            "cpu_rounds": cpu_us}


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    add_sbin_to_path()
    try:
        require({"wrk": "wrk", "nginx": "nginx-light"})
    except ToolError as error:
        print(f"missing tools: {error}; run `bash bench/setup.sh`")
        return 2
    install_signal_handlers()
    try:
        summary = run(opts)
    except (ServerError, WrkError) as error:
        print(f"benchmark failed: {error}")
        return 1
    verdict = "✓" if summary["ratio"] >= TARGET_RATIO else "✗"
    print(f"1 KiB memory hits, one worker pinned, {opts.rounds} alternating rounds (medians):")
    print(f"  limits off {summary['off_rps']:,.0f} req/s · on {summary['on_rps']:,.0f} req/s"
          f" · ratio {summary['ratio']:.3f}× (≥ {TARGET_RATIO}× {verdict})"
          f" · added {summary['added_us']:.2f} µs/request (target ≤ 2)")
    print(f"  edge CPU per request: off {summary['cpu_us_off']:.2f} µs · on"
          f" {summary['cpu_us_on']:.2f} µs · added {summary['cpu_us_on'] - summary['cpu_us_off']:.2f}"
          f" µs · ratio {summary['cpu_ratio']:.3f}×")
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
