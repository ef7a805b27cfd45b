"""RateLimiter: rules -> verdicts, the 429's fields, counters, and where state lives."""

from __future__ import annotations

import json
import re

import pytest

from verge.http.message import Request
from verge.protect.keys import ClientAddresses
from verge.protect.ratelimit import (
    ALLOW,
    DRAFT,
    PROBLEM_TYPE,
    RateLimiter,
    RuleSpec,
    format_rate,
    parse_rate,
    too_many_requests,
)
from verge.protect.shared import SharedTable

# An SF List of Items whose value is an sf-string and whose parameters are integers.
SF_ITEM = r'"[a-z0-9_-]+"(;[a-z][a-z0-9_*.-]*=[0-9]+)+'
SF_LIST = re.compile(rf"{SF_ITEM}(, {SF_ITEM})*")


def request(
    method: str = "GET", target: str = "/api/x", client: str = "192.0.2.1", headers=()
) -> Request:
    return Request(method, target, headers=list(headers), client=client)


def fields(verdict) -> dict[str, str]:
    return dict(verdict.headers)


# ---- rates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,rate",
    [
        ("100/s", (100, 1)),
        ("5/m", (5, 60)),
        ("1/h", (1, 3600)),
        ("20/d", (20, 86400)),
        (" 10 / 30s ", (10, 30)),
        ("7/second", (7, 1)),
        ("3/2m", (3, 120)),
    ],
)
def test_rates(text, rate) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(format_rate(*rate)) == rate


@pytest.mark.parametrize(
    "text",
    [
        "",
        "100",
        "100/",
        "/s",
        "0/s",
        "-1/s",
        "1.5/s",
        "1e9/s",
        "10000000/s",
        "1/0s",
        "1/2d",
        "1/ms",
        "1/500ms",
        "1/w",
        "\u0661\u0660/s",
        "1/s/s",
        "9" * 5000 + "/s",
        None,
        100,
    ],
)
def test_bad_rates(text) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "Bad Name"},
        {"name": ""},
        {"action": "explode"},
        {"count": 0},
        {"count": 10**30},
        {"period": 0},
        {"burst": -1},
        {"burst": 10**12},
        {"penalty": -1.0},
        {"penalty": float("inf")},
        {"path": "api"},
        {"methods": frozenset({"get"})},
        {"key": "header:"},
    ],
)
def test_bad_rule_specs(fields) -> None:
    spec = {"name": "api", "count": 1, "period": 1} | fields
    with pytest.raises(ValueError):
        RuleSpec(**spec)


# ---- verdicts ---------------------------------------------------------------------------------


def test_allowed_responses_carry_the_draft_fields() -> None:
    limiter = RateLimiter([RuleSpec("api", 100, 1, 200, path="/api/", headers=True)], steered=True)
    verdict = limiter.evaluate(request(), 50.0)
    assert verdict.action == "allow" and verdict.allowed
    assert fields(verdict) == {
        "RateLimit-Policy": '"api";q=100;w=1;verge-burst=200',
        "RateLimit": '"api";r=200;t=1',
    }
    assert all(SF_LIST.fullmatch(value) for value in fields(verdict).values())
    assert limiter.evaluate(request(target="/static/a.css"), 50.0) is ALLOW
    assert DRAFT == "draft-ietf-httpapi-ratelimit-headers-11"


def test_the_429() -> None:
    limiter = RateLimiter(
        [RuleSpec("login", 5, 60, 1, path="/login", methods=frozenset({"POST"}), headers=True)],
        steered=True,
    )
    post = request("POST", "/login")
    assert limiter.evaluate(post, 0.0).allowed
    assert fields(limiter.evaluate(post, 0.0))["RateLimit"] == '"login";r=0;t=24'
    verdict = limiter.evaluate(post, 0.0)
    assert verdict.action == "block" and verdict.rule == "login" and not verdict.allowed
    assert verdict.retry_after == pytest.approx(12.0)
    assert fields(verdict) == {
        "Retry-After": "12",
        "RateLimit-Policy": '"login";q=5;w=60;verge-burst=1',
        "RateLimit": '"login";r=0;t=12',
    }
    assert limiter.evaluate(request("GET", "/login"), 0.0) is ALLOW  # method not matched
    status, headers, body = too_many_requests(verdict)
    assert status == 429
    assert ("Content-Type", "application/problem+json") in headers
    assert ("Cache-Control", "no-store") in headers
    assert ("Retry-After", "12") in headers
    problem = json.loads(body)
    assert problem["type"] == PROBLEM_TYPE and problem["violated-policies"] == ["login"]


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    limiter = RateLimiter([RuleSpec("fast", 1000, 1)], steered=True)
    limiter.evaluate(request(), 0.0)
    verdict = limiter.evaluate(request(), 0.0)
    assert verdict.retry_after == pytest.approx(0.001)
    assert fields(verdict)["Retry-After"] == "1"


def test_drop_and_log_actions() -> None:
    limiter = RateLimiter(
        [
            RuleSpec("d", 1, 60, path="/d", action="drop"),
            RuleSpec("l", 1, 60, path="/l", action="log"),
        ],
        steered=True,
    )
    limiter.evaluate(request(target="/d"), 0.0)
    dropped = limiter.evaluate(request(target="/d"), 0.0)
    assert dropped.action == "drop" and dropped.headers == () and not dropped.allowed
    assert limiter.evaluate(request(target="/l"), 0.0) is ALLOW  # log rules add no fields
    logged = limiter.evaluate(request(target="/l"), 0.0)
    assert logged.action == "log" and logged.allowed and logged.headers == ()
    assert limiter.stats() == {
        "d": {"allowed": 1, "limited": 1, "blocked": 1},
        "l": {"allowed": 1, "limited": 1, "blocked": 0},
    }


def test_a_refused_request_does_not_spend_the_other_rules() -> None:
    limiter = RateLimiter(
        [RuleSpec("site", 10, 60, 9, path="/"), RuleSpec("login", 1, 60, path="/login")],
        steered=True,
    )
    assert limiter.evaluate(request(target="/login"), 0.0).allowed
    for _ in range(20):
        assert limiter.evaluate(request(target="/login"), 0.0).rule == "login"
    for _ in range(9):  # "site" spent 1 of 10 so far, not 21
        assert limiter.evaluate(request(target="/"), 0.0).allowed
    assert limiter.evaluate(request(target="/"), 0.0).rule == "site"


def test_several_rules_advertise_several_policies() -> None:
    limiter = RateLimiter(
        [
            RuleSpec("site", 10, 60, 10, headers=True),
            RuleSpec("api", 5, 1, path="/api/", headers=True),
            RuleSpec("watch", 1, 60, action="log", headers=True),
        ],
        steered=True,
    )
    verdict = limiter.evaluate(request(), 0.0)
    assert fields(verdict) == {
        "RateLimit-Policy": '"site";q=10;w=60;verge-burst=10, "api";q=5;w=1',
        "RateLimit": '"site";r=10;t=6, "api";r=0;t=1',
    }
    assert all(SF_LIST.fullmatch(value) for value in fields(verdict).values())
    watched = limiter.evaluate(request(target="/x"), 1.0)  # watch is over: logged, not shown
    assert watched.action == "log" and watched.rule == "watch"
    assert fields(watched) == {
        "RateLimit-Policy": '"site";q=10;w=60;verge-burst=10',
        "RateLimit": '"site";r=9;t=11',
    }


def test_a_log_rule_never_hides_an_enforcing_one() -> None:
    limiter = RateLimiter(
        [RuleSpec("watch", 1, 60, action="log"), RuleSpec("api", 1, 60)], steered=True
    )
    assert limiter.evaluate(request(), 0.0).allowed
    verdict = limiter.evaluate(request(), 0.0)
    assert verdict.action == "block" and verdict.rule == "api"


def test_penalty_box_through_the_limiter() -> None:
    limiter = RateLimiter([RuleSpec("login", 5, 60, penalty=600.0)], steered=True)
    assert limiter.evaluate(request(), 0.0).allowed
    assert fields(limiter.evaluate(request(), 1.0))["Retry-After"] == "600"
    later = limiter.evaluate(request(), 400.0)
    assert later.action == "block" and fields(later)["Retry-After"] == "201"
    assert limiter.evaluate(request(), 601.0).allowed
    assert limiter.counters["login"].blocked == 2


def test_allowed_responses_carry_no_fields_unless_asked_but_a_429_always_does() -> None:
    limiter = RateLimiter([RuleSpec("api", 1, 60)], steered=True)
    assert limiter.evaluate(request(), 0.0) is ALLOW
    assert fields(limiter.evaluate(request(), 0.0)) == {
        "Retry-After": "60", "RateLimit-Policy": '"api";q=1;w=60', "RateLimit": '"api";r=0;t=60'}


def test_spoofed_forwarded_for_gets_no_fresh_quota() -> None:
    limiter = RateLimiter(
        [RuleSpec("api", 1, 60)], addresses=ClientAddresses(["10.0.0.0/8"]), steered=True
    )
    assert limiter.evaluate(request(client="192.0.2.1"), 0.0).allowed
    for fake in ("198.51.100.1", "198.51.100.2", "10.0.0.1"):
        spoofed = request(client="192.0.2.1", headers=[("X-Forwarded-For", fake)])
        assert not limiter.evaluate(spoofed, 0.0).allowed
    via_proxy = request(client="10.0.0.1", headers=[("X-Forwarded-For", "198.51.100.1")])
    assert limiter.evaluate(via_proxy, 0.0).allowed  # a different client, through the proxy
    assert not limiter.evaluate(via_proxy, 0.0).allowed


def test_header_keys_with_odd_bytes() -> None:
    limiter = RateLimiter([RuleSpec("key", 1, 60, key="header:X-Api-Key")], steered=True)
    for value in ("\x00", "é" * 9000, "a\tb", "\udcff", ""):
        api_key = request(headers=[("X-Api-Key", value)])
        assert limiter.evaluate(api_key, 0.0).allowed
        assert not limiter.evaluate(api_key, 0.0).allowed
    assert limiter.evaluate(request(), 0.0).allowed  # no key: keyed by the address
    assert not limiter.evaluate(request(), 0.0).allowed


def test_where_each_rule_lives() -> None:
    rules = [
        RuleSpec("ip", 1, 1),
        RuleSpec("ip-path", 1, 1, key="client_ip+path"),
        RuleSpec("key", 1, 1, key="header:X-Api-Key"),
    ]
    table = SharedTable.create(buckets=64)
    assert RateLimiter(rules, shared=table, steered=True).placement() == {
        "ip": "worker",
        "ip-path": "worker",
        "key": "shared",
    }
    assert RateLimiter(rules, steered=True).placement() == {
        "ip": "worker",
        "ip-path": "worker",
        "key": "per-worker",
    }
    behind_proxies = RateLimiter(
        rules, shared=table, steered=True, addresses=ClientAddresses(["10.0.0.0/8"])
    )
    assert set(behind_proxies.placement().values()) == {"shared"}
    assert set(RateLimiter(rules, shared=table).placement().values()) == {"shared"}
    table.close()


def test_shared_rules_are_scoped_per_service() -> None:
    table = SharedTable.create(buckets=64)
    rules = [RuleSpec("login", 1, 60, key="header:X-Api-Key")]
    shop = RateLimiter(rules, shared=table, scope="shop")
    blog = RateLimiter(rules, shared=table, scope="blog")
    again = RateLimiter(rules, shared=table, scope="shop")  # another worker of the node
    api_key = request(headers=[("X-Api-Key", "k")])
    assert shop.evaluate(api_key, 0.0).allowed
    assert blog.evaluate(api_key, 0.0).allowed
    assert not again.evaluate(api_key, 0.0).allowed
    table.close()


def test_sweep_and_bounded_state() -> None:
    limiter = RateLimiter([RuleSpec("api", 10, 1)], steered=True, max_keys=128)
    for n in range(5000):
        limiter.evaluate(request(client=f"198.51.{n >> 8}.{n & 255}"), n / 1000)
    assert len(limiter._rules[0].limit) <= 128
    assert len(limiter._rules[0]._verdicts) <= 4096  # the reused allowed verdicts too
    assert limiter.sweep(100.0) > 0


def test_duplicate_rule_names() -> None:
    with pytest.raises(ValueError):
        RateLimiter([RuleSpec("a", 1, 1), RuleSpec("a", 2, 1)])
