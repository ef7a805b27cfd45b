"""Purges in the control-plane store: numbered in commit order, fanned out, acknowledged.

A purge names URLs, key prefixes or tags; the store checks the caller owns what they route to,
turns them into the targets edges match (cache keys as the edge makes them), numbers the job
with the ``purge_seq`` counter and lists every registered node as expected to acknowledge.
Nodes fetch the purges after the last number they applied and acknowledge up to a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from verge import config as vconfig
from verge.cache import keys
from verge.control.auth import Principal
from verge.control.hostnames import covers
from verge.control.models import PURGE_SEQ, Node, PurgeAck, PurgeJob, Service, utcnow
from verge.control.store.base import Invalid, NotFound, iso
from verge.control.store.bundle import ConfigBundle
from verge.control.store.nodes import Nodes
from verge.control.store.services import Services

PURGE_BATCH = 500
"""Most purges handed to a node in one answer."""
PURGE_TIMEOUT = 60.0
"""Seconds after which a purge counts as done although some nodes have not acknowledged it
(they are still listed as pending, and apply it when they come back)."""


class Purges(ConfigBundle, Services, Nodes):
    """Queue purges, report who applied them, hand them to nodes, record acknowledgements."""

    def __init__(self, url: str, *, purge_timeout: float = PURGE_TIMEOUT, **options: Any) -> None:
        super().__init__(url, **options)
        self.purge_timeout = purge_timeout
        """Seconds until a purge is done even with nodes pending (see PURGE_TIMEOUT)."""

    def purge_seq(self) -> int:
        with self.reading() as session:
            return self.counter(session, PURGE_SEQ)

    def create_purge(
        self,
        principal: Principal,
        *,
        service: str | None = None,
        urls: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        soft: bool = False,
    ) -> dict:
        """Queue a purge for every edge: ``{"seq": N, "nodes": [names expected to ack]}``.

        Every registered, non-revoked node is expected, up or not: a node that looks down
        (say, the control plane itself was down and heard no heartbeats) may well be serving;
        it stays pending until it acknowledges. A purge of one service carries that
        service's hosts (``scope``) so that edges apply its tags to that service only.
        """
        if not (urls or prefixes or tags):
            raise Invalid("nothing to purge: give urls, prefixes or tags", "urls")
        _check_tags(tags)
        with self.writing() as session:
            scope = self.visible_service(session, principal, service) if service else None
            if scope is None and not principal.sees_all and (prefixes or tags):
                raise Invalid("name the service whose prefixes or tags to purge", "service")
            resolver = _PurgeResolver(
                self.current_config(session)[1],
                principal,
                scope,
                dict(session.execute(select(Service.name, Service.tenant_id)).all()),
            )
            targets = resolver.targets(urls, prefixes, tags)
            seq = self.bump(session, PURGE_SEQ)
            expected = self.registered_node_names(session)
            tenant_id = scope.tenant_id if scope else principal.tenant_id
            session.add(
                PurgeJob(
                    seq=seq,
                    tenant_id=tenant_id,
                    service=service,
                    targets=targets,
                    soft=soft,
                    expected=expected,
                    scope=self._purge_scope(session, scope) if scope else None,
                    created_by=principal.actor,
                    created_at=utcnow(),
                )
            )
            self.audit(
                session,
                principal,
                "purge.create",
                f"purge:{seq}",
                tenant_id,
                {
                    "service": service,
                    "urls": list(urls),
                    "prefixes": list(prefixes),
                    "tags": list(tags),
                    "soft": soft,
                },
            )
        self.emit("purges")
        return {"seq": seq, "nodes": expected}

    def purge_status(self, principal: Principal, seq: int) -> dict:
        """Who has applied purge ``seq``: ``acked`` and ``pending`` node names.

        ``done`` once nobody is pending, or when ``purge_timeout`` seconds have passed
        (``timed_out``); the nodes still pending then (``down`` lists those that look down)
        apply it when they come back, before serving from their cache.
        """
        with self.reading() as session:
            job = session.get(PurgeJob, seq)
            if job is None or not (principal.sees_all or job.tenant_id == principal.tenant_id):
                raise NotFound(f"no purge #{seq}")
            acked = set(
                session.scalars(
                    select(Node.name)
                    .join(PurgeAck, PurgeAck.node_id == Node.id)
                    .where(PurgeAck.seq == seq)
                ).all()
            )
            nodes = {
                node.name: node
                for node in session.scalars(select(Node).where(Node.name.in_(job.expected)))
            }
        now = utcnow()
        pending = sorted(
            name
            for name in job.expected
            if name not in acked and name in nodes and not nodes[name].revoked
        )
        timed_out = bool(pending) and now - job.created_at > timedelta(seconds=self.purge_timeout)
        return {
            "seq": job.seq,
            "acked": sorted(acked),
            "pending": pending,
            "down": [name for name in pending if self.node_status(nodes[name], now) == "down"],
            "created_at": iso(job.created_at),
            "service": job.service,
            "soft": job.soft,
            "done": not pending or timed_out,
            "timed_out": timed_out,
        }

    def purges_after(self, after: int, limit: int = PURGE_BATCH) -> list[dict]:
        """Purges with seq > after, oldest first (what a node has not applied yet)."""
        with self.reading() as session:
            jobs = session.scalars(
                select(PurgeJob).where(PurgeJob.seq > after).order_by(PurgeJob.seq).limit(limit)
            ).all()
            return [_purge_record(job) for job in jobs]

    def _purge_scope(self, session: Session, service: Service) -> dict:
        """The hosts a purge of ``service`` may touch, as the edges route them.

        ``hosts``: the service's hosts ("*" too when it is the default service); ``except``:
        other services' hosts that take precedence inside them (an exact host or a more
        specific wildcard below one of its wildcards; everything else for "*").
        """
        hosts = sorted(host.host for host in service.hosts)
        if service.is_default and "*" not in hosts:
            hosts.append("*")
        wildcards = [host for host in hosts if host.startswith("*.")]
        everything = "*" in hosts
        others = sorted(
            claim.host
            for claim in self.claims(session)
            if claim.service != service.name
            and (everything or any(covers(w, claim.host) for w in wildcards))
        )
        return {"hosts": hosts, "except": others}

    def ack_purges(self, principal: Principal, seq: int) -> None:
        """The node has applied every purge up to ``seq``."""
        with self.writing() as session:
            node = session.get_one(Node, principal.node_id, with_for_update=True)
            top = min(seq, self.counter(session, PURGE_SEQ))
            if top <= node.acked_seq:
                return
            now = utcnow()
            seqs = session.scalars(
                select(PurgeJob.seq).where(PurgeJob.seq > node.acked_seq, PurgeJob.seq <= top)
            ).all()
            session.add_all(PurgeAck(seq=s, node_id=node.id, acked_at=now) for s in seqs)
            node.acked_seq = top
            self.announce(session, "acks")
        self.emit("acks")

    def ack_count(self) -> int:
        """A number that changes whenever any node acknowledges (for the status long poll)."""
        with self.reading() as session:
            return session.scalar(select(func.count()).select_from(PurgeAck)) or 0


# ---------------------------------------------------------------------------------------------
# Purge targets: what the edges match (cache keys, key prefixes, tags)
# ---------------------------------------------------------------------------------------------


class _PurgeResolver:
    """Turns purge URLs and prefixes into edge targets, checking the caller owns them.

    URLs become cache keys as the edge's admin API makes them (``keys.key_for_url``, plus the
    variant a matching rule's ``sort_query``/``ignore_query`` produces, plus the prefix that
    covers variants keyed by rule headers).
    """

    def __init__(
        self,
        config: vconfig.Config,
        principal: Principal,
        scope: Service | None,
        tenants: dict[str, int],
    ) -> None:
        self.config, self.principal, self.scope, self.tenants = config, principal, scope, tenants

    def targets(
        self, urls: Sequence[str], prefixes: Sequence[str], tags: Sequence[str]
    ) -> list[list[str]]:
        out: list[list[str]] = []
        for index, url in enumerate(urls):
            for key in self._url_keys(url, f"urls[{index}]"):
                out.append(["url", key])
                out.append(["prefix", key + "\n"])
        for index, prefix in enumerate(prefixes):
            key = keys.key_for_url(prefix)
            self._service_of(key.partition("/")[0], prefix, f"prefixes[{index}]")
            out.append(["prefix", keys.prefix_key(self.config, prefix)])
        out.extend(["tag", tag] for tag in tags)
        return out

    def _url_keys(self, url: str, field: str) -> list[str]:
        self._service_of(keys.key_for_url(url).partition("/")[0], url, field)
        return keys.url_keys(self.config, url)

    def _service_of(self, host: str, url: str, field: str) -> vconfig.Service | None:
        """The service serving ``host``, after checking the caller may purge it."""
        if not host:
            raise Invalid(f"{url!r} has no host; give http://host/path", field)
        service = self.config.service_for_host(host)
        if self.scope is not None:
            if service is None or service.name != self.scope.name:
                raise Invalid(f"{url} is not served by service {self.scope.name!r}", field)
            return service
        if self.principal.sees_all:
            return service
        owner = self.tenants.get(service.name) if service is not None else None
        if service is None or owner != self.principal.tenant_id:
            raise Invalid(f"{url} is not served by any of your services", field)
        return service


def _purge_record(job: PurgeJob) -> dict:
    """A purge as edges get it; ``scope`` only for a purge of one service."""
    record = {"seq": job.seq, "targets": job.targets, "soft": job.soft}
    if job.scope:
        record["scope"] = job.scope
    return record


def _check_tags(tags: Sequence[str]) -> None:
    """Tags come from response headers, which hold no control characters; edges rely on it."""
    for index, tag in enumerate(tags):
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in tag):
            raise Invalid("a tag cannot contain control characters", f"tags[{index}]")
