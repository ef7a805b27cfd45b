"""Fixtures for the control plane: a store on SQLite and on PostgreSQL, and the API over it.

``db_url`` is parametrised, so every test that uses it (directly or through ``store`` /
``api``) runs once per backend. The PostgreSQL cluster starts once per session, only when a
PostgreSQL test runs; if it cannot start, those tests are skipped with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.control.pg import Cluster, Unavailable, start_cluster
from verge.control.api import Settings, create_app
from verge.control.store import Store

with warnings.catch_warnings():  # starlette nudges towards httpx2; httpx is what we have
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ORIGIN = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster | Unavailable]:
    try:
        cluster = start_cluster()
    except Unavailable as exc:
        yield exc
        return
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_template(pg_cluster: Cluster | Unavailable) -> str | None:
    """A migrated database that test databases are copied from."""
    if isinstance(pg_cluster, Unavailable):
        return None
    url = pg_cluster.new_database()
    store = Store(url)
    store.migrate()
    store.close()
    return url.rsplit("/", 1)[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/control.db"
    cluster = request.getfixturevalue("pg_cluster")
    if isinstance(cluster, Unavailable):
        pytest.skip(f"PostgreSQL unavailable: {cluster}")
    return cluster.new_database(request.getfixturevalue("pg_template"))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    store.migrate()
    yield store
    store.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def service_body(name: str, *hosts: str, **extra: object) -> dict:
    return {"name": name, "hosts": list(hosts) or [f"{name}.test"], "origins": [ORIGIN], **extra}


@dataclass
class Api:
    """A TestClient on the app, authenticated as admin, with helpers for common set-ups."""

    client: TestClient
    store: Store
    admin: str

    def get(self, path: str, token: str | None = None, **kw):
        return self.client.get(path, headers=self._headers(token, kw), **kw)

    def post(self, path: str, token: str | None = None, **kw):
        return self.client.post(path, headers=self._headers(token, kw), **kw)

    def put(self, path: str, token: str | None = None, **kw):
        return self.client.put(path, headers=self._headers(token, kw), **kw)

    def delete(self, path: str, token: str | None = None, **kw):
        return self.client.delete(path, headers=self._headers(token, kw), **kw)

    def _headers(self, token: str | None, kw: dict) -> dict[str, str]:
        return {**bearer(token or self.admin), **kw.pop("headers", {})}

    def tenant(self, name: str, role: str = "tenant_admin", zones: tuple[str, ...] = ()) -> str:
        """Create tenant ``name`` (if needed) with ``zones`` delegated to it (its tokens may
        claim hosts only inside them) and return a new token of ``role`` for it."""
        created = self.post("/api/v1/tenants", json={"name": name, "zones": list(zones)})
        if created.status_code == 409 and zones:
            added = self.post(f"/api/v1/tenants/{name}/zones", json={"zones": list(zones)})
            assert added.status_code == 200, added.text
        response = self.post("/api/v1/tokens", json={"role": role, "tenant": name})
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def service(self, name: str, *hosts: str, token: str | None = None, **extra) -> dict:
        response = self.post("/api/v1/services", token, json=service_body(name, *hosts, **extra))
        assert response.status_code == 201, response.text
        return response.json()

    def join(self, name: str = "edge-1", region: str | None = "eu") -> str:
        """A node credential for a freshly joined node ``name``."""
        join = self.post("/api/v1/tokens", json={"role": "join", "name": "join"}).json()["token"]
        body = {
            "name": name,
            "url": "http://127.0.0.1:18080",
            "admin_url": "http://127.0.0.1:18081",
            "region": region,
        }
        response = self.post("/api/v1/nodes/join", join, json=body)
        assert response.status_code == 200, response.text
        return response.json()["credential"]


@contextmanager
def api_for(store: Store, admin: str | None = None, **settings: object) -> Iterator[Api]:
    """The API over ``store``; a new admin token unless ``admin`` (another replica's) is given."""
    admin = admin or store.ensure_admin_token()
    assert admin is not None
    app = create_app(store, Settings(**settings))  # type: ignore[arg-type]
    with TestClient(app) as client:
        yield Api(client, store, admin)


@pytest.fixture
def api(store: Store) -> Iterator[Api]:
    with api_for(store, poll_interval=0.1) as api:
        yield api
