"""Edge nodes in the control-plane store: join, heartbeats, health verdicts, revocation.

A node joins with a join token and gets its own credential (a re-join replaces it); it
reports its health, load and the config version and purge number it has applied with every
heartbeat. A node is "down" after three heartbeat intervals without one; purges still expect
it until it is revoked (verge.control.store.purges).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from verge.control import auth
from verge.control.auth import Principal
from verge.control.models import CONFIG_VERSION, PURGE_SEQ, Node, utcnow
from verge.control.store.base import NotFound, StoreBase, iso


class Nodes(StoreBase):
    """The node registry."""

    def __init__(self, url: str, *, heartbeat_interval: float = 2.0, **options: Any) -> None:
        super().__init__(url, **options)
        self.down_after = 3 * heartbeat_interval
        """Seconds without a heartbeat after which a node counts as down."""

    def join_node(
        self, principal: Principal, name: str, url: str, admin_url: str, region: str | None = None
    ) -> dict:
        """Register a node (or re-register it: a new credential replaces the old one)."""
        issued = auth.issue(node=True)
        with self.writing() as session:
            node = session.scalar(select(Node).where(Node.name == name).with_for_update())
            top = self.counter(session, PURGE_SEQ)
            rejoin = node is not None
            if node is None:
                node = Node(
                    name=name,
                    acked_seq=top,
                    purge_seq=0,
                    config_version=0,
                    load={},
                    health={},
                    revoked=False,
                )
                session.add(node)
            node.url, node.admin_url, node.region = url, admin_url, region
            node.credential_id, node.credential_sha256 = issued.id, issued.digest
            self.logins_revoked(session)
            node.joined_at, node.revoked = utcnow(), False
            self.audit(
                session,
                principal,
                "node.join",
                f"node:{name}",
                None,
                {"url": url, "admin_url": admin_url, "region": region, "rejoin": rejoin},
            )
            config_version = self.counter(session, CONFIG_VERSION)
        self.forget_logins()
        return {
            "node": name,
            "credential": issued.text,
            "config_version": config_version,
            "purge_seq": top,
        }

    def heartbeat(
        self,
        principal: Principal,
        *,
        health: dict,
        load: dict,
        config_version: int,
        purge_seq: int,
        whereabouts: dict | None = None,
    ) -> None:
        """Record a heartbeat; `whereabouts` (url, admin_url, region) as the node reports them."""
        with self.writing() as session:
            session.execute(
                update(Node)
                .where(Node.id == principal.node_id)
                .values(
                    last_heartbeat=utcnow(),
                    health=health,
                    load=load,
                    config_version=config_version,
                    purge_seq=purge_seq,
                    **(whereabouts or {}),
                )
            )

    def monitor_targets(self) -> list[tuple[str, str, dict]]:
        """(name, admin URL, stored verdict) of every node the health monitor checks."""
        with self.reading() as session:
            rows = session.execute(
                select(Node.name, Node.admin_url, Node.monitor).where(Node.revoked.is_(False))
            ).all()
        return [(name, admin_url, monitor or {}) for name, admin_url, monitor in rows]

    def record_monitor(self, name: str, verdict: dict) -> None:
        """Store the monitor's verdict for one node (on a change of state, not every check)."""
        with self.writing() as session:
            session.execute(update(Node).where(Node.name == name).values(monitor=verdict))

    def list_nodes(self, limit: int = 50, offset: int = 0) -> dict:
        now = utcnow()
        with self.reading() as session:
            return self.paged(
                session,
                select(Node).order_by(Node.name),
                limit,
                offset,
                lambda node: self._node_view(node, now),
            )

    def revoke_node(self, principal: Principal, name: str) -> None:
        with self.writing() as session:
            node = session.scalar(select(Node).where(Node.name == name))
            if node is None:
                raise NotFound(f"no node named {name!r}")
            if node.revoked:
                return
            node.revoked = True
            self.logins_revoked(session)
            self.audit(session, principal, "node.revoke", f"node:{name}", None)
        self.forget_logins()

    def node_status(self, node: Node, now: datetime) -> str:
        """The node's state: up, down (no heartbeat for ``down_after`` seconds) or revoked."""
        if node.revoked:
            return "revoked"
        seen = node.last_heartbeat or node.joined_at
        return "up" if now - seen <= timedelta(seconds=self.down_after) else "down"

    def registered_node_names(self, session: Session) -> list[str]:
        """Every node that joined and was not revoked (up or down: the store knows them all,
        not just those heard from lately)."""
        return list(
            session.scalars(
                select(Node.name).where(Node.revoked.is_(False)).order_by(Node.name)
            ).all()
        )

    def _node_view(self, node: Node, now: datetime) -> dict:
        return {
            "name": node.name,
            "url": node.url,
            "admin_url": node.admin_url,
            "region": node.region,
            "status": self.node_status(node, now),
            "last_heartbeat": iso(node.last_heartbeat),
            "joined_at": iso(node.joined_at),
            "config_version": node.config_version,
            "purge_seq": node.purge_seq,
            "load": node.load,
            "health": node.health,
            "monitor": node.monitor,
        }
