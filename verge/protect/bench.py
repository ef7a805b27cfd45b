"""Measure the rate-limit check: ``python -m verge.protect.bench``.

Prints µs per operation (best of several rounds, loop overhead subtracted) for:
the worker-local GCRA (``Gcra.update``, ``Gcra.check``) over 50k keys; the shared-memory
table (``SharedGcra.update``) alone and with a second process hammering the same table; and
``RateLimiter.evaluate`` for a request a client_ip rule matches (with its RateLimit fields)
and one no rule matches. These are the numbers quoted in gcra.py, shared.py and
ratelimit.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from verge.http.message import Request
from verge.protect.gcra import Gcra
from verge.protect.ratelimit import RateLimiter, RuleSpec
from verge.protect.shared import SharedTable

KEYS = 50_000
CHECKS = 200_000
ROUNDS = 5


def _addresses(count: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]


def per_call(function: Callable[[str, float], object], keys: Sequence[str]) -> float:
    """Best µs per call of function(key, now) over ``keys``, loop overhead subtracted."""
    now = time.monotonic()

    def timed(body: Callable[[str, float], object]) -> float:
        start = time.perf_counter()
        for key in keys:
            body(key, now)
        return time.perf_counter() - start

    def empty(_key: str, _now: float) -> None:
        return None

    best = min(timed(function) - timed(empty) for _ in range(ROUNDS))
    return best / len(keys) * 1e6


def _sequence(seed: int) -> list[str]:
    rng = random.Random(seed)
    addresses = _addresses(KEYS)
    return [rng.choice(addresses) for _ in range(CHECKS)]


def local_numbers() -> dict[str, float]:
    limit = Gcra(100, 1.0, 200)
    now = time.monotonic()
    for key in _addresses(KEYS):
        limit.update(key, now)
    sequence = _sequence(1)
    return {
        "Gcra.update": per_call(limit.update, sequence),
        "Gcra.check": per_call(limit.check, sequence),
    }


def shared_numbers() -> dict[str, float]:
    table = SharedTable.create()
    limit = table.limit("bench/api", 100, 1.0, 200)
    now = time.monotonic()
    for key in _addresses(KEYS):
        limit.update(key, now)
    sequence = _sequence(2)
    alone = per_call(limit.update, sequence)
    other = subprocess.Popen(
        [sys.executable, "-m", "verge.protect.bench", "--hammer", str(table.fileno())],
        pass_fds=(table.fileno(),),
        stdout=subprocess.PIPE,
    )
    assert other.stdout is not None
    other.stdout.readline()  # started
    contended = per_call(limit.update, sequence)
    other.kill()
    other.wait()
    table.close()
    return {"SharedGcra.update": alone, "SharedGcra.update, 2 processes": contended}


def _hammer(fd: int) -> None:
    limit = SharedTable.attach(fd).limit("bench/api", 100, 1.0, 200)
    sequence = _sequence(3)
    print("started", flush=True)
    while True:
        now = time.monotonic()
        for key in sequence:
            limit.update(key, now)


def limiter_numbers() -> dict[str, float]:
    limiter = RateLimiter([RuleSpec("api", 100, 1, 200, path="/api/")], steered=True)
    hit = [Request("GET", "/api/item", client=key) for key in _sequence(4)[:50_000]]
    miss = [Request("GET", "/static/a.css", client=key) for key in _sequence(5)[:50_000]]
    for request in (*hit, *miss):
        request.path  # noqa: B018 - split once, as the server's router does before this
    by_request = {id(r): r for r in (*hit, *miss)}

    def evaluate(request_id: str, now: float) -> object:
        return limiter.evaluate(by_request[request_id], now)  # type: ignore[index]

    def lookup(request_id: str, _now: float) -> object:
        return by_request[request_id]  # type: ignore[index]

    hit_ids = [id(r) for r in hit]
    miss_ids = [id(r) for r in miss]
    overhead = per_call(lookup, hit_ids)  # type: ignore[arg-type]
    return {
        "RateLimiter.evaluate (client_ip rule matches)": per_call(evaluate, hit_ids) - overhead,  # type: ignore[arg-type]
        "RateLimiter.evaluate (no rule matches)": per_call(evaluate, miss_ids) - overhead,  # type: ignore[arg-type]
    }


def main(argv: Sequence[str]) -> None:
    if len(argv) == 2 and argv[0] == "--hammer":
        _hammer(int(argv[1]))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {KEYS} keys")
    for numbers in (local_numbers(), shared_numbers(), limiter_numbers()):
        for name, micros in numbers.items():
            print(f"{name:50s} {micros:6.2f} µs")


if __name__ == "__main__":
    main(sys.argv[1:])
