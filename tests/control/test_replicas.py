"""Several control-plane replicas on one PostgreSQL database (issue 19).

Real ``verge control`` processes where start-up is what is tested (bootstrap races, the
refusal without VERGE_SECRET, a change through A waking a long poll on B); in-process stores
and apps where one replica's view is enough (NOTIFY rather than polling wakes B, the bundle's
identity follows its content, a bundle B cannot build whole is refused).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from tests.control.conftest import ORIGIN, api_for, bearer, service_body
from tests.control.pg import Cluster, Unavailable
from tests.control.test_certs import Ca
from tests.control.test_fleet import VERGE, Proc
from verge import config as vconfig
from verge.certs import ensure_ca
from verge.control.auth import LoginCache, Principal
from verge.control.models import Token
from verge.control.store import Store

pytestmark = pytest.mark.timeout(120)
V1 = "/api/v1"
ADMIN_TOKEN = "vrg_admin_replica-test-token"
SECRET = "replica-test-secret"
ADMIN = Principal("t0", "root", "admin")


@pytest.fixture
def cluster(pg_cluster: Cluster | Unavailable, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    if isinstance(pg_cluster, Unavailable):
        pytest.skip(f"PostgreSQL unavailable: {pg_cluster}")
    monkeypatch.setenv("VERGE_SECRET", SECRET)
    return pg_cluster


@pytest.fixture
def pg_url(cluster: Cluster, pg_template: str) -> str:
    return cluster.new_database(pg_template)


class Replica:
    """A ``verge control`` process on 127.0.0.1:0 with an admin client."""

    def __init__(
        self, db: str, admin_token: str | None = ADMIN_TOKEN, timeout: float = 30.0
    ) -> None:
        token_args = ["--admin-token", admin_token] if admin_token else []
        self.proc = Proc(
            [*VERGE, "control", "--listen", "127.0.0.1:0", "--db", db, *token_args],
            "verge control ready",
            timeout,
        )
        self.url = self.proc.ready_line.split("ready: ")[1].strip()
        self.api = httpx.Client(base_url=self.url, timeout=30, headers=bearer(admin_token or ""))

    @property
    def output(self) -> str:
        return "".join(self.proc.lines)

    def stop(self) -> None:
        self.api.close()
        self.proc.kill()


START_SECONDS = 4.0
"""CPU seconds one `verge control` takes to come up here (imports, migrations): ten started
at once on two cores need about 20 s of the machine before the last is ready."""


def start_together(dbs: list[str], admin_token: str | None = ADMIN_TOKEN) -> list[Replica]:
    """Two replicas per database, all started at the same moment (fails unless all ready)."""
    timeout = 30.0 + START_SECONDS * 2 * len(dbs)  # a busy CI machine shares its two cores
    with ThreadPoolExecutor(2 * len(dbs)) as pool:
        futures = [pool.submit(Replica, db, admin_token, timeout) for db in dbs for _ in range(2)]
        errors, replicas = [], []
        for future in futures:
            try:
                replicas.append(future.result())
            except RuntimeError as exc:
                errors.append(str(exc))
    if errors:
        for replica in replicas:
            replica.stop()
        pytest.fail(f"{len(errors)} of {len(futures)} replicas did not start:\n" + errors[0])
    return replicas


@pytest.fixture
def pair(pg_url: str) -> Iterator[list[Replica]]:
    replicas = start_together([pg_url])
    yield replicas
    for replica in replicas:
        replica.stop()


def admin_count(url: str) -> int:
    store = Store(url)
    try:
        with store.reading() as session:
            return session.scalar(
                select(func.count()).select_from(Token).where(Token.role == "admin")
            )
    finally:
        store.close()


# ---- start-up ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)  # two batches of ten starts, each allowed 110 s on a busy machine
def test_replicas_started_together_with_one_admin_token_both_come_up(
    cluster: Cluster, pg_template: str
) -> None:
    # 10 pairs, five at a time (each pair on its own database); the first database is
    # empty, so that pair races on the migrations as well as on the bootstrap token
    for batch in range(2):
        urls = [cluster.new_database(None if batch == i == 0 else pg_template) for i in range(5)]
        replicas = start_together(urls)
        try:
            for replica in replicas:
                assert replica.api.get(f"{V1}/tokens").status_code == 200, replica.output
        finally:
            for replica in replicas:
                replica.stop()
        assert [admin_count(url) for url in urls] == [1] * 5


def test_without_admin_token_only_one_replica_makes_one(cluster: Cluster, pg_template: str) -> None:
    for _ in range(2):
        url = cluster.new_database(pg_template)
        replicas = start_together([url], admin_token=None)
        outputs = [replica.output for replica in replicas]
        for replica in replicas:
            replica.stop()
        printed = [
            line for out in outputs for line in out.splitlines() if "admin token: vrg_" in line
        ]
        assert len(printed) == 1, outputs
        assert sum("an admin token exists already" in out for out in outputs) == 1, outputs
        assert admin_count(url) == 1


def test_postgresql_without_secret_refused(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERGE_SECRET")
    result = subprocess.run(
        [*VERGE, "control", "--listen", "127.0.0.1:0", "--db", pg_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "VERGE_SECRET" in result.stderr and "Traceback" not in result.stderr


def test_replica_whose_secret_opens_no_key_refused(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, ca: Ca
) -> None:
    with api_for(Store(pg_url)) as a:
        cert, key = ca.issue("shop.test")
        body = {"name": "shop", "cert_pem": cert, "key_pem": key}
        assert a.post(f"{V1}/certificates", json=body).status_code == 201
        a.store.close()
    monkeypatch.setenv("VERGE_SECRET", "another-secret")
    result = subprocess.run(
        [*VERGE, "control", "--listen", "127.0.0.1:0", "--db", pg_url, "--admin-token", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "certificate 'shop'" in result.stderr and "Traceback" not in result.stderr


# ---- changes and revocations across replicas ---------------------------------------------------


def _join(replica: Replica, name: str) -> str:
    join = replica.api.post(f"{V1}/tokens", json={"role": "join", "name": "join"}).json()["token"]
    body = {"name": name, "url": "http://127.0.0.1:9", "admin_url": "http://127.0.0.1:9"}
    response = replica.api.post(f"{V1}/nodes/join", json=body, headers=bearer(join))
    assert response.status_code == 200, response.text
    return response.json()["credential"]


def _long_poll(url: str, credential: str, path: str, params: dict) -> tuple[httpx.Response, float]:
    response = httpx.get(url + path, params=params, headers=bearer(credential), timeout=30)
    return response, time.monotonic()


def test_change_through_a_wakes_long_polls_on_b(pair: list[Replica]) -> None:
    a, b = pair
    credential = _join(a, "edge-1")
    version = httpx.get(f"{b.url}{V1}/nodes/self/config", headers=bearer(credential)).json()[
        "version"
    ]
    with ThreadPoolExecutor(2) as pool:
        config = pool.submit(
            _long_poll,
            b.url,
            credential,
            f"{V1}/nodes/self/config",
            {"after": version, "wait": 20},
        )
        purges = pool.submit(
            _long_poll, b.url, credential, f"{V1}/nodes/self/purges", {"after": 0, "wait": 20}
        )
        time.sleep(0.3)  # both polls waiting on B (nothing to wait for: they must block)
        assert not config.done() and not purges.done()
        made = a.api.post(f"{V1}/services", json=service_body("shop"))
        changed = time.monotonic()
        assert made.status_code == 201, made.text
        assert a.api.post(f"{V1}/purge", json={"urls": ["http://shop.test/x"]}).status_code == 202
        purged = time.monotonic()
        answer, at = config.result(10)
        assert answer.status_code == 200 and answer.json()["version"] > version
        assert at - changed < 1.0
        jobs, at = purges.result(10)
        assert jobs.json()["purges"] and at - purged < 1.0


def test_token_revoked_on_a_is_refused_by_b_at_once(pair: list[Replica]) -> None:
    """B forgets its cached login when A's notification arrives: milliseconds, where B's
    login cache alone would accept the token for up to a second."""
    a, b = pair
    for _ in range(5):
        made = a.api.post(f"{V1}/tokens", json={"role": "read_only", "name": "ro"}).json()
        headers = bearer(made["token"])
        for _ in range(2):  # the second answer comes from B's login cache
            assert b.api.get(f"{V1}/services", headers=headers).status_code == 200
        assert a.api.delete(f"{V1}/tokens/{made['id']}").status_code == 204
        revoked = time.monotonic()
        while b.api.get(f"{V1}/services", headers=headers).status_code == 200:
            assert time.monotonic() - revoked < 0.5, "B still accepts the revoked token"


# ---- in-process replicas -----------------------------------------------------------------------


@pytest.fixture
def two_stores(pg_url: str) -> Iterator[tuple[Store, Store]]:
    a, b = Store(pg_url), Store(pg_url)
    yield a, b
    a.close()
    b.close()


def test_notification_not_polling_wakes_b(two_stores: tuple[Store, Store]) -> None:
    store_a, store_b = two_stores
    assert store_b.listen() and store_b.wait_listening(10)
    with api_for(store_a) as a, api_for(store_b, a.admin, poll_interval=30) as b:
        credential = a.join()
        version = b.get(f"{V1}/nodes/self/config", credential).json()["version"]
        done: dict[str, float] = {}

        def poll() -> None:
            answer = b.get(
                f"{V1}/nodes/self/config", credential, params={"after": version, "wait": 20}
            )
            assert answer.status_code == 200
            done["at"] = time.monotonic()

        waiter = threading.Thread(target=poll)
        waiter.start()
        time.sleep(0.3)
        a.service("shop")
        changed = time.monotonic()
        waiter.join(10)
        assert done["at"] - changed < 1.0  # B polls the database only every 30 s


def test_listener_reconnects_after_postgresql_drops_it(
    two_stores: tuple[Store, Store], cluster: Cluster
) -> None:
    store_a, store_b = two_stores
    heard: list[str] = []
    store_b.subscribe(heard.append)
    assert store_b.listen() and store_b.wait_listening(10)
    cluster.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + 10
    while store_b.hears_others and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store_b.wait_listening(10), "the listener did not come back"
    heard.clear()
    store_a.create_service(ADMIN, _spec("shop"))
    deadline = time.monotonic() + 5
    while "config" not in heard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "config" in heard


def _spec(name: str) -> vconfig.Service:
    return vconfig.Service.model_validate(
        {"name": name, "hosts": [f"{name}.test"], "origins": [ORIGIN]}
    )


def test_bundle_identity_follows_content(two_stores: tuple[Store, Store]) -> None:
    store_a, store_b = two_stores
    first = store_a.bundle()
    assert first["digest"].startswith("sha256:") and store_b.bundle() == first
    with api_for(store_a) as a:
        credential = a.join()
        a.service("shop")
        second = store_b.bundle()
        assert second["version"] > first["version"] and second["digest"] != first["digest"]
        assert store_a.bundle()["digest"] == second["digest"]
        served = a.get(f"{V1}/nodes/self/config", credential)
        assert served.headers["etag"] == f'"{second["digest"]}"'
        # a node that says what it holds: the same content waits, other content is answered
        # whatever the version numbers say (a replica or a restored database behind)
        same = {"after": second["version"], "digest": second["digest"], "wait": 0}
        assert a.get(f"{V1}/nodes/self/config", credential, params=same).status_code == 204
        stale = {"after": second["version"] + 5, "digest": first["digest"], "wait": 0}
        answer = a.get(f"{V1}/nodes/self/config", credential, params=stale)
        assert answer.status_code == 200 and answer.json()["digest"] == second["digest"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return Ca(ensure_ca(tmp_path_factory.mktemp("ca")))


def test_bundle_a_replica_cannot_build_whole_is_refused(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, ca: Ca
) -> None:
    store_a = Store(pg_url)
    with api_for(store_a) as a:
        credential = a.join()
        cert, key = ca.issue("shop.test")
        body = {"name": "shop", "cert_pem": cert, "key_pem": key}
        assert a.post(f"{V1}/certificates", json=body).status_code == 201
        monkeypatch.setenv("VERGE_SECRET", "not-the-one")
        store_b = Store(pg_url)
        with api_for(store_b, a.admin) as b:
            answer = b.get(f"{V1}/nodes/self/config", credential)
            assert answer.status_code == 503
            assert "certificate 'shop'" in answer.json()["error"]
        store_b.close()
        whole = a.get(f"{V1}/nodes/self/config", credential).json()
        assert [c["name"] for c in whole["config"]["tls"]["certificates"]] == ["shop"]
    store_a.close()


def test_login_looked_up_before_a_revocation_is_not_cached() -> None:
    cache = LoginCache(ttl=60)
    generation = cache.generation()
    cache.clear()  # a revocation (here or heard from another replica) while looking up
    cache.put("vrg_a_b", ADMIN, generation)
    assert cache.get("vrg_a_b") is None
    cache.put("vrg_a_b", ADMIN, cache.generation())
    assert cache.get("vrg_a_b") == ADMIN
