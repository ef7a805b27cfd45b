"""Traffic stats in the control-plane store: nodes' samples summed per service and bucket.

Agents upload per-service counters with an idempotency key (a retried upload counts once);
samples are added into ``STATS_BUCKET``-second buckets per node and service (an upsert), read
back summed per ``step`` and pruned after the retention period.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from verge.control.auth import Principal
from verge.control.models import (
    STAT_COUNTERS,
    Node,
    Service,
    StatsBatch,
    StatsSample,
    utcnow,
)
from verge.control.store.base import Conflict, NotFound, StoreBase, scoped

STATS_BUCKET = 10
"""Seconds per stored stats bucket."""


class Stats(StoreBase):
    """Ingest, query and prune traffic stats."""

    def ingest_stats(
        self, principal: Principal, samples: Sequence[dict], idempotency_key: str | None = None
    ) -> dict:
        """Add a node's samples to their buckets; a batch key seen before is ignored."""
        try:
            return self._ingest_stats(principal, samples, idempotency_key)
        except Conflict:  # the same batch, sent twice at once: the other copy counted it
            if idempotency_key and self._batch_seen(principal, idempotency_key):
                return {"accepted": 0, "duplicate": True}
            raise

    def _batch_seen(self, principal: Principal, key: str) -> bool:
        with self.reading() as session:
            return session.get(StatsBatch, (principal.node_id, key)) is not None

    def _ingest_stats(
        self, principal: Principal, samples: Sequence[dict], idempotency_key: str | None
    ) -> dict:
        with self.writing() as session:
            if idempotency_key:
                if session.get(StatsBatch, (principal.node_id, idempotency_key)) is not None:
                    return {"accepted": 0, "duplicate": True}
                session.add(
                    StatsBatch(node_id=principal.node_id, key=idempotency_key, received_at=utcnow())
                )
            tenants = dict(session.execute(select(Service.name, Service.tenant_id)).all())
            buckets = _sum_buckets(samples)
            for (service, bucket), counts in buckets.items():
                self._add_sample(
                    session, principal.node_id, service, bucket, tenants.get(service), counts
                )
        return {"accepted": len(samples), "duplicate": False}

    def _add_sample(
        self,
        session: Session,
        node_id: int | None,
        service: str,
        bucket: int,
        tenant_id: int | None,
        counts: dict[str, float],
    ) -> None:
        dialect = postgresql if self.is_postgres else sqlite
        statement = dialect.insert(StatsSample).values(
            node_id=node_id, service=service, bucket=bucket, tenant_id=tenant_id, **counts
        )
        table = StatsSample.__table__.c
        statement = statement.on_conflict_do_update(
            index_elements=["node_id", "service", "bucket"],
            set_={name: table[name] + statement.excluded[name] for name in STAT_COUNTERS},
        )
        session.execute(statement)

    def query_stats(
        self,
        principal: Principal,
        *,
        service: str | None = None,
        node: str | None = None,
        since: float | None = None,
        until: float | None = None,
        step: int = STATS_BUCKET,
    ) -> dict:
        """Sums per ``step`` seconds over the filter: ``{"series": [{"t", "requests", ...}]}``."""
        now = utcnow().timestamp()
        since = now - 3600 if since is None else since
        step = max(int(step), 1)
        t = (StatsSample.bucket - StatsSample.bucket % step).label("start")
        sums = [func.sum(getattr(StatsSample, name)).label(name) for name in STAT_COUNTERS]
        query = (
            select(t, *sums)
            .where(StatsSample.bucket >= int(since) - int(since) % STATS_BUCKET)
            .group_by(t)
            .order_by(t)
        )
        if until is not None:
            query = query.where(StatsSample.bucket <= until)
        query = scoped(query, principal, StatsSample.tenant_id)
        with self.reading() as session:
            if service is not None:
                self._check_stats_service(session, principal, service)
                query = query.where(StatsSample.service == service)
            if node is not None:
                query = query.join(Node, Node.id == StatsSample.node_id).where(Node.name == node)
            rows = session.execute(query).all()
        return {"series": [_series_point(row) for row in rows], "step": step}

    def _check_stats_service(self, session: Session, principal: Principal, name: str) -> None:
        tenant_id = session.scalar(select(Service.tenant_id).where(Service.name == name))
        if tenant_id is not None and not principal.can_see_tenant(tenant_id):
            raise NotFound(f"no service named {name!r}")

    def prune_stats(self, retention_days: float, now: datetime | None = None) -> int:
        """Delete samples and idempotency keys older than ``retention_days``; rows deleted."""
        cutoff = (now or utcnow()) - timedelta(days=retention_days)
        with self.writing() as session:
            samples = session.execute(
                delete(StatsSample).where(StatsSample.bucket < int(cutoff.timestamp()))
            )
            batches = session.execute(delete(StatsBatch).where(StatsBatch.received_at < cutoff))
            return (samples.rowcount or 0) + (batches.rowcount or 0)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


def _series_point(row: Any) -> dict:
    values = row._mapping
    point = {"t": int(values["start"])}
    for name in STAT_COUNTERS[:-2]:
        point[name] = int(values[name] or 0)
    count = int(values["origin_count"] or 0)
    point["origin_ms_avg"] = round(float(values["origin_ms_sum"] or 0) / count, 3) if count else 0.0
    return point


def _sum_buckets(samples: Sequence[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """Samples added up per (service, bucket start)."""
    buckets: dict[tuple[str, int], dict[str, float]] = {}
    for sample in samples:
        t = int(sample["t"])
        key = (sample["service"], t - t % STATS_BUCKET)
        counts = buckets.setdefault(key, dict.fromkeys(STAT_COUNTERS, 0))
        for name in STAT_COUNTERS:
            counts[name] += sample.get(name, 0) or 0
    return buckets
