"""The durable store-and-forward spool of the ingest route: SQLite in WAL mode.

What it promises:

* ``append`` returns only once the records are durable; the route answers 2xx only then.
  Each request is all-or-nothing (one transaction), and an over-quota request raises
  :class:`SpoolFull` (the route's 429) with nothing written: data is refused, never dropped.
* Records leave only when the sink confirmed them (:meth:`Spool.ack`) or when the sink
  rejected them as poison (:meth:`Spool.dead_letter` moves them to the ``dead`` table).
* A batch is a persisted range of sequence numbers ``[first_seq, last_seq]``: the claim is
  committed before the batch is sent, so after a crash the same batch (same records, same
  idempotency key ``SPOOLID-FIRST-LAST``) is resent. Sequence numbers are never reused (the
  high-water mark is kept in ``meta``), and the spool id is random per spool file, so a key
  never names two different batches.

Why ``synchronous=FULL`` by default: in WAL mode FULL fsyncs the WAL at every commit, so a
committed append survives power loss and an OS crash, which is what a 2xx to a device
promises. ``NORMAL`` syncs only at checkpoints: commits survive a process crash (``kill
-9`` leaves the WAL writes in the page cache) but the last ones can roll back on power
loss, losing acknowledged readings and, worse, a batch claim whose batch already reached
the sink (then re-cut with another key: a duplicate). It is offered for hosts that accept
this for speed. The cost of FULL is one fsync per commit, amortised by group commit
(:class:`AsyncSpool` commits every request waiting at that moment in one transaction).

One process owns a spool file (an ``flock`` on ``PATH.lock``); an edge with several
worker processes gives each its own spool. :class:`Spool` is synchronous and used from one
thread at a time; :class:`AsyncSpool` runs it on a dedicated thread for the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from verge.compute.ingest import Aggregator, encode_record

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, created REAL NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    bytes INTEGER NOT NULL, claimed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dead (
    key TEXT PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL, status INTEGER, reason TEXT, at REAL NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS request_keys (
    key TEXT PRIMARY KEY, readings INTEGER NOT NULL, records INTEGER NOT NULL,
    first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, at REAL NOT NULL);
"""


class SpoolFull(Exception):
    """Over quota: the request was refused whole; ask the device to come back later."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SpoolLocked(Exception):
    """Another process has this spool open."""


@dataclass(frozen=True, slots=True)
class AppendRequest:
    readings: list[Any]
    key: str | None = None  # the device's Idempotency-Key, for retried POSTs


@dataclass(frozen=True, slots=True)
class AppendResult:
    readings: int
    records: int
    first_seq: int  # 0 when the request produced no record (folded into aggregator state)
    last_seq: int
    replayed: bool = False  # a retry of a request already committed under the same key


@dataclass(frozen=True, slots=True)
class Batch:
    spool_id: str
    first_seq: int
    last_seq: int
    payloads: list[bytes]

    @property
    def key(self) -> str:
        """The Idempotency-Key: the same on every retry and after restarts."""
        return f"{self.spool_id}-{self.first_seq}-{self.last_seq}"

    @property
    def count(self) -> int:
        return len(self.payloads)

    @property
    def bytes(self) -> int:
        return sum(map(len, self.payloads))

    def body(self) -> bytes:
        """NDJSON: one JSON record per line."""
        return b"\n".join(self.payloads) + b"\n"


class Spool:
    """The spool file. See the module docstring for the guarantees."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        quota_bytes: int = 256 * 1024 * 1024,
        quota_records: int = 1_000_000,
        synchronous: str = "FULL",
        request_key_ttl: float = 24 * 3600.0,
        retry_after: float = 5.0,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, EXTRA or NORMAL")
        self.path = Path(path)
        self.quota_bytes = quota_bytes
        self.quota_records = quota_records
        self.request_key_ttl = request_key_ttl
        self.retry_after = retry_after
        self._lock_fd = _lock(self.path)
        try:
            self.conn = self._connect(synchronous.upper())
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.commits = 0  # transactions that appended records (group commit makes it < requests)
        self._inflight: set[int] = set()

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL after checkpoints
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        return conn

    def _load(self) -> None:
        meta = dict(self.conn.execute("SELECT name, value FROM meta"))
        if "spool_id" not in meta:
            meta = {"spool_id": uuid.uuid4().hex[:16], "last_seq": "0", "claimed_upto": "0"}
            with self._transaction():
                self.conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        self.spool_id = meta["spool_id"]
        self.last_seq = int(meta["last_seq"])
        self.claimed_upto = int(meta["claimed_upto"])
        self.records, self.bytes = self.conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM records"
        ).fetchone()
        self.unclaimed_records, self.unclaimed_bytes = self.conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM records WHERE seq > ?",
            (self.claimed_upto,),
        ).fetchone()
        self.oldest_unclaimed = self._oldest_after(self.claimed_upto)
        self.pending = {
            first: last
            for first, last in self.conn.execute(
                "SELECT first_seq, last_seq FROM batches ORDER BY first_seq"
            )
        }
        self.dead_batches = self.conn.execute("SELECT count(*) FROM dead").fetchone()[0]

    def _oldest_after(self, seq: int) -> float | None:
        row = self.conn.execute(
            "SELECT created FROM records WHERE seq > ? ORDER BY seq LIMIT 1", (seq,)
        ).fetchone()
        return row[0] if row else None

    @contextlib.contextmanager
    def _transaction(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    # ----- appending ----------------------------------------------------------------------
    def append(
        self, records: list[Any], *, key: str | None = None, now: float | None = None
    ) -> AppendResult:
        """Spool ``records`` as they are (no aggregator); raises :class:`SpoolFull`."""
        result = self.commit([AppendRequest(records, key)], Aggregator(), now)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def load_state(self) -> dict[str, Any]:
        """The aggregator state as last committed."""
        return {
            name: json.loads(value)
            for name, value in self.conn.execute("SELECT name, value FROM state")
        }

    def commit(
        self, requests: list[AppendRequest], aggregator: Aggregator, now: float | None = None
    ) -> list[AppendResult | BaseException]:
        """Run each request through ``aggregator`` and commit them all in one transaction.

        Each request gets its own result: an :class:`AppendResult`, or the exception that
        refused it (:class:`SpoolFull`, an aggregator error, or the commit's error). A
        refused request leaves neither records nor aggregator changes behind.
        """
        now = time.time() if now is None else now
        start = aggregator.mark()
        group = _Group(self.last_seq)
        results: list[AppendResult | BaseException] = []
        for request in requests:
            prior = self._prior_result(request.key, group)
            if prior is not None:
                results.append(replace(prior, replayed=True))
                continue
            results.append(self._stage(request, aggregator, group, now))
        try:
            self._write_group(group, aggregator.changes(), now)
        except Exception as exc:
            aggregator.rollback(start)
            return [r if isinstance(r, BaseException) or r.replayed else exc for r in results]
        aggregator.committed()
        return results

    def _prior_result(self, key: str | None, group: _Group) -> AppendResult | None:
        if key is None:
            return None
        if key in group.keys:
            return group.keys[key]
        row = self.conn.execute(
            "SELECT readings, records, first_seq, last_seq FROM request_keys WHERE key = ?", (key,)
        ).fetchone()
        return AppendResult(*row) if row else None

    def _stage(
        self, request: AppendRequest, aggregator: Aggregator, group: _Group, now: float
    ) -> AppendResult | BaseException:
        mark = aggregator.mark()
        try:
            payloads = [encode_record(r) for r in aggregator.process(request.readings, now)]
        except Exception as exc:  # an aggregator bug refuses its request, not the group
            aggregator.rollback(mark)
            return exc
        size = sum(map(len, payloads))
        if self._over_quota(len(group.rows) + len(payloads), group.bytes + size):
            aggregator.rollback(mark)
            return SpoolFull(
                f"spool over quota ({self.records} records, {self.bytes} bytes)", self.retry_after
            )
        first = group.last_seq + 1
        for payload in payloads:
            group.last_seq += 1
            group.rows.append((group.last_seq, now, payload))
        group.bytes += size
        result = AppendResult(
            len(request.readings),
            len(payloads),
            first if payloads else 0,
            group.last_seq if payloads else 0,
        )
        if request.key is not None:
            group.keys[request.key] = result
        return result

    def _over_quota(self, extra_records: int, extra_bytes: int) -> bool:
        return (
            self.records + extra_records > self.quota_records
            or self.bytes + extra_bytes > self.quota_bytes
        )

    def _write_group(self, group: _Group, changes: dict[str, Any], now: float) -> None:
        if not (group.rows or group.keys or changes):
            return
        with self._transaction() as conn:
            if group.rows:
                conn.executemany("INSERT INTO records VALUES (?, ?, ?)", group.rows)
                conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'last_seq'", (str(group.last_seq),)
                )
            conn.executemany(
                "INSERT INTO request_keys VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (key, r.readings, r.records, r.first_seq, r.last_seq, now)
                    for key, r in group.keys.items()
                ],
            )
            _write_state(conn, changes)
        self._count_appended(group.rows, group.bytes, now)
        self.last_seq = group.last_seq

    def _count_appended(self, rows: list, size: int, now: float) -> None:
        if not rows:
            return
        self.commits += 1
        self.records += len(rows)
        self.bytes += size
        self.unclaimed_records += len(rows)
        self.unclaimed_bytes += size
        if self.oldest_unclaimed is None:
            self.oldest_unclaimed = now

    def tick(self, aggregator: Aggregator, now: float | None = None) -> int:
        """Spool what the aggregator emits on its own (closed windows), expire old request
        keys; returns the records spooled. Never refused for quota: the data was accepted."""
        now = time.time() if now is None else now
        mark = aggregator.mark()
        payloads = [encode_record(r) for r in aggregator.tick(now)]
        rows = [(self.last_seq + i, now, p) for i, p in enumerate(payloads, 1)]
        try:
            with self._transaction() as conn:
                if rows:
                    conn.executemany("INSERT INTO records VALUES (?, ?, ?)", rows)
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE name = 'last_seq'",
                        (str(self.last_seq + len(rows)),),
                    )
                _write_state(conn, aggregator.changes())
                conn.execute("DELETE FROM request_keys WHERE at < ?", (now - self.request_key_ttl,))
        except Exception:
            aggregator.rollback(mark)
            raise
        aggregator.committed()
        self._count_appended(rows, sum(map(len, payloads)), now)
        self.last_seq += len(rows)
        return len(rows)

    # ----- forwarding -------------------------------------------------------------------------
    def due_in(self, now: float, max_records: int, max_bytes: int, max_age: float) -> float | None:
        """0 when a batch is ready to send, else seconds until one will be (age), or None
        when nothing is waiting. From in-memory counters: cheap enough to call often."""
        if any(first not in self._inflight for first in self.pending):
            return 0.0
        if not self.unclaimed_records:
            return None
        if self.unclaimed_records >= max_records or self.unclaimed_bytes >= max_bytes:
            return 0.0
        return max(0.0, (self.oldest_unclaimed or now) + max_age - now)

    def claim(
        self, max_records: int = 500, max_bytes: int = 1024 * 1024, now: float | None = None
    ) -> Batch | None:
        """The oldest batch not being sent: a claimed one left from before (a retry, maybe
        after a crash), else a new one cut from the unclaimed records; None when empty."""
        for first, last in self.pending.items():
            if first not in self._inflight:
                self._inflight.add(first)
                return Batch(self.spool_id, first, last, self._payloads(first, last))
        if not self.unclaimed_records:
            return None
        return self._cut_batch(max_records, max_bytes, time.time() if now is None else now)

    def _payloads(self, first: int, last: int) -> list[bytes]:
        return [
            row[0]
            for row in self.conn.execute(
                "SELECT payload FROM records WHERE seq BETWEEN ? AND ? ORDER BY seq", (first, last)
            )
        ]

    def _cut_batch(self, max_records: int, max_bytes: int, now: float) -> Batch | None:
        rows = self.conn.execute(
            "SELECT seq, payload FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
            (self.claimed_upto, max(1, max_records)),
        ).fetchall()
        taken, size = [], 0
        for seq, payload in rows:
            if taken and size + len(payload) > max_bytes:
                break
            taken.append((seq, payload))
            size += len(payload)
        if not taken:  # the counters drifted from the table: trust the table
            self.unclaimed_records = self.unclaimed_bytes = 0
            self.oldest_unclaimed = None
            return None
        first, last = taken[0][0], taken[-1][0]
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?)", (first, last, len(taken), size, now)
            )
            conn.execute("UPDATE meta SET value = ? WHERE name = 'claimed_upto'", (str(last),))
        self.claimed_upto = last
        self.unclaimed_records -= len(taken)
        self.unclaimed_bytes -= size
        self.oldest_unclaimed = self._oldest_after(last) if self.unclaimed_records else None
        self.pending[first] = last
        self._inflight.add(first)
        return Batch(self.spool_id, first, last, [payload for _, payload in taken])

    def ack(self, batch: Batch) -> None:
        """The sink has the batch: delete it."""
        with self._transaction() as conn:
            self._delete_batch(conn, batch)
        self._forget(batch)

    def dead_letter(self, batch: Batch, status: int | None, reason: str) -> None:
        """The sink rejected the batch as bad input: keep it aside in ``dead``, delete it."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO dead VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    batch.key,
                    batch.first_seq,
                    batch.last_seq,
                    batch.count,
                    status,
                    reason[:2000],
                    time.time(),
                    batch.body(),
                ),
            )
            self._delete_batch(conn, batch)
        self.dead_batches += 1
        self._forget(batch)

    def release(self, batch: Batch) -> None:
        """Stop sending ``batch`` for now; the next claim returns it again."""
        self._inflight.discard(batch.first_seq)

    def _delete_batch(self, conn: sqlite3.Connection, batch: Batch) -> None:
        conn.execute(
            "DELETE FROM records WHERE seq BETWEEN ? AND ?", (batch.first_seq, batch.last_seq)
        )
        conn.execute("DELETE FROM batches WHERE first_seq = ?", (batch.first_seq,))

    def _forget(self, batch: Batch) -> None:
        self.records -= batch.count
        self.bytes -= batch.bytes
        self.pending.pop(batch.first_seq, None)
        self._inflight.discard(batch.first_seq)

    def dead_letters(self) -> list[dict[str, Any]]:
        return [
            {
                "key": k,
                "first_seq": f,
                "last_seq": la,
                "count": c,
                "status": s,
                "reason": r,
                "at": at,
            }
            for k, f, la, c, s, r, at in self.conn.execute(
                "SELECT key, first_seq, last_seq, count, status, reason, at FROM dead ORDER BY at"
            )
        ]

    def stats(self) -> dict[str, Any]:
        return {
            "spool_id": self.spool_id,
            "records": self.records,
            "bytes": self.bytes,
            "unclaimed_records": self.unclaimed_records,
            "pending_batches": len(self.pending),
            "dead_batches": self.dead_batches,
            "last_seq": self.last_seq,
            "quota_records": self.quota_records,
            "quota_bytes": self.quota_bytes,
            "commits": self.commits,
        }


@dataclass
class _Group:
    """Rows and request keys staged for one group commit."""

    last_seq: int
    bytes: int = 0

    def __post_init__(self) -> None:
        self.rows: list[tuple[int, float, bytes]] = []
        self.keys: dict[str, AppendResult] = {}


def _write_state(conn: sqlite3.Connection, changes: dict[str, Any]) -> None:
    for name, value in changes.items():
        if value is None:
            conn.execute("DELETE FROM state WHERE name = ?", (name,))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO state VALUES (?, ?)",
                (name, json.dumps(value, separators=(",", ":"))),
            )


def _lock(path: Path) -> int:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLocked(f"{path} is in use by another process") from None
    return fd


class AsyncSpool:
    """A :class:`Spool` for the event loop: one worker thread, group commit, wake-ups.

    Appends that arrive while a commit is running wait and are committed together by the
    next one, so N concurrent requests cost about one fsync, not N. ``appended`` is set
    whenever records were spooled (the forwarder waits on it).
    """

    def __init__(self, spool: Spool, aggregator: Aggregator | None = None) -> None:
        self.spool = spool
        self.aggregator = aggregator or Aggregator()
        self.appended = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._waiting: list[tuple[AppendRequest, asyncio.Future]] = []
        self._committer: asyncio.Task | None = None

    @classmethod
    async def open(
        cls, path: str | os.PathLike, aggregator: Aggregator | None = None, **options: Any
    ) -> AsyncSpool:
        spool = await asyncio.to_thread(Spool, path, **options)
        self = cls(spool, aggregator)
        self.aggregator.load(await self.run(spool.load_state))
        return self

    async def run(self, function, *args):
        """Run a Spool method on the spool's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def append(self, readings: list[Any], key: str | None = None) -> AppendResult:
        """Durably spool one request's readings (through the aggregator)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((AppendRequest(readings, key), future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_waiting())
        return await future

    async def _commit_waiting(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            requests = [request for request, _ in group]
            try:
                results = await self.run(self.spool.commit, requests, self.aggregator)
            except Exception as exc:
                results = [exc] * len(group)
            for (_, future), result in zip(group, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if any(isinstance(r, AppendResult) and r.records and not r.replayed for r in results):
                self.appended.set()

    async def tick(self) -> int:
        spooled = await self.run(self.spool.tick, self.aggregator)
        if spooled:
            self.appended.set()
        return spooled

    async def claim(self, max_records: int, max_bytes: int) -> Batch | None:
        return await self.run(self.spool.claim, max_records, max_bytes)

    async def ack(self, batch: Batch) -> None:
        await self.run(self.spool.ack, batch)

    async def dead_letter(self, batch: Batch, status: int | None, reason: str) -> None:
        await self.run(self.spool.dead_letter, batch, status, reason)

    async def release(self, batch: Batch) -> None:
        await self.run(self.spool.release, batch)

    def stats(self) -> dict[str, Any]:
        return self.spool.stats()

    async def close(self) -> None:
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._committer
        await self.run(self.spool.close)
        self._executor.shutdown(wait=True)
