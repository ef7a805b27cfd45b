"""The KV bench runs end to end with a few writes: a control plane and two edges start, every
write is seen on edge B and through the API, and the figures are there. Needs clang with
wasm32-wasi (as the bench does); skipped without it."""

from __future__ import annotations

import shutil

import kv_bench
import pytest


@pytest.mark.skipif(
    shutil.which("clang-14") is None and shutil.which("clang") is None, reason="clang not installed"
)
def test_a_few_writes_are_measured_everywhere() -> None:
    result = kv_bench.run(writes=3)
    delays = [*result["function_write"].values(), *result["api_write"].values()]
    assert all(d["n"] == 3 and d["timeouts"] == 0 and d["max_ms"] > 0 for d in delays)
    assert set(result["function_write"]) == {"request", "edge_b", "api"}
