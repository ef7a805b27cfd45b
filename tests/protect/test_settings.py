"""The protection block: the documented example, round trips, bounds, hostile values."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from verge import config as vconfig
from verge.protect import settings as psettings
from verge.protect.ratelimit import RateLimiter, RuleSpec
from verge.protect.settings import Protection

EXAMPLE = """
rate_limits:
  - {name: api, match: {path: /api/}, key: client_ip, rate: 100/s, burst: 200, action: block}
  - {name: login, match: {path: /login, methods: [POST]}, key: "header:X-Api-Key", rate: 5/m,
     action: block, penalty: 10m}
connections_per_ip: 256
deny: {cidrs: [203.0.113.0/24], countries: [de], user_agents: ["(?i)sqlmap"]}
trusted_proxies: [10.0.0.0/8]
"""


def protection(data: dict[str, Any]) -> Protection:
    return Protection.model_validate(data)


def test_the_example() -> None:
    block = protection(yaml.safe_load(EXAMPLE))
    api, login = block.rule_specs()
    assert api == RuleSpec("api", 100, 1, 200, "client_ip", "block", 0.0, "/api/")
    assert login == RuleSpec(
        "login", 5, 60, 0, "header:x-api-key", "block", 600.0, "/login", frozenset({"POST"})
    )
    assert block.connections_per_ip == 256
    assert block.deny.countries == ["DE"]
    deny = block.deny.deny_list(country_of=lambda address: None)
    assert deny.check("203.0.113.5", None) == "cidr"
    assert deny.check("192.0.2.1", "sqlmap/1.0") == "user-agent#0"
    limiter = RateLimiter(block.rule_specs(), addresses=block.client_addresses(), steered=True)
    assert limiter.placement() == {"api": "per-worker", "login": "per-worker"}  # no table
    assert block.waf is None


def test_json_round_trip() -> None:
    block = protection(yaml.safe_load(EXAMPLE))
    dumped = block.model_dump(mode="json")
    assert protection(dumped) == block
    assert dumped["rate_limits"][1]["rate"] == "5/m"
    assert dumped["rate_limits"][1]["key"] == "header:x-api-key"
    assert dumped["rate_limits"][1]["penalty"] == 600.0


def test_defaults() -> None:
    block = protection({})
    assert block.rate_limits == [] and block.connections_per_ip is None
    assert block.ipv6_prefix == 64
    rule = protection({"rate_limits": [{"name": "all", "rate": "10/s"}]}).rate_limits[0]
    assert rule.key == "client_ip" and rule.match.path == "/" and rule.action == "block"


def _rule(**fields: Any) -> dict[str, Any]:
    return {"rate_limits": [{"name": "r", "rate": "1/s"} | fields]}


@pytest.mark.parametrize(
    "data",
    [
        _rule(rate="1e9/s"),
        _rule(rate="10000000/s"),
        _rule(rate=100),
        _rule(rate="1/0s"),
        _rule(burst=10**30),
        _rule(burst=-1),
        _rule(burst=1.5),
        _rule(burst="lots"),
        _rule(penalty="forever"),
        _rule(penalty=10**30),
        _rule(penalty=-1),
        _rule(penalty="2d"),
        _rule(penalty=float("nan")),
        _rule(key="header:"),
        _rule(key="ip"),
        _rule(key="x" * 400),
        _rule(name="Has Space"),
        _rule(name="x" * 64),
        _rule(action="ban"),
        _rule(extra=1),
        _rule(match={"path": "api"}),
        _rule(match={"path": "/" * 2000}),
        _rule(match={"methods": ["GET POST"]}),
        _rule(match={"methods": ["1GET"]}),
        _rule(match={"methods": ["G\u00c9T"]}),
        _rule(match={"methods": [""]}),
        _rule(match={"methods": ["GET"] * 17}),
        _rule(match={"host": "x"}),
        {"rate_limits": [{"name": f"r{n}", "rate": "1/s"} for n in range(33)]},
        {"connections_per_ip": 0},
        {"connections_per_ip": 10**12},
        {"connections_per_ip": True},
        _rule(burst=True),
        {"ipv6_prefix": "64"},
        {"deny": {"cidrs": ["203.0.113.7/24"]}},
        {"deny": {"cidrs": ["not-a-cidr"]}},
        {"deny": {"cidrs": ["10.0.0.0/8"] * 10_001}},
        {"deny": {"countries": ["DEU"]}},
        {"deny": {"countries": ["1A"]}},
        {"deny": {"user_agents": [r"(a)\1"]}},
        {"deny": {"user_agents": ["x" * 257]}},
        {"deny": {"user_agents": ["x"] * 65}},
        {"deny": {"user_agents": [r"(a{1000}){1000}"]}},
        {"trusted_proxies": ["10.0.0.0/33"]},
        {"trusted_proxies": ["::/0"] * 1001},
        {"ipv6_prefix": 8},
        {"ipv6_prefix": 129},
        {"unknown": 1},
    ],
)
def test_hostile_values_are_refused(data) -> None:
    with pytest.raises(ValidationError):
        protection(data)


def test_duplicate_names_point_at_the_second() -> None:
    with pytest.raises(ValidationError) as error:
        protection({"rate_limits": [{"name": "a", "rate": "1/s"}, {"name": "a", "rate": "2/s"}]})
    (detail,) = error.value.errors()
    assert detail["type"] == "config_conflict"
    assert detail["ctx"]["at"] == ("rate_limits", 1, "name")


def test_catastrophic_patterns_are_accepted_because_they_are_harmless() -> None:
    block = protection({"deny": {"user_agents": [r"(a+)+$"]}})
    assert block.deny.deny_list().check("192.0.2.1", "a" * 50_000 + "!") is None


# ---- every value is bounded (the rule of tests/control/test_bounds.py) ------------------------


def unbounded(node: dict[str, Any], defs: dict[str, Any], where: str) -> list[str]:
    """Every place that accepts an unbounded value, as "where: why"."""
    if "$ref" in node:
        return unbounded(defs[node["$ref"].rsplit("/", 1)[-1]], defs, where)
    problems: list[str] = []
    for branch in node.get("anyOf", ()):
        problems += unbounded(branch, defs, where)
    if "enum" in node or "const" in node:
        return problems
    kinds = node.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
    if not kinds and not node.get("anyOf") and not node.get("properties"):
        problems.append(f"{where}: accepts any JSON value")
    for kind in kinds:
        if kind in ("integer", "number") and not (
            ("maximum" in node or "exclusiveMaximum" in node)
            and ("minimum" in node or "exclusiveMinimum" in node)
        ):
            problems.append(f"{where}: {kind} without both bounds")
        if kind == "string" and "maxLength" not in node:
            problems.append(f"{where}: string without maxLength")
        if kind == "array":
            if "maxItems" not in node:
                problems.append(f"{where}: array without maxItems")
            problems += unbounded(node.get("items", {}), defs, f"{where}[]")
    for name, child in node.get("properties", {}).items():
        problems += unbounded(child, defs, f"{where}.{name}")
    return problems


def test_every_value_is_bounded() -> None:
    schema = Protection.model_json_schema()
    assert unbounded(schema, schema.get("$defs", {}), "protection") == []


def test_shared_bounds_match_the_config_table() -> None:
    assert psettings.MAX_NAME == vconfig.MAX_NAME
    assert psettings.MAX_URL_PATH == vconfig.MAX_URL_PATH
