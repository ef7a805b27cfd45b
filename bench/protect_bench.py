"""What the protect phase costs a cache hit: hits/s with rate limits (and a deny list) on vs off.

Why it exists: the issue "Edge protection" promises that limits do not slow the hot path —
the rate-limit check adds at most 2 µs per hit and hits/s with limits on stay at ≥ 0.95× of
hits/s without them.

What it does, in two parts:

* in process (no network, the precise figure): the edge's synchronous hit path
  (``EdgeApp.handle_fast``) of three apps built from configs — plain, with the rate limit,
  with the rate limit and the deny list — timed in batches of 2,000 requests, alternating,
  150 times; the 10th percentile and the median per app give what the protect phase adds.
  Then again with the CPU caches flushed before each hit: end to end every hit starts cold
  behind the kernel's network work, and there a check costs about three times as much;
* end to end: a local nginx origin and one-worker `verge edge`s pinned to CPU 0, the same
  service plain, with a rate limit matching every request (rate high enough that none is
  refused, keyed by the client address: the issue's "limits on vs off"), and with a deny list
  (CIDR + user agent) on top. wrk on CPU 1 reads a 1 KiB memory hit. Why several edges per
  side (``--instances``): on this VM one process can run ±10 % faster than another of the
  same code for its whole life (memory layout), which once decided the ratio alone; each
  round runs every group, the order rotating, and the paired ratios' median is the figure.
  The edge workers' CPU time per request is measured too.

    .venv/bin/python bench/protect_bench.py [--rounds N] [--duration S] [--connections C]
                                            [--instances K] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
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
LIMITED = PLAIN + """\
    protection:
      rate_limits:
        - {{name: all, match: {{path: /}}, key: client_ip, rate: 1000000/s, burst: 100000}}
"""
PROTECTED = LIMITED + """\
      deny:
        cidrs: [203.0.113.0/24, "2001:db8::/32"]
        user_agents: ["(?i)sqlmap", "(?i)nikto"]
"""
# the sides measured end to end: "limits" is the figure (rate limits on vs off),
# "limits+deny" adds a deny list (CIDRs and user agents) on top
SIDES = {"off": PLAIN, "limits": LIMITED, "limits+deny": PROTECTED}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--instances", type=int, default=3, help="edges per side")
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
        groups: list[dict] = []
        try:
            common = {"workers": 1, "cpus": "0", "admin_token": "bench"}
            for index in range(opts.instances):
                group = {}
                for name, text in SIDES.items():
                    label = f"{name.replace('+', '-')}{index}"
                    config = root / f"{label}.yaml"
                    config.write_text(text.format(origin=origin.port))
                    group[name] = start_verge(label, root / label, VERGE, origin.port, **common,
                                             extra_args=("--config", str(config)))
                groups.append(group)
            for group in groups:  # warm: the object becomes a memory hit
                for edge in group.values():
                    run_wrk(f"http://127.0.0.1:{edge.port}{OBJECT}", duration_s=1,
                            connections=4, threads=1, cpus="1")
            return measure(opts, groups)
        finally:
            for group in groups:
                for edge in group.values():
                    edge.stop()
            origin.stop()


def measure(opts: argparse.Namespace, groups: list[dict]) -> dict:
    """Every round runs each group's edges back to back (the order rotating by round); each
    protected side's ratio is paired with the plain edge of its group and round."""
    rates: dict[str, list[float]] = {name: [] for name in SIDES}
    cpu_us: dict[str, list[float]] = {name: [] for name in SIDES}
    ratios: dict[str, list[float]] = {name: [] for name in SIDES if name != "off"}
    names = list(SIDES)
    for round_no in range(opts.rounds):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for group in groups:
            got = {name: one_run(opts, name, group[name]) for name in order}
            for name, (rps, cpu) in got.items():
                rates[name].append(rps)
                cpu_us[name].append(cpu)
            for name in ratios:
                ratios[name].append(got[name][0] / got["off"][0])
    median = statistics.median
    off, cpu_off = median(rates["off"]), median(cpu_us["off"])
    sides = {name: {"rps": median(rates[name]), "ratio": median(ratios[name]),
                    "ratio_spread": [min(ratios[name]), max(ratios[name])],
                    "added_us": (1 / median(rates[name]) - 1 / off) * 1e6,
                    "cpu_us": median(cpu_us[name]),
                    "cpu_ratio": cpu_off / median(cpu_us[name])} for name in ratios}
    return {"off_rps": off, "cpu_us_off": cpu_off, "sides": sides,
            "ratio": sides["limits"]["ratio"], "rounds": rates, "cpu_rounds": cpu_us}


def one_run(opts: argparse.Namespace, name: str, edge) -> tuple[float, float]:
    """(requests/s, edge CPU µs per request) of one wrk run."""
    workers = worker_pids(edge)
    cpu_before = cpu_seconds(workers)
    result = run_wrk(f"http://127.0.0.1:{edge.port}{OBJECT}", duration_s=opts.duration,
                     connections=opts.connections, threads=1, cpus="1")
    if result.non_2xx or result.socket_errors:
        raise WrkError(f"{name}: {result.non_2xx} non-2xx answers, "
                       f"{result.socket_errors} socket errors")
    cpu = (cpu_seconds(workers) - cpu_before) * 1e6 / max(1, result.requests)
    return result.requests_per_s, cpu


def in_process(batches: int = 150, batch: int = 2000, *, cold: bool = False
               ) -> dict[str, tuple[float, float]]:
    """µs per ``handle_fast`` of a 1 KiB memory hit (10th percentile, median) for the
    plain, rate-limited and rate-limited + deny-listed service, batches alternating.
    ``cold``: 4 MiB are read between requests (untimed), so every hit starts with the CPU
    caches flushed, as it does behind the kernel's network work end to end (where the warm
    figure is about a third of what a check costs)."""
    apps = {label: hit_app(text) for label, text in
            (("plain", PLAIN), ("limit", PROTECTED.split("      deny:")[0]),
             ("limit+deny", PROTECTED))}
    flush = bytearray(4 * 1024 * 1024) if cold else None
    if cold:
        batches, batch = batches // 2, 200
    times: dict[str, list[float]] = {label: [] for label in apps}
    for _ in range(batches):
        for label, app in apps.items():
            requests = [hit_request() for _ in range(batch)]
            handle = app.handle_fast
            spent = 0.0
            if flush is None:
                started = time.perf_counter()
                for request in requests:
                    handle(request)
                spent = time.perf_counter() - started
            else:
                for request in requests:
                    bytes(flush)
                    started = time.perf_counter()
                    handle(request)
                    spent += time.perf_counter() - started
            times[label].append(spent / batch * 1e6)
            app.records.pending.clear()  # not the access log's business here
    return {label: (sorted(t)[len(t) // 10], statistics.median(t)) for label, t in times.items()}


def hit_app(config_text: str):
    """An edge app (one worker's, no sockets) whose memory cache holds OBJECT."""
    from verge.cache import policy
    from verge.cache.store import CacheEntry
    from verge.config import Config
    from verge.edge.worker import Worker

    config = Config.model_validate(yaml.safe_load(config_text.format(origin=9)))
    worker = Worker({"index": 0, "options": {"workers": 1, "cache_dir": tempfile.mkdtemp(),
                                             "node": "bench"},
                     "config": config.model_dump(mode="json")})
    app = worker.app
    key = app.cached_route(hit_request())[0].key.text
    freshness = policy.Freshness(response_time=time.time(), corrected_initial_age=0,
                                 lifetime=3600)
    app.cache.put(CacheEntry(key=key, variant="", status=200, reason="OK",
                             headers=[("Content-Type", "application/octet-stream")],
                             freshness=freshness, body_size=1024, body=b"x" * 1024), ())
    if app.handle_fast(hit_request()) is None:
        raise RuntimeError("the in-process hit path did not answer from memory")
    return app


def hit_request():
    from verge.http.message import Request

    return Request("GET", OBJECT, headers=[("Host", "127.0.0.1"), ("User-Agent", "wrk")],
                   client="127.0.0.1", hmap={"host": "127.0.0.1", "user-agent": "wrk"})


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
    batches = 20 if opts.quick else 150
    summary["in_process"] = in_process(batches)
    summary["in_process_cold"] = in_process(batches, cold=True)
    for key, what in (("in_process", "warm caches"), ("in_process_cold", "CPU caches flushed")):
        print(f"In process, {what}: µs per hit on the synchronous path (10th percentile /"
              " median of alternating batches):")
        plain_p10, plain_median = summary[key]["plain"]
        for label, (p10, median) in summary[key].items():
            added = "" if label == "plain" else \
                f" · added {p10 - plain_p10:.2f} / {median - plain_median:.2f} µs"
            print(f"  {label:<11} {p10:.2f} / {median:.2f}{added}")
    limit_added = summary["in_process"]["limit"][0] - summary["in_process"]["plain"][0]
    print(f"  the rate-limit check adds {limit_added:.2f} µs warm (target ≤ 2"
          f" {'✓' if limit_added <= 2 else '✗'})")
    print(f"1 KiB memory hits, one worker pinned, {opts.instances} edges per side,"
          f" {opts.rounds} rounds (paired with the plain edge of the same round):")
    print(f"  off          {summary['off_rps']:,.0f} req/s · edge CPU"
          f" {summary['cpu_us_off']:.2f} µs per request")
    for name, side in summary["sides"].items():
        low, high = side["ratio_spread"]
        verdict = "" if name != "limits" else \
            f" (≥ {TARGET_RATIO}× {'✓' if side['ratio'] >= TARGET_RATIO else '✗'})"
        print(f"  {name:<12} {side['rps']:,.0f} req/s · paired ratio {side['ratio']:.3f}×"
              f" ({low:.2f}–{high:.2f}){verdict} · edge CPU {side['cpu_us']:.2f} µs"
              f" (+{side['cpu_us'] - summary['cpu_us_off']:.2f})")
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
