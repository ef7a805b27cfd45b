"""Weighted origin choice (verge.edge.origins.OriginSet) without a network.

The attack this guards against: an origin weight of 2**64 once became a list of 2**64
entries on every edge worker. Here the weights reach OriginSet directly, past the config's
bound, and choosing must stay fast and small.
"""

from __future__ import annotations

import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass

from verge.edge.origins import OriginSet


@dataclass(frozen=True)
class Spec:
    url: str
    weight: int = 1
    host_header: str | None = None

    def tls_options(self) -> dict:
        return {}


def origin_set(*weights: int) -> OriginSet:
    specs = [Spec(f"http://10.0.0.{n + 1}:80", weight) for n, weight in enumerate(weights)]
    return OriginSet(specs, pool=None)  # type: ignore[arg-type]  # no request is sent


def first_choices(origins: OriginSet, picks: int) -> list[int]:
    """Which origin (by position) each of `picks` requests tries first."""
    return [origins.states.index(origins.order()[0]) for _ in range(picks)]


def order(origins: OriginSet) -> list[int]:
    return [origins.states.index(state) for state in origins.order()]


def test_picks_follow_the_weights_and_interleave() -> None:
    origins = origin_set(3, 1)
    picks = first_choices(origins, 8)
    assert Counter(picks) == {0: 6, 1: 2}
    assert picks[:4].count(1) == 1  # every round of 4 has the light origin once
    assert Counter(first_choices(origin_set(5, 3, 2), 100)) == {0: 50, 1: 30, 2: 20}


def test_equal_weights_rotate_and_order_keeps_every_origin() -> None:
    origins = origin_set(1, 1, 1)
    assert first_choices(origins, 3) == [0, 1, 2]
    assert order(origins) == [0, 1, 2]
    assert order(origins) == [1, 2, 0]  # rotated: the next request starts at the next origin


def test_unhealthy_origins_come_last() -> None:
    origins = origin_set(1, 1)
    origins.states[0].healthy = False
    for _ in range(4):
        assert order(origins) == [1, 0]


def test_a_huge_weight_costs_neither_time_nor_memory() -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        origins = origin_set(18446744073709551616, 1)
        picks = first_choices(origins, 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 1_000_000  # bytes: the weights are numbers, not lists
    assert set(picks) == {0}  # the light origin's turn is 2**64 picks away


def test_zero_or_no_weights_still_give_an_order() -> None:
    assert order(origin_set(0, 0)) == [0, 1]
    assert order(origin_set()) == []
