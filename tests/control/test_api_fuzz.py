"""Fuzzing the control-plane API from its own OpenAPI schema (schemathesis, in-process ASGI).

Every operation of GET /openapi.json gets generated requests, valid and invalid, as an admin,
as a tenant admin, as an edge node (the node API only), and with credentials that must not
work (none, a wrong token, a revoked token). The checks: no answer is a 5xx, and without
good credentials every operation but the deliberately public ones answers 401 or 403.

Deterministic (Hypothesis derandomized, no example database) and bounded in time: a few
examples per operation, one SQLite store for the module, long polls that never wait.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.control.conftest import bearer, service_body
from verge.control.api import Settings, create_app
from verge.control.store import Store

with warnings.catch_warnings():  # starlette nudges towards httpx2; httpx is what we have
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

EXAMPLES = int(os.environ.get("VERGE_FUZZ_EXAMPLES", "8"))
"""Generated requests per operation and credential (raise it to hunt: VERGE_FUZZ_EXAMPLES=200)."""

PUBLIC = {"GET /healthz"}
"""Operations that answer without a token, on purpose (liveness for load balancers)."""

V1 = "/api/v1"


@dataclass
class Control:
    """The app under test and one credential of each kind."""

    app: object
    admin: str
    tenant: str
    node: str
    revoked: str


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/control.db")
    store.migrate()
    admin = store.ensure_admin_token()
    assert admin is not None
    settings_ = Settings(max_wait=0.0, poll_interval=0.05, monitor_interval=0)
    app = create_app(store, settings_)
    with TestClient(app) as client:  # the set-up, before the fuzzer runs the app itself
        control = Control(app, admin, *_credentials(client, admin))
    yield control
    store.close()


def _credentials(client: TestClient, admin: str) -> tuple[str, str, str]:
    """A tenant admin (with a service to find), a node credential, a revoked token."""

    def post(path: str, token: str, json: dict) -> dict:
        response = client.post(V1 + path, headers=bearer(token), json=json)
        assert response.status_code in (200, 201), response.text
        return response.json()

    post("/tenants", admin, {"name": "acme"})
    tenant = post("/tokens", admin, {"role": "tenant_admin", "tenant": "acme"})["token"]
    post("/services", admin, {**service_body("web"), "tenant": "acme"})
    join = post("/tokens", admin, {"role": "join", "name": "join"})["token"]
    node_body = {"name": "edge-1", "url": "http://127.0.0.1:1", "admin_url": "http://127.0.0.1:2"}
    node = post("/nodes/join", join, node_body)["credential"]
    revoked = post("/tokens", admin, {"role": "admin", "name": "gone"})
    response = client.delete(f"{V1}/tokens/{revoked['id']}", headers=bearer(admin))
    assert response.status_code == 204
    return tenant, node, revoked["token"]


@pytest.fixture(scope="module")
def control_schema(control: Control) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_asgi("/openapi.json", control.app)
    schema.config.generation.update(
        deterministic=True,
        database="none",
        with_security_parameters=False,  # the tests send the credentials themselves
    )
    return schema


def _operations() -> list[str]:
    """ "METHOD /path" of every operation in the schema: to name the tests when they are
    collected (building the schema opens no database; the store's file is never created)."""
    unopened = Store(f"sqlite:///{tempfile.gettempdir()}/verge-fuzz-never-opened.db")
    spec = create_app(unopened).openapi()
    return [
        f"{method.upper()} {path}" for path, methods in spec["paths"].items() for method in methods
    ]


OPERATIONS = _operations()
NODE_OPERATIONS = [label for label in OPERATIONS if " /api/v1/nodes/self/" in label]


def fuzz(schema: schemathesis.BaseSchema, label: str, check, max_examples: int) -> None:
    """Run `check` on generated cases of one operation: valid ones and invalid ones."""
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    with contextlib.suppress(Exception):  # an operation without inputs has no invalid cases
        strategy = strategy | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        check(case)

    run()


@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_server_error_as_admin(operation: str, control: Control, control_schema) -> None:
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=bearer(control.admin), checks=[not_a_server_error])

    fuzz(control_schema, operation, check, EXAMPLES)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_server_error_as_tenant(operation: str, control: Control, control_schema) -> None:
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=bearer(control.tenant), checks=[not_a_server_error])

    fuzz(control_schema, operation, check, EXAMPLES)


@pytest.mark.parametrize("operation", NODE_OPERATIONS)
def test_no_server_error_as_node(operation: str, control: Control, control_schema) -> None:
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=bearer(control.node), checks=[not_a_server_error])

    fuzz(control_schema, operation, check, EXAMPLES)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_bad_credentials_are_refused(operation: str, control: Control, control_schema) -> None:
    public = operation in PUBLIC
    wrong = control.admin[:-4] + ("xxxx" if not control.admin.endswith("xxxx") else "yyyy")
    attempts = [{}, bearer(wrong), bearer(control.revoked), {"Authorization": "Basic Zm9v"}]

    def check(case: schemathesis.Case) -> None:
        for headers in attempts:
            response = case.call(headers=headers)
            assert response.status_code < 500, response.text
            if not public:
                assert response.status_code in (401, 403), (headers, response.text)

    fuzz(control_schema, operation, check, max(1, EXAMPLES // 3))


# ---- what the fuzzer found, kept as plain regressions ----------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"\x00\x00\x00\x00\x00", b"[1,"])
def test_an_unparsable_body_without_a_good_token_is_a_401(control: Control, body: bytes) -> None:
    """FastAPI decodes the body before authenticating: it answered 422 or 400 to anyone."""
    json_type = {"Content-Type": "application/json"}
    with TestClient(control.app) as client:
        for credentials in ({}, bearer(control.revoked), bearer("vrg_wrong")):
            response = client.post(
                f"{V1}/purge", content=body, headers={**json_type, **credentials}
            )
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"] == "Bearer"
        response = client.post(
            f"{V1}/purge", content=body, headers={**json_type, **bearer(control.admin)}
        )
        assert response.status_code in (400, 422), response.text
