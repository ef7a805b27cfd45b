"""Changes committed by other control-plane replicas, heard at once through PostgreSQL.

Why: replicas share one database, and an edge long-polls whichever replica it reaches. A
change committed through replica A must wake the edges waiting on replica B now, not at B's
next poll of the counters; and a token revoked on A must stop working on B now, not when B's
login cache expires. PostgreSQL provides exactly this: ``NOTIFY`` inside the writing
transaction is delivered to every ``LISTEN``-ing session when (and only if) it commits.

The writer side is :func:`announce` (one ``pg_notify`` in the transaction, payload
``"<topic> <replica id>"``). The reader side is :class:`ChangeListener`: one thread per
replica holding one autocommit psycopg connection that LISTENs, waiting in ``select()`` on
that connection's socket and on a pipe that stops it at once. Every topic another replica
announces is handed to ``on_change``; its own announcements are skipped (the committing
thread woke this replica already).

Rules:
* ``live`` is True only while the LISTEN connection is up. Callers fall back to polling
  (long polls) and to no caching (logins) while it is False.
* Notifications sent while the connection was down are lost, so every (re)connection is
  reported as ``on_change(EVERYTHING)``: whatever may have changed meanwhile is re-read.
* PostgreSQL restarting closes the socket: the listener sees it at once and reconnects every
  ``retry`` seconds; TCP keepalives find a silently dead peer within about 15 seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import URL

log = logging.getLogger("verge.control.notify")

CHANNEL = "verge_changes"
EVERYTHING = "*"
"""The topic reported when the listener (re)connects: anything may have changed."""
TOPICS = ("config", "purges", "acks", "kv", "auth")
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


def new_replica_id() -> str:
    """An id that tells this process's announcements from other replicas'."""
    return secrets.token_hex(6)


def announce(session: Any, topic: str, replica_id: str) -> None:
    """Queue a notification of ``topic`` in the session's transaction (sent on commit)."""
    session.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CHANNEL, "payload": f"{topic} {replica_id}"},
    )


def libpq_dsn(url: URL) -> str:
    """A psycopg connection string for a SQLAlchemy ``postgresql+psycopg://`` URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """One LISTEN connection in its own thread; ``on_change(topic)`` for other replicas' news."""

    def __init__(
        self,
        dsn: str,
        replica_id: str,
        on_change: Callable[[str], None],
        *,
        retry: float = 1.0,
    ) -> None:
        self._dsn, self._replica_id, self._on_change = dsn, replica_id, on_change
        self._retry = retry
        self._stop = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._live = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def live(self) -> bool:
        """Whether notifications are being heard right now."""
        return self._live.is_set()

    def wait_live(self, timeout: float) -> bool:
        return self._live.wait(timeout)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="verge-listen", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop listening now (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._listen_once()
                failures = 0
            except (psycopg.Error, OSError) as exc:
                if failures == 0:
                    log.warning("change notifications lost (%s); polling until back", exc)
                failures += 1
            finally:
                self._live.clear()
            self._stop.wait(self._retry)

    def _listen_once(self) -> None:
        """Connect, LISTEN, and deliver notifications until the connection or we stop."""
        with psycopg.connect(
            self._dsn, autocommit=True, connect_timeout=5, **_KEEPALIVES
        ) as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            self._live.set()
            self._deliver(EVERYTHING)
            pgconn = connection.pgconn
            while not self._stop.is_set():
                readable, _, _ = select.select([pgconn.socket, self._stop_r], [], [])
                if self._stop_r in readable:
                    return
                pgconn.consume_input()  # raises when the server went away
                while (note := pgconn.notifies()) is not None:
                    self._received(note.extra.decode(errors="replace"))
                if pgconn.status != psycopg.pq.ConnStatus.OK:
                    raise psycopg.OperationalError("connection to PostgreSQL lost")

    def _received(self, payload: str) -> None:
        topic, _, sender = payload.partition(" ")
        if sender != self._replica_id:
            self._deliver(topic)

    def _deliver(self, topic: str) -> None:
        try:
            self._on_change(topic)
        except Exception:  # a broken subscriber must not stop the listening
            log.exception("change listener failed for %r", topic)
