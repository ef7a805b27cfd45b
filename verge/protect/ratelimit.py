"""Rate limiting of one service: rules -> a verdict per request, and the 429's fields.

A rule says which requests it counts (a path prefix, optionally methods), how it keys them
(verge/protect/keys.py), the rate (``100/s``, ``5/m``, ``10/30s``), the burst, what happens
over the limit (``block``: 429; ``drop``: close the connection without an answer; ``log``:
let it through, count it) and an optional penalty box. :meth:`RateLimiter.evaluate` checks
every rule that matches; the first enforcing rule (block/drop) that refuses decides, and a
refused request is not counted against the other rules (nginx ``limit_req`` with several
zones does the same). A ``log`` rule never hides an enforcing one and never adds fields.

Exact per node, as nginx, Varnish (vsthrottle) and Fastly's edge rate limiting are per node:
a limit of 100/s on a fleet of 10 nodes admits up to 1000/s fleet-wide. Within a node each
rule's state lives where it is exact and cheapest:

- keys with a ``client_ip`` part, when the node steers each client's connections to one
  worker (verge/protect/steer.py) and the service trusts no proxies: the worker's dict
  (verge/protect/gcra.py). Measured (``python -m verge.protect.bench``, 2-core VM under
  load, 50k keys): 0.2-0.6 µs a check; the whole ``evaluate`` of a matching client_ip
  rule, RateLimit fields included, 1.6-1.9 µs; a request no rule matches 0.4 µs.
- other keys (header, cookie, path; client_ip behind trusted proxies, whose peers are the
  proxies and cannot be steered): the node's shared-memory table (verge/protect/shared.py),
  ~5 µs a check, when the worker was given one; without it, the worker's dict, which makes
  such a limit per worker (up to ``workers x rate`` per node). :meth:`RateLimiter.placement`
  says which, per rule.

Why not the shared table for everything: measured at ~5 µs (9-13 µs while another process
hammers it) against 0.2-0.6 µs a check (a keyed hash, a struct unpack and two ``lockf``
calls, in Python), it alone would exceed the 2 µs budget of a cache hit. Steering costs
nothing per request (the kernel runs ~20 BPF instructions per new connection: 77 vs 78 µs
per connect + accept in a Python loop, noise) and also makes the per-IP connection cap
exact. Its price: one address's connections all load one worker (a big NAT, or a flood
from one address, weighs on 1/N of the clients), and none behind proxies.

Response fields follow draft-ietf-httpapi-ratelimit-headers-11 (23 May 2026, the newest
revision; the -10 syntax is the same): ``RateLimit-Policy: "api";q=100;w=1`` states the
configured rate as quota ``q`` per window ``w`` seconds (the rate's period must be whole
seconds for that), plus the vendor parameter ``verge-burst`` when the rule has a burst;
``RateLimit: "api";r=R;t=T`` gives the requests that would pass right now (``r``, up to
burst + 1) and the seconds until the whole burst is back (``t``). A 429 carries
``Retry-After`` and ``RateLimit: "api";r=0;t=<Retry-After>`` (the draft asks that
Retry-After not precede the end of the effective window) and an RFC 9457 problem body of the
draft's "quota-exceeded" type. Rules with ``headers: false`` and ``log`` rules add nothing.

Counters per rule (allowed / limited / blocked) are plain ints on :attr:`counters`:
``allowed`` passed the rule, ``limited`` were over it (whatever the action), ``blocked``
were refused (block or drop, the penalty box included); a ``log`` rule counts ``limited``
but never ``blocked``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from verge.protect.gcra import DEFAULT_MAX_KEYS, Gcra, Limit
from verge.protect.keys import ClientAddresses, KeyFunction, RequestLike, compile_key, steerable
from verge.protect.shared import SharedTable

Action = Literal["block", "drop", "log"]
FieldList = tuple[tuple[str, str], ...]
DRAFT = "draft-ietf-httpapi-ratelimit-headers-11"
PROBLEM_TYPE = "https://iana.org/assignments/http-problem-types#quota-exceeded"

_RATE_RE = re.compile(
    r"\s*([0-9]{1,7})\s*/\s*([0-9]{0,6})\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*"
)
_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_RULE_NAME_RE = re.compile(r"[a-z0-9_][a-z0-9_-]{0,62}")
MAX_RATE_COUNT = 1_000_000
MAX_RATE_PERIOD = 86_400
MAX_BURST = 1_000_000
MAX_PENALTY = 86_400.0


_METHOD_RE = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")


def _check_int(value: object, what: str, least: int, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise ValueError(f"{what} must be an int in {least}..{most}, not {value!r}")


def parse_rate(text: str) -> tuple[int, int]:
    """(count, period in whole seconds) of a rate: "100/s", "5/m", "10/30s", "1000/h", "20/d"."""
    match = _RATE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid rate {text!r}: use COUNT/UNIT (unit s, m, h or d), e.g. 100/s, 5/m or 10/30s"
        )
    count, multiple, unit = int(match[1]), int(match[2] or 1), _UNITS[match[3]]
    period = multiple * unit
    if not 1 <= count <= MAX_RATE_COUNT:
        raise ValueError(f"invalid rate {text!r}: the count must be 1..{MAX_RATE_COUNT}")
    if not 1 <= period <= MAX_RATE_PERIOD:
        raise ValueError(f"invalid rate {text!r}: the period must be 1s..1d")
    return count, period


def format_rate(count: int, period: int) -> str:
    """The canonical text of a rate: (100, 1) -> "100/s", (5, 60) -> "5/m", (10, 30) -> "10/30s"."""
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if period == seconds:
            return f"{count}/{unit}"
    return f"{count}/s" if period == 1 else f"{count}/{period}s"


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rate-limit rule (the config's ``protection.rate_limits[i]``, parsed)."""

    name: str
    count: int
    period: int
    burst: int = 0
    key: str = "client_ip"
    action: Action = "block"
    penalty: float = 0.0
    path: str = "/"
    methods: frozenset[str] = field(default_factory=frozenset)
    headers: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _RULE_NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid rule name {self.name!r}: lower-case letters, digits, - _")
        if self.action not in ("block", "drop", "log"):
            raise ValueError(f"invalid action {self.action!r}: block, drop or log")
        steerable(self.key)  # validates the key spec
        _check_int(self.count, "count", 1, MAX_RATE_COUNT)
        _check_int(self.period, "period", 1, MAX_RATE_PERIOD)
        _check_int(self.burst, "burst", 0, MAX_BURST)
        if not isinstance(self.penalty, int | float) or not 0 <= self.penalty <= MAX_PENALTY:
            raise ValueError(f"penalty must be 0..{MAX_PENALTY:.0f} seconds, not {self.penalty!r}")
        if not isinstance(self.path, str) or not self.path.startswith("/") or len(self.path) > 1024 \
                or "?" in self.path or "#" in self.path:
            raise ValueError(f"path {self.path!r} must be a path prefix starting with '/' "
                             f"(no '?' or '#')")
        for method in self.methods:
            if not isinstance(method, str) or not _METHOD_RE.fullmatch(method):
                raise ValueError(f"invalid method {method!r}: upper-case, e.g. GET or POST")

    @classmethod
    def parse(cls, name: str, rate: str, **fields: object) -> RuleSpec:
        count, period = parse_rate(rate)
        return cls(name, count, period, **fields)  # type: ignore[arg-type]


class Verdict(NamedTuple):
    action: Literal["allow", "block", "drop", "log"]
    rule: str
    """The rule that limited the request ("" when none did)."""
    retry_after: float
    """Seconds until the limiting rule would let the request through (0.0 when allowed)."""
    headers: FieldList
    """Fields to add to the response (RateLimit fields; for block, Retry-After too)."""

    @property
    def allowed(self) -> bool:
        """Whether the request goes on (allow, or a log rule's over-limit request)."""
        return self.action in ("allow", "log")


ALLOW = Verdict("allow", "", 0.0, ())
VERDICT_MEMO = 4096  # allowed verdicts kept per rule
_ceil = math.ceil


class RuleCounters:
    __slots__ = ("allowed", "limited", "blocked")

    def __init__(self) -> None:
        self.allowed = 0
        self.limited = 0
        self.blocked = 0

    def as_dict(self) -> dict[str, int]:
        return {"allowed": self.allowed, "limited": self.limited, "blocked": self.blocked}


def _seconds(value: float) -> int:
    """Whole seconds for a delay field: rounded up, at least 1."""
    return max(1, math.ceil(value - 1e-9))


class _Rule:
    """A rule ready to run: its matcher, key function, state and precomputed field text."""

    __slots__ = (
        "spec",
        "name",
        "prefix",
        "methods",
        "key_of",
        "limit",
        "enforcing",
        "headers",
        "policy",
        "policy_field",
        "item",
        "tolerance",
        "interval",
        "counters",
        "placement",
        "_verdicts",
    )

    def __init__(self, spec: RuleSpec, key_of: KeyFunction, limit: Limit, placement: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.prefix = spec.path
        self.methods = spec.methods or None
        self.key_of = key_of
        self.limit = limit
        self.enforcing = spec.action != "log"
        self.headers = spec.headers and self.enforcing
        burst = f";verge-burst={spec.burst}" if spec.burst else ""
        self.policy = f'"{spec.name}";q={spec.count};w={spec.period}{burst}'
        self.policy_field = ("RateLimit-Policy", self.policy)
        self.item = f'"{spec.name}";r='
        self.tolerance = limit.tolerance
        self.interval = limit.interval
        self.counters = RuleCounters()
        self.placement = placement
        self._verdicts: dict[int, Verdict] = {}

    def matches(self, method: str, path: str) -> bool:
        return path.startswith(self.prefix) and (self.methods is None or method in self.methods)

    def service_limit(self, ahead: float) -> tuple[str, str]:
        """The RateLimit field of an allowed request whose key is now ``ahead`` seconds full
        (:meth:`verge.protect.gcra.Limit.remaining`, inlined: this runs on cache hits)."""
        slack = self.tolerance - ahead
        remaining = int(slack / self.interval + 1e-9) + 1 if slack >= -1e-9 else 0
        return ("RateLimit", f"{self.item}{remaining};t={_ceil(ahead - 1e-9)}")

    def allowed(self, ahead: float) -> Verdict:
        """The verdict of an allowed request, fields included. Verdicts are immutable and few
        (one per remaining count and whole second), so they are made once and reused."""
        slack = self.tolerance - ahead
        remaining = int(slack / self.interval + 1e-9) + 1 if slack >= -1e-9 else 0
        seconds = _ceil(ahead - 1e-9)
        memo_key = (remaining << 40) | seconds
        verdict = self._verdicts.get(memo_key)
        if verdict is None:
            if len(self._verdicts) >= VERDICT_MEMO:
                self._verdicts.clear()
            limit = ("RateLimit", f"{self.item}{remaining};t={seconds}")
            verdict = Verdict("allow", "", 0.0, (self.policy_field, limit))
            self._verdicts[memo_key] = verdict
        return verdict


class RateLimiter:
    """The rate-limit rules of one service.

    ``steered``: the node steers each client address's connections to one worker (or runs
    a single worker), so client_ip keys are exact in the worker. ``shared``: the node's
    shared-memory table, for the keys that are not; ``scope`` (the service name) keeps this
    service's rules apart from others' in it.
    """

    def __init__(
        self,
        rules: Sequence[RuleSpec],
        *,
        addresses: ClientAddresses | None = None,
        shared: SharedTable | None = None,
        steered: bool = False,
        scope: str = "",
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        names = [rule.name for rule in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names repeat: {names}")
        self.addresses = addresses or ClientAddresses()
        self._rules = [self._compile(spec, shared, steered, scope, max_keys) for spec in rules]
        self.counters = {rule.name: rule.counters for rule in self._rules}

    def _compile(
        self, spec: RuleSpec, shared: SharedTable | None, steered: bool, scope: str, max_keys: int
    ) -> _Rule:
        key_of = compile_key(spec.key, self.addresses)
        in_worker = steered and steerable(spec.key) and not self.addresses.trusts_proxies
        if in_worker or shared is None:
            limit: Limit = Gcra(
                spec.count, spec.period, spec.burst, penalty=spec.penalty, max_keys=max_keys
            )
            placement = "worker" if in_worker else "per-worker"
        else:
            limit = shared.limit(
                f"{scope}/{spec.name}", spec.count, spec.period, spec.burst, penalty=spec.penalty
            )
            placement = "shared"
        return _Rule(spec, key_of, limit, placement)

    def placement(self) -> dict[str, str]:
        """Where each rule's state lives: "worker" (exact: steered), "shared" (exact: the
        node's table) or "per-worker" (each worker counts alone)."""
        return {rule.name: rule.placement for rule in self._rules}

    def evaluate(self, request: RequestLike, now: float) -> Verdict:
        """Count the request against the rules that match it; ``now``: time.monotonic().

        A prefix holds no '?' (RuleSpec), so it starts the target exactly when it starts the
        path: the target is matched, and a hit never splits it."""
        method, target = request.method, request.target
        hit = None
        for rule in self._rules:
            if target.startswith(rule.prefix) and (rule.methods is None or method in rule.methods):
                if hit is not None:
                    hits = [r for r in self._rules if r.matches(method, request.path)]
                    return self._several(hits, request, now)
                hit = rule
        if hit is None:
            return ALLOW
        ahead = hit.limit.update(hit.key_of(request), now)
        if ahead < 0.0:
            return self.refused(hit, -ahead)
        hit.counters.allowed += 1
        return hit.allowed(ahead) if hit.headers else ALLOW

    def _several(self, hits: list[_Rule], request: RequestLike, now: float) -> Verdict:
        keys = [rule.key_of(request) for rule in hits]
        for rule, key in zip(hits, keys, strict=True):
            if rule.enforcing and not rule.limit.peek(key, now).allowed:
                ahead = rule.limit.update(key, now)  # boxes the key if the rule has a penalty
                return self.refused(rule, -ahead if ahead < 0.0 else rule.limit.interval)
        logged: Verdict | None = None
        policies: list[str] = []
        limits: list[str] = []
        for rule, key in zip(hits, keys, strict=True):
            ahead = rule.limit.update(key, now)
            if ahead < 0.0:  # a log rule, or another worker spent the last unit meanwhile
                verdict = self.refused(rule, -ahead)
                if rule.enforcing:
                    return verdict
                logged = logged or verdict
                continue
            rule.counters.allowed += 1
            if rule.headers:
                policies.append(rule.policy)
                limits.append(rule.service_limit(ahead)[1])
        fields = (
            (("RateLimit-Policy", ", ".join(policies)), ("RateLimit", ", ".join(limits)))
            if policies
            else ()
        )
        if logged is not None:
            return logged._replace(headers=fields)
        return Verdict("allow", "", 0.0, fields) if fields else ALLOW

    def refused(self, rule: _Rule, retry_after: float) -> Verdict:
        counters = rule.counters
        counters.limited += 1
        action = rule.spec.action
        if action == "log":
            return Verdict("log", rule.name, retry_after, ())
        counters.blocked += 1
        if action == "drop":
            return Verdict("drop", rule.name, retry_after, ())
        wait = _seconds(retry_after)
        fields: FieldList = (  # a 429 always says which policy and when to come back
            ("Retry-After", str(wait)),
            ("RateLimit-Policy", rule.policy),
            ("RateLimit", f'"{rule.name}";r=0;t={wait}'),
        )
        return Verdict("block", rule.name, retry_after, fields)

    def client_rule(self) -> _Rule | None:
        """The limiter's one rule when it has the shape a protect phase runs inline
        (verge.edge.protect.ServiceProtection.admit): a single rule for every method, keyed
        by the peer address alone (no proxies to see through) and adding no fields to allowed
        answers. Its key for an IPv4 peer is the peer address itself; None otherwise."""
        if len(self._rules) != 1 or self.addresses.trusts_proxies:
            return None
        rule = self._rules[0]
        if rule.methods is not None or rule.headers or rule.key_of != self.addresses.key:
            return None
        return rule

    def sweep(self, now: float) -> int:
        """Drop expired keys of the worker-local rules (call from periodic housekeeping)."""
        return sum(rule.limit.sweep(now) for rule in self._rules if isinstance(rule.limit, Gcra))

    def stats(self) -> dict[str, dict[str, int]]:
        """{rule: {allowed, limited, blocked}} (plain ints, for /metrics)."""
        return {name: counters.as_dict() for name, counters in self.counters.items()}


def too_many_requests(verdict: Verdict) -> tuple[int, list[tuple[str, str]], bytes]:
    """(429, fields, body) answering a ``block`` verdict: the verdict's fields plus an RFC
    9457 problem of the draft's "quota-exceeded" type, never stored by a cache."""
    body = json.dumps(
        {
            "type": PROBLEM_TYPE,
            "title": "Request cannot be satisfied as assigned quota has been exceeded",
            "status": 429,
            "violated-policies": [verdict.rule],
        }
    ).encode()
    fields = [
        *verdict.headers,
        ("Content-Type", "application/problem+json"),
        ("Cache-Control", "no-store"),
    ]
    return 429, fields, body
