"""Every input has a bound: the config model's JSON schema and the control plane's OpenAPI.

An attack took the whole fleet down with one tenant call: an origin ``weight`` of 2**64 that
the edges expanded into a list. The walk below fails naming every field that accepts an
unbounded number, string, list or map, so a new field cannot come without its bound (the
table is verge/config/bounds.py). Numbers need a maximum and a minimum, strings a
maxLength, arrays maxItems, open maps maxProperties (and bounded keys); booleans, enums and
constants are bounded by nature; "any JSON value" is not. Then the regressions of the
report: the huge weight, and the control plane's 500s on odd numbers, now clear 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, Field

from tests.control.conftest import Api, api_for, service_body
from verge import config as vconfig
from verge.compute.runtime import PoolSettings
from verge.config import Config, ConfigError, parse_config
from verge.control.store import Store

V1 = "/api/v1"
HUGE_WEIGHT = 18446744073709551616  # 2**64, from the attack report
Schema = dict[str, Any]


# ---- the walk --------------------------------------------------------------------------------


def unbounded_fields(schema: Schema, defs: Schema, where: str) -> list[str]:
    """Every place under `schema` that accepts an unbounded value, as "where.field: why"."""
    problems: list[str] = []
    _walk(schema, defs, where, problems, frozenset())
    return problems


def _walk(node: Schema, defs: Schema, where: str, problems: list[str], refs: frozenset) -> None:
    if "$ref" in node:
        ref = node["$ref"]
        if ref not in refs:  # a recursive model is checked once per path
            _walk(defs[ref.rsplit("/", 1)[-1]], defs, where, problems, refs | {ref})
        return
    branches = [*node.get("anyOf", ()), *node.get("oneOf", ()), *node.get("allOf", ())]
    for branch in branches:
        _walk(branch, defs, where, problems, refs)
    if "enum" in node or "const" in node:
        return
    kinds = node.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
    if not kinds and not branches and not node.get("properties"):
        problems.append(f"{where}: accepts any JSON value")
    for kind in kinds:
        why = _unbounded_because(kind, node)
        if why:
            problems.append(f"{where}: {why}")
    if "array" in kinds:
        for index, item in enumerate(node.get("prefixItems", ())):
            _walk(item, defs, f"{where}[{index}]", problems, refs)
        if isinstance(node.get("items"), dict):
            _walk(node["items"], defs, f"{where}[]", problems, refs)
    if "object" in kinds or "properties" in node:
        _walk_object(node, defs, where, problems, refs)


def _unbounded_because(kind: str, node: Schema) -> str | None:
    if kind in ("integer", "number"):
        has_max = "maximum" in node or "exclusiveMaximum" in node
        has_min = "minimum" in node or "exclusiveMinimum" in node
        missing = [name for name, has in (("maximum", has_max), ("minimum", has_min)) if not has]
        if missing:
            return f"{kind} without {', '.join(missing)}"
    elif kind == "string" and "maxLength" not in node:
        return "string without maxLength"
    elif kind == "array" and "maxItems" not in node:
        return "array without maxItems"
    elif kind == "object" and _open_map(node) and "maxProperties" not in node:
        return "map without maxProperties"
    return None


def _open_map(node: Schema) -> bool:
    extra = node.get("additionalProperties", "properties" not in node)
    return extra is True or isinstance(extra, dict) or bool(node.get("patternProperties"))


def _walk_object(node: Schema, defs: Schema, where: str, problems: list[str], refs) -> None:
    prefix = f"{where}." if where else ""
    for name, child in node.get("properties", {}).items():
        _walk(child, defs, f"{prefix}{name}", problems, refs)
    if not _open_map(node):
        return
    keys = node.get("propertyNames", {"type": "string"})
    _walk({"type": "string", **keys}, defs, f"{where}{{key}}", problems, refs)
    for child in (node.get("additionalProperties"), *node.get("patternProperties", {}).values()):
        if isinstance(child, dict):
            _walk(child, defs, f"{where}{{}}", problems, refs)


def openapi_inputs(spec: Schema) -> Iterator[tuple[str, Schema]]:
    """(operation and input, schema) for every parameter and request body of every operation."""
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            name = f"{method.upper()} {path}"
            for parameter in operation.get("parameters", ()):
                yield f"{name} {parameter['in']} {parameter['name']}", parameter["schema"]
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                yield f"{name} body ({media})", content.get("schema", {})


# ---- the walk itself finds what it should ----------------------------------------------------


class _Loose(BaseModel):
    count: int
    ratio: float = Field(ge=0)
    name: str
    tags: list[str] = Field(max_length=3)
    extra: dict[str, int] = Field(default_factory=dict)
    anything: Any = None
    flag: bool = False


class _Tight(BaseModel):
    count: int = Field(ge=0, le=9)
    name: str = Field(max_length=9)
    tags: list[str] = Field(max_length=3)
    extra: dict[str, int] = Field(default_factory=dict, max_length=3)


class _Both(BaseModel):
    tight: _Tight
    loose: list[_Loose] | None = Field(None, max_length=2)


def test_the_walk_names_every_unbounded_field() -> None:
    schema = _Both.model_json_schema()
    assert sorted(unbounded_fields(schema, schema["$defs"], "")) == [
        "loose[].anything: accepts any JSON value",
        "loose[].count: integer without maximum, minimum",
        "loose[].extra: map without maxProperties",
        "loose[].extra{key}: string without maxLength",
        "loose[].extra{}: integer without maximum, minimum",
        "loose[].name: string without maxLength",
        "loose[].ratio: number without maximum",
        "loose[].tags[]: string without maxLength",
        "tight.extra{key}: string without maxLength",
        "tight.extra{}: integer without maximum, minimum",
        "tight.tags[]: string without maxLength",
    ]


# ---- the config model and the control-plane API ---------------------------------------------


def test_every_config_field_is_bounded() -> None:
    schema = Config.model_json_schema()
    assert unbounded_fields(schema, schema["$defs"], "config") == []


@pytest.fixture
def sqlite_api(tmp_path) -> Iterator[Api]:
    store = Store(f"sqlite:///{tmp_path}/control.db")
    store.migrate()
    with api_for(store, poll_interval=0.1, monitor_interval=0) as api:
        yield api
    store.close()


def test_every_api_input_is_bounded(sqlite_api: Api) -> None:
    spec = sqlite_api.client.get("/openapi.json").json()
    defs = spec["components"]["schemas"]
    inputs = list(openapi_inputs(spec))
    assert len(inputs) > 60  # the walk saw the API (parameters and bodies of ~45 operations)
    problems = [p for name, schema in inputs for p in unbounded_fields(schema, defs, name)]
    assert problems == []


# ---- regressions from the attack report ------------------------------------------------------


def test_a_huge_origin_weight_is_refused_by_the_api(api: Api) -> None:
    body = service_body("web", origins=[{"url": "http://127.0.0.1:9", "weight": HUGE_WEIGHT}])
    response = api.post(f"{V1}/services", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "origins[0].weight"
    api.service("web")
    added = api.post(
        f"{V1}/services/web/origins", json={"url": "http://127.0.0.2", "weight": HUGE_WEIGHT}
    )
    assert added.status_code == 422 and added.json()["field"] == "weight"
    limit = vconfig.MAX_ORIGIN_WEIGHT
    ok = api.post(f"{V1}/services/web/origins", json={"url": "http://127.0.0.2", "weight": limit})
    assert ok.status_code == 201, ok.text
    assert api.store.bundle()["config"]["services"][0]["origins"][1]["weight"] == limit


def test_a_huge_origin_weight_is_a_config_error_naming_the_field() -> None:
    text = f"""\
services:
  - name: web
    hosts: [example.com]
    origins:
      - url: http://127.0.0.1:8080
        weight: {HUGE_WEIGHT}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "verge.yaml")
    (issue,) = info.value.issues
    assert (issue.line, issue.path) == (6, "services[0].origins[0].weight")
    assert str(vconfig.MAX_ORIGIN_WEIGHT) in issue.reason


@pytest.mark.parametrize("since", ["nan", "inf", "-inf", "-1e308", "1e308", "-1"])
def test_stats_with_a_since_that_is_not_a_time_is_a_422(api: Api, since: str) -> None:
    response = api.get(f"{V1}/stats", params={"since": since})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "since"
    assert api.get(f"{V1}/stats", params={"until": since}).status_code == 422
    assert api.get(f"{V1}/stats", params={"since": "0", "until": "1e10"}).status_code == 200


@pytest.mark.parametrize("seq", ["1180591620717411303424", str(2**63), "0", "-1"])
def test_purge_status_of_an_impossible_seq_is_a_422(api: Api, seq: str) -> None:
    response = api.get(f"{V1}/purge/{seq}")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "seq"


def test_purge_status_of_a_missing_seq_is_a_404(api: Api) -> None:
    assert api.get(f"{V1}/purge/{2**63 - 1}").status_code == 404
    assert api.get(f"{V1}/purge/7").status_code == 404


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (f"/tenants?offset={2**70}", "offset"),
        ("/tenants?offset=-1", "offset"),
        (f"/nodes/self/purges?after={2**64}", "after"),
        ("/nodes/self/kv?wait=nan", "wait"),
        (f"/purge/1?wait={10**6}", "wait"),
    ],
)
def test_out_of_range_query_numbers_are_422s(api: Api, path: str, field: str) -> None:
    token = api.join() if "/nodes/self/" in path else None
    response = api.get(V1 + path, token)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"memory_mb": 4096}, "memory_mb"),
        ({"memory_mb": vconfig.MAX_FUNCTION_MEMORY_MB + 1}, "memory_mb"),
        ({"cpu_ms": 1e9}, "cpu_ms"),
        ({"max_subrequests": 10**6}, "max_subrequests"),
    ],
)
def test_functions_the_edges_cannot_run_are_refused(api: Api, limits: dict, field: str) -> None:
    api.service("shop")
    body = {
        "name": "hello",
        "service": "shop",
        "routes": ["/hello"],
        "module_base64": "AGFzbQEAAAA=",  # an empty module: \0asm, version 1
    }
    response = api.post(f"{V1}/functions", json={**body, **limits})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    most = {"memory_mb": vconfig.MAX_FUNCTION_MEMORY_MB}
    assert api.post(f"{V1}/functions", json={**body, **most}).status_code == 201


def test_the_config_and_the_edge_runtime_share_the_memory_limit() -> None:
    assert PoolSettings().max_memory_bytes == vconfig.MAX_FUNCTION_MEMORY_MB * 1024 * 1024
    field = vconfig.EdgeFunction.model_fields["memory_mb"]
    assert any(getattr(m, "le", None) == vconfig.MAX_FUNCTION_MEMORY_MB for m in field.metadata)


def test_edge_reports_are_bounded(api: Api) -> None:
    node = api.join()
    heartbeat = f"{V1}/nodes/self/heartbeat"
    nested = api.post(heartbeat, node, json={"health": {"deep": {"deeper": [{"x": 1}]}}})
    assert nested.status_code == 422 and nested.json()["field"].startswith("health.deep")
    wide = {f"k{i}": i for i in range(vconfig.MAX_REPORT_KEYS + 1)}
    assert api.post(heartbeat, node, json={"load": wide}).status_code == 422
    seq = api.post(heartbeat, node, json={"config_version": 2**63})
    assert seq.status_code == 422 and seq.json()["field"] == "config_version"
    sample = {"t": 1e300, "service": "web", "requests": 1}
    stats = api.post(f"{V1}/nodes/self/stats", node, json={"samples": [sample]})
    assert stats.status_code == 422 and stats.json()["field"] == "samples[0].t"
    ok = {"health": {"status": "ok", "workers": 2}, "load": {"connections": 3}}
    assert api.post(heartbeat, node, json=ok).status_code == 200


@pytest.mark.parametrize("target", ["http://[", "//[::1/x", "[oops/path"])
def test_purge_of_a_url_that_cannot_be_split_is_a_422(api: Api, target: str) -> None:
    """Found by tests/control/test_api_fuzz.py: urlsplit's ValueError was a 500."""
    for field in ("urls", "prefixes"):
        response = api.post(f"{V1}/purge", json={field: ["http://ok.test/a", target]})
        assert response.status_code == 422, response.text
        assert response.json()["field"] == f"{field}[1]"


def test_an_over_long_body_is_refused_before_it_is_read(sqlite_api: Api) -> None:
    """FastAPI reads a JSON body whole before authentication: the body limit comes first,
    by Content-Length or, for a chunked body, as soon as it passes the limit."""
    from verge.control.api import MAX_REQUEST_BODY

    declared = sqlite_api.client.post(
        "/api/v1/functions", headers={"Content-Length": str(MAX_REQUEST_BODY + 1)},
        content=b"{}")
    assert declared.status_code == 413
    assert "request body over" in declared.json()["error"]

    def chunks():
        piece = b" " * (1 << 20)
        for _ in range(MAX_REQUEST_BODY // len(piece) + 2):
            yield piece

    streamed = sqlite_api.client.post("/api/v1/tenants", content=chunks(), headers={
        "Authorization": "Bearer wrong", "Content-Type": "application/json"})
    assert streamed.status_code == 413
    ok = sqlite_api.post("/api/v1/tenants", json={"name": "fits"})
    assert ok.status_code == 201
