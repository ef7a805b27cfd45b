"""GCRA (verge.protect.gcra, and the shared-memory table of verge.protect.shared) against an
exact-arithmetic leaky bucket.

The reference is the continuous-state leaky bucket of ITU-T I.371: a bucket of capacity
burst + 1 that drains one request per interval; a request fits when the level is at most
burst, and adds one. GCRA claims to be the same thing stored as one timestamp; the property
test feeds both the same requests and compares every field of every decision. Times and
intervals are dyadic rationals (k / 1024 s, period / 2^n), so the floats in GCRA are exact
and the comparison can be too.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.protect.gcra import Decision, Gcra, Limit
from verge.protect.shared import SharedTable

BASE = 1000  # seconds: monotonic clocks do not start at 0


class BucketModel:
    """The leaky bucket, in fractions, with the same penalty box rules."""

    def __init__(self, count: int, period: int, burst: int, penalty: Fraction) -> None:
        self.interval = Fraction(period, count)
        self.burst = burst
        self.penalty = penalty
        self.level: dict[str, tuple[Fraction, Fraction]] = {}  # key -> (level, at)
        self.box: dict[str, Fraction] = {}

    def check(self, key: str, now: Fraction) -> tuple[bool, Fraction, int, Fraction]:
        level, at = self.level.get(key, (Fraction(0), now))
        level = max(Fraction(0), level - (now - at) / self.interval)
        release = self.box.get(key)
        if release is not None:
            if now < release:
                return False, release - now, 0, max(level * self.interval, release - now)
            del self.box[key]
        if level > self.burst:
            retry = (level - self.burst) * self.interval
            if self.penalty > 0:
                retry = max(retry, self.penalty)
                self.box[key] = now + retry
            return False, retry, 0, max(level * self.interval, retry)
        level += 1
        self.level[key] = (level, now)
        return True, Fraction(0), math.floor(self.burst + 1 - level), level * self.interval


def assert_same(decision: Decision, expected: tuple[bool, Fraction, int, Fraction]) -> None:
    allowed, retry_after, remaining, reset = expected
    assert decision.allowed == allowed
    assert decision.remaining == remaining
    assert decision.retry_after == pytest.approx(float(retry_after), abs=1e-9)
    assert decision.reset == pytest.approx(float(reset), abs=1e-9)


limits = st.tuples(
    st.sampled_from([1, 2, 4, 8, 16, 64]),  # count: intervals stay dyadic
    st.sampled_from([1, 2, 3, 10, 60]),  # period
    st.integers(0, 12),  # burst
    st.sampled_from([Fraction(0), Fraction(1, 2), Fraction(3), Fraction(20)]),  # penalty
)
steps = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3000)), min_size=1, max_size=150)


def run_against_model(limit: Limit, model: BucketModel, requests: list[tuple[int, int]]) -> None:
    now = Fraction(BASE)
    for key_index, step in requests:
        now += Fraction(step, 1024)
        key = f"client-{key_index}"
        assert_same(limit.check(key, float(now)), model.check(key, now))


@settings(max_examples=300, deadline=None)
@given(limits, steps)
def test_gcra_is_the_leaky_bucket(params, requests) -> None:
    count, period, burst, penalty = params
    limit = Gcra(count, period, burst, penalty=float(penalty))
    run_against_model(limit, BucketModel(count, period, burst, penalty), requests)


@pytest.fixture(scope="module")
def table():
    shared = SharedTable.create()  # roomy: examples never meet in a full bucket
    yield shared
    shared.close()


SCOPES = itertools.count()  # a fresh scope per example: the table outlives examples


@settings(max_examples=150, deadline=None)
@given(limits, steps)
def test_the_shared_table_is_the_leaky_bucket_too(table, params, requests) -> None:
    count, period, burst, penalty = params
    scope = f"test/{next(SCOPES)}"
    limit = table.limit(scope, count, period, burst, penalty=float(penalty))
    run_against_model(limit, BucketModel(count, period, burst, penalty), requests)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 50),
    st.floats(0.01, 100),
    st.integers(0, 30),
    st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=300),
    st.floats(0.01, 20),
)
def test_no_window_admits_more_than_burst_plus_rate(count, period, burst, gaps, window) -> None:
    """The GCRA guarantee with arbitrary floats: in any window of w seconds at most
    burst + 1 + w / interval requests pass."""
    limit = Gcra(count, period, burst)
    now, passed = 1e4, []
    for gap in gaps:
        now += gap
        if limit.check("k", now).allowed:
            passed.append(now)
    bound = burst + 1 + window / limit.interval + 1e-6
    for index, start in enumerate(passed):
        inside = sum(1 for t in passed[index:] if t - start <= window)
        assert inside <= bound


def test_nginx_burst_semantics() -> None:
    """100/s burst 5 from idle: 6 pass at once, then one per 10 ms."""
    limit = Gcra(100, 1.0, 5)
    decisions = [limit.check("a", 10.0) for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 6 + [False] * 2
    assert [d.remaining for d in decisions[:6]] == [5, 4, 3, 2, 1, 0]
    assert decisions[6].retry_after == pytest.approx(0.01)
    assert decisions[6].reset == pytest.approx(0.06)
    assert not limit.check("a", 10.0099).allowed
    assert limit.check("a", 10.0100001).allowed
    assert limit.check("b", 10.0).allowed  # keys are independent


def test_refusals_do_not_dig_deeper() -> None:
    limit = Gcra(1, 1.0)
    assert limit.check("a", 0.0).allowed
    for _ in range(1000):
        assert not limit.check("a", 0.5).allowed
    assert limit.check("a", 1.0).allowed


def test_penalty_box() -> None:
    """5/m with a 10 minute penalty: refused once, then refused for 10 minutes, whatever
    the key does meanwhile, then back to the rate."""
    limit = Gcra(5, 60.0, 0, penalty=600.0)
    assert limit.check("k", 0.0).allowed
    refused = limit.check("k", 1.0)
    assert not refused.allowed and refused.retry_after == pytest.approx(600.0)
    assert limit.boxed("k", 2.0)
    for t in (100.0, 300.0, 600.9):
        later = limit.check("k", t)
        assert not later.allowed
        assert later.retry_after == pytest.approx(601.0 - t)  # not extended by retries
    assert limit.check("k", 601.0).allowed
    assert not limit.boxed("k", 601.0)
    assert limit.check("other", 2.0).allowed


def test_peek_does_not_count() -> None:
    limit = Gcra(1, 1.0, 1, penalty=5.0)
    assert limit.peek("a", 0.0) == limit.check("a", 0.0)
    for _ in range(5):
        assert limit.peek("a", 0.0).allowed
    assert limit.check("a", 0.0).allowed
    assert not limit.peek("a", 0.0).allowed
    assert not limit.boxed("a", 0.0)  # peeking does not box


def test_the_table_is_bounded_and_forgets_the_least_recently_used() -> None:
    limit = Gcra(1, 60.0, max_keys=640)
    now = 0.0
    limit.check("regular", now)
    for index in range(10_000):
        now += 0.001
        limit.check(f"flood-{index}", now)
        if index % 100 == 0:
            assert not limit.check("regular", now).allowed  # remembered: used recently
        assert len(limit) <= 640
    assert limit.evicted > 0  # live keys had to go (60 s intervals: none expired)
    assert not limit.check("regular", now).allowed


def test_expired_keys_are_swept_and_evicting_them_is_not_counted() -> None:
    limit = Gcra(10, 1.0, max_keys=64)
    for index in range(64):
        limit.check(f"k{index}", 0.0)
    assert len(limit) == 64
    limit.check("new", 5.0)  # the table was full of expired keys
    assert limit.evicted == 0
    assert len(limit) == 64
    assert limit.sweep(5.0) == 63  # all but "new" (TAT 5.1)
    assert len(limit) == 1


def test_keys_with_odd_characters() -> None:
    limit = Gcra(1, 1.0)
    for key in ("", "\x00", "\ud800", "é" * 10_000, "a\r\nb"):
        assert limit.check(key, 0.0).allowed
        assert not limit.check(key, 0.0).allowed


@pytest.mark.parametrize(
    "args",
    [
        (0, 1.0),
        (-1, 1.0),
        (True, 1.0),
        (1.5, 1.0),
        (10**400, 1.0),
        (1, 0.0),
        (1, -1.0),
        (1, math.inf),
        (1, math.nan),
        (1, "1"),
        (1, 1.0, -1),
        (1, 1.0, 10**400),
        (1, 1e308, 10**10),
    ],
)
def test_hostile_parameters_are_refused(args) -> None:
    with pytest.raises(ValueError):
        Gcra(*args)
    with pytest.raises(ValueError):
        Gcra(1, 1.0, penalty=math.inf)
    with pytest.raises(ValueError):
        Gcra(1, 1.0, max_keys=0)
