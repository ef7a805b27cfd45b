"""The control-plane store on SQLite and PostgreSQL: schema, tokens, atomic changes, counters
under concurrency, notifications, stats retention. (API behaviour is in test_api.py.)"""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text

from verge import config as vconfig
from verge.control import auth
from verge.control.models import AuditEntry, Base, Node, StatsBatch, StatsSample, Token, utcnow
from verge.control.store import (
    Conflict,
    PreconditionFailed,
    Store,
    normalize_url,
)

ADMIN = auth.Principal("t0", "root", "admin")


def _service(name: str, *hosts: str) -> vconfig.Service:
    return vconfig.Service.model_validate(
        {"name": name, "hosts": list(hosts) or [f"{name}.test"], "origins": ["http://127.0.0.1:9"]}
    )


def _node(store: Store, name: str = "edge-1") -> auth.Principal:
    credential = store.join_node(ADMIN, name, "http://127.0.0.1:1", "http://127.0.0.1:2")
    principal = store.authenticate(credential["credential"])
    assert principal is not None and principal.role == "node"
    return principal


def _run_together(count: int, work) -> list[object]:
    """Run work(i) in `count` threads released at the same moment; results or exceptions."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_migrations_create_exactly_the_models(store: Store) -> None:
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_migrate_is_idempotent_and_starts_at_config_version_1(store: Store) -> None:
    store.migrate()
    assert (store.config_version(), store.purge_seq()) == (1, 0)
    bundle = store.bundle()
    assert bundle["version"] == 1 and vconfig.Config.model_validate(bundle["config"]).services == []


def test_admin_token_is_made_once(store: Store) -> None:
    generated = store.ensure_admin_token()
    assert generated is not None and generated.startswith("vrg_")
    assert store.ensure_admin_token() is None
    principal = store.authenticate(generated)
    assert principal is not None and principal.role == "admin" and principal.sees_all


def test_an_operator_chosen_admin_token_works_across_restarts(store: Store) -> None:
    for chosen in ("plain secret", "vrg_admin_cli-test-token", "vrg_node_looks-like-a-node"):
        assert store.ensure_admin_token(chosen) is None
        assert store.ensure_admin_token(chosen) is None  # second start: already there
        principal = store.authenticate(chosen)
        assert principal is not None and principal.role == "admin"
    assert store.ensure_admin_token() is None  # an admin exists: nothing generated
    assert store.authenticate("vrg_admin_wrong-secret") is None


def test_only_secret_digests_are_stored(store: Store) -> None:
    made = store.create_token(ADMIN, "read_only", "ci")
    node = store.join_node(ADMIN, "edge-1", "http://127.0.0.1:1", "http://127.0.0.1:2")
    with store.engine.connect() as connection:
        dumped = " ".join(
            str(row)
            for table in ("tokens", "nodes")
            for row in connection.execute(text(f"SELECT * FROM {table}"))
        )
    for secret_text in (made["token"], node["credential"]):
        secret = auth.parse(secret_text)[1]
        assert secret not in dumped
        assert hashlib.sha256(secret.encode()).hexdigest() in dumped


def test_a_failed_change_leaves_no_trace(store: Store) -> None:
    store.create_service(ADMIN, _service("web", "a.test"))
    version = store.config_version()
    with store.reading() as session:
        audited = session.scalar(select(func.count()).select_from(AuditEntry))
    with pytest.raises(Conflict) as clash:
        store.create_service(ADMIN, _service("other", "b.test", "a.test"))
    assert clash.value.field == "hosts[1]"
    assert store.config_version() == version
    with store.reading() as session:
        assert session.scalar(select(func.count()).select_from(AuditEntry)) == audited
    assert [s["name"] for s in store.list_services(ADMIN)["items"]] == ["web"]
    store.create_service(ADMIN, _service("other", "b.test"))  # b.test was not left claimed


def test_concurrent_updates_of_one_version_let_exactly_one_win(store: Store) -> None:
    store.create_service(ADMIN, _service("web"))

    def update(index: int) -> dict:
        return store.update_service(ADMIN, "web", _service("web", f"h{index}.test"), 1)

    results = _run_together(4, update)
    winners = [r for r in results if isinstance(r, dict)]
    assert len(winners) == 1 and winners[0]["version"] == 2
    assert all(isinstance(r, PreconditionFailed) for r in results if r is not winners[0])
    assert store.get_service(ADMIN, "web")["hosts"] == winners[0]["hosts"]
    assert store.config_version() == 3


def test_purge_numbers_are_gap_free_in_commit_order(store: Store) -> None:
    results = _run_together(
        6, lambda i: [store.create_purge(ADMIN, tags=[f"t{i}-{n}"])["seq"] for n in range(3)]
    )
    seqs = sorted(seq for batch in results for seq in batch)  # type: ignore[union-attr]
    assert seqs == list(range(1, 19))
    assert [job["seq"] for job in store.purges_after(0)] == seqs
    assert [job["seq"] for job in store.purges_after(15)] == [16, 17, 18]


def test_concurrent_service_creates_get_distinct_config_versions(store: Store) -> None:
    results = _run_together(5, lambda i: store.create_service(ADMIN, _service(f"s{i}")))
    assert all(isinstance(r, dict) for r in results)
    assert store.config_version() == 6
    assert len(vconfig.Config.model_validate(store.bundle()["config"]).services) == 5


def test_subscribers_hear_of_committed_changes_only(store: Store) -> None:
    heard: list[str] = []
    store.subscribe(heard.append)
    store.create_service(ADMIN, _service("web", "a.test"))
    with pytest.raises(Conflict):
        store.create_service(ADMIN, _service("web", "b.test"))
    store.create_purge(ADMIN, tags=["x"])
    store.delete_service(ADMIN, "web")
    assert heard == ["config", "purges", "config"]


def test_the_bundle_is_built_once_per_version(store: Store) -> None:
    first = store.bundle()
    assert store.bundle() is first
    store.create_service(ADMIN, _service("web"))
    second = store.bundle()
    assert second is not first and second["version"] == first["version"] + 1


def test_duplicate_stats_batches_count_once_even_when_concurrent(store: Store) -> None:
    node = _node(store)
    sample = {"t": utcnow().timestamp(), "service": "web", "requests": 5}
    results = _run_together(4, lambda i: store.ingest_stats(node, [sample], "same-key"))
    assert sorted(r["duplicate"] for r in results) == [False, True, True, True]  # type: ignore[index]
    series = store.query_stats(ADMIN)["series"]
    assert sum(point["requests"] for point in series) == 5


def test_old_stats_are_pruned(store: Store) -> None:
    node = _node(store)
    now = utcnow()
    old, recent = (now - timedelta(days=9)).timestamp(), (now - timedelta(days=1)).timestamp()
    store.ingest_stats(node, [{"t": old, "service": "web", "requests": 1}], "old")
    store.ingest_stats(node, [{"t": recent, "service": "web", "requests": 2}], "new")
    with store.writing() as session:  # the "old" batch key was received long ago too
        session.get_one(StatsBatch, (node.node_id, "old")).received_at = now - timedelta(days=9)
    assert store.prune_stats(7, now=now) == 2
    with store.reading() as session:
        buckets = session.scalars(select(StatsSample.bucket)).all()
        keys = session.scalars(select(StatsBatch.key)).all()
    assert buckets == [int(recent) - int(recent) % 10] and keys == ["new"]


def test_acks_are_recorded_per_node_and_purge(store: Store) -> None:
    early = store.create_purge(ADMIN, tags=["before-join"])["seq"]
    node = _node(store)
    later = [store.create_purge(ADMIN, tags=[f"t{i}"])["seq"] for i in range(3)]
    store.ack_purges(node, later[1])
    with store.reading() as session:
        acked_seq = session.get_one(Node, node.node_id).acked_seq
    assert acked_seq == later[1]
    assert store.purge_status(ADMIN, later[0])["acked"] == ["edge-1"]
    assert store.purge_status(ADMIN, later[2])["pending"] == ["edge-1"]
    status = store.purge_status(ADMIN, early)  # queued before the node existed
    assert status["acked"] == [] and status["pending"] == []


def test_tokens_store_no_secret_and_revocation_sticks(store: Store) -> None:
    made = store.create_token(ADMIN, "join", "joiner")
    assert store.authenticate(made["token"]) is not None
    store.revoke_token(ADMIN, made["id"])
    assert store.authenticate(made["token"]) is None
    with store.reading() as session:
        assert session.get_one(Token, made["id"]).revoked_at is not None


def test_token_parsing() -> None:
    issued = auth.issue()
    assert auth.parse(issued.text) == (issued.id, issued.text.split("_", 2)[2])
    assert auth.is_node_id(auth.issue(node=True).id) and not auth.is_node_id(issued.id)
    token_id, secret = auth.parse("whatever-string")
    assert token_id.startswith("x") and secret == "whatever-string"
    assert auth.bearer("Bearer abc") == "abc" and auth.bearer("Basic abc") is None
    assert auth.bearer(None) is None and auth.bearer("Bearer ") is None


def test_urls() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("state/verge.db") == "sqlite:///state/verge.db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="in-memory"):
        Store("sqlite://")
