"""CPU per edge-function request in process: the edge's synchronous path, no network.

Why it exists: the issue "Edge functions, second generation" asks for function requests/s
>= 0.2x cache hits on the same worker (bench/compute_bench.py, end to end with wrk). Most of
what separates the two is CPU spent in the worker per request; this measures exactly that,
precisely and without load on the machine's other core: one worker's app (no sockets) with
the bench's "hello" function (C, wasm32-wasi) and a cached 1 KiB object, and
``EdgeApp.handle_fast`` called for each, in alternating batches. Per batch: the process's
CPU time (every thread: the epoch ticker's too) and the wall time, per request; medians over
the batches.

    .venv/bin/python bench/compute_cpu.py [--batches 40] [--batch 500] [--json PATH]
    VERGE_WASMSHIM=off .venv/bin/python bench/compute_cpu.py   # the ctypes path
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
from compute_bench import build_hello

FUNCTION_PATH = "/fn/hello"
OBJECT_PATH = "/static/app.js"
CONFIG = """
services:
  - name: bench
    hosts: ["*"]
    origins: ["http://127.0.0.1:9"]
functions:
  - {{name: hello, service: bench, routes: [{path}], module: {module}}}
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args(argv)


def make_app(work: Path):
    """One worker's app (no sockets): the hello function deployed, OBJECT_PATH cached."""
    from verge.cache import policy
    from verge.cache.store import CacheEntry
    from verge.config import Config
    from verge.edge.worker import Worker

    text = CONFIG.format(path=FUNCTION_PATH, module=build_hello(work))
    config = Config.model_validate(yaml.safe_load(text))
    worker = Worker(
        {
            "index": 0,
            "options": {"workers": 1, "cache_dir": str(work / "cache"), "node": "bench"},
            "config": config.model_dump(mode="json"),
        }
    )
    app = worker.app
    key = app.cached_route(request(OBJECT_PATH))[0].key.text
    freshness = policy.Freshness(response_time=time.time(), corrected_initial_age=0, lifetime=3600)
    app.cache.put(
        CacheEntry(
            key=key,
            variant="",
            status=200,
            reason="OK",
            headers=[("Content-Type", "application/javascript")],
            freshness=freshness,
            body_size=1024,
            body=b"x" * 1024,
        ),
        (),
    )
    for path in (OBJECT_PATH, FUNCTION_PATH):
        response = app.handle_fast(request(path))
        if response is None or response.status != 200:
            raise RuntimeError(f"{path}: the in-process fast path did not answer")
    return worker


def request(path: str):
    """A request as wrk sends it (Host with the port), parsed as the protocol layer does."""
    from verge.http.message import Request

    host = "127.0.0.1:8080"
    return Request("GET", path, headers=[("Host", host)], client="127.0.0.1", hmap={"host": host})


def measure(worker, batches: int, batch: int) -> dict[str, dict[str, float]]:
    """Median µs per request (process CPU and wall) of each path, batches alternating.

    A batch in which the fast path did not answer every request is left out (and counted):
    on a busy machine an inline run can outlast its wall-clock budget, and the function is
    then sent to the thread pool for a while, which this does not measure."""
    app = worker.app
    deployed = worker.compute.match("bench", FUNCTION_PATH)
    cpu: dict[str, list[float]] = {OBJECT_PATH: [], FUNCTION_PATH: []}
    wall: dict[str, list[float]] = {OBJECT_PATH: [], FUNCTION_PATH: []}
    dropped = 0
    handle = app.handle_fast
    for _ in range(batches):
        for path in cpu:
            requests = [request(path) for _ in range(batch)]
            missed = 0
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for each in requests:
                if handle(each) is None:
                    missed += 1
            cpu_us = (time.process_time() - cpu0) / batch * 1e6
            wall_us = (time.perf_counter() - wall0) / batch * 1e6
            app.records.pending.clear()  # not the access log's business here
            if missed:
                dropped += 1
                deployed.pool_until = 0.0
                continue
            cpu[path].append(cpu_us)
            wall[path].append(wall_us)
    med = statistics.median
    result: dict[str, dict[str, float]] = {
        label: {"cpu_us": med(cpu[path]), "cpu_p10_us": _p10(cpu[path]), "wall_us": med(wall[path])}
        for label, path in (("hit", OBJECT_PATH), ("function", FUNCTION_PATH))
    }
    result["ratio"] = {"cpu": result["hit"]["cpu_us"] / result["function"]["cpu_us"]}
    result["dropped_batches"] = {"count": dropped}
    return result


def _p10(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 10]


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="verge-compute-cpu-") as tmp:
        worker = make_app(Path(tmp))
        try:
            native = worker.compute.runtime.shim is not None
            result = measure(worker, opts.batches, opts.batch)
        finally:
            worker.compute.close()
    result["native"] = native
    for label in ("hit", "function"):
        print(
            f"{label:9} {result[label]['cpu_us']:7.1f} µs CPU (p10 "
            f"{result[label]['cpu_p10_us']:.1f})  {result[label]['wall_us']:7.1f} µs wall "
            "per request"
        )
    print(
        f"function/hit requests per CPU second: {result['ratio']['cpu']:.3f} "
        f"({'shim' if native else 'ctypes path'}; "
        f"{result['dropped_batches']['count']} batches left out)"
    )
    if opts.json is not None:
        opts.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
