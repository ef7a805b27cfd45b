"""The protect phase's inline rate-limit path (one rule keyed by the client address) decides
exactly as the general walk does, and the deny list's memo of (address, user agent) pairs
never answers for another pair."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from verge.edge.protect import ServiceProtection
from verge.http.message import Request
from verge.protect.deny import DenyList
from verge.protect.settings import Protection

CLIENTS = ["192.0.2.7", "192.0.2.8", "198.51.100.1", "2001:db8::1", "2001:db8::2"]
TARGETS = ["/", "/api/x", "/api", "/other?q=1", "*"]


def request(client: str, target: str, method: str = "GET", agent: str = "curl") -> Request:
    return Request(method, target, headers=[("Host", "t"), ("User-Agent", agent)],
                   client=client, hmap={"host": "t", "user-agent": agent})


def outcome(admission) -> tuple:
    refusal = admission.refusal
    return (admission.kind, admission.drop, refusal.status if refusal is not None else None,
            tuple(refusal.headers) if refusal is not None else None, admission.fields)


rules = st.fixed_dictionaries({
    "name": st.just("r"),
    "match": st.fixed_dictionaries({"path": st.sampled_from(["/", "/api"])}),
    "key": st.just("client_ip"),
    "rate": st.sampled_from(["2/s", "5/s", "1/m"]),
    "burst": st.integers(1, 4),
    "action": st.sampled_from(["block", "drop", "log"]),
    "penalty": st.sampled_from([None, "2s"]),
})
steps = st.lists(st.tuples(st.sampled_from(CLIENTS), st.sampled_from(TARGETS),
                           st.floats(0.0, 0.7)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(rule=rules, steps=steps, deny=st.booleans())
def test_the_inline_rule_decides_as_the_general_walk(rule, steps, deny) -> None:
    spec = {"rate_limits": [{k: v for k, v in rule.items() if v is not None}]}
    if deny:
        spec["deny"] = {"cidrs": ["198.51.100.0/24"], "user_agents": ["(?i)sqlmap"]}
    settings_ = Protection.model_validate(spec)
    inline, walked = ServiceProtection("s", settings_), ServiceProtection("s", settings_)
    assert inline._inline_rule is not None
    walked._inline_rule = None  # the general walk only
    now = 1000.0
    for client, target, gap in steps:
        now += gap
        assert outcome(inline.admit(request(client, target), now)) == \
            outcome(walked.admit(request(client, target), now))
    assert inline.limiter.stats() == walked.limiter.stats()
    assert inline.denied == walked.denied


def test_only_the_client_ip_shape_is_inline() -> None:
    def inline(rule: dict, **more) -> bool:
        guard = ServiceProtection("s", Protection.model_validate(
            {"rate_limits": [{"name": "r", "rate": "5/s", **rule}], **more}))
        return guard._inline_rule is not None

    assert inline({"key": "client_ip"})
    assert inline({"key": "client_ip", "match": {"path": "/api/"}})
    assert not inline({"key": "client_ip", "match": {"path": "/", "methods": ["POST"]}})
    assert not inline({"key": "header:X-Api-Key"})
    assert not inline({"key": "client_ip+path"})
    assert not inline({"key": "client_ip", "headers": True})
    assert not inline({"key": "client_ip"}, trusted_proxies=["10.0.0.0/8"])


def test_a_remembered_pair_never_answers_for_another() -> None:
    deny = DenyList(cidrs=["198.51.100.0/24"], user_agents=["(?i)sqlmap"])
    assert deny.check("192.0.2.1", "curl") is None
    assert deny.check("192.0.2.1", "sqlmap/1.7") == "user-agent#0"
    assert deny.check("198.51.100.9", "curl") == "cidr"
    assert deny.check("192.0.2.1", None) is None
    assert deny.check("192.0.2.1", "curl") is None  # from the memo, still its own verdict
    assert deny.check("192.0.2.1", "SQLMAP") == "user-agent#0"
    long_agent = "x" * 5000 + "sqlmap"
    assert deny.check("192.0.2.1", long_agent) == "user-agent#0"
    assert ("192.0.2.1", long_agent) not in deny._verdicts  # not kept: bounded memory
