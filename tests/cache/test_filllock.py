"""Node-wide fill locks (verge.cache.filllock): held across processes, let go on death."""

from __future__ import annotations

import subprocess
import sys

from verge.cache.filllock import NodeFillLocks

HOLDER = """
import sys
from verge.cache.filllock import NodeFillLocks
locks = NodeFillLocks(sys.argv[1])
assert locks.try_acquire("site/hot") is not None
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_lock_held_by_another_worker_is_refused_until_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        locks = NodeFillLocks(tmp_path)
        assert locks.try_acquire("site/hot") is None
        other = locks.try_acquire("site/cold")
        assert other is not None
        locks.release(other)
        holder.kill()  # as kill -9: the kernel lets go of its locks
        holder.wait(10)
        stripe = locks.try_acquire("site/hot")
        assert stripe is not None
        locks.release(stripe)
    finally:
        holder.kill()
        holder.wait(10)


def test_one_worker_may_hold_a_stripe_for_two_fills(tmp_path):
    locks = NodeFillLocks(tmp_path)
    first = locks.try_acquire("k")
    second = locks.try_acquire("k")
    assert first == second is not None
    locks.release(first)
    assert locks.held == {first: 1}
    locks.release(second)
    assert locks.held == {}


def test_pass_marks_are_shared_and_expire(tmp_path):
    one, two = NodeFillLocks(tmp_path), NodeFillLocks(tmp_path)
    assert not two.passing("k")
    one.mark_pass("k", 60)
    assert two.passing("k")
    one.mark_pass("k", -1)
    assert not two.passing("k")
