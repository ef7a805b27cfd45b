"""The shared-memory GCRA table: exact across processes, bounded, robust to bad input.

The cross-process test is the node's situation: two worker processes (real ones, started
with the table's file descriptor as the supervisor would pass it) spend the same keys' burst
at the same instant, on both cores at once; together they must get exactly burst + 1 per
key, never more (a lost update would show up as an extra pass).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from verge.protect.shared import BUCKET, HEADER_SIZE, SLOTS_PER_BUCKET, SharedTable

WORKER = """
import sys
from verge.protect.shared import SharedTable
fd, checks, burst = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
limit = SharedTable.attach(fd).limit("svc/login", 5, 60, burst)
keys = [f"api-key-{i}" for i in range(8)]
print("ready", flush=True)
sys.stdin.readline()  # go
limit.update(f"started-{sys.argv[4]}", 5000.0)  # a barrier through the table itself
while limit.state(f"started-{1 - int(sys.argv[4])}", 5000.0)[0] is None:
    pass
allowed = dict.fromkeys(keys, 0)
for index in range(checks):
    key = keys[index % len(keys)]
    if limit.update(key, 5000.0) > 0:
        allowed[key] += 1
print(" ".join(str(allowed[k]) for k in keys), flush=True)
"""


def _start_worker(table: SharedTable, checks: int, burst: int, index: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(table.fileno()), str(checks), str(burst), str(index)],
        pass_fds=(table.fileno(),),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def test_two_workers_together_get_exactly_the_burst() -> None:
    table = SharedTable.create()
    burst = 1500
    workers = [_start_worker(table, 16_000, burst, index) for index in range(2)]
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    counts = []
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        counts.append([int(n) for n in out.split()])
    per_key = [a + b for a, b in zip(*counts, strict=True)]
    assert per_key == [burst + 1] * 8  # (usually split between the two, e.g. 700 + 801)
    limit = table.limit("svc/login", 5, 60, burst)
    assert not limit.check("api-key-0", 5000.0).allowed  # and this process sees it too
    table.close()


def test_scopes_keep_rules_apart() -> None:
    table = SharedTable.create(buckets=4)
    login = table.limit("a/login", 1, 60)
    api = table.limit("b/login", 1, 60)
    assert login.check("k", 1.0).allowed
    assert api.check("k", 1.0).allowed
    assert not login.check("k", 1.0).allowed
    table.close()


def test_a_full_bucket_evicts_the_key_closest_to_expiry() -> None:
    table = SharedTable.create(buckets=1)  # every key in one bucket of 8 slots
    limit = table.limit("s/r", 1, 10)
    for index in range(SLOTS_PER_BUCKET):
        assert limit.check(f"k{index}", 100.0 + index / 10).allowed
    assert limit.check("newcomer", 101.0).allowed
    assert limit.evicted == 1
    assert limit.check("k0", 101.0).allowed  # k0 (TAT 110, the soonest) was forgotten
    assert not limit.check("k7", 101.0).allowed  # the others were kept
    table.close()


def test_expired_slots_are_reused_without_eviction() -> None:
    table = SharedTable.create(buckets=1)
    limit = table.limit("s/r", 1, 1)
    for index in range(SLOTS_PER_BUCKET):
        limit.check(f"k{index}", 0.0)
    assert limit.check("late", 10.0).allowed
    assert limit.evicted == 0
    table.close()


def test_state_from_a_looser_rule_is_not_trusted() -> None:
    """A config reload makes a rule stricter: TATs further ahead than the new rule can
    produce are stale and reset (permissive), not obeyed for the old, longer time."""
    table = SharedTable.create()
    loose = table.limit("s/r", 1, 3600, 100)
    for _ in range(100):
        loose.check("k", 0.0)
    strict = table.limit("s/r", 1, 1)
    assert strict.check("k", 0.0).allowed
    table.close()


def test_penalty_box_in_the_shared_table() -> None:
    table = SharedTable.create()
    limit = table.limit("s/login", 5, 60, penalty=600.0)
    assert limit.check("k", 0.0).allowed
    first = limit.check("k", 1.0)
    assert not first.allowed and first.retry_after == pytest.approx(600.0)
    assert limit.check("k", 300.0).retry_after == pytest.approx(301.0)
    assert limit.check("k", 601.0).allowed
    table.close()


def test_odd_keys() -> None:
    table = SharedTable.create()
    limit = table.limit("s/r", 1, 60)
    for key in ("", "\x00", "\ud800\udfff", "é" * 50_000):
        assert limit.check(key, 1.0).allowed
        assert not limit.check(key, 1.0).allowed
    table.close()


def test_attach_refuses_what_is_not_a_table() -> None:
    fd = os.memfd_create("not-a-table")
    try:
        with pytest.raises(ValueError):
            SharedTable.attach(fd)
        os.ftruncate(fd, HEADER_SIZE + BUCKET.size)
        with pytest.raises(ValueError):
            SharedTable.attach(fd)
    finally:
        os.close(fd)
    for buckets in (0, -1, 2**40, True, 1.5):
        with pytest.raises(ValueError):
            SharedTable.create(buckets)
