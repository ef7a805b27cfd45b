"""The compute phase: edge functions (WebAssembly, WAGI ABI) in the request pipeline.

After the route phase, a function whose routes match the path gets the request first
(compare Cloudflare Workers and Fermyon Spin). It may answer (the response goes to the client
as is), or pass — optionally rewriting the path and headers — and the request carries on
through the cache to the origin. A function that breaks its limits (CPU, memory, response
size, sub-requests) or crashes gets the client a clear 5xx; it is logged with the request id
and its stderr, and counted. Nothing it does can reach the node: see :mod:`verge.compute`.

Invocations run on a small thread pool: a function may use its whole CPU budget, and
``fetch`` sub-requests are synchronous HTTP calls made from that thread. A function that
cannot touch the world (no ``fetch``, no KV writes) is first tried right on the event loop
with a CPU budget of ``INLINE_CPU_MS``: most answer well within it, and skip the hand-over
to a thread and back (and the GIL hand-over that comes with it), which is most of what a
small function costs. One that outruns the budget has had no effect anywhere, so it is run
again on the pool with its full budget, and for ``INLINE_BACKOFF_S`` it goes straight there
(unless a pool run shows it was a one-off, such as a cold first run): the loop is never held
for more than a few milliseconds.

The edge KV (:class:`EdgeKV`) is the control plane's KV replicated to this node: the agent
writes changes to ``CACHE_DIR/control/kv.db`` (SQLite WAL, with the last sequence number) and
tells the workers, which read the new rows into an in-memory dict: a function's read is one
dict lookup, and a node restarted without the control plane starts from the file.

A function granted ``kv_write`` writes through the control plane like the API does: its put
or delete is committed to the node's outbox (:class:`KVOutbox`, ``control/kv-outbox.db``,
fsync'd before the call returns) and set in its worker's memory; the agent ships the outbox
to the control plane, which orders every write of every edge and the API in one sequence
(last writer wins, by kv seq), and the change feed brings the result back to every edge.
While the control plane is away the writes wait in the outbox (bounded: a full outbox makes
the write fail with ``E_FULL``, never drops it) and survive restarts.

Counters live in a :class:`StatsBook` keyed by (function, module version), outside the
deployments: deploying any function, or the same one again, keeps them.

Each worker keeps the last ``LOGS_KEPT`` log records (failures, stderr, load errors) that the
agent collects and ships to the control plane (``verge fn logs``).

A function that cannot run fails closed. When its module does not load (not a valid module,
a memory limit over the runtime's cap, a module artefact that is missing) and no running
version can stand in for it, it is deployed all the same as an *unavailable* stand-in that
claims its routes and answers every request with 503 and Retry-After: a route a function
guards never reaches the origin unguarded. The load error is in the worker's log, in
``verge fn logs``, in the function's stats (``load_error``, ``refused``; the admin's
``/stats``) and counted as an error in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from verge.compute.host import (
    Capabilities,
    FetchRequest,
    FetchResponse,
    HostServices,
    KVFull,
)
from verge.compute.wagi import Answer, CgiRequest
from verge.http.response import Response, write_body

log = logging.getLogger("verge.compute")

MiB = 1024 * 1024
FUNCTION_THREADS = 2
INLINE_CPU_MS = 5.0  # a first, speculative run on the event loop (epoch ticks: 6-8 ms at most)
INLINE_BACKOFF_S = 10.0  # a function that outran it goes to the pool this long
FUNCTION_BODY_LIMIT = 8 * MiB  # a request body a function reads on stdin (larger: 413)
LOGS_KEPT = 200  # log records a worker holds until the agent collects them
MODULE_PREFIX = "sha256:"  # a module the agent fetches from the control plane
KV_FILE = "kv.db"  # under CACHE_DIR/control
OUTBOX_FILE = "kv-outbox.db"  # under CACHE_DIR/control: function writes not yet applied
OUTBOX_MAX_WRITES = 50_000  # pending keys (a pending write of a key replaces the older one)
OUTBOX_MAX_BYTES = 256 * MiB  # keys + values held
OUTBOX_BATCH = 500  # writes the agent sends in one call
OUTBOX_BATCH_BYTES = 4 * MiB  # values in one call (a larger single value goes alone)
OUTBOX_ID_CHARS = 24  # hex digits of an outbox's random id
SETTLED_KEPT = 10_000  # settled records kept for workers to follow
FULL_LOG_INTERVAL_S = 60.0  # a full outbox is logged at most this often per worker
VERSIONS_KEPT = 4  # versions no longer deployed whose own counters a function keeps
UNLOADED = "unloaded"  # the version label of a function that failed to load
UNAVAILABLE_RETRY_AFTER_S = 30  # a function that failed to load: until a redeploy, likely
ANSWERS_SHARED = 64  # a function's distinct small answers whose Response is shared
ANSWER_SHARED_BYTES = 4096  # larger answer bodies get a Response of their own


class EdgeKV:
    """The node's replica of the control plane's KV (SQLite on disk, a dict in memory), plus
    this node's function writes on their way to the control plane (:class:`KVOutbox`).

    The agent (``writer=True``) applies changes from the control plane with :meth:`apply`,
    in one transaction with the new last sequence number. Workers read the same file:
    :meth:`refresh` loads rows newer than what they hold. Function reads (:meth:`get`) touch
    only the dict. A function's write (:meth:`put`, :meth:`delete`) is committed to the
    node's outbox before it returns, then set in the dict (read-your-writes in the worker).

    What a worker shows for a key (:meth:`_resolve`): the node's newest write of it while
    that write is pending, or applied by the control plane at a seq the replica has not yet
    reached; else the replica's row. So neither the change feed nor another worker's refresh
    turns a key back to an older value while the node's own write is on its way; and once
    the control plane has ordered it (last writer wins, in kv seq order), the replica rules.
    Without an outbox file (an edge without a control plane) writes stay in memory.
    """

    def __init__(self, path: str | Path, writer: bool = False,
                 outbox: str | Path | None = None) -> None:
        self.path = Path(path)
        self.writer = writer
        self.seq = 0
        self.data: dict[tuple[str, bytes], bytes] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # writes (function threads) vs refresh (event loop)
        self.outbox: KVOutbox | None = None
        if outbox is not None and not writer and Path(outbox).exists():
            self.outbox = KVOutbox(outbox)
        self._outbox_seen = 0  # the newest outbox row id and settled id this worker has seen
        self._settled_seen = 0
        self._built = False
        self._full_logged = 0.0
        self.refresh()

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None and (self.writer or self.path.exists()):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            if self.writer:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE IF NOT EXISTS kv (namespace TEXT NOT NULL, key BLOB "
                           "NOT NULL, value BLOB, seq INTEGER NOT NULL, "
                           "PRIMARY KEY (namespace, key))")
                db.execute("CREATE INDEX IF NOT EXISTS kv_by_seq ON kv (seq)")
            self._db = db
        return self._db

    # ----- what functions see (KVStore protocol) ----------------------------------------
    def get(self, namespace: str, key: bytes) -> bytes | None:
        return self.data.get((namespace, key))

    def put(self, namespace: str, key: bytes, value: bytes, function: str | None = None) -> None:
        self._write(namespace, key, value, function)

    def delete(self, namespace: str, key: bytes, function: str | None = None) -> None:
        self._write(namespace, key, None, function)

    def _write(self, namespace: str, key: bytes, value: bytes | None,
               function: str | None) -> None:
        """Outbox first (durable when this returns), then memory; KVFull when it is full."""
        with self._lock:
            if self.outbox is not None:
                try:
                    self.outbox.add(namespace, key, value, function)
                except KVFull as exc:
                    self._log_full(exc)
                    raise
            self._set(self.data, (namespace, key), value)

    def _log_full(self, exc: KVFull) -> None:
        now = time.monotonic()
        if now - self._full_logged >= FULL_LOG_INTERVAL_S:
            self._full_logged = now
            log.error("edge KV writes refused (functions get E_FULL): %s; they resume once "
                      "the control plane takes the queued ones", exc)

    # ----- replication ------------------------------------------------------------------------
    def refresh(self) -> int:
        """Load rows with a newer seq than this replica holds (workers); the new seq."""
        db = self._connect()
        if db is None:
            return self.seq
        try:
            if self.writer:  # the agent keeps no copy in memory, only the position
                self.seq = db.execute("SELECT coalesce(max(seq), 0) FROM kv").fetchone()[0]
                return self.seq
            with self._lock:
                if self.outbox is None:
                    self._load_newer(db)
                elif not self._built or self.outbox.pruned_past(self._settled_seen):
                    self._rebuild(db)
                else:
                    self._refresh_with_outbox(db)
        except sqlite3.OperationalError as exc:  # no table yet: the agent has not written
            log.debug("edge KV not readable yet: %s", exc)
        return self.seq

    def _load_newer(self, db: sqlite3.Connection) -> None:
        rows = db.execute("SELECT namespace, key, value, seq FROM kv WHERE seq > ? "
                          "ORDER BY seq", (self.seq,)).fetchall()
        for namespace, key, value, seq in rows:
            self._set(self.data, (namespace, bytes(key)), _blob(value))
            self.seq = max(self.seq, seq)

    def _refresh_with_outbox(self, db: sqlite3.Connection) -> None:
        """New replica rows, the node's writes since the last refresh and the writes the
        agent settled since then (applied and caught up with, or refused): each key as
        :meth:`_resolve` says."""
        outbox = self.outbox
        touched, self._outbox_seen, self._settled_seen = outbox.touched_since(
            self._outbox_seen, self._settled_seen)
        rows = db.execute("SELECT namespace, key, value, seq FROM kv WHERE seq > ? "
                          "ORDER BY seq", (self.seq,)).fetchall()
        local_writes = not outbox.empty()
        for namespace, key, value, seq in rows:
            item = (namespace, bytes(key))
            self.seq = max(self.seq, seq)
            if local_writes and item not in touched:
                local = outbox.newest(*item)
                if local is not None and _local_wins(local[1], seq):
                    self._set(self.data, item, local[0])
                    continue
            if item not in touched:
                self._set(self.data, item, _blob(value))
        for item in touched:
            self._resolve(db, item, self.data)

    def _rebuild(self, db: sqlite3.Connection) -> None:
        """The whole view: the replica, then every key the outbox holds (at start, or when
        this worker fell behind the settled log the agent keeps)."""
        outbox = self.outbox
        self._outbox_seen, self._settled_seen = outbox.positions()
        data: dict[tuple[str, bytes], bytes] = {}
        seq = 0
        for namespace, key, value, row_seq in db.execute(
                "SELECT namespace, key, value, seq FROM kv"):
            seq = max(seq, row_seq)
            if value is not None:
                data[(namespace, bytes(key))] = bytes(value)
        for item in outbox.written_keys():
            self._resolve(db, item, data)
        self.data, self.seq, self._built = data, seq, True

    def _resolve(self, db: sqlite3.Connection, item: tuple[str, bytes],
                 into: dict[tuple[str, bytes], bytes]) -> None:
        """Set ``item`` to the node's newest write of it if that one wins, else the
        replica's value (or nothing)."""
        row = db.execute("SELECT value, seq FROM kv WHERE namespace = ? AND key = ?",
                         item).fetchone()
        local = self.outbox.newest(*item) if self.outbox is not None else None
        if local is not None and _local_wins(local[1], row[1] if row else 0):
            self._set(into, item, local[0])
        else:
            self._set(into, item, _blob(row[0]) if row else None)

    def apply(self, changes: list[dict]) -> int:
        """Persist control-plane changes (``{"seq","namespace","key","value": base64|null}``)
        in one transaction (agent); returns the new last seq. Workers then :meth:`refresh`."""
        db = self._connect()
        assert db is not None and self.writer
        fresh = [c for c in changes if int(c["seq"]) > self.seq]
        if not fresh:
            return self.seq
        rows = [(c["namespace"], c["key"].encode(),
                 None if c["value"] is None else base64.b64decode(c["value"]), int(c["seq"]))
                for c in fresh]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO kv VALUES (?, ?, ?, ?) ON CONFLICT (namespace, key) "
                           "DO UPDATE SET value = excluded.value, seq = excluded.seq", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.seq = max(seq for *_, seq in rows)
        return self.seq

    @staticmethod
    def _set(into: dict[tuple[str, bytes], bytes], item: tuple[str, bytes],
             value: bytes | None) -> None:
        if value is None:  # a deletion (tombstone)
            into.pop(item, None)
        else:
            into[item] = value

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self.outbox is not None:
            self.outbox.close()


def _blob(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


def _local_wins(applied_seq: int | None, replica_seq: int) -> bool:
    """Whether the node's write of a key beats the replica's row of it: while pending, or
    when the control plane applied it after the row the replica holds."""
    return applied_seq is None or applied_seq > replica_seq


@dataclass(slots=True)
class OutboxWrite:
    """One function write in the outbox, as the agent sends it."""

    id: int
    namespace: str
    key: bytes
    value: bytes | None  # None: a deletion
    function: str | None
    t: float

    def wire(self) -> dict:
        """``{"id","namespace","key","value": base64|null,"t","function"}`` for the API."""
        value = None if self.value is None else base64.b64encode(self.value).decode("ascii")
        return {"id": self.id, "namespace": self.namespace,
                "key": self.key.decode("utf-8", "replace"), "value": value, "t": self.t,
                "function": self.function}


@dataclass(slots=True)
class Settled:
    """What the agent learnt from the control plane's answer to one batch."""

    applied: int = 0
    refused: list[tuple[OutboxWrite, str]] = field(default_factory=list)
    forgotten: int = 0  # rows removed (refused, or applied and caught up with)


class KVOutbox:
    """Function KV writes on their way to the control plane: ``CACHE_DIR/control/kv-outbox.db``.

    Rules (the file is shared by the workers, which add writes, and the agent, which ships
    and settles them):

    * A write is committed with ``synchronous=FULL`` (the WAL is fsync'd) before the
      function's ``kv_put`` returns: the function may tell its client "saved" next, and a
      crash or power loss after that must not lose the write. Function writes run on the
      function thread pool, never on the event loop, so the fsync holds up no request.
    * Ids only grow (AUTOINCREMENT) and the agent sends pending writes oldest first; the
      control plane keeps, per outbox (its random ``id``), the highest write id it applied,
      so a batch sent again after a lost answer is not applied twice.
    * A pending write of a key replaces the older pending write of it (the newer wins
      anyway): the outbox holds at most one pending write per key. ``max_writes`` and
      ``max_bytes`` bound it; past them :meth:`add` raises :class:`KVFull`.
    * An applied write stays (``applied_seq``) until the replica has reached that seq, so
      workers never show the older value in between; then it is removed. Every removal
      (applied and caught up with, refused, dropped) is recorded in ``settled``, which the
      workers follow to re-resolve those keys; the newest ``SETTLED_KEPT`` are kept.
    """

    def __init__(self, path: str | Path, create: bool = False,
                 max_writes: int = OUTBOX_MAX_WRITES, max_bytes: int = OUTBOX_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_writes, self.max_bytes = max_writes, max_bytes
        if not create and not self.path.exists():
            raise FileNotFoundError(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout=10000")
        if create:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_OUTBOX_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('outbox', ?)",
                            (uuid.uuid4().hex[:OUTBOX_ID_CHARS],))
        self.db.execute("PRAGMA synchronous=FULL")
        self.id: str = self._meta("outbox")
        self.wake_address = f"\0verge-kv-outbox-{self.id}"  # the agent listens (abstract)
        self._waker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._waker.setblocking(False)

    def _meta(self, name: str):
        return self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]

    def _transaction(self):
        return _Transaction(self.db, self._lock)

    # ----- workers ------------------------------------------------------------------------------
    def add(self, namespace: str, key: bytes, value: bytes | None,
            function: str | None = None) -> int:
        """Queue a write (``value`` None: a deletion), durable on return; its id."""
        size = len(key) + len(value or b"")
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE namespace = ? AND key = ? "
                       "AND applied_seq IS NULL", (namespace, key))
            writes, held = db.execute(
                "SELECT (SELECT value FROM meta WHERE name = 'writes'), "
                "(SELECT value FROM meta WHERE name = 'bytes')").fetchone()
            if writes + 1 > self.max_writes or held + size > self.max_bytes:
                raise KVFull(f"the node's KV outbox is full ({writes} writes, {held} bytes "
                             f"queued; at most {self.max_writes}, {self.max_bytes})")
            cursor = db.execute("INSERT INTO outbox (namespace, key, value, function, t) "
                                "VALUES (?, ?, ?, ?, ?)",
                                (namespace, key, value, function, time.time()))
            write_id = cursor.lastrowid
        self.nudge()
        return write_id

    def nudge(self) -> None:
        """Tell the agent a write is queued (a datagram; nobody listening: no matter)."""
        # no agent (yet), or its queue is full: it looks at the file now and then anyway
        with contextlib.suppress(OSError):
            self._waker.sendto(b"w", self.wake_address)

    def newest(self, namespace: str, key: bytes) -> tuple[bytes | None, int | None] | None:
        """(value, applied seq or None) of the newest write of a key, or None."""
        with self._lock:
            row = self.db.execute("SELECT value, applied_seq FROM outbox WHERE namespace = ? "
                                  "AND key = ? ORDER BY id DESC LIMIT 1",
                                  (namespace, key)).fetchone()
        return None if row is None else (_blob(row[0]), row[1])

    def touched_since(self, outbox_seen: int, settled_seen: int
                      ) -> tuple[set[tuple[str, bytes]], int, int]:
        """Keys written (outbox id > outbox_seen) or settled (> settled_seen) since, and
        the new positions. (Ids are handed out in commit order: SQLite has one writer at a
        time; a row that commits later has a higher id and is found next time.)"""
        with self._lock:
            written = self.db.execute("SELECT id, namespace, key FROM outbox WHERE id > ?",
                                      (outbox_seen,)).fetchall()
            settled = self.db.execute("SELECT id, namespace, key FROM settled WHERE id > ?",
                                      (settled_seen,)).fetchall()
        keys = {(ns, bytes(key)) for _, ns, key in (*written, *settled)}
        return (keys, max((row[0] for row in written), default=outbox_seen),
                max((row[0] for row in settled), default=settled_seen))

    def positions(self) -> tuple[int, int]:
        """The newest outbox row id and settled id (where a full read starts following)."""
        with self._lock:
            return self.db.execute("SELECT (SELECT coalesce(max(id), 0) FROM outbox), "
                                   "(SELECT coalesce(max(id), 0) FROM settled)").fetchone()

    def written_keys(self) -> set[tuple[str, bytes]]:
        with self._lock:
            rows = self.db.execute("SELECT DISTINCT namespace, key FROM outbox").fetchall()
        return {(ns, bytes(key)) for ns, key in rows}

    def empty(self) -> bool:
        return self.size()[0] == 0

    def size(self) -> tuple[int, int]:
        """(writes, bytes) held: pending, and applied but not yet caught up with."""
        with self._lock:
            return self.db.execute("SELECT (SELECT value FROM meta WHERE name = 'writes'), "
                                   "(SELECT value FROM meta WHERE name = 'bytes')").fetchone()

    def pruned_past(self, settled_seen: int) -> bool:
        """Whether settled records after ``settled_seen`` were pruned (rebuild the view)."""
        with self._lock:
            return self._meta("settled_pruned") > settled_seen

    # ----- the agent ------------------------------------------------------------------------------
    def pending(self, max_writes: int = OUTBOX_BATCH, max_bytes: int = OUTBOX_BATCH_BYTES
                ) -> list[OutboxWrite]:
        """The oldest writes not yet applied: at most ``max_writes`` and, past the first,
        ``max_bytes`` of values."""
        with self._lock:
            rows = self.db.execute("SELECT id, namespace, key, value, function, t FROM outbox "
                                   "WHERE applied_seq IS NULL ORDER BY id LIMIT ?",
                                   (max_writes,)).fetchall()
        batch, size = [], 0
        for row_id, namespace, key, value, function, t in rows:
            size += len(value or b"")
            if batch and size > max_bytes:
                break
            batch.append(OutboxWrite(row_id, namespace, bytes(key), _blob(value), function, t))
        return batch

    def has_pending(self) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM outbox WHERE applied_seq IS NULL "
                                   "LIMIT 1").fetchone() is not None

    def settle(self, sent: list[OutboxWrite], results: list[dict], kv_seq: int,
               replica_seq: int) -> Settled:
        """Record the control plane's answer to a batch: applied writes get their seq
        (a duplicate: ``kv_seq``, the control plane's seq when it answered, an upper
        bound), refused ones are removed; then what the replica has caught up with goes."""
        by_id = {write.id: write for write in sent}
        outcome = Settled()
        applied: list[tuple[int, int]] = []
        refused: list[int] = []
        for result in results:
            write = by_id.get(result.get("id"))
            if write is None:
                continue
            if "error" in result:
                refused.append(write.id)
                outcome.refused.append((write, str(result["error"])))
            else:
                applied.append((int(result.get("seq") or kv_seq), write.id))
        outcome.applied = len(applied)
        with self._transaction() as db:
            db.executemany("UPDATE outbox SET applied_seq = ? WHERE id = ?", applied)
            outcome.forgotten = self._remove(db, "id IN (SELECT value FROM json_each(?))",
                                             (json.dumps(refused),))
            outcome.forgotten += self._remove(db, "applied_seq <= ?", (replica_seq,))
        return outcome

    def drop(self, sent: list[OutboxWrite]) -> int:
        """Remove a batch the control plane refused as a whole; rows removed."""
        with self._transaction() as db:
            return self._remove(db, "id IN (SELECT value FROM json_each(?))",
                                (json.dumps([write.id for write in sent]),))

    def forget_applied(self, replica_seq: int) -> int:
        """Remove applied writes the replica has caught up with; rows removed."""
        with self._transaction() as db:
            return self._remove(db, "applied_seq <= ?", (replica_seq,))

    def _remove(self, db: sqlite3.Connection, where: str, params: tuple) -> int:
        db.execute(f"INSERT INTO settled (namespace, key) SELECT namespace, key FROM outbox "
                   f"WHERE {where}", params)
        removed = db.execute(f"DELETE FROM outbox WHERE {where}", params).rowcount
        if removed:
            cutoff = db.execute("SELECT coalesce(max(id), 0) - ? FROM settled",
                                (SETTLED_KEPT,)).fetchone()[0]
            if cutoff > 0 and db.execute("DELETE FROM settled WHERE id <= ?",
                                         (cutoff,)).rowcount:
                db.execute("UPDATE meta SET value = max(value, ?) WHERE name = "
                           "'settled_pruned'", (cutoff,))
        return removed

    def close(self) -> None:
        with self._lock:
            self.db.close()
        self._waker.close()


class _Transaction:
    """``with``: the outbox's lock and one IMMEDIATE transaction, rolled back on error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if kind else "COMMIT")
        finally:
            self.lock.release()


_OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL, key BLOB NOT NULL,
    value BLOB,             -- NULL: a deletion
    function TEXT, t REAL NOT NULL,
    applied_seq INTEGER     -- the control plane's kv seq, once it applied the write
);
CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox (namespace, key);
CREATE TABLE IF NOT EXISTS settled (
    id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL, key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value);
INSERT OR IGNORE INTO meta VALUES ('writes', 0), ('bytes', 0), ('settled_pruned', 0);
CREATE TRIGGER IF NOT EXISTS outbox_added AFTER INSERT ON outbox BEGIN
    UPDATE meta SET value = value + 1 WHERE name = 'writes';
    UPDATE meta SET value = value + length(NEW.key) + coalesce(length(NEW.value), 0)
        WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS outbox_removed AFTER DELETE ON outbox BEGIN
    UPDATE meta SET value = value - 1 WHERE name = 'writes';
    UPDATE meta SET value = value - length(OLD.key) - coalesce(length(OLD.value), 0)
        WHERE name = 'bytes';
END;
"""


@dataclass
class FunctionStats:
    """One version's counters in one worker."""

    invocations: int = 0
    errors: int = 0
    cpu_ms: float = 0.0
    peak_memory: int = 0
    refused: int = 0  # requests answered 503 because the function could not be loaded
    load_error: str | None = None

    def add(self, other: FunctionStats) -> None:
        self.invocations += other.invocations
        self.errors += other.errors
        self.cpu_ms += other.cpu_ms
        self.peak_memory = max(self.peak_memory, other.peak_memory)
        self.refused += other.refused

    def counters(self) -> dict:
        return {"invocations": self.invocations, "errors": self.errors, "cpu_ms": self.cpu_ms,
                "peak_memory": self.peak_memory, "refused": self.refused}


class StatsBook:
    """Each function's counters per version (module sha256, 12 digits), outside the
    deployments, so that :meth:`EdgeCompute.apply` carries them over: deploying another
    function, or this one again, changes nothing; a new module starts its own version.

    A function's total is the sum over its versions (monotonic, as Prometheus counters
    must be); versions no longer deployed keep their own counters up to ``VERSIONS_KEPT``
    per function, older ones are folded into the total. A function that is no longer
    deployed at all is forgotten.
    """

    def __init__(self) -> None:
        self.versions: dict[str, dict[str, FunctionStats]] = {}  # most recently deployed last
        self.folded: dict[str, FunctionStats] = {}

    def stats(self, name: str, version: str) -> FunctionStats:
        per = self.versions.setdefault(name, {})
        stats = per.pop(version, None) or FunctionStats()
        per[version] = stats
        return stats

    def keep(self, deployed: dict[str, str]) -> None:
        """After a deployment (function -> its deployed version): prune as the class says."""
        for name in list(self.versions):
            if name not in deployed:
                del self.versions[name]
                self.folded.pop(name, None)
                continue
            per = self.versions[name]
            retired = [version for version in per if version != deployed[name]]
            for version in retired[:max(0, len(retired) - VERSIONS_KEPT)]:
                self.folded.setdefault(name, FunctionStats()).add(per.pop(version))

    def view(self, deployed: Deployed) -> dict:
        """A function's totals, its load error, its deployed version and each version's."""
        name = deployed.spec.name
        per = self.versions.get(name, {})
        total = FunctionStats()
        total.add(self.folded.get(name, FunctionStats()))
        for stats in per.values():
            total.add(stats)
        return {**total.counters(), "load_error": deployed.stats.load_error,
                "version": deployed.version,
                "versions": {version: stats.counters() for version, stats in per.items()}}


@dataclass
class Deployed:
    spec: object  # verge.config.EdgeFunction
    function: object | None  # verge.compute.runtime.Function; None: it failed to load
    stats: FunctionStats = field(default_factory=FunctionStats)  # this version's (StatsBook)
    version: str = ""
    pool_until: float = 0.0  # monotonic time until which it skips the inline attempt
    inline: bool = field(init=False, default=False)  # it may be tried on the event loop
    route: str = field(init=False, default="")  # X_MATCHED_ROUTE
    answers: dict = field(init=False, default_factory=dict, repr=False)  # see response()

    def __post_init__(self) -> None:
        fn = self.function
        self.inline = fn is not None and not (
            fn.caps.fetch_hosts or fn.caps.kv_write or fn.limits.cpu_ms <= INLINE_CPU_MS)
        self.route = next(iter(self.spec.routes), "")

    @property
    def available(self) -> bool:
        return self.function is not None

    def response(self, result: Answer, node: str, method: str) -> Response:
        """The Response of one of its answers. A function mostly answers the same thing again
        (the same head, a short body), so a small answer to a GET shares one Response with
        the same answers before it, and with it the protocols' memoised renderings, as hot
        cache hits do (Responses are never changed once made); up to ``ANSWERS_SHARED``
        distinct ones, then they start over."""
        body = result.body
        if method != "GET" or len(body) > ANSWER_SHARED_BYTES:
            return _answer_response(result, node)
        key = (result.status, node, body, *result.headers)
        response = self.answers.get(key)
        if response is None:
            if len(self.answers) >= ANSWERS_SHARED:
                self.answers.clear()
            response = self.answers[key] = _answer_response(result, node)
        return response


def _answer_response(result: Answer, node: str) -> Response:
    headers = [*result.headers, ("Cache-Status", f"{node}; detail=function")]
    return Response(result.status, headers, result.body)


def version_of(function) -> str:
    """A loaded function's version label: its module's sha256, 12 hex digits."""
    return str(getattr(function, "digest", "") or "")[:12] or "unknown"


class FunctionKV:
    """The edge KV as one function sees it: its writes carry its name (for the audit and
    `verge fn logs` when the control plane refuses one)."""

    __slots__ = ("kv", "function")

    def __init__(self, kv: EdgeKV, function: str) -> None:
        self.kv, self.function = kv, function

    def get(self, namespace: str, key: bytes) -> bytes | None:
        return self.kv.get(namespace, key)

    def put(self, namespace: str, key: bytes, value: bytes) -> None:
        self.kv.put(namespace, key, value, self.function)

    def delete(self, namespace: str, key: bytes) -> None:
        self.kv.delete(namespace, key, self.function)


@dataclass(slots=True)
class Refusal:
    """What :meth:`EdgeCompute.invoke` returns for a function that failed to load: an answer
    (503, Retry-After) the pipeline sends like any function's, so the request stops here."""

    function: str
    error: str
    result: Answer
    outcome: str = "unavailable"
    ok: bool = False
    error_status: int = 503
    cpu_ms: float = 0.0
    peak_memory: int = 0
    stderr: bytes = b""


def unavailable(spec, error: str, stats: FunctionStats | None = None) -> Deployed:
    """The stand-in for a function that failed to load: it claims the function's routes
    and refuses their requests. It runs in the request phase whatever the function's phase
    is: a response-phase function would otherwise see the request reach the origin first."""
    claim = spec.model_copy(update={"phase": "request"})
    stats = stats if stats is not None else FunctionStats()
    stats.load_error = error
    return Deployed(claim, None, stats, UNLOADED)


class EdgeCompute:
    """One per worker: the runtime, the deployed functions by service, the local KV."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir) / "functions"
        self.runtime = None  # created on the first deployment: wasmtime only when used
        self.by_service: dict[str, list[Deployed]] = {}
        control = Path(cache_dir) / "control"
        self.kv = EdgeKV(control / KV_FILE, outbox=control / OUTBOX_FILE)
        self.book = StatsBook()
        self.logs: deque[dict] = deque(maxlen=LOGS_KEPT)
        self._pool: ThreadPoolExecutor | None = None
        self._http: httpx.Client | None = None
        self._inline_services = HostServices(kv=self.kv)  # (no fetch, KV reads only)

    # ----- deployment ----------------------------------------------------------------------
    def apply(self, specs) -> None:
        """Load the config's functions (compiling only what is new) and switch to them in one
        assignment. A function that fails to load keeps its running version if that one
        claims the same requests (same service, routes and phase), else it is deployed as
        unavailable (see the module docstring); either way the error is logged and kept for
        `verge fn logs`."""
        running = {d.spec.name: d for ds in self.by_service.values() for d in ds
                   if d.available}
        by_service: dict[str, list[Deployed]] = {}
        for spec in specs:
            try:
                function = self._load(spec)
                version = version_of(function)
                deployed = Deployed(spec, function, self.book.stats(spec.name, version), version)
            except Exception as exc:  # whatever breaks a load, the routes stay claimed
                deployed = self._failed(spec, exc, running.get(spec.name))
            by_service.setdefault(deployed.spec.service, []).append(deployed)
        self.by_service = by_service
        self.book.keep({d.spec.name: d.version for ds in by_service.values() for d in ds})

    def _failed(self, spec, exc: Exception, running: Deployed | None) -> Deployed:
        """What serves a function whose load failed: its running version, else a refusal."""
        if running is not None and not _same_claim(running.spec, spec):
            running = None
        if running is not None:
            outcome = "; the running version stays"
        else:
            outcome = "; its routes answer 503 until it loads"
        error = f"{exc}" or type(exc).__name__
        log.error("edge function %s not deployed: %s%s", spec.name, error, outcome)
        self.logs.append({"function": spec.name, "t": time.time(),
                          "outcome": "load_error", "error": error + outcome})
        if running is not None:
            return running
        return unavailable(spec, error, self.book.stats(spec.name, UNLOADED))

    def _load(self, spec):
        from verge.compute.runtime import Limits, Runtime

        if self.runtime is None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.runtime = Runtime(self.cache_dir)
        if spec.module.startswith(MODULE_PREFIX):  # the node supervisor resolves these
            raise ValueError(f"module {spec.module} was not fetched from the control plane")
        module = Path(spec.module)
        source = module.read_text() if module.suffix == ".wat" else module.read_bytes()
        caps = Capabilities.of(env=spec.env, fetch_hosts=spec.fetch_hosts,
                               kv_namespace=spec.kv_namespace, kv_write=spec.kv_write)
        limits = Limits(cpu_ms=spec.cpu_ms, memory_bytes=spec.memory_mb * MiB,
                        max_subrequests=spec.max_subrequests)
        return self.runtime.load(source, name=spec.name, caps=caps, limits=limits)

    def match(self, service: str, path: str) -> Deployed | None:
        for deployed in self.by_service.get(service, ()):
            if deployed.spec.matches(path):
                return deployed
        return None

    # ----- invocation ------------------------------------------------------------------------
    async def invoke(self, deployed: Deployed, request, body: bytes, request_id: str,
                     response: tuple[int, list, bytes] | None = None):
        """Run the function for one request (inline if it may, else on the pool); returns the
        runtime's Invocation (a :class:`Refusal` for a function that failed to load). With
        `response` (status, headers, body) it runs in response-editing mode."""
        if not deployed.available:
            return self._refuse(deployed)
        cgi = _cgi_request(deployed, request, body)
        invocation = self._invoke_inline(deployed, cgi, request_id, response)
        if invocation is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FUNCTION_THREADS, thread_name_prefix="verge-fn")
            kv = FunctionKV(self.kv, deployed.spec.name) if deployed.spec.kv_write else self.kv
            services = HostServices(kv=kv, fetch=self._fetch)
            invocation = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: self.runtime.invoke(deployed.function, cgi,
                                                        services=services,
                                                        request_id=request_id,
                                                        response=response))
            if invocation.cpu_ms < INLINE_CPU_MS / 2:  # it was a one-off (a cold first run)
                deployed.pool_until = 0.0
        self._count(deployed, invocation)
        return invocation

    def invoke_now(self, deployed: Deployed, request, request_id: str):
        """The inline run of a request-phase function for a request without a body, on the
        caller's stack (the fast path: no task, no thread); None when the function must run
        on the pool (or failed to load): the async path then runs it."""
        if not deployed.inline:  # (may fetch or write, a large budget, or not loaded)
            return None
        invocation = self._invoke_inline(deployed, _cgi_request(deployed, request, b""),
                                         request_id, None)
        if invocation is not None:
            self._count(deployed, invocation)
        return invocation

    def _invoke_inline(self, deployed: Deployed, cgi: CgiRequest, request_id: str, response):
        """The speculative run on the event loop (see the module docstring), or None when
        the function must run, or run again, on the pool."""
        if not deployed.inline or time.monotonic() < deployed.pool_until:
            return None
        fn = deployed.function
        services = self._inline_services if fn.loaded.uses_host else None
        for _ in range(2):
            invocation = self.runtime.invoke(fn, cgi, services=services,
                                             request_id=request_id, response=response,
                                             cpu_ms=INLINE_CPU_MS)
            if invocation.outcome != "timeout":  # (Outcome.TIMEOUT: wasmtime loads lazily)
                return invocation
            deployed.stats.cpu_ms += invocation.cpu_ms  # spent all the same
            if invocation.cpu_ms >= INLINE_CPU_MS:  # it really needs more: the pool, a while
                deployed.pool_until = time.monotonic() + INLINE_BACKOFF_S
                return None
            # else it was cut short (the Python ticker's deadline came early, or a busy host
            # preempted the run: its wall-clock budget went by): once more, then the pool —
            # for a while too: twice cut short is a busy machine or a heavy function, and
            # either way the loop should not pay for a third try
        deployed.pool_until = time.monotonic() + INLINE_BACKOFF_S
        return None

    def _refuse(self, deployed: Deployed) -> Refusal:
        """The answer of a function that failed to load (the error stays on the node)."""
        name = deployed.spec.name
        stats = deployed.stats
        stats.refused += 1
        stats.errors += 1
        body = (f"edge function {name} is unavailable on this edge (it failed to load); "
                f"the request was not forwarded\n").encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Retry-After", str(UNAVAILABLE_RETRY_AFTER_S)),
                   ("Cache-Control", "no-store")]
        return Refusal(name, f"not loaded: {stats.load_error}", Answer(503, headers, body))

    def _count(self, deployed: Deployed, invocation) -> None:
        stats = deployed.stats
        stats.invocations += 1
        stats.cpu_ms += invocation.cpu_ms or 0.0
        stats.peak_memory = max(stats.peak_memory, invocation.peak_memory or 0)
        if not invocation.ok:
            stats.errors += 1
            record = self._remember(deployed, invocation)
            log.warning("edge function %s failed: %s", deployed.spec.name, record)
        elif invocation.stderr:
            record = self._remember(deployed, invocation)
            log.info("edge function %s stderr: %s", deployed.spec.name, record)

    def _remember(self, deployed: Deployed, invocation) -> dict:
        """Keep a failure's or stderr's log record for the control plane (verge fn logs)."""
        record = invocation.log_record()
        record["t"] = time.time()
        record["module_sha256"] = getattr(deployed.function, "digest", None)
        self.logs.append(record)
        return record

    def take_logs(self) -> list[dict]:
        """The log records kept since the last call (the agent ships them)."""
        taken = list(self.logs)
        self.logs.clear()
        return taken

    def _fetch(self, request: FetchRequest) -> FetchResponse:
        """A function's sub-request (already checked against its allow-list by the runtime)."""
        if self._http is None:
            self._http = httpx.Client(trust_env=False, follow_redirects=False)
        response = self._http.request(request.method, request.url, headers=request.headers,
                                      content=request.body or None, timeout=request.timeout)
        return FetchResponse(response.status_code, list(response.headers.multi_items()),
                             response.content)

    def stats(self) -> dict[str, dict]:
        """Per function: totals over its versions, ``version`` (the deployed one),
        ``versions`` (each one's counters) and ``load_error``."""
        return {d.spec.name: self.book.view(d) for ds in self.by_service.values() for d in ds}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.close()
        if self.runtime is not None:
            self.runtime.close()
        self.kv.close()


def _cgi_request(deployed: Deployed, request, body: bytes) -> CgiRequest:
    return CgiRequest(method=request.method, target=request.target,
                      headers=list(request.headers), body=body, scheme=request.scheme,
                      host=request.hmap.get("host", ""), remote_addr=request.client,
                      route=deployed.route)


def _same_claim(old_spec, new_spec) -> bool:
    """Whether two versions of a function see the same requests."""
    return (old_spec.service, old_spec.routes, old_spec.phase) == \
        (new_spec.service, new_spec.routes, new_spec.phase)


class ResponseTooLarge(Exception):
    """The response is bigger than a response-phase function may see."""


class CapturedResponse:
    """Stands in for the client's ResponseWriter while a response-phase function is pending:
    the pipeline (cache hit, fill, pass-through) writes its response here, whole, and the
    function then sees it. Bounded: past `limit` body bytes the capture gives up."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.started = False
        self.keep_alive = True
        self.bytes_sent = 0

    def start(self, status: int, headers, *, content_length: int | None = None,
              reason: str | None = None) -> None:
        self.status, self.headers, self.started = status, list(headers), True

    async def write(self, data: bytes) -> None:
        self._add(data)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        self._add(os.pread(fd, count, offset))

    async def send(self, response) -> None:
        """A whole response (verge.http.response): its fields and body, read in full."""
        self.start(response.status, response.headers)
        await write_body(self, response.body)

    async def end(self) -> None:
        return None

    def _add(self, data: bytes) -> None:
        self.body += data
        self.bytes_sent = len(self.body)
        if len(self.body) > self.limit:
            raise ResponseTooLarge(f"response over {self.limit} bytes")
