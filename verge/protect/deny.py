"""Deny lists (address prefixes, countries, user agents) and the per-address connection cap.

:class:`DenyList` answers "is this client refused, and why" with a short reason ("cidr",
"country:XX", "user-agent#N") or None. Address prefixes use verge/protect/cidr.py (one bisect
for thousands of prefixes); the country comes from a lookup callable (a MaxMind database
through :func:`open_country_lookup`: on the edge the one ``verge edge --geoip`` names, opened
once per worker; or anything that maps an address to an ISO code) and is memoised, since a
database lookup costs more than the rest of the check. An address the database does not
know, a record without a country, or an IPv6 address in an IPv4-only database has no
country: it is not refused (an IPv4-mapped address is looked up as the IPv4 one it carries).

User-agent patterns are regular expressions written by tenants and run on every request of
the shared edge workers, so a pattern must not be able to stall a worker: Python's ``re``
backtracks, and ``(a+)+$`` against 30 "a"s and a "!" already takes seconds. They are compiled
with RE2 (``google-re2``), whose matching time is linear in the input whatever the pattern:
backreferences and lookarounds do not exist there and are refused when the config is read,
and each pattern's compiled program is bounded (``max_mem``; counted repetition at most
1000). The patterns are bounded in length and number (verge/protect/settings.py) and run as
one alternation, so a request costs one scan of its User-Agent whatever the number of
patterns; the matching index is looked up only on a hit. Results are memoised per
User-Agent (few distinct values reach an edge).

:class:`ConnectionCap` counts open connections per client address for a cap
(``connections_per_ip``): the server calls :meth:`ConnectionCap.opened` when a connection is
accepted (False: close it now) and :meth:`ConnectionCap.closed` when it ends. It is exact per
node when connections are steered by address (verge/protect/steer.py), per worker otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import re2

from verge.cidr import CidrSet, format_ip, parse_ip

MAX_PATTERN = 256
MAX_PATTERNS = 64
PATTERN_MEMORY = 2 << 20  # RE2 max_mem per pattern (program + DFA cache)
MEMO_SIZE = 4096
_UNKNOWN = object()  # an address not yet in a memo
MEMO_VALUE_CHARS = 1024  # longer user agents are matched every time, not memoised

CountryLookup = Callable[[str], str | None]


def _re2_options(memory: int) -> re2.Options:
    options = re2.Options()
    options.max_mem = memory
    options.log_errors = False
    return options


def compile_user_agent_pattern(pattern: str) -> re2._Regexp:
    """One user-agent pattern compiled by RE2, or ValueError saying why not."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise ValueError(f"user-agent pattern must be 1..{MAX_PATTERN} characters")
    try:
        return re2.compile(pattern, _re2_options(PATTERN_MEMORY))
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else str(exc)
        )
        raise ValueError(
            f"invalid user-agent pattern {pattern!r}: {reason} (RE2 syntax: no "
            "backreferences or lookarounds)"
        ) from None


class UserAgentPatterns:
    """A list of RE2 patterns matched anywhere in a User-Agent; the first hit's index."""

    __slots__ = ("patterns", "_each", "_any", "_memo")

    def __init__(self, patterns: Sequence[str]) -> None:
        if len(patterns) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} user-agent patterns")
        self.patterns = list(patterns)
        self._each = [compile_user_agent_pattern(p) for p in self.patterns]
        joined = "|".join(f"(?:{p})" for p in self.patterns)
        memory = PATTERN_MEMORY * max(1, len(self.patterns))
        self._any = re2.compile(joined, _re2_options(memory)) if self.patterns else None
        self._memo: dict[str, int | None] = {}

    def __bool__(self) -> bool:
        return self._any is not None

    def match(self, user_agent: str) -> int | None:
        """Index of the first pattern found in ``user_agent``; None when none is."""
        if self._any is None:
            return None
        memo = self._memo
        if user_agent in memo:
            return memo[user_agent]
        index = None
        if self._any.search(user_agent) is not None:
            index = next(i for i, each in enumerate(self._each) if each.search(user_agent))
        if len(user_agent) <= MEMO_VALUE_CHARS:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[user_agent] = index
        return index


class DenyList:
    """Refuse clients by address prefix, country or user agent."""

    __slots__ = ("cidrs", "countries", "user_agents", "_agents", "_country_of", "_country_memo",
                 "_address_memo", "_verdicts")

    def __init__(
        self,
        cidrs: Iterable[str] = (),
        countries: Iterable[str] = (),
        user_agents: Sequence[str] = (),
        *,
        country_of: CountryLookup | None = None,
    ) -> None:
        self.cidrs = CidrSet(cidrs)
        self.countries = frozenset(code.upper() for code in countries)
        self.user_agents = UserAgentPatterns(user_agents)
        self._agents = self.user_agents if self.user_agents else None  # (checked per request)
        if self.countries and country_of is None:
            raise ValueError("deny.countries needs a GeoIP database (a country lookup)")
        self._country_of = country_of
        self._country_memo: dict[str, str | None] = {}
        self._address_memo: dict[str, str | None] = {}
        self._verdicts: dict[tuple[str, str | None], str | None] = {}

    def __bool__(self) -> bool:
        return bool(self.cidrs or self.countries or self.user_agents)

    def check_address(self, address: str) -> str | None:
        """Why the address is refused ("cidr", "country:XX"), or None. Cheap enough for
        every accepted connection (before TLS) when the peer is the client."""
        parsed = parse_ip(address)
        if parsed is None:
            return None
        if self.cidrs and self.cidrs.contains(*parsed):
            return "cidr"
        if self.countries:
            country = self._country(format_ip(*parsed))
            if country in self.countries:
                return f"country:{country}"
        return None

    def check(self, address: str, user_agent: str | None) -> str | None:
        """Why a request is refused ("cidr", "country:XX", "user-agent#N"), or None.

        The verdict of an (address, user agent) pair is memoised (a client sends many
        requests with the same two): a request of a known pair costs one dict lookup, and
        one frame — on a cache hit each further call is a CPU-cache miss after the kernel's
        network work. The address and user-agent verdicts are memoised on their own too."""
        pair = (address, user_agent)
        verdicts = self._verdicts
        reason = verdicts.get(pair, _UNKNOWN)
        if reason is _UNKNOWN:
            reason = self._check(address, user_agent)
            if user_agent is None or len(user_agent) <= MEMO_VALUE_CHARS:
                if len(verdicts) >= MEMO_SIZE:
                    verdicts.clear()
                verdicts[pair] = reason
        return reason

    def _check(self, address: str, user_agent: str | None) -> str | None:
        memo = self._address_memo
        reason = memo.get(address, _UNKNOWN)
        if reason is _UNKNOWN:
            reason = self.check_address(address)
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[address] = reason
        agents = self._agents
        if reason is None and user_agent is not None and agents is not None:
            index = agents.match(user_agent)
            if index is not None:
                reason = f"user-agent#{index}"
        return reason

    def _country(self, address: str) -> str | None:
        memo = self._country_memo
        if address in memo:
            return memo[address]
        try:
            country = self._country_of(address) if self._country_of else None
        except (ValueError, OSError):
            country = None
        country = country.upper() if isinstance(country, str) else None
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[address] = country
        return country


def open_country_lookup(path: str) -> CountryLookup:
    """An address -> ISO country code lookup on a MaxMind-format database (GeoLite2-Country
    or -City: the file the router's ``geoip`` setting names, and the edge's ``--geoip``).
    The country, else the registered country; None when the record has neither. A file
    that is missing or not such a database is a ValueError naming it."""
    import maxminddb

    try:
        reader = maxminddb.open_database(str(path))
    except (OSError, maxminddb.InvalidDatabaseError) as exc:
        raise ValueError(f"geoip: cannot open {path}: {exc}") from None

    def country_of(address: str) -> str | None:
        record = reader.get(address)
        if not isinstance(record, dict):
            return None
        for field in ("country", "registered_country"):
            code = (record.get(field) or {}).get("iso_code")
            if isinstance(code, str):
                return code
        return None

    return country_of


class ConnectionCap:
    """Open connections per client address, refused beyond ``limit``."""

    __slots__ = ("limit", "exempt", "refused", "_open")

    def __init__(self, limit: int, *, exempt: Iterable[str] = ()) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"the connection cap must be an int >= 1, not {limit!r}")
        self.limit = limit
        self.exempt = CidrSet(exempt)  # e.g. the trusted proxies: many clients per address
        self.refused = 0
        self._open: dict[str, int] = {}

    def opened(self, address: str) -> bool:
        """Count a new connection; False (and not counted) when the address is at its cap."""
        if self.exempt and address in self.exempt:
            return True
        count = self._open.get(address, 0)
        if count >= self.limit:
            self.refused += 1
            return False
        self._open[address] = count + 1
        return True

    def closed(self, address: str) -> None:
        """Uncount a connection that :meth:`opened` accepted."""
        count = self._open.get(address, 0)
        if count > 1:
            self._open[address] = count - 1
        else:
            self._open.pop(address, None)

    def count(self, address: str) -> int:
        return self._open.get(address, 0)

    def __len__(self) -> int:
        return len(self._open)
