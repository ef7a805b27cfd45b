"""The ``protection:`` block of a service: validated models, every value bounded.

::

    protection:
      rate_limits:
        - {name: api, match: {path: /api/}, key: client_ip, rate: 100/s, burst: 200, action: block}
        - {name: login, match: {path: /login, methods: [POST]}, key: "header:X-Api-Key",
           rate: 5/m, action: block, penalty: 10m}
      connections_per_ip: 256
      deny: {cidrs: [203.0.113.0/24], countries: [XX], user_agents: ["(?i)sqlmap"]}
      trusted_proxies: [10.0.0.0/8]
      challenge: {match: {path: /}, when: "rate > 50/s", kind: cookie}

A tenant writes this block through the control plane, and the edge workers it runs on serve
every tenant, so each number, string and list has a bound (the rule of verge/config/bounds.py's
bounds table; the limits below are this block's, the shared ones have the same values as
that table) and nothing a tenant writes can cost a worker more than a bounded amount per
request: rate-limit state is bounded per rule (verge/protect/gcra.py), user-agent patterns
are RE2 (linear time) and bounded in length and number (verge/protect/deny.py).

This module imports nothing of verge.config (verge.config imports it); durations use the
syntax of verge.units ("10m", "1h30m"), the one the config uses.
The models dump to JSON and validate back unchanged (rates and keys are kept in their
canonical text: "100/s", "header:x-api-key").
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from verge.cidr import parse_network
from verge.protect.challenge import RULE as CHALLENGE_RULE
from verge.protect.challenge import ChallengeSpec, format_when, parse_when
from verge.protect.deny import MAX_PATTERN, MAX_PATTERNS, CountryLookup, DenyList
from verge.protect.deny import compile_user_agent_pattern as _compile_pattern
from verge.protect.keys import ClientAddresses, check_key_spec
from verge.protect.ratelimit import (
    MAX_BURST,
    MAX_PENALTY,
    RuleSpec,
    format_rate,
    parse_rate,
)
from verge.protect.waf_settings import WafSettings
from verge.units import parse_duration

# Bounds of this block (shared ones equal verge.config's: MAX_NAME, MAX_URL_PATH)
MAX_NAME = 63
MAX_URL_PATH = 1024
MAX_RATE_RULES = 32
"""Rate-limit rules of one service: every request is matched against each."""
MAX_METHODS = 16
MAX_KEY_SPEC = 300
MAX_RATE_TEXT = 32
MAX_CIDR_TEXT = 64
MAX_DENY_CIDRS = 10_000
MAX_TRUSTED_PROXIES = 1000
MAX_COUNTRIES = 300
MAX_CONNECTIONS_PER_IP = 1_000_000
MAX_WHEN_TEXT = 48
MIN_CHALLENGE_TTL = 60.0
MAX_CHALLENGE_TTL = 86_400.0
"""A challenge token's lifetime: a minute to a day."""
MAX_REFUSE_AFTER = 100
MAX_CHALLENGE_WINDOW = 3600.0


class _Model(BaseModel):
    """Same rules as verge.config's models: unknown keys are errors, numbers are finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def _duration(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, str):
        return parse_duration(value)
    return value


def _rate(text: str) -> str:
    return format_rate(*parse_rate(text))


def _when(text: str) -> str:
    return format_when(*parse_when(text))


def _key(spec: str) -> str:
    return "+".join(check_key_spec(spec))


def _cidr(text: str) -> str:
    return str(parse_network(text))


def _pattern(pattern: str) -> str:
    _compile_pattern(pattern)
    return pattern


def _path_prefix(path: str) -> str:
    if not path.startswith("/") or "?" in path or "#" in path:
        raise ValueError(f"path {path!r} must be a path prefix such as /api/ (starting with "
                         f"'/', no '?' or '#')")
    return path


def _method(method: str) -> str:
    method = method.upper()
    RuleSpec("x", 1, 1, methods=frozenset({method}))  # the same rule as the limiter's
    return method


def _country(code: str) -> str:
    code = code.upper()
    if len(code) != 2 or not code.isascii() or not code.isalpha():
        raise ValueError(f"invalid country {code!r}: use an ISO 3166 alpha-2 code such as DE")
    return code


def _rule_name(name: str) -> str:
    RuleSpec(name, 1, 1)  # the same rule as the limiter's
    return name


RuleName = Annotated[str, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_rule_name)]
RateText = Annotated[str, Field(max_length=MAX_RATE_TEXT), AfterValidator(_rate)]
WhenText = Annotated[str, Field(max_length=MAX_WHEN_TEXT), AfterValidator(_when)]
KeySpec = Annotated[str, Field(max_length=MAX_KEY_SPEC), AfterValidator(_key)]
CidrText = Annotated[str, Field(max_length=MAX_CIDR_TEXT), AfterValidator(_cidr)]
PathPrefix = Annotated[str, Field(max_length=MAX_URL_PATH), AfterValidator(_path_prefix)]
Method = Annotated[str, Field(min_length=1, max_length=32), AfterValidator(_method)]
Country = Annotated[str, Field(min_length=2, max_length=2), AfterValidator(_country)]
UserAgentPattern = Annotated[
    str, Field(min_length=1, max_length=MAX_PATTERN), AfterValidator(_pattern)
]
Penalty = Annotated[float, Field(ge=0, le=MAX_PENALTY), BeforeValidator(_duration)]


class RateLimitMatch(_Model):
    path: PathPrefix = "/"
    """A path prefix: /api/ counts /api/users and /api/x; / counts everything."""
    methods: list[Method] = Field(default_factory=list, max_length=MAX_METHODS)
    """Only these methods (upper-case); empty: every method."""


class RateLimitRule(_Model):
    name: RuleName
    """Lower-case letters, digits, "-" and "_"; names the rule in metrics and RateLimit fields."""
    match: RateLimitMatch = Field(default_factory=RateLimitMatch)
    key: KeySpec = "client_ip"
    """client_ip, path, header:NAME or cookie:NAME, or several joined by "+"."""
    rate: RateText
    """COUNT/UNIT with unit s, m, h or d, or COUNT/Ns: 100/s, 5/m, 10/30s."""
    burst: int = Field(0, ge=0, le=MAX_BURST, strict=True)
    """Requests allowed beyond the rate at once (nginx limit_req burst, nodelay)."""
    action: Literal["block", "drop", "log"] = "block"
    """block: 429 with Retry-After; drop: close without an answer; log: count only."""
    penalty: Penalty = 0.0
    """Once over the limit, refuse the key outright for this long ("10m")."""
    headers: bool = False
    """Send RateLimit-Policy and RateLimit fields on allowed responses too (a 429 always
    carries them). Off by default: a cache hit then needs its own head per request."""

    def spec(self) -> RuleSpec:
        """The rule as verge.protect.ratelimit.RateLimiter takes it."""
        count, period = parse_rate(self.rate)
        return RuleSpec(
            self.name,
            count,
            period,
            self.burst,
            self.key,
            self.action,
            self.penalty,
            self.match.path,
            frozenset(self.match.methods),
            self.headers,
        )


class DenySettings(_Model):
    cidrs: list[CidrText] = Field(default_factory=list, max_length=MAX_DENY_CIDRS)
    """Client address prefixes (203.0.113.0/24, 2001:db8::/32) or single addresses."""
    countries: list[Country] = Field(default_factory=list, max_length=MAX_COUNTRIES)
    """ISO 3166 alpha-2 codes, looked up in the node's GeoIP database."""
    user_agents: list[UserAgentPattern] = Field(default_factory=list, max_length=MAX_PATTERNS)
    """RE2 regular expressions searched in the User-Agent ("(?i)" for case-insensitive)."""

    def deny_list(self, country_of: CountryLookup | None = None) -> DenyList:
        return DenyList(self.cidrs, self.countries, self.user_agents, country_of=country_of)


class ChallengeSettings(_Model):
    """Clients over a rate must show they keep cookies (verge.protect.challenge)."""

    match: RateLimitMatch = Field(default_factory=RateLimitMatch)
    """Which requests count and may be challenged (a rate limit's match)."""
    when: WhenText
    """The client's rate beyond which it is challenged: "rate > 50/s" ("50/s" alike)."""
    burst: int | None = Field(None, ge=0, le=MAX_BURST, strict=True)
    """Requests beyond the rate allowed at once; unset: the rate's count less one, so that
    "rate > 50/s" challenges the 51st request within a second, not a page's burst of assets."""
    kind: Literal["cookie", "javascript"] = "cookie"
    """cookie: 307 to the same URL with Set-Cookie; javascript: a page whose script sets it."""
    ttl: Annotated[float, Field(ge=MIN_CHALLENGE_TTL, le=MAX_CHALLENGE_TTL),
                   BeforeValidator(_duration)] = 3600.0
    """How long a passed challenge's cookie is good for ("1h")."""
    refuse_after: int = Field(5, ge=1, le=MAX_REFUSE_AFTER, strict=True)
    """Challenges a client may leave unanswered within ``window``; beyond them: 429."""
    window: Annotated[float, Field(ge=1, le=MAX_CHALLENGE_WINDOW),
                      BeforeValidator(_duration)] = 60.0
    """Starts with a client's first unanswered challenge; a refused client waits it out."""

    def spec(self) -> ChallengeSpec:
        """The challenge as verge.protect.challenge.Challenge takes it: its rate as a
        ``log`` rule keyed by the client address (counted, never refusing by itself)."""
        count, period = parse_when(self.when)
        burst = self.burst if self.burst is not None else count - 1
        rule = RuleSpec(CHALLENGE_RULE, count, period, burst, "client_ip", "log",
                        path=self.match.path, methods=frozenset(self.match.methods))
        return ChallengeSpec(rule, self.kind, self.ttl, self.refuse_after, self.window)


class Protection(_Model):
    rate_limits: list[RateLimitRule] = Field(default_factory=list, max_length=MAX_RATE_RULES)
    """Checked in order; every matching rule counts the request."""
    connections_per_ip: int | None = Field(None, ge=1, le=MAX_CONNECTIONS_PER_IP, strict=True)
    """Open connections one client address may hold (none: no cap)."""
    deny: DenySettings = Field(default_factory=DenySettings)
    trusted_proxies: list[CidrText] = Field(default_factory=list, max_length=MAX_TRUSTED_PROXIES)
    """Peers whose X-Forwarded-For is believed (the rightmost untrusted hop is the client)."""
    ipv6_prefix: int = Field(64, ge=32, le=128, strict=True)
    """IPv6 clients are one key per prefix of this length (one host usually owns a /64)."""
    waf: WafSettings | None = None
    """The OWASP Core Rule Set on libmodsecurity (verge.protect.waf); none: no WAF."""
    challenge: ChallengeSettings | None = None
    """A cookie challenge for clients over a rate (verge.protect.challenge); none: no challenge."""

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Protection:
        seen: set[str] = {CHALLENGE_RULE} if self.challenge is not None else set()
        for index, rule in enumerate(self.rate_limits):
            if rule.name in seen:
                reason = f"the rule name {rule.name!r} is used twice" \
                    if rule.name != CHALLENGE_RULE or self.challenge is None else \
                    f"the rule name {CHALLENGE_RULE!r} is the challenge's (its counters' name)"
                # verge.config's "config_conflict": "at" extends the error's path to the line
                raise PydanticCustomError(
                    "config_conflict",
                    "{reason}",
                    {"reason": reason, "at": ("rate_limits", index, "name")},
                )
            seen.add(rule.name)
        return self

    def rule_specs(self) -> list[RuleSpec]:
        return [rule.spec() for rule in self.rate_limits]

    def client_addresses(self) -> ClientAddresses:
        return ClientAddresses(self.trusted_proxies, ipv6_prefix=self.ipv6_prefix)


class FloodSettings(_Model):
    """The node's flood guard (the config's top-level ``flood:``; verge.protect.flood): the
    operator's, never a tenant's, since it refuses whole networks for every service.

    ::

        flood: {rate: 2000/s, burst: 200, penalty: 1m, ipv4_prefix: 24, exempt: [10.0.0.0/8]}
    """

    rate: RateText
    """Requests and new connections per network (all services of the node together): size
    it for the network's aggregate, many users behind one NAT."""
    burst: int | None = Field(None, ge=0, le=MAX_BURST, strict=True)
    """What a network may add at once; unset: a tenth of a second of the rate (at least 10).
    A flood is served this much before it is boxed, so a large burst is a stall for every
    other client of the worker (verge.protect.flood explains the default)."""
    penalty: Annotated[float, Field(ge=1, le=86_400), BeforeValidator(_duration)] = 60.0
    """How long a network over the rate is refused: requests dropped with their connection,
    new connections dropped by the listeners' kernel filter."""
    ipv4_prefix: int = Field(24, ge=8, le=32, strict=True)
    ipv6_prefix: int = Field(48, ge=16, le=128, strict=True)
    exempt: list[CidrText] = Field(default_factory=list, max_length=MAX_TRUSTED_PROXIES)
    """Networks never counted (your load balancers, monitoring, a campus NAT)."""

    def spec(self):
        """The guard's parsed settings (verge.protect.flood.FloodSpec)."""
        from verge.protect.flood import FloodSpec

        count, period = parse_rate(self.rate)
        return FloodSpec(count, period, self.burst, self.penalty, self.ipv4_prefix,
                         self.ipv6_prefix, tuple(self.exempt))
