"""Edge functions and the edge KV in the control-plane store (the part of the store for issue 7).

Kept beside the store package rather than in it: :class:`FunctionStore` wraps a
:class:`~verge.control.store.Store` and uses only its public unit of work (``reading()``,
``writing()``, ``bump()``, ``counter()``, ``audit()``, ``emit()``, ``list_scoped()``) and
its public lookups (``visible_service()``, ``tenant_for_service()``), exactly as the store's
own aggregates do (verge.control.store).

Functions: every deploy stores a new *version* (spec + module bytes); exactly one version of
a name is ``active`` and only that one is in the config bundle, with its module named
``sha256:<hex>``. Deploy and rollback flip the active flag and bump the config version in
one transaction, so edges switch with the next long poll, all functions at once. A function
belongs to the tenant of its service: a tenant deploys only onto services it can see.

KV: one row per (namespace, key) holds the newest value; each write or deletion takes the next
number of the ``kv_seq`` counter (in commit order, like purges), and deletions stay as
tombstones, so an edge that has applied everything up to N asks for ``seq > N`` and converges
(eventual consistency, last writer wins). A namespace belongs to the tenant that first wrote
it or first granted it to a function.

Functions granted ``kv_write`` write through the same path: their edge queues the writes in
an outbox (verge.edge.compute.KVOutbox) and its agent sends them here in batches
(:meth:`FunctionStore.kv_node_writes`), where they take kv seq numbers like API writes, in
the order this store applies them: concurrent writers of a key, edges or the API, resolve by
last writer wins in kv seq order (the API's ETag is that seq). A node may write only the
namespaces an active function is granted ``kv_write`` on. Per outbox (its random id, per
node) a counter keeps the highest write id applied, so a batch sent again after a lost
answer is not applied twice: the edge sends its writes in id order.

Logs: edges report failed invocations, stderr and load errors; the newest ``LOGS_KEPT`` per
function are kept.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from verge import config as vconfig
from verge.control.auth import Principal
from verge.control.models import (
    CONFIG_VERSION,
    KV_SEQ,
    Counter,
    FunctionLog,
    FunctionVersion,
    KvEntry,
    KvNamespace,
    Tenant,
    utcnow,
)
from verge.control.store import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Store,
    StoreError,
    iso,
    keep_newest,
    page_of,
    scoped,
    validation_error,
)

MiB = 1024 * 1024
MAX_MODULE_BYTES = 16 * MiB
WASM_MAGIC = b"\0asm"
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1 * MiB
"""The same bounds as the edge's host API (verge.compute.host), so every stored value fits."""
KV_BATCH = 1000
"""Most KV changes handed to a node in one answer."""
KV_NODE_WRITES = 1000
"""Most function writes one node upload may carry."""
VALUE_BASE64_CHARS = (MAX_VALUE_BYTES // 3 + 1) * 4
"""Base64 of the largest value: a longer text is refused before decoding."""
OUTBOX_COUNTER_PREFIX = "kvo:"
LOGS_KEPT = 300
"""Log records kept per function (the newest)."""
MAX_LOG_RECORDS = 1000
"""Most log records one node upload may carry."""
_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SPEC_FIELDS = (
    "name",
    "service",
    "routes",
    "env",
    "fetch_hosts",
    "kv_namespace",
    "kv_write",
    "cpu_ms",
    "memory_mb",
    "max_subrequests",
    "phase",
)


class TooLarge(StoreError):
    status = 413


def module_ref(digest: str) -> str:
    """How the bundle names a module the edge fetches from the control plane."""
    return f"sha256:{digest}"


def check_module(module: bytes) -> str:
    """The module's sha256 (hex) after the size and WebAssembly magic checks."""
    if len(module) > MAX_MODULE_BYTES:
        raise TooLarge(f"the module is {len(module)} bytes; at most {MAX_MODULE_BYTES}", "module")
    if not module.startswith(WASM_MAGIC):
        raise Invalid("not a WebAssembly binary (no \\0asm magic); upload the .wasm", "module")
    return hashlib.sha256(module).hexdigest()


def check_namespace(name: str, field: str = "namespace") -> str:
    if len(name) > 63 or not _NAMESPACE_RE.fullmatch(name):
        raise Invalid(
            f"namespace {name!r} must be a slug: lower-case letters, digits and '-'", field
        )
    return name


def check_key(key: str) -> str:
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise Invalid(f"a key is 1 to {MAX_KEY_BYTES} bytes (UTF-8)", "key")
    return key


class FunctionStore:
    """Functions, their logs and the edge KV, on top of ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- functions ------------------------------------------------------------------------------

    def deploy(self, principal: Principal, fields: dict[str, Any], module: bytes) -> dict:
        """A new active version of ``fields["name"]`` (an EdgeFunction without ``module``)."""
        digest = check_module(module)
        spec = _function_spec(fields, digest)
        store = self.store
        with store.writing() as session:
            service = store.visible_service(session, principal, spec.service)
            tenant_id = service.tenant_id
            rows = self._versions(session, spec.name, lock=True)
            if rows and rows[0].tenant_id != tenant_id:
                where = "" if principal.can_see_tenant(rows[0].tenant_id) else " another tenant's"
                raise Conflict(f"the name {spec.name!r} is taken by{where} function", "name")
            if spec.kv_namespace:
                self._claim_namespace(
                    session, principal, spec.kv_namespace, tenant_id, "kv_namespace"
                )
            for row in rows:
                row.active = False
            version = max((row.version for row in rows), default=0) + 1
            row = FunctionVersion(
                name=spec.name,
                tenant_id=tenant_id,
                service=spec.service,
                version=version,
                spec=spec.model_dump(mode="json"),
                module_sha256=digest,
                module=module,
                size=len(module),
                active=True,
                created_at=utcnow(),
                created_by=principal.actor,
            )
            session.add(row)
            session.flush()
            config_version = store.bump(session, CONFIG_VERSION)
            store.audit(
                session,
                principal,
                "function.deploy",
                f"function:{spec.name}",
                tenant_id,
                {
                    "version": version,
                    "service": spec.service,
                    "module_sha256": digest,
                    "size": len(module),
                    "routes": spec.routes,
                    "env": sorted(spec.env),
                    "config_version": config_version,
                },
            )
            view = _function_view(row, service.tenant.name)
        store.emit("config")
        return view

    def list(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = (
            select(FunctionVersion)
            .where(FunctionVersion.active.is_(True))
            .order_by(FunctionVersion.name)
        )
        return self.store.list_scoped(
            principal,
            query,
            FunctionVersion.tenant_id,
            limit,
            offset,
            lambda row: _function_view(row, row.tenant.name),
        )

    def get(self, principal: Principal, name: str) -> dict:
        """``{..active version.., "versions": [{"version", "module_sha256", ...}]}``."""
        with self.store.reading() as session:
            rows = self._visible(session, principal, name)
            active = next(row for row in rows if row.active)
            return {
                **_function_view(active, active.tenant.name),
                "versions": [_version_view(row) for row in rows],
            }

    def rollback(self, principal: Principal, name: str, version: int | None = None) -> dict:
        """Make ``version`` (default: the one before the active one) the active version."""
        store = self.store
        with store.writing() as session:
            rows = self._visible(session, principal, name, lock=True)
            active = next(row for row in rows if row.active)
            target = _rollback_target(rows, active, version)
            if target is not active:
                active.active, target.active = False, True
                session.flush()
                config_version = store.bump(session, CONFIG_VERSION)
                store.audit(
                    session,
                    principal,
                    "function.rollback",
                    f"function:{name}",
                    target.tenant_id,
                    {
                        "from": active.version,
                        "to": target.version,
                        "config_version": config_version,
                    },
                )
            view = _function_view(target, target.tenant.name)
        if target is not active:
            store.emit("config")
        return view

    def delete(self, principal: Principal, name: str) -> None:
        store = self.store
        with store.writing() as session:
            rows = self._visible(session, principal, name, lock=True)
            tenant_id = rows[0].tenant_id
            for row in rows:
                session.delete(row)
            session.execute(delete(FunctionLog).where(FunctionLog.name == name))
            session.flush()
            config_version = store.bump(session, CONFIG_VERSION)
            store.audit(
                session,
                principal,
                "function.delete",
                f"function:{name}",
                tenant_id,
                {"versions": len(rows), "config_version": config_version},
            )
        store.emit("config")

    def module(self, digest: str) -> bytes:
        """The bytes of a module by sha256 (for nodes)."""
        with self.store.reading() as session:
            found = session.scalar(
                select(FunctionVersion.module)
                .where(FunctionVersion.module_sha256 == digest.lower())
                .limit(1)
            )
        if found is None:
            raise NotFound(f"no module with sha256 {digest}")
        return found

    def _versions(self, session: Session, name: str, lock: bool = False) -> list[FunctionVersion]:
        query = (
            select(FunctionVersion)
            .where(FunctionVersion.name == name)
            .order_by(FunctionVersion.version.desc())
        )
        if lock:
            query = query.with_for_update(of=FunctionVersion)
        return list(session.scalars(query).unique().all())

    def _visible(
        self, session: Session, principal: Principal, name: str, lock: bool = False
    ) -> list[FunctionVersion]:
        rows = self._versions(session, name, lock)
        if not rows or not principal.can_see_tenant(rows[0].tenant_id):
            raise NotFound(f"no function named {name!r}")
        return rows

    # -- logs -------------------------------------------------------------------------------------

    def add_logs(self, principal: Principal, records: Sequence[dict]) -> dict:
        """Store a node's log records (``{"function", "t"?, ...}``), keeping LOGS_KEPT each."""
        records = list(records)[:MAX_LOG_RECORDS]
        names: set[str] = set()
        with self.store.writing() as session:
            for record in records:
                name = str(record.get("function", ""))[:63]
                if not name:
                    continue
                names.add(name)
                session.add(
                    FunctionLog(
                        name=name, node=principal.name, at=_record_time(record), record=record
                    )
                )
            session.flush()
            for name in names:
                self._prune_logs(session, name)
        return {"accepted": len(records)}

    def _prune_logs(self, session: Session, name: str) -> None:
        keep_newest(session, FunctionLog, FunctionLog.name == name, LOGS_KEPT)

    def logs(self, principal: Principal, name: str, limit: int = 100) -> dict:
        """The newest ``limit`` records, oldest first: ``{"items": [{"at", "node", ...}]}``."""
        with self.store.reading() as session:
            self._visible(session, principal, name)
            rows = session.scalars(
                select(FunctionLog)
                .where(FunctionLog.name == name)
                .order_by(FunctionLog.id.desc())
                .limit(limit)
            ).all()
        return {
            "items": [{**row.record, "at": iso(row.at), "node": row.node} for row in reversed(rows)]
        }

    # -- KV -----------------------------------------------------------------------------------------

    def kv_seq(self) -> int:
        with self.store.reading() as session:
            return self.store.counter(session, KV_SEQ)

    def kv_put(
        self,
        principal: Principal,
        namespace: str,
        key: str,
        value: bytes,
        tenant: str | None = None,
    ) -> dict:
        check_namespace(namespace)
        check_key(key)
        if len(value) > MAX_VALUE_BYTES:
            raise TooLarge(f"the value is {len(value)} bytes; at most {MAX_VALUE_BYTES}", "value")
        store = self.store
        with store.writing() as session:
            ns = session.get(KvNamespace, namespace)
            if ns is None:
                owner = store.tenant_for_service(session, principal, tenant)
                ns = self._claim_namespace(session, principal, namespace, owner.id, "namespace")
            elif not principal.can_see_tenant(ns.tenant_id):
                raise Conflict(f"KV namespace {namespace!r} belongs to another tenant", "namespace")
            seq = self._set_entry(session, namespace, key, value)
            store.audit(
                session,
                principal,
                "kv.put",
                f"kv:{namespace}/{key}",
                ns.tenant_id,
                {"seq": seq, "size": len(value)},
            )
        store.emit("kv")
        return {"namespace": namespace, "key": key, "seq": seq, "size": len(value)}

    def _set_entry(
        self, session: Session, namespace: str, key: str, value: bytes | None
    ) -> int | None:
        """Write (``value`` None: delete) one key with the next kv seq; that seq, or None
        for the deletion of an absent key (nothing changes). The one write path of the API
        and of the edges' function writes. Locks in one order, the kv_seq counter first,
        then the key (PostgreSQL: two writers of a key never wait on each other crosswise);
        a caller creates namespaces before, never while holding the counter."""
        session.execute(select(Counter.value).where(Counter.name == KV_SEQ).with_for_update())
        entry = session.get(KvEntry, (namespace, key), with_for_update=True)
        if value is None and (entry is None or entry.deleted):
            return None
        seq = self.store.bump(session, KV_SEQ)
        if entry is None:
            entry = KvEntry(namespace=namespace, key=key)
            session.add(entry)
        entry.value, entry.deleted = (b"", True) if value is None else (value, False)
        entry.seq, entry.updated_at = seq, utcnow()
        return seq

    def kv_node_writes(self, principal: Principal, outbox: str, writes: Sequence[dict]) -> dict:
        """Apply a node's queued function writes (``{"id","namespace","key","value":
        base64|null,"function"?}``, ids growing per outbox) in one transaction.

        Returns ``{"kv_seq", "applied", "refused", "duplicates", "results": [{"id",
        "seq"} | {"id", "duplicate": true} | {"id", "error", "field", "status"}]}`` in the
        order of ``writes``. A write refused (a namespace no active function may write, a bad
        key, a value over 1 MiB) is answered, not retried: the others still apply. Writes of
        one key in one batch apply as the last of them (it would win anyway).
        """
        store = self.store
        ordered = sorted(writes, key=lambda write: int(write["id"]))
        results: dict[int, dict] = {}
        with store.writing() as session:
            mark = self._outbox_mark(session, principal, outbox)
            grants = self._write_grants(session)
            latest: dict[tuple[str, str], tuple[list[int], bytes | None, str | None]] = {}
            refused: list[tuple[dict, StoreError]] = []
            for write in ordered:
                write_id = int(write["id"])
                if write_id <= mark.value:
                    results[write_id] = {"id": write_id, "duplicate": True}
                    continue
                try:
                    item, value = _node_write(write, grants)
                except StoreError as exc:
                    refused.append((write, exc))
                    results[write_id] = {
                        "id": write_id,
                        "error": exc.message,
                        "field": exc.field,
                        "status": exc.status,
                    }
                    continue
                ids = latest.pop(item, ([], None, None))[0]  # re-added: applied in write order
                latest[item] = ([*ids, write_id], value, write.get("function"))
            applied = self._apply_node_writes(session, principal, latest, grants, results)
            if refused:
                self._audit_refused(session, principal, refused)
            if ordered:
                mark.value = max(mark.value, int(ordered[-1]["id"]))
            kv_seq = store.counter(session, KV_SEQ)
        if applied:
            store.emit("kv")
        answers = [results[int(write["id"])] for write in writes]
        return {
            "kv_seq": kv_seq,
            "applied": sum(1 for a in answers if "seq" in a),
            "refused": sum(1 for a in answers if "error" in a),
            "duplicates": sum(1 for a in answers if a.get("duplicate")),
            "results": answers,
        }

    def _outbox_mark(self, session: Session, principal: Principal, outbox: str) -> Counter:
        """The (locked) counter of the highest write id applied from a node's outbox."""
        name = outbox_counter(principal.node_id or 0, outbox)
        mark = session.get(Counter, name, with_for_update=True)
        if mark is None:  # a concurrent first batch of the same outbox: 409, sent again
            mark = Counter(name=name, value=0)
            session.add(mark)
            session.flush()
        return mark

    def _write_grants(self, session: Session) -> dict[str, int]:
        """Namespace -> tenant of the active functions granted ``kv_write`` (every node
        runs every active function)."""
        rows = session.execute(
            select(FunctionVersion.spec, FunctionVersion.tenant_id).where(
                FunctionVersion.active.is_(True)
            )
        ).all()
        return {
            spec["kv_namespace"]: tenant_id
            for spec, tenant_id in rows
            if spec.get("kv_write") and spec.get("kv_namespace")
        }

    def _apply_node_writes(
        self,
        session: Session,
        principal: Principal,
        latest: dict[tuple[str, str], tuple[list[int], bytes | None, str | None]],
        grants: dict[str, int],
        results: dict[int, dict],
    ) -> int:
        """Write each key's last value; audit once per namespace (sizes, never values)."""
        audits: dict[str, dict] = {}
        changed = 0
        for namespace in sorted({namespace for namespace, _ in latest}):  # before the counter
            if session.get(KvNamespace, namespace) is None:
                self._claim_namespace(session, principal, namespace, grants[namespace], "namespace")
        for (namespace, key), (ids, value, function) in latest.items():
            seq = self._set_entry(session, namespace, key, value)
            for write_id in ids:
                results[write_id] = {"id": write_id, "seq": seq}
            if seq is None:
                continue
            changed += 1
            audit = audits.setdefault(
                namespace,
                {"puts": 0, "deletes": 0, "bytes": 0, "functions": set(), "seqs": [seq, seq]},
            )
            audit["deletes" if value is None else "puts"] += 1
            audit["bytes"] += len(value or b"")
            audit["seqs"][1] = seq
            if function:
                audit["functions"].add(str(function)[:63])
        for namespace, detail in audits.items():
            detail["functions"] = sorted(detail["functions"])
            self.store.audit(
                session, principal, "kv.node_write", f"kv:{namespace}", grants[namespace], detail
            )
        return changed

    def _audit_refused(
        self, session: Session, principal: Principal, refused: list[tuple[dict, StoreError]]
    ) -> None:
        namespaces = sorted({str(write.get("namespace"))[:63] for write, _ in refused})
        self.store.audit(
            session,
            principal,
            "kv.node_write.refused",
            f"node:{principal.name}",
            None,
            {
                "writes": len(refused),
                "namespaces": namespaces[:20],
                "reason": refused[0][1].message,
            },
        )

    def kv_get(self, principal: Principal, namespace: str, key: str) -> tuple[bytes, int]:
        """(value, seq) of a live key."""
        with self.store.reading() as session:
            self._visible_namespace(session, principal, namespace)
            entry = session.get(KvEntry, (namespace, key))
            if entry is None or entry.deleted:
                raise NotFound(f"no key {key!r} in namespace {namespace!r}", "key")
            return entry.value, entry.seq

    def kv_delete(self, principal: Principal, namespace: str, key: str) -> dict:
        store = self.store
        with store.writing() as session:
            ns = self._visible_namespace(session, principal, namespace)
            seq = self._set_entry(session, namespace, key, None)
            if seq is None:
                raise NotFound(f"no key {key!r} in namespace {namespace!r}", "key")
            store.audit(
                session, principal, "kv.delete", f"kv:{namespace}/{key}", ns.tenant_id, {"seq": seq}
            )
        store.emit("kv")
        return {"namespace": namespace, "key": key, "seq": seq}

    def kv_keys(
        self,
        principal: Principal,
        namespace: str,
        prefix: str = "",
        limit: int = 50,
        offset: int = 0,
    ) -> dict:
        query = (
            select(
                KvEntry.key,
                KvEntry.seq,
                func.length(KvEntry.value).label("size"),
                KvEntry.updated_at,
            )
            .where(KvEntry.namespace == namespace, KvEntry.deleted.is_(False))
            .order_by(KvEntry.key)
        )
        if prefix:
            query = query.where(KvEntry.key.startswith(prefix, autoescape=True))
        with self.store.reading() as session:
            self._visible_namespace(session, principal, namespace)
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.execute(query.limit(limit).offset(offset)).all()
        items = [
            {"key": key, "seq": seq, "size": size, "updated_at": iso(updated)}
            for key, seq, size, updated in rows
        ]
        return page_of(items, total, limit, offset)

    def kv_namespaces(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        live = (
            select(func.count())
            .where(KvEntry.namespace == KvNamespace.name, KvEntry.deleted.is_(False))
            .correlate(KvNamespace)
            .scalar_subquery()
        )
        query = (
            select(KvNamespace.name, Tenant.name.label("tenant"), live.label("keys"))
            .join(Tenant, Tenant.id == KvNamespace.tenant_id)
            .order_by(KvNamespace.name)
        )
        query = scoped(query, principal, KvNamespace.tenant_id)
        with self.store.reading() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.execute(query.limit(limit).offset(offset)).all()
        items = [{"namespace": name, "tenant": tenant, "keys": keys} for name, tenant, keys in rows]
        return page_of(items, total, limit, offset)

    def kv_changes(self, after: int, limit: int = KV_BATCH) -> list[dict]:
        """Changes with seq > after, oldest first; values base64, ``null`` for a deletion."""
        with self.store.reading() as session:
            rows = session.scalars(
                select(KvEntry).where(KvEntry.seq > after).order_by(KvEntry.seq).limit(limit)
            ).all()
            return [_change_view(row) for row in rows]

    def _claim_namespace(
        self, session: Session, principal: Principal, name: str, tenant_id: int, field: str
    ) -> KvNamespace:
        """The namespace, made for ``tenant_id`` when new; another tenant's is a conflict."""
        check_namespace(name, field)
        ns = session.get(KvNamespace, name)
        if ns is None:
            ns = KvNamespace(name=name, tenant_id=tenant_id, created_at=utcnow())
            session.add(ns)
            session.flush()
            self.store.audit(session, principal, "kv.namespace.create", f"kv:{name}", tenant_id)
        elif ns.tenant_id != tenant_id:
            raise Conflict(f"KV namespace {name!r} belongs to another tenant", field)
        return ns

    def _visible_namespace(self, session: Session, principal: Principal, name: str) -> KvNamespace:
        ns = session.get(KvNamespace, name)
        if ns is None or not principal.can_see_tenant(ns.tenant_id):
            raise NotFound(f"no KV namespace named {name!r}", "namespace")
        return ns


# ---------------------------------------------------------------------------------------------
# Checks and views
# ---------------------------------------------------------------------------------------------


def _function_spec(fields: dict[str, Any], digest: str) -> vconfig.EdgeFunction:
    data = {key: fields[key] for key in _SPEC_FIELDS if fields.get(key) is not None}
    try:
        spec = vconfig.EdgeFunction.model_validate({**data, "module": module_ref(digest)})
    except ValidationError as exc:
        raise validation_error(exc) from None
    if spec.kv_write and not spec.kv_namespace:
        raise Invalid("kv_write needs a kv_namespace", "kv_write")
    return spec


def outbox_counter(node_id: int, outbox: str) -> str:
    """The counter (32 characters at most) holding the highest write id applied from one
    outbox of one node."""
    digest = hashlib.sha256(f"{node_id}/{outbox}".encode()).hexdigest()
    return OUTBOX_COUNTER_PREFIX + digest[:28]


def _node_write(write: dict, grants: dict[str, int]) -> tuple[tuple[str, str], bytes | None]:
    """((namespace, key), value or None for a deletion) of a node's write, checked."""
    namespace = check_namespace(str(write.get("namespace", "")))
    if namespace not in grants:
        raise Forbidden(
            f"no active function is granted kv_write on namespace {namespace!r}", "namespace"
        )
    key = check_key(str(write.get("key", "")))
    if "\0" in key:
        raise Invalid("a key may not contain NUL", "key")
    encoded = write.get("value")
    if encoded is None:
        return (namespace, key), None
    if len(encoded) > VALUE_BASE64_CHARS:
        raise TooLarge(f"the value is over {MAX_VALUE_BYTES} bytes", "value")
    try:
        value = base64.b64decode(encoded, validate=True)
    except (ValueError, TypeError):
        raise Invalid("the value is not valid base64", "value") from None
    if len(value) > MAX_VALUE_BYTES:
        raise TooLarge(f"the value is {len(value)} bytes; at most {MAX_VALUE_BYTES}", "value")
    return (namespace, key), value


def _rollback_target(
    rows: list[FunctionVersion], active: FunctionVersion, version: int | None
) -> FunctionVersion:
    if version is None:
        earlier = [row for row in rows if row.version < active.version]
        if not earlier:
            raise Conflict(
                f"{active.name!r} has no version before {active.version} to roll back to",
                "version",
            )
        return max(earlier, key=lambda row: row.version)
    for row in rows:
        if row.version == version:
            return row
    raise NotFound(f"{active.name!r} has no version {version}", "version")


def _function_view(row: FunctionVersion, tenant: str) -> dict:
    """The active version as the API shows it: env names only (values may be secrets)."""
    spec = row.spec
    return {
        "name": row.name,
        "tenant": tenant,
        "service": row.service,
        "version": row.version,
        "module_sha256": row.module_sha256,
        "size": row.size,
        "routes": spec["routes"],
        "env": sorted(spec.get("env") or {}),
        "fetch_hosts": spec.get("fetch_hosts") or [],
        "kv_namespace": spec.get("kv_namespace"),
        "kv_write": bool(spec.get("kv_write")),
        "cpu_ms": spec.get("cpu_ms"),
        "memory_mb": spec.get("memory_mb"),
        "max_subrequests": spec.get("max_subrequests"),
        "phase": spec.get("phase", "request"),
        "created_at": iso(row.created_at),
        "created_by": row.created_by,
    }


def _version_view(row: FunctionVersion) -> dict:
    return {
        "version": row.version,
        "active": row.active,
        "service": row.service,
        "module_sha256": row.module_sha256,
        "size": row.size,
        "created_at": iso(row.created_at),
        "created_by": row.created_by,
    }


def _change_view(row: KvEntry) -> dict:
    value = None if row.deleted else base64.b64encode(row.value).decode("ascii")
    return {"seq": row.seq, "namespace": row.namespace, "key": row.key, "value": value}


def _record_time(record: dict):  # noqa: ANN202 (datetime)
    from datetime import UTC, datetime

    try:
        return datetime.fromtimestamp(float(record["t"]), UTC)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return utcnow()


__all__ = [
    "MAX_KEY_BYTES",
    "MAX_MODULE_BYTES",
    "MAX_VALUE_BYTES",
    "KV_NODE_WRITES",
    "VALUE_BASE64_CHARS",
    "FunctionStore",
    "TooLarge",
    "check_module",
    "module_ref",
]
