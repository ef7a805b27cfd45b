"""Disk tier: atomic publish, never a half-written object, shared by workers, rebuilt after crashes.

Everything runs on real files in ``tmp_path``; the crash tests kill real writer processes
with SIGKILL and check every object a fresh store returns against a body derived from its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.cache.disk import (
    TOUCH_FLUSH_INTERVAL,
    DiskEntry,
    DiskStore,
    _prefix_upper_bound,
    object_hash,
    sweep_dead_writers,
)

GIB = 1 << 30


def body_for(key: str, gen: int = 0, small: bool = False) -> bytes:
    """A body that only this (key, generation) has, of a length derived from both."""
    seed = hashlib.sha256(f"{key}|{gen}|{small}".encode()).digest()
    length = 1 + (seed[0] if small else int.from_bytes(seed[:2], "big") * 3)  # 256 B / 196 KB
    return (seed * (length // len(seed) + 1))[:length]


def put(
    store: DiskStore, key: str, variant: str = "", gen: int = 0, tags=(), chunk=4096
) -> DiskEntry:
    body = body_for(key, gen)
    writer = store.writer(key, variant)
    for offset in range(0, len(body), chunk):
        writer.write(body[offset : offset + chunk])
    return writer.commit({"key": key, "gen": gen, "headers": [["x", "y"]]}, tags)


def read_body(entry: DiskEntry) -> bytes:
    fd = entry.open()
    try:
        return os.pread(fd, entry.body_size + 1, 0)
    finally:
        os.close(fd)


def object_files(root: Path, suffix: str = "") -> list[Path]:
    return sorted(p for p in (root / "objects").rglob(f"*{suffix}") if p.is_file())


def scratch_files(root: Path) -> list[Path]:
    """Temp files in the writers' scratch directories (``writing/PID-TOKEN/``)."""
    return sorted(p for p in (root / "writing").rglob("*") if p.is_file())


def meta_path(root: Path, key: str, variant: str = "") -> Path:
    digest = object_hash(key, variant)
    return root / "objects" / digest[:2] / digest[2:4] / f"{digest}.meta"


def mark_crashed(root: Path) -> None:
    """Leave the marker of a worker that died without closing (as kill -9 does)."""
    (root / "procs" / "4242-dead").touch()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    s = DiskStore(tmp_path, GIB)
    yield s
    s.close()


# ----- write, commit, look up ---------------------------------------------------------------
def test_round_trip(store, tmp_path):
    entry = put(store, "https://a.example/x.css", tags=["css", "site-a"])
    found = store.lookup("https://a.example/x.css", "")
    assert found is not None
    assert found.meta == {"key": "https://a.example/x.css", "gen": 0, "headers": [["x", "y"]]}
    assert found.body_size == entry.body_size == len(body_for("https://a.example/x.css"))
    assert found.body_path == entry.body_path
    assert read_body(found) == body_for("https://a.example/x.css")
    assert store.used_bytes == found.body_size
    assert store.lookup("https://a.example/x.css", "other-variant") is None
    assert store.lookup("https://a.example/missing", "") is None


def test_keys_and_variants_are_arbitrary_strings(store):
    odd = ["", "a\0b", "ü/../..", "k" * 5000, "\U0010ffff", "a\nb\tc"]
    for i, key in enumerate(odd):
        put(store, key, variant=odd[-1 - i], gen=i)
    for i, key in enumerate(odd):
        found = store.lookup(key, odd[-1 - i])
        assert found is not None and read_body(found) == body_for(key, i)


def test_empty_body(store):
    writer = store.writer("empty", "")
    writer.commit({"status": 204})
    found = store.lookup("empty", "")
    assert found is not None and found.body_size == 0 and read_body(found) == b""


def test_readers_pread_from_the_writer_while_the_body_arrives(store):
    writer = store.writer("k", "")
    writer.write(b"hello ")
    assert os.pread(writer.fd, 100, 0) == b"hello "
    own = writer.open()
    writer.write(b"world")
    assert writer.written == 11
    writer.commit({})
    assert writer.fd == -1
    try:
        assert os.pread(own, 100, 0) == b"hello world"
    finally:
        os.close(own)


def test_abort_leaves_nothing(store, tmp_path):
    writer = store.writer("k", "v")
    writer.write(b"x" * 10_000)
    writer.abort()
    writer.abort()
    assert object_files(tmp_path) == []
    assert store.lookup("k", "v") is None
    assert store.used_bytes == 0
    with pytest.raises(ValueError):
        writer.write(b"more")
    with pytest.raises(ValueError):
        writer.commit({})


def test_commit_of_unserialisable_meta_aborts(store, tmp_path):
    writer = store.writer("k", "")
    writer.write(b"data")
    with pytest.raises(TypeError):
        writer.commit({"bad": object()})
    assert object_files(tmp_path) == []
    assert store.lookup("k", "") is None


def test_close_aborts_unfinished_writers(tmp_path):
    store = DiskStore(tmp_path, GIB)
    store.writer("k", "").write(b"partial")
    store.close()
    assert object_files(tmp_path) == []


# ----- never a half-written object --------------------------------------------------------------
def test_body_without_commit_is_invisible_to_other_workers(store, tmp_path):
    writer = store.writer("k", "")
    writer.write(b"x" * 1000)
    other = DiskStore(tmp_path, GIB)
    try:
        assert other.lookup("k", "") is None
        assert other.keys_with_prefix("") == []
    finally:
        other.close()
        writer.abort()


def test_meta_naming_a_short_body_is_absent_and_cleaned(store, tmp_path):
    entry = put(store, "k", tags=["t"])
    os.truncate(entry.body_path, entry.body_size - 1)
    assert store.lookup("k", "") is None
    store.drain()  # the clean-up is the writer thread's
    assert object_files(tmp_path) == []
    assert store.keys_with_tag("t") == [] and store.used_bytes == 0


def test_meta_naming_a_missing_body_is_absent_and_cleaned(store, tmp_path):
    entry = put(store, "k")
    os.unlink(entry.body_path)
    assert store.lookup("k", "") is None
    store.drain()
    assert not meta_path(tmp_path, "k").exists()
    assert store.keys_with_prefix("") == []


def test_garbled_meta_is_absent(store, tmp_path):
    put(store, "k")
    meta_path(tmp_path, "k").write_bytes(b'{"format": 1, "key": "k", "va')
    assert store.lookup("k", "") is None
    store.drain()
    assert object_files(tmp_path) == []


def test_replaced_object_stays_readable_to_an_open_reader(store, tmp_path):
    old = put(store, "k", gen=1)
    fd = store.lookup("k", "").open()
    try:
        put(store, "k", gen=2)
        assert os.pread(fd, old.body_size + 1, 0) == body_for("k", 1)
    finally:
        os.close(fd)
    found = store.lookup("k", "")
    assert found.meta["gen"] == 2 and read_body(found) == body_for("k", 2)
    assert len(object_files(tmp_path, ".body")) == 1
    assert store.used_bytes == found.body_size


def test_update_meta_replaces_meta_and_keeps_body(store, tmp_path):
    put(store, "k", tags=["t"])
    assert store.update_meta("k", "", {"status": 200, "invalidated": True}) is True
    found = store.lookup("k", "")
    assert found.meta == {"status": 200, "invalidated": True}
    assert read_body(found) == body_for("k")
    assert store.keys_with_tag("t") == [("k", "")]
    assert store.update_meta("absent", "", {}) is False
    assert object_files(tmp_path, ".mtmp") == []


# ----- index: rebuild and reconciliation --------------------------------------------------------
def fill_sample(store: DiskStore) -> None:
    put(store, "/a/1", tags=["a", "all"])
    put(store, "/a/2", tags=["a", "all"])
    put(store, "/b/1", tags=["all"])
    put(store, "/v", variant="accept-encoding=gzip", gen=1)
    put(store, "/v", variant="accept-encoding", gen=2)
    store.set_vary("/a/1", ())
    store.set_vary("/a/2", ())
    store.set_vary("/b/1", ())
    store.set_vary("/v", ("accept-encoding",))
    store.update_meta("/b/1", "", {"refreshed": True})


def assert_sample(store: DiskStore) -> None:
    assert store.keys_with_prefix("/a/") == [("/a/1", ""), ("/a/2", "")]
    assert store.keys_with_tag("all") == [("/a/1", ""), ("/a/2", ""), ("/b/1", "")]
    assert store.get_vary("/v") == ("accept-encoding",)
    assert store.get_vary("/a/1") == ()
    assert read_body(store.lookup("/v", "accept-encoding=gzip")) == body_for("/v", 1)
    assert store.lookup("/b/1", "").meta == {"refreshed": True}
    total = sum(p.stat().st_size for p in object_files(Path(store.root), ".body"))
    assert store.used_bytes == total


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_lost_index_is_rebuilt_from_metas(tmp_path, damage):
    with DiskStore(tmp_path, GIB) as store:
        fill_sample(store)
        assert_sample(store)
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    if damage == "garbage":
        (tmp_path / "index.db").write_bytes(b"this is not a database" * 500)
    with DiskStore(tmp_path, GIB) as store:
        assert_sample(store)


def test_clean_restart_keeps_everything(tmp_path):
    with DiskStore(tmp_path, GIB) as store:
        fill_sample(store)
    assert os.listdir(tmp_path / "procs") == []
    with DiskStore(tmp_path, GIB) as store:
        assert_sample(store)


def test_restart_after_crash_removes_orphans(tmp_path):
    with DiskStore(tmp_path, GIB) as store:
        fill_sample(store)
        kept = put(store, "/kept")
    digest = object_hash("/orphan", "")
    directory = tmp_path / "objects" / digest[:2] / digest[2:4]
    directory.mkdir(parents=True, exist_ok=True)
    leftovers = [
        directory / f"{digest}.0001.tmp",  # body still being written
        directory / f"{digest}.0002.body",  # body renamed, meta never written
        directory / f"{digest}.0002.mtmp",  # meta written, never renamed
        Path(kept.body_path).with_name(f"{object_hash('/kept', '')}.0003.body"),
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    mark_crashed(tmp_path)
    with DiskStore(tmp_path, GIB) as store:
        assert not any(p.exists() for p in leftovers)
        assert store.lookup("/orphan", "") is None
        assert read_body(store.lookup("/kept", "")) == body_for("/kept")
        assert_sample(store)
        assert len(object_files(tmp_path, ".body")) == len(store.keys_with_prefix(""))


def test_restart_after_crash_reindexes_a_meta_the_index_missed(tmp_path):
    """kill -9 after the meta rename but before the index transaction committed."""
    with DiskStore(tmp_path, GIB) as store:
        put(store, "/x", tags=["t"])
        put(store, "/gone")
    with sqlite3.connect(tmp_path / "index.db") as db:
        db.execute("DELETE FROM entries WHERE key = '/x'")
        db.execute("DELETE FROM tags WHERE key = '/x'")
    meta_path(tmp_path, "/gone").unlink()  # ... and a remove that unlinked the meta only
    mark_crashed(tmp_path)
    with DiskStore(tmp_path, GIB) as store:
        assert store.keys_with_tag("t") == [("/x", "")]
        assert store.keys_with_prefix("") == [("/x", "")]
        assert store.used_bytes == len(body_for("/x"))
        assert len(object_files(tmp_path, ".body")) == 1


# ----- several workers on one directory ----------------------------------------------------------
def test_two_workers_see_each_others_commits(tmp_path):
    with DiskStore(tmp_path, GIB) as one, DiskStore(tmp_path, GIB) as two:
        put(one, "/from-one", tags=["t"])
        put(two, "/from-two", tags=["t"])
        two.set_vary("/from-one", ("accept",))
        for store in (one, two):
            assert read_body(store.lookup("/from-two", "")) == body_for("/from-two")
            assert read_body(store.lookup("/from-one", "")) == body_for("/from-one")
            assert store.keys_with_tag("t") == [("/from-one", ""), ("/from-two", "")]
            assert store.get_vary("/from-one") == ("accept",)
        assert one.used_bytes == two.used_bytes
        assert two.remove("/from-one") == 1
        assert one.lookup("/from-one", "") is None
        put(one, "/from-two", gen=5)
        assert two.lookup("/from-two", "").meta["gen"] == 5
        assert len(object_files(tmp_path, ".body")) == 1


def test_a_late_worker_does_not_disturb_a_running_one(tmp_path):
    first = DiskStore(tmp_path, GIB)
    writer = first.writer("/streaming", "")
    writer.write(b"part one ")
    mark_crashed(tmp_path)  # even with a dead worker's marker, a running one blocks the scan
    with DiskStore(tmp_path, GIB) as late:
        assert late.lookup("/streaming", "") is None
    writer.write(b"part two")
    writer.commit({})
    assert read_body(first.lookup("/streaming", "")) == b"part one part two"
    first.close()


# ----- the writer thread: index writes never stall the caller's thread ---------------------------
HOLD_LOCK = textwrap.dedent(
    """
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("holding", flush=True)
    sys.stdin.readline()
    db.execute("COMMIT")
    print("released", flush=True)
    """
)
READ_ELSEWHERE = textwrap.dedent(
    """
    import json, os, sys
    from verge.cache.disk import DiskStore

    with DiskStore(sys.argv[1], 1 << 30) as store:
        entry = store.lookup(sys.argv[2], sys.argv[3])
        if entry is None:
            print(json.dumps(None))
        else:
            fd = entry.open()
            body = os.pread(fd, entry.body_size, 0).decode()
            os.close(fd)
            print(json.dumps([body, entry.meta, store.get_vary(sys.argv[2])]))
    """
)
FAST = 1.0  # seconds: far below the 10 s busy timeout that a blocked call would wait


@contextlib.contextmanager
def index_lock_held(root: Path) -> Iterator[Callable[[], None]]:
    """Another process holds the index write lock (BEGIN IMMEDIATE) until ``release()``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root / "index.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def release() -> None:
        if not proc.stdin.closed:
            proc.stdin.close()
            assert proc.stdout.readline() == "released\n"

    try:
        assert proc.stdout.readline() == "holding\n"
        yield release
        release()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def read_in_another_process(root: Path, key: str, variant: str = "") -> list | None:
    """[body, meta, vary] of an object as a freshly started process sees it (None: absent)."""
    project = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", READ_ELSEWHERE, str(root), key, variant],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(done.stdout)


def test_a_locked_index_holds_up_only_the_writer_thread(store, tmp_path):
    put(store, "/old", tags=["t"])
    store.set_vary("/old", ())
    with index_lock_held(tmp_path) as release:
        store.touch("/old", "")
        started = time.monotonic()
        flushed = store.flush()  # handed over, not written: returns at once
        removed = store.later(store.remove, "/old")
        # reads go on through the query-only connection (WAL: no reader waits for a writer)
        assert store.lookup("/old", "").meta["gen"] == 0
        assert store.keys_with_tag("t") == [("/old", "")]
        assert store.get_vary("/old") == ()
        assert store.used_bytes == len(body_for("/old"))
        assert time.monotonic() - started < FAST
        assert not removed.done() and not flushed.done()  # the writer thread waits its turn
        release()
        assert removed.result(timeout=10) == 1
    assert flushed.done() and store.lookup("/old", "") is None


def test_writes_queued_by_one_process_run_in_order(store):
    done: list[str] = []
    put(store, "/k")
    futures = [
        store.later(store.update_meta, "/k", "", {"step": 1}),
        store.later(done.append, "after update"),
        store.later(store.remove, "/k"),
        store.later(done.append, "after remove"),
    ]
    store.drain()
    assert all(f.done() for f in futures) and futures[0].result() is True
    assert done == ["after update", "after remove"] and store.lookup("/k", "") is None


async def test_commit_async_keeps_the_fd_for_readers_until_published(store, tmp_path):
    writer = store.writer("/new", "")
    writer.write(b"streamed body")
    with index_lock_held(tmp_path) as release:
        commit = asyncio.ensure_future(writer.commit_async({"gen": 7}, ["t"], vary=("accept",)))
        await asyncio.sleep(0)  # (the job is on the writer thread, blocked by the lock)
        assert not commit.done()
        assert os.pread(writer.fd, 100, 0) == b"streamed body"  # readers of the fill go on
        with pytest.raises(ValueError):
            writer.write(b"more")  # the size is in the meta being published
        assert store.lookup("/new", "") is None
        release()
        entry = await asyncio.wait_for(commit, 10)
    assert writer.fd == -1 and read_body(entry) == b"streamed body"
    seen = read_in_another_process(tmp_path, "/new")
    assert seen == ["streamed body", {"gen": 7}, ["accept"]]
    assert store.keys_with_tag("t") == [("/new", "")]


async def test_a_cancelled_commit_still_publishes_and_closes_its_fd(store, tmp_path):
    writer = store.writer("/c", "")
    writer.write(b"body")
    with index_lock_held(tmp_path) as release:
        commit = asyncio.ensure_future(writer.commit_async({}))
        await asyncio.sleep(0)
        commit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await commit
        release()
        await asyncio.wait_for(asyncio.to_thread(store.drain), 10)
    await asyncio.sleep(0)  # the settling callback runs on the loop
    assert writer.fd == -1 and read_body(store.lookup("/c", "")) == b"body"


# ----- purge and vary ---------------------------------------------------------------------------
def test_purge_by_prefix_and_tag(store, tmp_path):
    for key in ["/img/a.png", "/img/b.png", "/img%/c", "/img_x", "/imh", "/css/a.css"]:
        put(store, key, tags=["img"] if key.startswith("/img/") else ["other"])
    put(store, "/img/a.png", variant="gzip", tags=["img", "gz"])
    assert store.keys_with_prefix("/img/") == [
        ("/img/a.png", ""),
        ("/img/a.png", "gzip"),
        ("/img/b.png", ""),
    ]
    assert store.keys_with_prefix("/img%") == [("/img%/c", "")]
    assert store.keys_with_tag("gz") == [("/img/a.png", "gzip")]
    for key, variant in store.keys_with_tag("img"):
        store.remove(key, variant)
    assert store.keys_with_prefix("/img/") == []
    assert store.keys_with_tag("gz") == []
    assert len(store.keys_with_prefix("")) == 4
    assert store.remove("/css/a.css") == 1
    assert store.remove("/css/a.css") == 0
    remaining = sum(len(body_for(k)) for k in ["/img%/c", "/img_x", "/imh"])
    assert store.used_bytes == remaining
    assert len(object_files(tmp_path, ".body")) == 3


def test_remove_all_variants(store):
    put(store, "/v", "a")
    put(store, "/v", "b")
    put(store, "/vv", "a")
    assert store.remove("/v") == 2
    assert store.keys_with_prefix("") == [("/vv", "a")]


@given(
    keys=st.lists(st.text(max_size=4), max_size=12),
    prefix=st.text(max_size=3),
)
@settings(max_examples=300, deadline=None)
def test_prefix_range_matches_startswith(keys, prefix):
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t(key TEXT PRIMARY KEY)")
    keys = [k for k in set(keys) if not any(0xD800 <= ord(c) <= 0xDFFF for c in k)]
    db.executemany("INSERT INTO t VALUES (?)", [(k,) for k in keys])
    prefix = "".join(c for c in prefix if not 0xD800 <= ord(c) <= 0xDFFF)
    upper = _prefix_upper_bound(prefix)
    if upper is None:
        rows = db.execute("SELECT key FROM t WHERE key >= ?", (prefix,))
    else:
        rows = db.execute("SELECT key FROM t WHERE key >= ? AND key < ?", (prefix, upper))
    assert sorted(r[0] for r in rows) == sorted(k for k in keys if k.startswith(prefix))


def test_prefix_bound_edges():
    assert _prefix_upper_bound("") is None
    assert _prefix_upper_bound("a") == "b"
    assert _prefix_upper_bound("a\U0010ffff") == "b"
    assert _prefix_upper_bound("\ud7ff") == "\ue000"
    assert _prefix_upper_bound("\U0010ffff") is None


def test_vary_fields(store, tmp_path):
    assert store.get_vary("/k") is None
    store.set_vary("/k", ("accept-encoding", "accept-language"))
    assert store.get_vary("/k") == ("accept-encoding", "accept-language")
    put(store, "/k", "gzip\nen")
    put(store, "/k", "br\nde")
    store.set_vary("/k", ("accept-encoding",))
    assert store.get_vary("/k") == ("accept-encoding",)
    store.set_vary("/plain", ())
    assert store.get_vary("/plain") == ()
    assert store.remove("/k", "gzip\nen") == 1
    assert store.get_vary("/k") == ("accept-encoding",)  # one variant left
    assert store.remove("/k") == 1
    assert store.get_vary("/k") is None


def test_vary_survives_restart_and_goes_with_the_last_variant(tmp_path):
    clock = Clock()
    with DiskStore(tmp_path, GIB, clock=clock) as store:
        put(store, "/k", "gzip")
        store.set_vary("/k", ("accept-encoding",))
    with DiskStore(tmp_path, 0, clock=clock) as store:
        assert store.get_vary("/k") == ("accept-encoding",)
        assert store.enforce_capacity() > 0
        assert store.get_vary("/k") is None


# ----- capacity ---------------------------------------------------------------------------------
def put_sized(store: DiskStore, key: str, size: int) -> None:
    writer = store.writer(key, "")
    writer.write(b"x" * size)
    writer.commit({"key": key})


def test_capacity_evicts_least_recently_used(tmp_path):
    clock = Clock()
    with DiskStore(tmp_path, 3000, clock=clock) as store:
        for key in ["a", "b", "c"]:
            put_sized(store, key, 1000)
            clock.now += 1
        assert store.enforce_capacity() == 0
        store.touch("a", "")
        store.flush()
        clock.now += 1
        put_sized(store, "d", 1000)  # a commit over capacity evicts
        assert store.lookup("b", "") is None
        assert [k for k in "acd" if store.lookup(k, "")] == ["a", "c", "d"]
        assert store.used_bytes == 3000
        store.capacity_bytes = 1500
        assert store.enforce_capacity() == 2000
        assert [k for k in "acd" if store.lookup(k, "")] == ["d"]
    assert len(object_files(tmp_path)) == 2  # d's meta and body


def test_touches_are_batched(tmp_path):
    clock = Clock()
    with DiskStore(tmp_path, 10_000, clock=clock) as toucher:
        for key in ["a", "b"]:
            put_sized(toucher, key, 1000)
            clock.now += 0.1
        with DiskStore(tmp_path, 10_000, clock=clock) as evictor:
            toucher.touch("a", "")  # buffered: not yet in the index
            evictor.capacity_bytes = 1000
            assert evictor.enforce_capacity() == 1000
            assert evictor.lookup("a", "") is None and evictor.lookup("b", "")
            put_sized(toucher, "a", 1000)
            clock.now += TOUCH_FLUSH_INTERVAL
            toucher.touch("b", "")  # more than a second since the last flush: handed over
            toucher.drain()  # (written by the writer thread)
            evictor.capacity_bytes = 1000
            assert evictor.enforce_capacity() == 1000
            assert evictor.lookup("a", "") is None and evictor.lookup("b", "")


def test_fsync_mode(tmp_path):
    with DiskStore(tmp_path, GIB, fsync=True) as store:
        put(store, "k")
        assert read_body(store.lookup("k", "")) == body_for("k")


# ----- real crashes -----------------------------------------------------------------------------
CHILD = inspect.getsource(body_for) + textwrap.dedent(
    """
    import asyncio, sys
    from verge.cache.disk import DiskStore

    root, start, step, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    small, mode, capacity = sys.argv[5] == "small", sys.argv[6], int(sys.argv[7])

    async def commit(writer, i):
        meta, tags = {"gen": i, "small": small}, [f"t{i % 3}"]
        if mode == "async":  # as the edge does: the writer thread publishes, the loop runs on
            await writer.commit_async(meta, tags, vary=())
        else:  # (a new key's Vary goes in with the object: one transaction)
            writer.commit(meta, tags, vary=())

    async def main():
        store = DiskStore(root, capacity)
        i = start
        while True:
            key = f"obj/{i % keys}"
            body = body_for(key, i, small)
            writer = store.writer(key, "")
            for offset in range(0, len(body), 2048):
                writer.write(body[offset : offset + 2048])
                if offset == 0:
                    print("writing", i, flush=True)
            print("committing", i, flush=True)
            await commit(writer, i)
            print("committed", i, flush=True)
            i += step

    asyncio.run(main())
    """
)
KEYS = 40


def spawn_writer(
    root: Path,
    start: int,
    step: int = 1,
    small: bool = False,
    mode: str = "sync",
    capacity: int = GIB,
) -> subprocess.Popen:
    """A writer process committing objects ``obj/N`` forever ("writing", "committing" and
    "committed" lines); ``mode`` "async" commits with commit_async on an event loop."""
    project = Path(__file__).resolve().parents[2]
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import hashlib\n" + CHILD,
            str(root),
            str(start),
            str(step),
            str(KEYS),
            "small" if small else "large",
            mode,
            str(capacity),
        ],
        cwd=project,
        stdout=subprocess.PIPE,
        text=True,
    )


def run_until(proc: subprocess.Popen, commits: int, kill_on: str) -> dict[str, int]:
    """Follow the child's progress and SIGKILL it on the ``kill_on`` line of a gen >= commits.

    Returns the last acknowledged (committed) gen per key.
    """
    acked: dict[str, int] = {}
    for line in proc.stdout:
        what, i = line.split()
        if what == "committed":
            acked[f"obj/{int(i) % KEYS}"] = int(i)
        if what == kill_on and int(i) >= commits:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return acked


def verify_store(root: Path) -> dict[str, int]:
    """Open like a restarted worker; every object must be complete and correct. Gen per key."""
    found: dict[str, int] = {}
    with DiskStore(root, 1 << 30) as store:
        for k in range(KEYS):
            key = f"obj/{k}"
            entry = store.lookup(key, "")
            if entry is None:
                continue
            gen = entry.meta["gen"]
            assert read_body(entry) == body_for(key, gen, entry.meta["small"]), key
            assert (key, "") in store.keys_with_tag(f"t{gen % 3}")
            assert store.get_vary(key) == ()
            found[key] = gen
        assert sorted(store.keys_with_prefix("")) == sorted((k, "") for k in found)
        bodies = object_files(root, ".body")
        assert len(bodies) == len(found)
        assert store.used_bytes == sum(p.stat().st_size for p in bodies)
    assert object_files(root, ".tmp") == [] and object_files(root, ".mtmp") == []
    assert scratch_files(root) == []
    return found


@pytest.mark.timeout(60)
def test_kill_9_mid_write_never_serves_a_half_written_object(tmp_path):
    start = 0
    rounds = [  # (commits before the kill, kill after which line, small bodies?)
        (5, "writing", False),
        (47, "writing", False),
        (300, "committed", True),  # small bodies: the kill often lands inside a commit
        (30, "committed", False),
        (12, "writing", False),
    ]
    for commits, kill_on, small in rounds:
        proc = spawn_writer(tmp_path, start, small=small)
        acked = run_until(proc, start + commits, kill_on)
        found = verify_store(tmp_path)
        for key, gen in acked.items():
            assert found.get(key, -1) >= gen, f"{key}: acknowledged gen {gen} lost"
        start = max(found.values()) + 1


@pytest.mark.timeout(60)
def test_kill_9_during_a_commit_on_the_writer_thread(tmp_path):
    """The edge's way: commit_async, the writer thread mid-publish (or mid-eviction) when
    the process is killed."""
    start = 0
    rounds = [  # (commits before the kill, kill after which line, small bodies?)
        (40, "committing", False),
        (300, "committing", True),  # small bodies: the publish job is often half done
        (25, "committed", False),
    ]
    for commits, kill_on, small in rounds:
        proc = spawn_writer(tmp_path, start, small=small, mode="async")
        acked = run_until(proc, start + commits, kill_on)
        found = verify_store(tmp_path)
        for key, gen in acked.items():
            assert found.get(key, -1) >= gen, f"{key}: acknowledged gen {gen} lost"
        start = max(found.values()) + 1
    # over capacity: every commit evicts on the writer thread too
    proc = spawn_writer(tmp_path, start, mode="async", capacity=400_000)
    run_until(proc, start + 60, "committing")
    verify_store(tmp_path)


@pytest.mark.timeout(60)
def test_kill_9_of_two_workers_writing_the_same_keys(tmp_path):
    one = spawn_writer(tmp_path, 0, step=2, small=True)
    two = spawn_writer(tmp_path, 1, step=2, mode="async")
    acked = run_until(one, 400, "committed")
    acked_two = run_until(two, 41, "writing")
    found = verify_store(tmp_path)
    assert set(acked) | set(acked_two) <= set(found)


# ----- temp files of dead writers -----------------------------------------------------------------
SLOW_FILL = textwrap.dedent(
    """
    import sys, time
    from verge.cache.disk import DiskStore

    store = DiskStore(sys.argv[1], 1 << 30)
    writer = store.writer("slow", "")
    writer.write(b"x" * 65536)  # the first part of a slow origin's body
    print("filling", flush=True)
    time.sleep(60)
    """
)


def kill_mid_fill(root: Path) -> int:
    """A writer process killed with -9 in the middle of a fill; its pid."""
    project = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_FILL, str(root)], cwd=project, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "filling\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return proc.pid


def test_temp_files_live_in_the_writers_own_scratch_directory(store, tmp_path):
    writer = store.writer("k", "")
    writer.write(b"partial")
    (scratch,) = (tmp_path / "writing").iterdir()
    assert scratch.name.startswith(f"{os.getpid()}-")
    assert [p.suffix for p in scratch.iterdir()] == [".tmp"]
    assert object_files(tmp_path) == []  # nothing half-written among the objects
    writer.commit({})
    assert list(scratch.iterdir()) == [] and len(object_files(tmp_path, ".body")) == 1
    store.close()
    assert list((tmp_path / "writing").iterdir()) == []  # a clean close leaves no scratch


def test_sweep_removes_only_dead_writers_files(tmp_path):
    writing = tmp_path / "writing"
    for name, files in (("101-aa", 2), ("102-bb", 1), ("103-cc", 1), ("junk", 1)):
        (writing / name).mkdir(parents=True)
        for i in range(files):
            (writing / name / f"h.{i}.tmp").write_bytes(b"x")
    alive = {102}.__contains__
    assert sweep_dead_writers(tmp_path, pids=[101, 102], alive=alive) == 2
    assert sorted(p.name for p in writing.iterdir()) == ["102-bb", "103-cc", "junk"]
    assert sweep_dead_writers(tmp_path, alive=alive) == 1  # any dead pid: 103 too
    assert sorted(p.name for p in writing.iterdir()) == ["102-bb", "junk"]  # live, unknown
    assert sweep_dead_writers(tmp_path / "nowhere") == 0


def test_a_killed_writers_temp_file_is_swept_and_a_live_fill_survives(tmp_path):
    """kill -9 mid-fill while other processes keep the directory open (no full repair)."""
    store = DiskStore(tmp_path, GIB)
    ours = store.writer("ours", "")
    ours.write(b"in progress")
    pid = kill_mid_fill(tmp_path)
    dead = [p for p in scratch_files(tmp_path) if p.parent.name.startswith(f"{pid}-")]
    assert [p.suffix for p in dead] == [".tmp"] and dead[0].stat().st_size == 65536
    assert store.sweep_dead_writers([pid]) == 1
    assert not dead[0].exists() and not dead[0].parent.exists()
    assert [p.name for p in scratch_files(tmp_path)] == [os.path.basename(ours._path)]
    ours.write(b" and done")
    assert read_body(ours.commit({})) == b"in progress and done"
    store.close()


def test_a_store_that_opens_the_directory_sweeps_dead_writers(tmp_path):
    store = DiskStore(tmp_path, GIB)
    kill_mid_fill(tmp_path)
    assert len(scratch_files(tmp_path)) == 1
    with DiskStore(tmp_path, GIB):  # not the first: no full repair, but the sweep
        assert scratch_files(tmp_path) == []
    store.close()
