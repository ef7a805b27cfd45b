"""`bench/kv_bench.py`: how long an edge KV write takes to be seen elsewhere in the fleet.

The issue "Edge functions, second generation" asks for this measure: a function's write on
edge A, then a read on edge B and through the API; p95 of the delay over 100 writes. The
README's figures ("~70 ms p95, API writes ~45 ms") came from an ad hoc run; this makes them
reproducible.

Starts on 127.0.0.1 (free ports) a control plane, a demo origin and two edges joined to it
(one worker each), builds a small C function (clang --target=wasm32-wasi, with
examples/functions/verge.h) and deploys it twice on service `bench`: `kv-writer` at /kvw,
granted `kv_write` on namespace `bench` (`?key=K&value=V` puts), and `kv-reader` at /kvr,
granted reads only (`?key=K` answers `get=V`). Then:

* function writes: N times, a write through edge A's function (a new key each time, the
  value carries a timestamp); edge B's reader and the API (GET /api/v1/kv/bench/KEY, what
  `verge kv get` does) are polled at once, each from its own thread every ~2 ms, until each
  answers the value;
* API writes, for reference: N times a PUT /api/v1/kv/bench/KEY (what `verge kv put` does),
  then edge B's reader is polled until it answers the value.

A delay runs from just before the write request is sent to the arrival of the first answer
that has the value, so it includes the write request itself (its own time is reported too)
and is late by up to one poll (~2 ms plus a request). Prints p50/p95/max in ms of each delay
and writes bench/results/kv.json.

    .venv/bin/python bench/kv_bench.py [--writes 100] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from compute_bench import build_wasm
from purge_bench import VERGE, percentile, start
from servers import free_port

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "kv.json"
VERGE_H_DIR = BENCH_DIR.parent / "examples" / "functions"
ADMIN = "vrg_admin_bench-kv"
NAMESPACE = "bench"
HOST = "bench.test"
JSON, BYTES = "application/json", "application/octet-stream"
POLL_S = 0.002
SEEN_TIMEOUT_S = 10.0
KV_C = r"""
/* ?key=K&value=V: put V under K -> "put=<code>"; ?key=K: "get=<value>" or "get=<code>". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "verge.h"

static const char *param(const char *query, const char *name, size_t *len) {
    size_t n = strlen(name);
    for (const char *p = query; p && *p; p = strchr(p, '&') ? strchr(p, '&') + 1 : NULL) {
        if (strncmp(p, name, n) == 0 && p[n] == '=') {
            const char *end = strchr(p + n + 1, '&');
            *len = end ? (size_t)(end - (p + n + 1)) : strlen(p + n + 1);
            return p + n + 1;
        }
    }
    return NULL;
}

static char value_buffer[1024];

int main(void) {
    const char *query = getenv("QUERY_STRING");
    size_t key_len = 0, value_len = 0;
    const char *key = param(query ? query : "", "key", &key_len);
    const char *value = param(query ? query : "", "value", &value_len);
    printf("Content-Type: text/plain\nCache-Control: no-store\n\n");
    if (!key) {
        printf("usage: ?key=K[&value=V]\n");
    } else if (value) {
        printf("put=%d\n", verge_kv_put(key, key_len, value, value_len));
    } else {
        int got = verge_kv_get(key, key_len, value_buffer, sizeof value_buffer);
        if (got < 0) printf("get=%d\n", got);
        else printf("get=%.*s\n", got < (int)sizeof value_buffer ? got : (int)sizeof value_buffer,
                    value_buffer);
    }
    return 0;
}
"""


def build_kv_function(out: Path) -> Path:
    """The C function above, compiled to out/kv.wasm."""
    return build_wasm(out, "kv", KV_C, VERGE_H_DIR)


class Http:
    """One keep-alive connection to a server, used by one thread at a time."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        self.headers = headers

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = JSON
    ) -> tuple[int, bytes]:
        """(status, body); a connection the server closed is opened again once."""
        headers = self.headers if body is None else {**self.headers, "Content-Type": content_type}
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class Fleet:
    """A control plane, a demo origin and two edges (A and B) joined to it, on loopback."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.control_url = ""
        self.edge_urls: list[str] = []

    def start(self) -> None:
        origin_port, control_port = free_port(), free_port()
        start(
            [*VERGE, "demo-origin", "--listen", f"127.0.0.1:{origin_port}"],
            '"listening"',
            self.procs,
        )
        self.control_url = f"http://127.0.0.1:{control_port}"
        start(
            [
                *VERGE,
                "control",
                "--listen",
                f"127.0.0.1:{control_port}",
                "--db",
                f"sqlite:///{self.work / 'control.db'}",
                "--admin-token",
                ADMIN,
            ],
            "verge control ready",
            self.procs,
        )
        api = self.api()
        service = {
            "name": "bench",
            "hosts": [HOST],
            "origins": [{"url": f"http://127.0.0.1:{origin_port}"}],
        }
        expect(api.request("POST", "/api/v1/services", json.dumps(service).encode()), 201)
        token = api.request(
            "POST", "/api/v1/tokens", json.dumps({"name": "join", "role": "join"}).encode()
        )
        expect(token, 201)
        join = json.loads(token[1])["token"]
        for name in ("edge-a", "edge-b"):
            line = start(
                [
                    *VERGE,
                    "edge",
                    "--control",
                    self.control_url,
                    "--join-token",
                    join,
                    "--listen",
                    "127.0.0.1:0",
                    "--admin",
                    "127.0.0.1:0",
                    "--admin-token",
                    "bench",
                    "--cache-dir",
                    str(self.work / name),
                    "--workers",
                    "1",
                    "--name",
                    name,
                ],
                "verge edge ready",
                self.procs,
            )
            self.edge_urls.append(line.split("ready: ")[1].split()[0])

    def api(self) -> Http:
        return Http(self.control_url, {"Authorization": f"Bearer {ADMIN}"})

    def edge(self, index: int) -> Http:
        return Http(self.edge_urls[index], {"Host": HOST})

    def deploy(self, module: Path) -> None:
        """kv-writer (/kvw, may write) and kv-reader (/kvr, reads only); waits until both
        edges run both."""
        encoded = base64.b64encode(module.read_bytes()).decode()
        api = self.api()
        for name, route, write in (("kv-writer", "/kvw", True), ("kv-reader", "/kvr", False)):
            body = {
                "name": name,
                "service": "bench",
                "routes": [route],
                "kv_namespace": NAMESPACE,
                "kv_write": write,
                "module_base64": encoded,
            }
            expect(api.request("POST", "/api/v1/functions", json.dumps(body).encode()), 201)
        for index in range(len(self.edge_urls)):
            edge = self.edge(index)
            for route in ("/kvw", "/kvr"):
                wait_for(
                    lambda edge=edge, route=route: (
                        edge.request("GET", f"{route}?key=absent") == (200, b"get=-2\n")
                    ),
                    60,
                    f"{route} deployed",
                )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def expect(answer: tuple[int, bytes], status: int) -> None:
    if answer[0] != status:
        raise SystemExit(f"expected HTTP {status}, got {answer[0]}: {answer[1][:300]!r}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def seen_after(
    read: Callable[[], tuple[int, bytes]], expected: tuple[int, bytes], t0: float
) -> float | None:
    """Ms from t0 until read() answers expected (polled every POLL_S); None on a timeout."""
    while True:
        answer = read()
        now = time.perf_counter()
        if answer == expected:
            return (now - t0) * 1000
        if now - t0 > SEEN_TIMEOUT_S:
            return None
        time.sleep(POLL_S)


def measure_function_writes(fleet: Fleet, writes: int) -> dict[str, list[float | None]]:
    edge_a, edge_b, api = fleet.edge(0), fleet.edge(1), fleet.api()
    samples: dict[str, list[float | None]] = {"request": [], "edge_b": [], "api": []}
    with ThreadPoolExecutor(2) as pool:
        for i in range(writes):
            key, value = f"fn-{i}-{os.getpid()}", f"v{i}-{time.time_ns()}"
            t0 = time.perf_counter()
            expect(edge_a.request("GET", f"/kvw?key={key}&value={value}"), 200)
            samples["request"].append((time.perf_counter() - t0) * 1000)
            on_b = pool.submit(
                seen_after,
                partial(edge_b.request, "GET", f"/kvr?key={key}"),
                (200, f"get={value}\n".encode()),
                t0,
            )
            at_api = pool.submit(
                seen_after,
                partial(api.request, "GET", f"/api/v1/kv/{NAMESPACE}/{key}"),
                (200, value.encode()),
                t0,
            )
            samples["edge_b"].append(on_b.result())
            samples["api"].append(at_api.result())
    return samples


def measure_api_writes(fleet: Fleet, writes: int) -> dict[str, list[float | None]]:
    edge_b, api = fleet.edge(1), fleet.api()
    samples: dict[str, list[float | None]] = {"request": [], "edge_b": []}
    for i in range(writes):
        key, value = f"api-{i}-{os.getpid()}", f"v{i}-{time.time_ns()}"
        t0 = time.perf_counter()
        expect(api.request("PUT", f"/api/v1/kv/{NAMESPACE}/{key}", value.encode(), BYTES), 200)
        samples["request"].append((time.perf_counter() - t0) * 1000)
        samples["edge_b"].append(
            seen_after(
                partial(edge_b.request, "GET", f"/kvr?key={key}"),
                (200, f"get={value}\n".encode()),
                t0,
            )
        )
    return samples


def summarize(samples: list[float | None]) -> dict:
    seen = [s for s in samples if s is not None]
    figures = {"n": len(samples), "timeouts": len(samples) - len(seen)}
    if seen:
        figures |= {
            "p50_ms": statistics.median(seen),
            "p95_ms": percentile(seen, 0.95),
            "max_ms": max(seen),
        }
    return figures | {"samples_ms": [None if s is None else round(s, 3) for s in samples]}


def run(writes: int) -> dict:
    """Start the fleet, measure, stop it; the results (what kv.json holds)."""
    with tempfile.TemporaryDirectory(prefix="verge-bench-kv-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            module = build_kv_function(Path(tmp))
            fleet.start()
            fleet.deploy(module)
            by_function = measure_function_writes(fleet, writes)
            by_api = measure_api_writes(fleet, writes)
        finally:
            fleet.stop()
    return {
        "writes": writes,
        "poll_interval_ms": POLL_S * 1000,
        "function_write": {name: summarize(s) for name, s in by_function.items()},
        "api_write": {name: summarize(s) for name, s in by_api.items()},
        "load_average": os.getloadavg()[0],
    }


def report(result: dict) -> None:
    print(f"edge KV over loopback: control plane + 2 edges, {result['writes']} writes each")
    rows = (
        ("function write (edge A request)", result["function_write"]["request"]),
        ("function write -> edge B", result["function_write"]["edge_b"]),
        ("function write -> API", result["function_write"]["api"]),
        ("API write (PUT request)", result["api_write"]["request"]),
        ("API write -> edge B", result["api_write"]["edge_b"]),
    )
    for name, figures in rows:
        if "p50_ms" not in figures:
            print(f"{name:<34} never seen ({figures['timeouts']} timeouts)")
            continue
        timeouts = f"   {figures['timeouts']} TIMEOUTS" if figures["timeouts"] else ""
        print(
            f"{name:<34} p50 {figures['p50_ms']:7.1f} ms   p95 {figures['p95_ms']:7.1f} ms   "
            f"max {figures['max_ms']:7.1f} ms{timeouts}"
        )
    if result["load_average"] > 1.0:
        print(f"load average {result['load_average']:.2f}: other work may skew the numbers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=100, help="writes of each kind")
    parser.add_argument("--quick", action="store_true", help="20 writes of each kind")
    parser.add_argument("--output", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    result = run(20 if opts.quick else opts.writes)
    report(result)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {opts.output}")
    timeouts = sum(
        f["timeouts"] for kind in ("function_write", "api_write") for f in result[kind].values()
    )
    return 1 if timeouts else 0


if __name__ == "__main__":
    sys.exit(main())
