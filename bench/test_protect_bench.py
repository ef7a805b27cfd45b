"""The protection bench's in-process part runs (tiny sizes): three apps answer a memory hit
from the synchronous path, warm and with the CPU caches flushed."""

from __future__ import annotations

import protect_bench


def test_the_in_process_figures_are_measured_for_each_config() -> None:
    for cold in (False, True):
        figures = protect_bench.in_process(batches=2, batch=20, cold=cold)
        assert set(figures) == {"plain", "limit", "limit+deny"}
        for p10, median in figures.values():
            assert 0 < p10 <= median < 10_000  # µs per hit
