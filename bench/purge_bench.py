"""`make bench-purge`: global purge and config propagation latency over a fleet on loopback.

Starts one control plane and N edges (default 10, one worker each), then
  * purge: 100 purges through the API; the time from the POST to the moment the control
    plane has every edge's acknowledgement (GET /purge/{seq}?wait= returns at that moment);
  * config: 20 service changes through the API; the time until every edge serves the new
    response header (polled on all edges).
Prints p50/p95/max of each against the targets (purge p95 < 100 ms, config p95 < 200 ms).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from servers import free_port

VERGE = [sys.executable, "-m", "verge.cli"]
ADMIN = "vrg_admin_bench-purge"


def start(args: list[str], marker: str, procs: list) -> str:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    procs.append(proc)
    for line in proc.stdout:
        if marker in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return line
    raise SystemExit(f"{args[3]} did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(name: str, samples: list[float], target_ms: float) -> None:
    ms = [s * 1000 for s in samples]
    p95 = percentile(ms, 0.95)
    verdict = "ok" if p95 < target_ms else "MISSED"
    print(f"{name:<22} n={len(ms):<4} p50 {statistics.median(ms):7.1f} ms   p95 {p95:7.1f} ms   "
          f"max {max(ms):7.1f} ms   target p95 < {target_ms:.0f} ms: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=10)
    parser.add_argument("--purges", type=int, default=100)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args(argv)
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="verge-bench-purge-"))
    try:
        origin_port = free_port()
        start([*VERGE, "demo-origin", "--listen", f"127.0.0.1:{origin_port}"], '"listening"', procs)
        control_port = free_port()
        control = f"http://127.0.0.1:{control_port}"
        start([*VERGE, "control", "--listen", f"127.0.0.1:{control_port}", "--db",
               f"sqlite:///{tmp / 'control.db'}", "--admin-token", ADMIN],
              "verge control ready", procs)
        api = httpx.Client(base_url=control, timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN}"})
        service = {"name": "bench", "hosts": ["bench.test"],
                   "origins": [{"url": f"http://127.0.0.1:{origin_port}"}]}
        api.post("/api/v1/services", json=service).raise_for_status()
        join = api.post("/api/v1/tokens", json={"name": "j", "role": "join"}).json()["token"]
        edges = []
        for i in range(args.edges):
            line = start([*VERGE, "edge", "--control", control, "--join-token", join,
                          "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--admin-token",
                          "t", "--cache-dir", str(tmp / f"e{i}"), "--workers", "1",
                          "--name", f"e{i}"], "verge edge ready", procs)
            edges.append(line.split("ready: ")[1].split()[0])
        clients = [httpx.Client(base_url=url, headers={"Host": "bench.test"}, timeout=10)
                   for url in edges]
        deadline = time.monotonic() + 60
        while not all(_serves(c) for c in clients):
            if time.monotonic() > deadline:
                raise SystemExit("edges did not receive the service")
            time.sleep(0.05)
        print(f"fleet: 1 control plane, {len(edges)} edges on loopback")

        purge_times = []
        for i in range(args.purges):
            t0 = time.perf_counter()
            seq = api.post("/api/v1/purge", json={"urls": [f"http://bench.test/static/app.js?{i}"]}
                           ).json()["seq"]
            while api.get(f"/api/v1/purge/{seq}", params={"wait": 10}).json()["pending"]:
                pass
            purge_times.append(time.perf_counter() - t0)
        report("global purge", purge_times, 100)

        config_times = []
        for i in range(args.changes):
            etag = api.get("/api/v1/services/bench").headers["etag"]
            body = {**service, "headers": {"response_add": {"X-Change": str(i)}}}
            t0 = time.perf_counter()
            api.put("/api/v1/services/bench", json=body, headers={"If-Match": etag}).raise_for_status()
            pending = list(clients)
            while pending:
                pending = [c for c in pending if c.get("/").headers.get("x-change") != str(i)]
            config_times.append(time.perf_counter() - t0)
        report("config propagation", config_times, 200)
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _serves(client: httpx.Client) -> bool:
    try:
        return client.get("/").status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
