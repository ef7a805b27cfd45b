"""Protection events in the control-plane store: a sample of the requests edges refused.

Edges keep their newest refusals per service (deny list, rate limit, WAF, dropped connection;
verge.edge.protect) and their agents post them here (``POST /nodes/self/protection-events``);
``verge protection events SERVICE`` reads them back. Kept out of ``store.py`` like
:mod:`verge.control.functions`, and built the same way: :class:`ProtectionEvents` wraps a
:class:`~verge.control.store.Store` and uses its transactions and its tenant checks.

An event belongs to its service's row (deleted with it, so a later service of the same name
starts empty, whoever owns it), and a tenant reads only its own services' events: another
tenant's service is a 404, as everywhere in the API. The newest ``EVENTS_KEPT`` per service
are kept; events for a service the store does not know (deleted meanwhile) are skipped.

:class:`ProtectionCounts` keeps what the protect phases counted, per service, rule and
``STATS_BUCKET`` of time: a rate-limit rule's allowed, limited (over the rate, whatever its
action) and blocked requests, the deny lists' refusals (blocked) and the WAF's (allowed:
inspected and served, limited: matched the rules, blocked: refused). Agents send them with
their stats samples (``POST /nodes/self/stats``, ``"protection": [...]``: deltas, under the
same idempotency key, so a retried upload is counted once); ``GET
/services/{name}/protection/stats`` reads them back per ``step`` (the dashboard's plot), with
the same tenant scoping as the events. Rows go with their service and age out with the stats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from verge.control.auth import Principal
from verge.control.models import ProtectionCount, ProtectionEvent, Service, StatsBatch, utcnow
from verge.control.store import STATS_BUCKET, Conflict, Store, iso, keep_newest

EVENTS_KEPT = 1000
"""Events kept per service (the newest)."""
MAX_EVENTS_PER_UPLOAD = 1000
"""Most events one node upload may carry."""
KINDS = ("deny", "rate-limit", "challenge", "waf", "drop")
# The bounds of an event's texts: the edge cuts its texts to the same numbers
# (verge.edge.protect.MAX_EVENT_*; a test checks that they agree) and the columns hold them.
MAX_CLIENT = 64
MAX_METHOD = 32
MAX_HOST = 255
MAX_TARGET = 512
MAX_DETAIL = 200
MAX_STATUS = 999

COUNT_KINDS = ("rate-limit", "deny", "waf")
COUNTERS = ("allowed", "limited", "blocked")
MAX_COUNTS_PER_UPLOAD = 10_000
"""Most per-rule count samples one stats upload may carry."""
_BATCH_PREFIX = "protection:"
"""Idempotency keys of count uploads, beside the stats batches' (pruned with them)."""


class ProtectionEvents:
    """Protection events on top of ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, principal: Principal, events: Sequence[dict]) -> dict:
        """Store a node's events (validated by the API), keeping EVENTS_KEPT per service.

        ``{"accepted": stored, "skipped": for services the store does not know}``."""
        events = sorted(events[:MAX_EVENTS_PER_UPLOAD], key=lambda event: event["t"])
        with self.store.writing() as session:
            ids = self._service_ids(session, {event["service"] for event in events})
            stored = [
                _row(event, ids[event["service"]], principal.name)
                for event in events
                if event["service"] in ids
            ]
            session.add_all(stored)
            session.flush()
            for service_id in {row.service_id for row in stored}:
                self._prune(session, service_id)
        return {"accepted": len(stored), "skipped": len(events) - len(stored)}

    def list(self, principal: Principal, service: str, limit: int = 100) -> dict:
        """The newest ``limit`` events of a service the caller can see, oldest first:
        ``{"items": [{"at", "node", "client", "method", "host", "target", "status",
        "kind", "detail"}]}``."""
        with self.store.reading() as session:
            row = self.store.visible_service(session, principal, service)
            rows = session.scalars(
                select(ProtectionEvent)
                .where(ProtectionEvent.service_id == row.id)
                .order_by(ProtectionEvent.id.desc())
                .limit(limit)
            ).all()
        return {"items": [_view(event) for event in reversed(rows)]}

    @staticmethod
    def _service_ids(session: Session, names: set[str]) -> dict[str, int]:
        if not names:
            return {}
        rows = session.execute(select(Service.name, Service.id).where(Service.name.in_(names)))
        return {name: service_id for name, service_id in rows}

    @staticmethod
    def _prune(session: Session, service_id: int) -> None:
        keep_newest(session, ProtectionEvent, ProtectionEvent.service_id == service_id, EVENTS_KEPT)


def _row(event: dict, service_id: int, node: str) -> ProtectionEvent:
    return ProtectionEvent(
        service_id=service_id,
        node=node,
        at=datetime.fromtimestamp(event["t"], UTC),
        client=event["client"],
        method=event["method"],
        host=event["host"],
        target=event["target"],
        status=event["status"],
        kind=event["kind"],
        detail=event["detail"],
    )


def _view(row: ProtectionEvent) -> dict:
    return {
        "at": iso(row.at),
        "node": row.node,
        "client": row.client,
        "method": row.method,
        "host": row.host,
        "target": row.target,
        "status": row.status,
        "kind": row.kind,
        "detail": row.detail,
    }


class ProtectionCounts:
    """Per-rule protection counters on top of ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(
        self, principal: Principal, samples: Sequence[dict], idempotency_key: str | None = None
    ) -> dict:
        """Add a node's samples (validated by the API) to their buckets; an upload key seen
        before is ignored. ``{"accepted", "skipped" (unknown services), "duplicate"}``."""
        try:
            return self._add(principal, samples[:MAX_COUNTS_PER_UPLOAD], idempotency_key)
        except Conflict:  # the same upload twice at once: the other copy counted it
            if idempotency_key and self._seen(principal, idempotency_key):
                return {"accepted": 0, "skipped": 0, "duplicate": True}
            raise

    def _add(self, principal: Principal, samples: Sequence[dict], key: str | None) -> dict:
        with self.store.writing() as session:
            if key:
                if session.get(StatsBatch, (principal.node_id, _batch_key(key))) is not None:
                    return {"accepted": 0, "skipped": 0, "duplicate": True}
                session.add(
                    StatsBatch(node_id=principal.node_id, key=_batch_key(key), received_at=utcnow())
                )
            ids = ProtectionEvents._service_ids(session, {sample["service"] for sample in samples})
            known = [sample for sample in samples if sample["service"] in ids]
            for (service, kind, rule, bucket), counts in _sum_buckets(known).items():
                self._upsert(session, ids[service], principal.node_id, kind, rule, bucket, counts)
        return {"accepted": len(known), "skipped": len(samples) - len(known), "duplicate": False}

    def _seen(self, principal: Principal, key: str) -> bool:
        with self.store.reading() as session:
            return session.get(StatsBatch, (principal.node_id, _batch_key(key))) is not None

    def _upsert(
        self,
        session: Session,
        service_id: int,
        node_id: int | None,
        kind: str,
        rule: str,
        bucket: int,
        counts: dict[str, int],
    ) -> None:
        dialect = postgresql if self.store.is_postgres else sqlite
        statement = dialect.insert(ProtectionCount).values(
            service_id=service_id, node_id=node_id, kind=kind, rule=rule, bucket=bucket, **counts
        )
        table = ProtectionCount.__table__.c
        statement = statement.on_conflict_do_update(
            index_elements=["service_id", "node_id", "kind", "rule", "bucket"],
            set_={name: table[name] + statement.excluded[name] for name in COUNTERS},
        )
        session.execute(statement)

    def query(
        self,
        principal: Principal,
        service: str,
        *,
        since: float | None = None,
        until: float | None = None,
        step: int = STATS_BUCKET,
    ) -> dict:
        """A service's counts (one the caller can see) per ``step`` seconds from ``since``
        (default: an hour ago) and in total over the range: ``{"service", "since", "step",
        "rules": [{"kind", "rule", "allowed", "limited", "blocked"}], "series": [{"t",
        "kind", "rule", "allowed", "limited", "blocked"}]}``, sorted by time, kind, rule."""
        since = utcnow().timestamp() - 3600 if since is None else since
        step = max(int(step), 1)
        start = (ProtectionCount.bucket - ProtectionCount.bucket % step).label("start")
        sums = [func.sum(getattr(ProtectionCount, name)).label(name) for name in COUNTERS]
        with self.store.reading() as session:
            row = self.store.visible_service(session, principal, service)
            query = (
                select(start, ProtectionCount.kind, ProtectionCount.rule, *sums)
                .where(
                    ProtectionCount.service_id == row.id,
                    ProtectionCount.bucket >= int(since) - int(since) % STATS_BUCKET,
                )
                .group_by(start, ProtectionCount.kind, ProtectionCount.rule)
                .order_by(start, ProtectionCount.kind, ProtectionCount.rule)
            )
            if until is not None:
                query = query.where(ProtectionCount.bucket <= until)
            rows = session.execute(query).all()
        series = [_count_point(row) for row in rows]
        return {
            "service": service,
            "since": int(since),
            "step": step,
            "rules": _totals(series),
            "series": series,
        }

    def prune(self, retention_days: float, now: datetime | None = None) -> int:
        """Delete buckets older than ``retention_days`` (their upload keys go with the
        stats batches': Store.prune_stats); rows deleted."""
        cutoff = (now or utcnow()) - timedelta(days=retention_days)
        with self.store.writing() as session:
            result = session.execute(
                delete(ProtectionCount).where(ProtectionCount.bucket < int(cutoff.timestamp()))
            )
            return result.rowcount or 0  # type: ignore[attr-defined]


def _batch_key(key: str) -> str:
    """The stats_batches key of a count upload (a fixed length whatever the header's)."""
    return _BATCH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _sum_buckets(samples: Sequence[dict]) -> dict[tuple[str, str, str, int], dict[str, int]]:
    """Samples summed per (service, kind, rule, bucket start)."""
    buckets: dict[tuple[str, str, str, int], dict[str, int]] = {}
    for sample in samples:
        t = int(sample["t"])
        key = (sample["service"], sample["kind"], sample["rule"], t - t % STATS_BUCKET)
        counts = buckets.setdefault(key, dict.fromkeys(COUNTERS, 0))
        for name in COUNTERS:
            counts[name] += sample.get(name, 0) or 0
    return buckets


def _count_point(row) -> dict:
    values = row._mapping
    point = {"t": int(values["start"]), "kind": values["kind"], "rule": values["rule"]}
    for name in COUNTERS:
        point[name] = int(values[name] or 0)
    return point


def _totals(series: list[dict]) -> list[dict]:
    totals: dict[tuple[str, str], dict] = {}
    for point in series:
        into = totals.setdefault(
            (point["kind"], point["rule"]),
            {"kind": point["kind"], "rule": point["rule"], **dict.fromkeys(COUNTERS, 0)},
        )
        for name in COUNTERS:
            into[name] += point[name]
    return [totals[key] for key in sorted(totals)]
