"""Node-wide fill locks (verge.cache.filllock): held across processes, let go on death."""

from __future__ import annotations

import multiprocessing

from verge.cache.filllock import NodeFillLocks


def _hold(root, key, ready, done) -> None:
    locks = NodeFillLocks(root)
    assert locks.try_acquire(key) is not None
    ready.set()
    done.wait(10)


def test_a_lock_held_by_another_worker_is_refused_until_it_dies(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, "site/hot", ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        locks = NodeFillLocks(tmp_path)
        assert locks.try_acquire("site/hot") is None
        other = locks.try_acquire("site/cold")
        assert other is not None
        locks.release(other)
        holder.kill()  # as kill -9: the kernel lets go of its locks
        holder.join(10)
        stripe = locks.try_acquire("site/hot")
        assert stripe is not None
        locks.release(stripe)
    finally:
        done.set()
        holder.join(10)


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
