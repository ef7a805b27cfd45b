"""Disk tier of the edge cache: bounded in bytes, crash-safe, shared by a node's workers.

Why it is built this way:

* Objects are plain files so a worker can ``sendfile`` them. An object is a body file and
  a small JSON *meta* file under ``objects/xx/yy/`` (from the sha256 of key and variant).
  Both are written under a temp name and renamed into place, body first, and the meta
  names its body and the body's size. So ``kill -9`` at any moment leaves at worst a temp
  file or a body nobody names, never a meta pointing at half an object. A meta whose body
  is missing or has the wrong size (power loss without fsync) counts as absent and is
  removed.
* Temp files belong to their writer: each store writes them in its own scratch directory,
  ``writing/PID-TOKEN/`` (named like its marker in ``procs/``), and renames them into
  ``objects/`` from there. A writer killed mid-fill (a 50 MB body half written) leaves its
  temp files in that one directory, which :func:`sweep_dead_writers` removes as soon as
  the process is known dead (the node supervisor when it replaces a worker, and every
  store that opens the directory) — without walking the object tree, and never touching
  the scratch directory of a live process.
* Every write gets a fresh body file name. Replacing an object renames the new meta over
  the old one and only then unlinks the old body, so a reader that holds the old body open
  keeps reading it (Linux unlink semantics) and a meta's body never changes under it.
* An SQLite index (WAL, ``root/index.db``) answers what files cannot: purge by prefix or
  tag, Vary look-up, bytes used, LRU eviction. Meta files are renamed or unlinked only while
  this process holds the index write lock, so index rows and meta files change together and
  workers cannot interleave halves of two updates.
* The meta files are the truth. Every process leaves a marker in ``procs/`` while it has
  the directory open. The first process to open the directory (it alone gets an exclusive
  ``flock``) sees markers of processes that died without closing, or a missing or corrupt
  index, and then scans the tree: it re-indexes metas the index lost, drops rows whose
  body is gone and deletes temp and orphan body files (and every scratch directory: no
  other process has the directory open). After clean shutdowns it skips the scan, so a
  normal start costs nothing per object.
* Access times are buffered by :meth:`DiskStore.touch` and written in one transaction at
  most once a second (or on :meth:`DiskStore.flush`), off the per-request path.

Threads: the index is shared by every worker of a node, and a write transaction waits (up to
``BUSY_TIMEOUT_MS``) while another process holds the write lock. So that this wait never
stalls the event loop — and with it every memory hit of the worker — each store has ONE
*writer thread* with its own connection, and every write transaction of the process runs
there, in the order it was asked for: publishing an object and the eviction after it,
:meth:`~DiskStore.update_meta`, :meth:`~DiskStore.set_vary`, :meth:`~DiskStore.remove`,
:meth:`~DiskStore.enforce_capacity`, the access-time flush, the clean-up of a broken meta
that :meth:`~DiskStore.lookup` found, and the repair at open. The meta renames and unlinks
of those operations happen in that thread too, inside the transaction (the crash rules
above are unchanged). Every other thread reads through a second, query-only connection
(WAL: readers never wait for the writer): :meth:`~DiskStore.lookup`, Vary and purge
look-ups, :attr:`~DiskStore.used_bytes`.

How callers wait: the write methods named above block their caller until the writer
thread is done (scripts, tests, the node supervisor's purges). The event loop never calls
them directly: it awaits :meth:`DiskWriter.commit_async`, or hands work over with
:meth:`DiskStore.later` (returns a future at once) and :meth:`DiskStore.flush`.
Operations queued by one process run in order, so a later look-up in the same process sees
them done once their future is; :meth:`DiskStore.drain` waits for everything queued so far.
Body bytes are written by the thread that streams them (:meth:`DiskWriter.write`), and
look-ups read meta files on the caller's thread: both are file I/O, not index writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from verge.procs import pid_alive

log = logging.getLogger("verge.cache.disk")
T = TypeVar("T")

SCHEMA_VERSION = 1
META_FORMAT = 1
TOUCH_FLUSH_INTERVAL = 1.0  # seconds between batched access-time writes
BUSY_TIMEOUT_MS = 10_000

_META = ".meta"
_BODY = ".body"
_BODY_TMP = ".tmp"
_META_TMP = ".mtmp"
_INDEX = "index.db"
_LOCK = "lock"
_PROCS = "procs"
_WRITING = "writing"  # writing/PID-TOKEN/: one store's temp files (named like its marker)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries(
    key TEXT NOT NULL, variant TEXT NOT NULL, body TEXT NOT NULL, size INTEGER NOT NULL,
    stored REAL NOT NULL, atime REAL NOT NULL, PRIMARY KEY (key, variant)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_atime ON entries(atime);
CREATE TABLE IF NOT EXISTS tags(
    tag TEXT NOT NULL, key TEXT NOT NULL, variant TEXT NOT NULL,
    PRIMARY KEY (tag, key, variant)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_entry ON tags(key, variant);
CREATE TABLE IF NOT EXISTS vary(key TEXT PRIMARY KEY, fields TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage(id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO usage VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS entries_add AFTER INSERT ON entries
    BEGIN UPDATE usage SET bytes = bytes + NEW.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS entries_drop AFTER DELETE ON entries
    BEGIN UPDATE usage SET bytes = bytes - OLD.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS entries_resize AFTER UPDATE OF size ON entries
    BEGIN UPDATE usage SET bytes = bytes - OLD.size + NEW.size WHERE id = 1; END;
PRAGMA user_version = {SCHEMA_VERSION};
"""

_UPSERT_ENTRY = """
INSERT INTO entries (key, variant, body, size, stored, atime) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (key, variant) DO UPDATE SET
    body = excluded.body, size = excluded.size, stored = excluded.stored, atime = excluded.atime
"""


@dataclass(slots=True)
class DiskEntry:
    """A complete object on disk, as found by :meth:`DiskStore.lookup` or a commit."""

    key: str
    variant: str
    meta: dict
    body_path: str
    body_size: int

    def open(self) -> int:
        """A read-only fd on the body (for sendfile/pread); the caller closes it.

        Raises FileNotFoundError if the object was replaced or removed since the look-up.
        """
        return os.open(self.body_path, os.O_RDONLY | os.O_CLOEXEC)


class DiskWriter:
    """A body being written to a temp file; :meth:`commit` publishes it, :meth:`abort` drops it.

    While the body arrives, readers may ``os.pread`` from :attr:`fd` up to :attr:`written`.
    ``fd`` is closed by commit and abort (by the thread that called them, once the writer
    thread has published the body); a reader that must outlive them takes its own fd with
    :meth:`open` beforehand.
    """

    def __init__(self, store: DiskStore, key: str, variant: str) -> None:
        self.key = key
        self.variant = variant
        self.written = 0
        self._store = store
        self._hash = object_hash(key, variant)
        self._dir = store._object_dir(self._hash, create=True)
        self._token = secrets.token_hex(8)
        self._path = os.path.join(store._scratch, f"{self._hash}.{self._token}{_BODY_TMP}")
        self._vary = store.get_vary(key)
        self.fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._sealed = False  # a commit started: no more bytes
        self._published = False  # set by the writer thread: the body is the object's now
        self._done = False

    def write(self, data: bytes) -> None:
        """Append ``data`` to the body."""
        self._require_writable()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n

    def open(self) -> int:
        """A new fd onto this body (``os.dup``) that stays valid after commit or abort.

        It shares the file offset with :attr:`fd`: use pread/sendfile with explicit offsets.
        """
        self._require_open()
        return os.dup(self.fd)

    def commit(
        self, meta: dict, tags: Iterable[str] = (), vary: Iterable[str] | None = None
    ) -> DiskEntry:
        """Publish the body with ``meta`` (opaque, JSON-able) and purge ``tags``; blocks.

        ``vary``: the key's Vary field names, recorded with the object (for a key new on
        disk, in the same transaction), as :meth:`DiskStore.set_vary` would. Eviction runs
        after the commit if the tier is over capacity. On any error the write is aborted and
        the error re-raised. From the event loop, await :meth:`commit_async` instead.
        """
        return self._settle(self._start_commit(meta, tags, vary))

    async def commit_async(
        self, meta: dict, tags: Iterable[str] = (), vary: Iterable[str] | None = None
    ) -> DiskEntry:
        """:meth:`commit` without blocking the event loop: the writer thread publishes.

        :attr:`fd` stays open (readers may go on reading it) until this returns. If the
        awaiting task is cancelled, the commit still finishes (or fails) on its own.
        """
        job = self._start_commit(meta, tags, vary)
        waiter = asyncio.wrap_future(job)
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            waiter.add_done_callback(lambda _: self._settle_quietly(job))
            raise
        except Exception:
            pass  # _settle aborts the write and raises it
        return self._settle(job)

    def abort(self) -> None:
        """Drop the body; harmless after commit or a previous abort."""
        if self._done:
            return
        self._finish()
        if not self._published:
            _unlink_quietly(self._path)

    def _start_commit(
        self, meta: dict, tags: Iterable[str], vary: Iterable[str] | None
    ) -> Future[DiskEntry]:
        self._require_writable()
        self._sealed = True
        fields = None if vary is None else tuple(vary)
        return self._store._submit(self._publish, meta, list(dict.fromkeys(tags)), fields)

    def _publish(self, meta: dict, tags: list[str], vary: tuple[str, ...] | None) -> DiskEntry:
        """Writer thread: rename the body into place and publish it; then Vary, eviction."""
        store = self._store
        body_name = f"{self._hash}.{self._token}{_BODY}"
        body_path = os.path.join(self._dir, body_name)
        fields = self._vary if vary is None else vary
        stored = store._clock()
        doc = _encode_meta(
            self.key, self.variant, body_name, self.written, stored, tags, fields, meta
        )
        if store.fsync:
            os.fsync(self.fd)
        os.rename(self._path, body_path)
        self._path = body_path
        store._publish(self, body_name, stored, tags, doc, fields)
        self._published = True
        store._after_commit(self.key, vary)
        return DiskEntry(self.key, self.variant, meta, body_path, self.written)

    def _settle(self, job: Future[DiskEntry]) -> DiskEntry:
        """The caller's side of a finished commit job: close the fd, or abort on failure."""
        try:
            entry = job.result()
        except BaseException:
            self.abort()
            raise
        self._finish()
        return entry

    def _settle_quietly(self, job: Future[DiskEntry]) -> None:
        """Settle a commit whose caller was cancelled (nobody else will report its error)."""
        try:
            self._settle(job)
        except Exception as exc:
            log.error("commit of %r failed after its caller went: %r", self.key, exc)

    def _finish(self) -> None:
        self._done = True
        os.close(self.fd)
        self.fd = -1
        self._store._writers.discard(self)

    def _require_open(self) -> None:
        if self._done:
            raise ValueError("DiskWriter already committed or aborted")

    def _require_writable(self) -> None:
        self._require_open()
        if self._sealed:
            raise ValueError("DiskWriter is being committed")


class DiskStore:
    """The disk tier. One instance per worker process; all instances share ``root``.

    Owns the process's writer thread (see the module docstring): :meth:`close` stops it.
    """

    def __init__(
        self,
        root: str | Path,
        capacity_bytes: int,
        *,
        fsync: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self._clock = clock
        self._objects = str(self.root / "objects")
        self._known_dirs: set[str] = set()
        self._touches: dict[tuple[str, str], float] = {}
        self._touch_lock = threading.Lock()  # touch() on the loop, the write in the thread
        self._last_flush = clock()
        self._writers: set[DiskWriter] = set()
        self._closed = False
        self._writer_ident: int | None = None
        self._jobs = ThreadPoolExecutor(
            1, thread_name_prefix="verge-disk-writer", initializer=self._writer_started
        )
        os.makedirs(self._objects, exist_ok=True)
        os.makedirs(self.root / _PROCS, exist_ok=True)
        os.makedirs(self.root / _WRITING, exist_ok=True)
        self._lock_fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._marker = self._jobs.submit(self._attach).result()
            self._scratch = os.path.join(self.root, _WRITING, os.path.basename(self._marker))
            os.makedirs(self._scratch, exist_ok=True)
            self._db = self._connect(query_only=True)
        except BaseException:
            self._jobs.shutdown()
            for name in ("_wdb", "_db"):
                if hasattr(self, name):
                    getattr(self, name).close()
            os.close(self._lock_fd)
            raise

    def _writer_started(self) -> None:
        self._writer_ident = threading.get_ident()

    # ----- opening ----------------------------------------------------------------------
    def _attach(self) -> str:
        """Lock the directory, open (and if we are first and it is needed, repair) the index.

        Runs on the writer thread; sets ``self._wdb`` (its connection); returns this
        process's marker file.
        """
        first = _try_flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not first:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            self._wdb = self._connect()
            if _user_version(self._wdb) != SCHEMA_VERSION:
                self._create_schema(self._wdb)
            sweep_dead_writers(self.root)  # a worker starting: writers that died before it
            return self._register_process()
        dead = os.listdir(self.root / _PROCS)
        db = self._open_checked(thorough=bool(dead))
        if db is None:
            self._delete_index()
            db = self._connect()
            dead.append("lost index")
        self._wdb = db
        self._create_schema(db)
        if dead:
            self._reconcile()
        db.execute("DELETE FROM vary WHERE key NOT IN (SELECT key FROM entries)")
        for name in os.listdir(self.root / _PROCS):
            _unlink_quietly(os.path.join(self.root, _PROCS, name))
        for name in os.listdir(self.root / _WRITING):  # nobody else has the directory open
            _remove_scratch(os.path.join(self.root, _WRITING, name))
        marker = self._register_process()
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        return marker

    def _register_process(self) -> str:
        marker = os.path.join(self.root, _PROCS, f"{os.getpid()}-{secrets.token_hex(4)}")
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        return marker

    def _connect(self, query_only: bool = False) -> sqlite3.Connection:
        """A connection to the index: the writer thread's, or (``query_only``) the readers'."""
        db = sqlite3.connect(
            self.root / _INDEX,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if query_only:  # a write from any thread but the writer's fails loudly
            db.execute("PRAGMA query_only = 1")
            return db
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
        return db

    def _open_checked(self, thorough: bool) -> sqlite3.Connection | None:
        """The index if it exists and looks sound, else None (it must be rebuilt)."""
        if not (self.root / _INDEX).exists():
            return None
        db = None
        try:
            db = self._connect()
            sound = _user_version(db) == SCHEMA_VERSION
            if sound and thorough:
                sound = db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            if sound:
                return db
        except sqlite3.DatabaseError:
            pass
        if db is not None:
            db.close()
        return None

    def _create_schema(self, db: sqlite3.Connection) -> None:
        try:
            db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _delete_index(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            _unlink_quietly(os.path.join(self.root, _INDEX + suffix))

    # ----- repair after a crash ---------------------------------------------------------
    def _reconcile(self) -> None:
        """Make the index match the meta files and delete what no meta names.

        Runs only while this process holds the directory exclusively.
        """
        bodies: dict[str, str] = {}  # body file name -> its directory
        metas: dict[str, str] = {}  # object hash -> directory of its meta
        for directory, name in _walk_objects(self._objects):
            if name.endswith((_BODY_TMP, _META_TMP)):  # written here by older versions
                _unlink_quietly(os.path.join(directory, name))
            elif name.endswith(_BODY):
                bodies[name] = directory
            elif name.endswith(_META):
                metas[name[: -len(_META)]] = directory
        with self._write_tx() as db:
            rows = db.execute("SELECT key, variant, body FROM entries").fetchall()
            stale = [
                (k, v)
                for k, v, body in rows
                if body not in bodies or body.split(".", 1)[0] not in metas
            ]
            self._delete_rows(db, stale)
            indexed = {body for _, _, body in rows}
            vary_seen: dict[str, tuple[float, list[str] | None]] = {}
            for name, directory in bodies.items():
                if name not in indexed:
                    self._adopt(db, name, directory, vary_seen)
            self._restore_vary(db, vary_seen)
            live = {body for (body,) in db.execute("SELECT body FROM entries")}
        for name, directory in bodies.items():
            if name not in live:
                _unlink_quietly(os.path.join(directory, name))
        live_hashes = {name.split(".", 1)[0] for name in live}
        for digest, directory in metas.items():
            if digest not in live_hashes:
                _unlink_quietly(os.path.join(directory, digest + _META))

    def _adopt(
        self,
        db: sqlite3.Connection,
        body_name: str,
        directory: str,
        vary_seen: dict[str, tuple[float, list[str] | None]],
    ) -> None:
        """Index a body the index does not name, if its meta names it and sizes agree."""
        digest = body_name.split(".", 1)[0]
        doc = _decode_meta(_read_or_none(os.path.join(directory, digest + _META)))
        if doc is None or doc["body"] != body_name:
            return
        if object_hash(doc["key"], doc["variant"]) != digest:
            return
        if _size_or_none(os.path.join(directory, body_name)) != doc["size"]:
            return
        key, variant = doc["key"], doc["variant"]
        stored = doc["stored"]
        db.execute(_UPSERT_ENTRY, (key, variant, body_name, doc["size"], stored, stored))
        db.execute("DELETE FROM tags WHERE key = ? AND variant = ?", (key, variant))
        db.executemany(
            "INSERT OR IGNORE INTO tags VALUES (?, ?, ?)", [(t, key, variant) for t in doc["tags"]]
        )
        known = vary_seen.get(key)
        if known is None or (doc["vary"] is not None and (known[1] is None or stored > known[0])):
            vary_seen[key] = (stored, doc["vary"])

    @staticmethod
    def _restore_vary(
        db: sqlite3.Connection, vary_seen: dict[str, tuple[float, list[str] | None]]
    ) -> None:
        """Vary fields of re-indexed keys, from their newest meta that records them."""
        for key, (_, fields) in vary_seen.items():
            if fields is None:
                variants = {
                    v for (v,) in db.execute("SELECT variant FROM entries WHERE key = ?", (key,))
                }
                if variants != {""}:
                    continue  # unknown: the key stays unreachable until stored again
                fields = []
            db.execute("INSERT OR IGNORE INTO vary VALUES (?, ?)", (key, json.dumps(fields)))

    # ----- writing ----------------------------------------------------------------------
    def writer(self, key: str, variant: str) -> DiskWriter:
        """Start writing the body of ``(key, variant)``."""
        self._require_open()
        writer = DiskWriter(self, key, variant)
        self._writers.add(writer)
        return writer

    def _publish(
        self,
        writer: DiskWriter,
        body_name: str,
        stored: float,
        tags: list[str],
        doc: bytes,
        vary: tuple[str, ...] | None,
    ) -> None:
        """Index a renamed body and rename its meta into place, under the index write lock.

        ``vary`` is recorded if the key has no Vary record yet (a changed one: set_vary).
        """
        key, variant, digest, directory = writer.key, writer.variant, writer._hash, writer._dir
        meta_tmp = os.path.join(self._scratch, f"{digest}.{writer._token}{_META_TMP}")
        _write_new_file(meta_tmp, doc, self.fsync)
        try:
            with self._write_tx() as db:
                old = db.execute(
                    "SELECT body FROM entries WHERE key = ? AND variant = ?", (key, variant)
                ).fetchone()
                db.execute(_UPSERT_ENTRY, (key, variant, body_name, writer.written, stored, stored))
                if old is not None:
                    db.execute("DELETE FROM tags WHERE key = ? AND variant = ?", (key, variant))
                db.executemany(
                    "INSERT OR IGNORE INTO tags VALUES (?, ?, ?)", [(t, key, variant) for t in tags]
                )
                if vary is not None:
                    db.execute("INSERT OR IGNORE INTO vary VALUES (?, ?)", (key, json.dumps(vary)))
                os.rename(meta_tmp, os.path.join(directory, digest + _META))
        except BaseException:
            _unlink_quietly(meta_tmp)
            raise
        if self.fsync:
            _fsync_dir(directory)
        if old is not None and old[0] != body_name:
            _unlink_quietly(os.path.join(directory, old[0]))

    def _after_commit(self, key: str, vary: tuple[str, ...] | None) -> None:
        """Writer thread, after a commit: a changed Vary, then eviction if over capacity.

        The object is published by now, so a failure here is logged, not raised.
        """
        try:
            if vary is not None:
                self._set_vary(key, vary)
            if self.used_bytes > self.capacity_bytes:
                self._enforce_capacity()
        except Exception:
            log.exception("disk tier: Vary record or eviction after storing %r failed", key)

    def update_meta(self, key: str, variant: str, meta: dict) -> bool:
        """Atomically replace the caller's meta of a stored object (304 refresh, soft purge).

        Returns False (and does nothing) when the object is not on disk. Blocks until the
        writer thread did it (from the event loop: ``later(store.update_meta, ...)``).
        """
        return self._call(self._update_meta, key, variant, meta)

    def _update_meta(self, key: str, variant: str, meta: dict) -> bool:
        digest = object_hash(key, variant)
        directory = self._object_dir(digest)
        meta_path = os.path.join(directory, digest + _META)
        with self._write_tx():
            doc = _decode_meta(_read_or_none(meta_path))
            if doc is None or (doc["key"], doc["variant"]) != (key, variant):
                return False
            doc["meta"] = meta
            self._replace_meta(directory, digest, doc)
        return True

    def _replace_meta(self, directory: str, digest: str, doc: dict) -> None:
        """Rewrite a meta file (call under the write lock)."""
        tmp = os.path.join(self._scratch, f"{digest}.{secrets.token_hex(8)}{_META_TMP}")
        _write_new_file(tmp, _dump(doc), self.fsync)
        try:
            os.rename(tmp, os.path.join(directory, digest + _META))
        except BaseException:
            _unlink_quietly(tmp)
            raise

    # ----- reading ----------------------------------------------------------------------
    def lookup(self, key: str, variant: str) -> DiskEntry | None:
        """The complete object, or None if it is absent or incomplete.

        Reads files only. An incomplete object's meta is handed to the writer thread to be
        removed (:meth:`drain` waits for it).
        """
        self._require_open()
        digest = object_hash(key, variant)
        directory = self._object_dir(digest)
        meta_path = os.path.join(directory, digest + _META)
        raw = _read_or_none(meta_path)
        for _ in range(3):  # a concurrent replace can swap the meta between our reads
            if raw is None:
                return None
            doc = _decode_meta(raw)
            if doc is not None and (doc["key"], doc["variant"]) == (key, variant):
                body_path = os.path.join(directory, doc["body"])
                if _size_or_none(body_path) == doc["size"]:
                    return DiskEntry(key, variant, doc["meta"], body_path, doc["size"])
            again = _read_or_none(meta_path)
            if again == raw:  # not replaced meanwhile: broken (the writer re-checks)
                self.later(self._discard_broken, key, variant, meta_path, raw, doc)
                return None
            raw = again
        return None

    def _discard_broken(
        self, key: str, variant: str, meta_path: str, raw: bytes, doc: dict | None
    ) -> bool:
        """Remove a meta that names no complete body, unless it was replaced meanwhile."""
        directory = os.path.dirname(meta_path)
        with self._write_tx() as db:
            if _read_or_none(meta_path) != raw:
                return False
            _unlink_quietly(meta_path)
            row = db.execute(
                "SELECT body FROM entries WHERE key = ? AND variant = ?", (key, variant)
            ).fetchone()
            self._delete_rows(db, [(key, variant)])
        for body in {row[0] if row else None, doc["body"] if doc else None} - {None}:
            _unlink_quietly(os.path.join(directory, body))
        return True

    def set_vary(self, key: str, fields: tuple[str, ...]) -> None:
        """Remember the Vary field names of ``key`` (also in its metas, for index rebuilds).

        Blocks until the writer thread did it.
        """
        self._call(self._set_vary, key, tuple(fields))

    def _set_vary(self, key: str, fields: tuple[str, ...]) -> None:
        encoded = json.dumps(list(fields))
        row = self._wdb.execute("SELECT fields FROM vary WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] == encoded:
            return
        with self._write_tx() as db:
            db.execute("INSERT OR REPLACE INTO vary VALUES (?, ?)", (key, encoded))
            variants = [
                v for (v,) in db.execute("SELECT variant FROM entries WHERE key = ?", (key,))
            ]
            if fields or variants != [""]:  # a rebuild infers no-Vary for a lone "" variant
                self._record_vary_in_metas(key, variants, list(fields))

    def _record_vary_in_metas(self, key: str, variants: list[str], fields: list[str]) -> None:
        for variant in variants:
            digest = object_hash(key, variant)
            directory = self._object_dir(digest)
            doc = _decode_meta(_read_or_none(os.path.join(directory, digest + _META)))
            if doc is not None and doc["vary"] != fields:
                doc["vary"] = fields
                self._replace_meta(directory, digest, doc)

    def get_vary(self, key: str) -> tuple[str, ...] | None:
        """The Vary field names of ``key``; None when the key is unknown on disk."""
        self._require_open()
        row = self._reader().execute("SELECT fields FROM vary WHERE key = ?", (key,)).fetchone()
        return None if row is None else tuple(json.loads(row[0]))

    def keys_with_prefix(self, prefix: str) -> list[tuple[str, str]]:
        """(key, variant) of every object whose key starts with ``prefix``."""
        self._require_open()
        upper = _prefix_upper_bound(prefix)
        if upper is None:
            query, args = "SELECT key, variant FROM entries WHERE key >= ?", (prefix,)
        else:
            query, args = (
                "SELECT key, variant FROM entries WHERE key >= ? AND key < ?",
                (prefix, upper),
            )
        return self._reader().execute(query + " ORDER BY key, variant", args).fetchall()

    def keys_with_tag(self, tag: str) -> list[tuple[str, str]]:
        """(key, variant) of every object stored with purge tag ``tag``."""
        self._require_open()
        query = "SELECT key, variant FROM tags WHERE tag = ? ORDER BY key, variant"
        return self._reader().execute(query, (tag,)).fetchall()

    @property
    def used_bytes(self) -> int:
        """Bytes of all indexed bodies (all workers)."""
        return self._reader().execute("SELECT bytes FROM usage WHERE id = 1").fetchone()[0]

    # ----- removal and eviction -----------------------------------------------------------
    def remove(self, key: str, variant: str | None = None) -> int:
        """Remove one variant, or all variants when ``variant`` is None; returns how many.

        Blocks until the writer thread did it (from the event loop: ``later(store.remove,
        ...)``).
        """
        return self._call(self._remove, key, variant)

    def _remove(self, key: str, variant: str | None) -> int:
        with self._write_tx() as db:
            if variant is None:
                rows = db.execute(
                    "SELECT variant, body FROM entries WHERE key = ?", (key,)
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT variant, body FROM entries WHERE key = ? AND variant = ?",
                    (key, variant),
                ).fetchall()
            indexed = {v for v, _ in rows}
            candidates = indexed if variant is None else indexed | {variant}
            unlinked = {v for v in candidates if self._unlink_meta(key, v)}
            self._delete_rows(db, [(key, v) for v, _ in rows])
            if variant is None:
                db.execute("DELETE FROM vary WHERE key = ?", (key,))
        for v, body in rows:
            _unlink_quietly(os.path.join(self._object_dir(object_hash(key, v)), body))
        return len(indexed | unlinked)  # a meta the index lost is purged too

    def enforce_capacity(self) -> int:
        """Evict least-recently-used objects until used <= capacity; returns bytes freed.

        Access times buffered so far are written first. Blocks until the writer thread did
        it.
        """
        return self._call(self._enforce_capacity)

    def _enforce_capacity(self) -> int:
        self._write_touches()
        if self.used_bytes <= self.capacity_bytes:
            return 0
        freed = 0
        victims: list[tuple[str, str, str]] = []
        with self._write_tx() as db:
            excess = self.used_bytes - self.capacity_bytes
            cursor = db.execute(
                "SELECT key, variant, body, size FROM entries ORDER BY atime, key, variant"
            )
            for key, variant, body, size in cursor:
                if freed >= excess:
                    break
                victims.append((key, variant, body))
                freed += size
            cursor.close()
            for key, variant, _ in victims:
                self._unlink_meta(key, variant)
            self._delete_rows(db, [(k, v) for k, v, _ in victims])
        for key, variant, body in victims:
            _unlink_quietly(os.path.join(self._object_dir(object_hash(key, variant)), body))
        return freed

    def _unlink_meta(self, key: str, variant: str) -> bool:
        digest = object_hash(key, variant)
        return _unlink_quietly(os.path.join(self._object_dir(digest), digest + _META))

    @staticmethod
    def _delete_rows(db: sqlite3.Connection, pairs: list[tuple[str, str]]) -> None:
        """Delete index rows, their tags, and the Vary record of keys left with no variant."""
        db.executemany("DELETE FROM entries WHERE key = ? AND variant = ?", pairs)
        db.executemany("DELETE FROM tags WHERE key = ? AND variant = ?", pairs)
        db.executemany(
            "DELETE FROM vary WHERE key = ? AND NOT EXISTS (SELECT 1 FROM entries WHERE key = ?)",
            [(key, key) for key in {k for k, _ in pairs}],
        )

    # ----- access times -------------------------------------------------------------------
    def touch(self, key: str, variant: str) -> None:
        """Note a use of the object; handed to the writer thread at most once a second."""
        now = self._clock()
        with self._touch_lock:
            self._touches[(key, variant)] = now
        if now - self._last_flush >= TOUCH_FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> Future[None]:
        """Have the writer thread write the buffered access times; does not wait.

        The future is done when they are written (``flush().result()`` waits).
        """
        self._last_flush = self._clock()
        return self.later(self._write_touches)

    def _write_touches(self) -> None:
        with self._touch_lock:
            touches, self._touches = self._touches, {}
        if not touches:
            return
        with self._write_tx() as db:
            db.executemany(
                "UPDATE entries SET atime = ? WHERE key = ? AND variant = ?",
                [(t, k, v) for (k, v), t in touches.items()],
            )

    # ----- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Flush, finish the queued writes, abort unfinished writers, release the directory."""
        if self._closed:
            return
        try:
            self.flush()
            self._jobs.shutdown(wait=True)
            for writer in list(self._writers):
                writer.abort()
        finally:
            self._closed = True
            self._jobs.shutdown(wait=True)
            self._db.close()
            self._wdb.close()
            _remove_scratch(self._scratch)
            _unlink_quietly(self._marker)
            os.close(self._lock_fd)

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sweep_dead_writers(self, pids: Iterable[int] | None = None) -> int:
        """Remove the temp files of writers that died (see :func:`sweep_dead_writers`)."""
        return sweep_dead_writers(self.root, pids)

    # ----- the writer thread --------------------------------------------------------------
    def later(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Queue ``fn(*args)`` on the writer thread and return its future at once.

        ``fn`` is one of the blocking write methods (``store.remove``, ``store.update_meta``,
        ...) or a function calling them; it runs after everything queued before it. A
        failure is logged (and kept in the future). From a coroutine:
        ``await asyncio.wrap_future(store.later(...))``.
        """
        future = self._submit(fn, *args)
        future.add_done_callback(_log_failure)
        return future

    def drain(self) -> None:
        """Wait until every write queued so far (by any thread of this process) is done."""
        self._submit(_nothing).result()

    def _submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run ``fn`` on the writer thread: queued, or right now if we are that thread."""
        self._require_open()
        if threading.get_ident() != self._writer_ident:
            return self._jobs.submit(fn, *args)
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` on the writer thread and wait for its result."""
        return self._submit(fn, *args).result()

    def _reader(self) -> sqlite3.Connection:
        """The connection for a read on this thread (the writer thread reads its own)."""
        return self._wdb if threading.get_ident() == self._writer_ident else self._db

    # ----- helpers ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the index write lock (serialises all workers' changes).

        Writer thread only: the one connection of this process that writes.
        """
        assert threading.get_ident() == self._writer_ident, "index write off the writer thread"
        db = self._wdb
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _object_dir(self, digest: str, create: bool = False) -> str:
        directory = os.path.join(self._objects, digest[:2], digest[2:4])
        if create and directory not in self._known_dirs:
            os.makedirs(directory, exist_ok=True)
            self._known_dirs.add(directory)
        return directory

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError("DiskStore is closed")


# ----- module helpers -------------------------------------------------------------------------
def _nothing() -> None:
    return None


def _log_failure(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        exc = future.exception()
        log.error("disk tier: queued write failed: %r", exc, exc_info=exc)


def sweep_dead_writers(
    root: str | Path,
    pids: Iterable[int] | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> int:
    """Remove the scratch directories (half-written bodies and metas) of dead writers.

    A directory ``writing/PID-TOKEN`` is removed when process PID is not alive (and, with
    ``pids``, only if PID is one of them: the workers the caller saw die). A live process's
    directory is never touched, so its fills in progress go on; a name that names no process
    is left for the next full repair. Returns how many files were removed.
    """
    writing = os.path.join(root, _WRITING)
    wanted = None if pids is None else set(pids)
    try:
        names = os.listdir(writing)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        pid = _writer_pid(name)
        if pid is None or (wanted is not None and pid not in wanted) or alive(pid):
            continue
        removed += _remove_scratch(os.path.join(writing, name))
    return removed


def _writer_pid(scratch_name: str) -> int | None:
    """The pid in a scratch directory's name (``PID-TOKEN``), None for anything else."""
    pid, sep, _ = scratch_name.partition("-")
    return int(pid) if sep and pid.isdigit() and int(pid) > 0 else None


def _remove_scratch(directory: str) -> int:
    """Delete a scratch directory's files, then the directory; returns the files deleted."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = sum(_unlink_quietly(os.path.join(directory, name)) for name in names)
    with contextlib.suppress(OSError):  # (a file created meanwhile: the next sweep's)
        os.rmdir(directory)
    return removed


def object_hash(key: str, variant: str) -> str:
    """File-name hash of an object (unambiguous for any key and variant strings)."""
    return hashlib.sha256(json.dumps([key, variant]).encode()).hexdigest()


def _encode_meta(
    key: str,
    variant: str,
    body_name: str,
    size: int,
    stored: float,
    tags: list[str],
    vary: tuple[str, ...] | None,
    meta: dict,
) -> bytes:
    doc = {
        "format": META_FORMAT,
        "key": key,
        "variant": variant,
        "body": body_name,
        "size": size,
        "stored": stored,
        "tags": tags,
        "vary": list(vary) if vary is not None else None,
        "meta": meta,
    }
    return _dump(doc)


def _dump(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _decode_meta(raw: bytes | None) -> dict | None:
    """A meta document if ``raw`` is one, else None."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != META_FORMAT:
        return None
    body = doc.get("body")
    valid = (
        isinstance(doc.get("key"), str)
        and isinstance(doc.get("variant"), str)
        and isinstance(body, str)
        and body.endswith(_BODY)
        and "/" not in body
        and isinstance(doc.get("size"), int)
        and isinstance(doc.get("stored"), int | float)
        and isinstance(doc.get("tags"), list)
        and isinstance(doc.get("vary"), list | None)
        and isinstance(doc.get("meta"), dict)
    )
    return doc if valid else None


def _prefix_upper_bound(prefix: str) -> str | None:
    """The least string above all strings starting with ``prefix`` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which orders like code points.
    """
    chars = list(prefix)
    while chars:
        following = ord(chars.pop()) + 1
        if 0xD800 <= following <= 0xDFFF:
            following = 0xE000
        if following <= 0x10FFFF:
            return "".join(chars) + chr(following)
    return None


def _walk_objects(objects: str) -> Iterator[tuple[str, str]]:
    """(directory, file name) of every file in ``objects/xx/yy/``."""
    for top in _scandir_dirs(objects):
        for mid in _scandir_dirs(top):
            with os.scandir(mid) as it:
                files = [e.name for e in it if e.is_file(follow_symlinks=False)]
            for name in files:
                yield mid, name


def _scandir_dirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return [e.path for e in it if e.is_dir(follow_symlinks=False) and len(e.name) == 2]


def _user_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    return True


def _read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _size_or_none(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _write_new_file(path: str, data: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
