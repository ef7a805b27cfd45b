"""Device readings in: body parsing and validation, and the aggregation hook (pure, no I/O).

A device POSTs one reading as a JSON object, several as a JSON array, or NDJSON (one object
per line). Each reading needs ``device`` (a non-empty string) and a finite numeric ``value``;
``ts`` (seconds since the epoch) is optional and other fields pass through. A body is
accepted or rejected whole, so a device never has to guess which of its readings were kept.

Aggregation and "nothing lost". An aggregator holding its windows in memory would lose every
reading it had already acknowledged when the edge is killed. Two sound designs remain: spool
raw readings and aggregate downstream, or keep the aggregator's state durable in the same
transaction as the spool write. Verge does the second, because the point of aggregating at
the edge is to send less upstream: an :class:`Aggregator` keeps its state in ``self.state``
through :meth:`Aggregator.put` / :meth:`Aggregator.drop`, which journal every change. The
spool (see :mod:`verge.compute.spool`) commits the records a request produced *and* the
state changes it caused in one SQLite transaction before the device gets its 2xx, and rolls
the in-memory state back to the journal mark when the request is refused (quota) or the
commit fails. After a ``kill -9`` the state is reloaded from the spool: every acknowledged
reading is either in a spooled record or in a durable open window, never in both, never
in neither. Closed windows are emitted as records by the same mechanism (``tick``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

NDJSON_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
    }
)
_MISSING = object()


@dataclass(frozen=True, slots=True)
class IngestLimits:
    max_body_bytes: int = 1024 * 1024
    max_readings: int = 10_000
    max_device_chars: int = 128
    max_fields: int = 32


class IngestError(Exception):
    """A device's bad input: ``status`` is the HTTP answer (400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_readings(
    body: bytes, content_type: str = "", limits: IngestLimits = IngestLimits()
) -> list[dict[str, Any]]:
    """The validated readings of one ingest body; raises :class:`IngestError`."""
    if len(body) > limits.max_body_bytes:
        raise IngestError(413, f"body larger than {limits.max_body_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(400, f"body is not UTF-8: {exc}") from None
    items = _parse_json_or_lines(text, content_type.split(";", 1)[0].strip().lower())
    if not items:
        raise IngestError(400, "no readings in body")
    if len(items) > limits.max_readings:
        raise IngestError(413, f"more than {limits.max_readings} readings in one request")
    return [validate_reading(item, index, limits) for index, item in enumerate(items)]


def _parse_json_or_lines(text: str, media_type: str) -> list[Any]:
    if media_type not in NDJSON_TYPES:
        try:
            doc = _loads(text)
        except ValueError:
            pass  # maybe NDJSON sent without its media type: parse by lines for the error
        else:
            return doc if isinstance(doc, list) else [doc]
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(_loads(line))
            except ValueError as exc:
                raise IngestError(400, f"line {number}: invalid JSON: {exc}") from None
    return items


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid reading value")


def validate_reading(
    item: Any, index: int = 0, limits: IngestLimits = IngestLimits()
) -> dict[str, Any]:
    """``item`` itself when it is a valid reading; raises :class:`IngestError` (400)."""
    where = f"reading {index}"
    if not isinstance(item, dict):
        raise IngestError(400, f"{where}: a reading is a JSON object")
    if len(item) > limits.max_fields:
        raise IngestError(400, f"{where}: more than {limits.max_fields} fields")
    device = item.get("device")
    if not isinstance(device, str) or not 0 < len(device) <= limits.max_device_chars:
        raise IngestError(
            400, f"{where}: 'device' must be a string of 1 to {limits.max_device_chars} characters"
        )
    if not _is_number(item.get("value")):
        raise IngestError(400, f"{where}: 'value' must be a finite number")
    if "ts" in item and not (_is_number(item["ts"]) and item["ts"] >= 0):
        raise IngestError(400, f"{where}: 'ts' must be a non-negative number (epoch seconds)")
    return item


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Aggregator:
    """The hook between the ingest route and the spool: readings in, records to spool out.

    ``process`` runs for each accepted request and ``tick`` periodically (both with the
    current time); each returns the records to spool. State must live in ``self.state``
    (JSON-able values, changed only through :meth:`put` and :meth:`drop`, never mutated in
    place) so the spool can persist exactly the changes of each transaction and undo them.
    The base class is the identity: every reading is spooled as it came.
    """

    name = "identity"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self._undo: list[tuple[str, Any]] = []
        self._dirty: set[str] = set()

    def process(self, readings: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        return readings

    def tick(self, now: float) -> list[dict[str, Any]]:
        return []

    # ----- journaled state, used by the spool ---------------------------------------------
    def put(self, key: str, value: Any) -> None:
        self._undo.append((key, self.state.get(key, _MISSING)))
        self.state[key] = value
        self._dirty.add(key)

    def drop(self, key: str) -> None:
        if key in self.state:
            self._undo.append((key, self.state.pop(key)))
            self._dirty.add(key)

    def mark(self) -> int:
        """A point to roll back to."""
        return len(self._undo)

    def rollback(self, mark: int) -> None:
        """Undo every change made since ``mark``."""
        while len(self._undo) > mark:
            key, old = self._undo.pop()
            if old is _MISSING:
                self.state.pop(key, None)
            else:
                self.state[key] = old

    def changes(self) -> dict[str, Any]:
        """Keys changed since the last :meth:`committed`: new value, or None when dropped."""
        return {key: self.state.get(key) for key in self._dirty}

    def committed(self) -> None:
        """The spool made the current state durable: forget the journal."""
        self._undo.clear()
        self._dirty.clear()

    def load(self, state: dict[str, Any]) -> None:
        self.state = dict(state)
        self.committed()


class WindowAverage(Aggregator):
    """Per-device average per ``window``-second tumbling window (event time from ``ts``).

    A window is emitted once the clock passes its end plus ``grace`` seconds, as
    ``{"device", "window_start", "window_end", "count", "sum", "avg", "min", "max"}``.
    A reading arriving after its window was emitted is not dropped: it opens the window
    again and leaves as a second partial record for the same window. ``count`` and ``sum``
    make partials mergeable downstream (avg = Σsum / Σcount).
    """

    name = "window"

    def __init__(self, window: float = 10.0, grace: float = 0.0) -> None:
        super().__init__()
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.grace = grace

    def process(self, readings: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        for reading in readings:
            self._add(reading["device"], float(reading["value"]), reading.get("ts", now))
        return self.tick(now)

    def _add(self, device: str, value: float, ts: float) -> None:
        start = math.floor(ts / self.window) * self.window
        key = f"{start!r}|{device}"
        old = self.state.get(key)
        if old is None:
            self.put(key, [device, start, value, 1, value, value])
        else:
            _, _, total, count, low, high = old
            self.put(
                key, [device, start, total + value, count + 1, min(low, value), max(high, value)]
            )

    def tick(self, now: float) -> list[dict[str, Any]]:
        closing = [
            (value[1], value[0], key)
            for key, value in self.state.items()
            if value[1] + self.window + self.grace <= now
        ]
        records = []
        for _, _, key in sorted(closing):
            device, start, total, count, low, high = self.state[key]
            records.append(
                {
                    "device": device,
                    "window_start": start,
                    "window_end": start + self.window,
                    "count": count,
                    "sum": total,
                    "avg": total / count,
                    "min": low,
                    "max": high,
                }
            )
            self.drop(key)
        return records


def build_aggregator(spec: str) -> Aggregator:
    """``identity`` or ``window:SECONDS[:GRACE]`` (the node's ``--aggregate`` option)."""
    name, _, args = spec.partition(":")
    if name == "identity" and not args:
        return Aggregator()
    if name == "window":
        numbers = [float(part) for part in args.split(":") if part] if args else []
        if 1 <= len(numbers) <= 2:
            return WindowAverage(*numbers)
    raise ValueError(f"unknown aggregator {spec!r}: use identity or window:SECONDS[:GRACE]")


def encode_record(record: Any) -> bytes:
    """The compact JSON line a record is spooled and forwarded as."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()

