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
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from verge.control.auth import Principal
from verge.control.models import ProtectionEvent, Service
from verge.control.store import Store, iso

EVENTS_KEPT = 1000
"""Events kept per service (the newest)."""
MAX_EVENTS_PER_UPLOAD = 1000
"""Most events one node upload may carry."""
KINDS = ("deny", "rate-limit", "waf", "drop")
# The bounds of an event's texts: the edge cuts its texts to the same numbers
# (verge.edge.protect.MAX_EVENT_*; a test checks that they agree) and the columns hold them.
MAX_CLIENT = 64
MAX_METHOD = 32
MAX_HOST = 255
MAX_TARGET = 512
MAX_DETAIL = 200
MAX_STATUS = 999


class ProtectionEvents:
    """Protection events on top of ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, principal: Principal, events: Sequence[dict]) -> dict:
        """Store a node's events (validated by the API), keeping EVENTS_KEPT per service.

        ``{"accepted": stored, "skipped": for services the store does not know}``."""
        events = sorted(events[:MAX_EVENTS_PER_UPLOAD], key=lambda event: event["t"])
        with self.store._writing() as session:
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
        with self.store._reading() as session:
            row = self.store._visible_service(session, principal, service)
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
        oldest_kept = session.scalar(
            select(ProtectionEvent.id)
            .where(ProtectionEvent.service_id == service_id)
            .order_by(ProtectionEvent.id.desc())
            .offset(EVENTS_KEPT - 1)
            .limit(1)
        )
        if oldest_kept is not None:
            session.execute(
                delete(ProtectionEvent).where(
                    ProtectionEvent.service_id == service_id, ProtectionEvent.id < oldest_kept
                )
            )


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
