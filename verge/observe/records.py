"""Per-request bookkeeping in batches: the hot path appends one tuple, a drain counts and logs.

Why: counting a request into the metrics and formatting its JSON access-log line cost about
2 µs of an 8 µs cache hit when done as the request is answered. Appending a record tuple
costs about 0.15 µs; :meth:`RequestRecords.drain` then does the counting and the formatting
for a whole batch (every ``BATCH`` records, from the worker's housekeeping each second, and
before any metrics snapshot, so nothing scraped is ever stale), where repeated requests —
the common case on hot objects — share the formatting work.

A record is the tuple ``(ts, duration, client, method, host, target, status, sent, result,
service)``: wall-clock time, seconds spent, the client address, the request method, host
and target, the status (int or its three ASCII digits), body bytes sent, the cache result
(``hit``, ``miss``, ...) and the service name.
"""

from __future__ import annotations

from verge.observe.accesslog import AccessLog
from verge.observe.metrics import EdgeMetrics


class RequestRecords:
    """The records of one worker since the last drain, and where they go."""

    BATCH = 256  # a drain holds the loop ~0.2 ms: small enough for p99, big enough to pay

    __slots__ = ("pending", "metrics", "access_log")

    def __init__(self, metrics: EdgeMetrics, access_log: AccessLog) -> None:
        self.pending: list[tuple] = []  # appended to directly by the hot path
        self.metrics = metrics
        self.access_log = access_log

    def add(self, record: tuple) -> None:
        pending = self.pending
        pending.append(record)
        if len(pending) >= self.BATCH:
            self.drain()

    def drain(self) -> None:
        """Count the pending records into the metrics and hand them to the access log."""
        pending = self.pending
        if not pending:
            return
        self.metrics.count_records(pending)
        if self.access_log.enabled:
            self.access_log.write_records(pending)
        pending.clear()

    def flush(self) -> None:
        """Drain, then write the access log's buffered lines out."""
        self.drain()
        self.access_log.flush()
