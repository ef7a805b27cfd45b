"""HTTP caching semantics for a shared cache (RFC 9111), as pure functions.

Why a separate, I/O-free module: whether a response may be stored, for how long it stays
fresh and whether a stored response may answer a request are the decisions an HTTP cache is
judged on (cache-tests.fyi). Keeping them here, free of sockets and storage, lets them be
tested exhaustively and keeps the hit path cheap: :func:`analyze` parses the response once
at store time into a small :class:`Freshness` record, and :func:`evaluate` (run on every hit)
only does arithmetic on it plus, when the request carries one, a (memoised) parse of the
request's ``Cache-Control``.

Besides RFC 9111 the module honours the headers a CDN is expected to obey: the targeted
``CDN-Cache-Control`` field (RFC 9213, a Structured Field that replaces ``Cache-Control``
and ``Expires`` for this cache) and ``Surrogate-Control`` (``max-age`` / ``no-store``),
plus ``stale-while-revalidate`` / ``stale-if-error`` (RFC 5861).

Conventions: header arguments are ``Mapping[str, str]`` with lower-case names and repeated
fields joined by ``", "`` (see :func:`verge.http.message.header_map`); times are float
epoch seconds and the caller passes ``now``.
"""

from __future__ import annotations

import calendar
import enum
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache
from types import MappingProxyType

from verge.http_semantics import HOP_BY_HOP

__all__ = [
    "HEURISTICALLY_CACHEABLE",
    "UNDERSTOOD_STATUSES",
    "Freshness",
    "Verdict",
    "age_value",
    "analyze",
    "evaluate",
    "format_http_date",
    "invalidates",
    "merge_304",
    "not_modified_for",
    "only_if_cached",
    "parse_cache_control",
    "parse_http_date",
    "revalidation_headers",
    "secondary_key",
    "stale_if_error_ok",
]

# RFC 9110 §15.1: statuses whose responses may get a heuristic freshness lifetime.
HEURISTICALLY_CACHEABLE: frozenset[int] = frozenset(
    {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501}
)

# Statuses this cache stores without explicit freshness (with a validator, a heuristic or an
# operator TTL). Any other final status needs max-age / s-maxage / Expires (or `public`).
UNDERSTOOD_STATUSES: frozenset[int] = frozenset(
    {200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501}
)

# RFC 9111 §1.2.2: delta-seconds that overflow are taken as 2^31.
MAX_DELTA = 2147483648

_STORABLE_METHODS = frozenset({"GET", "HEAD"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

# RFC 9111 §3.2: fields a 304 must not update (plus hop-by-hop ones, §3.1).
_NOT_UPDATED_BY_304 = (
    frozenset({"content-length", "content-encoding", "transfer-encoding", "content-range"})
    | HOP_BY_HOP
    | {"proxy-authentication-info"}
)

_EMPTY: Mapping[str, str | None] = MappingProxyType({})


# --------------------------------------------------------------------------- Cache-Control


_TCHAR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _split_list(value: str) -> list[str]:
    """Split a comma-separated field value, ignoring commas inside quoted strings."""
    if '"' not in value:
        return value.split(",")
    parts: list[str] = []
    start = 0
    in_quotes = False
    escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif in_quotes:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == ",":
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def _directive_value(raw: str) -> str | None:
    """The value of ``name=raw``: a token or an unquoted quoted-string; None when invalid."""
    if raw.startswith('"'):
        quoted = _QUOTED_STRING.fullmatch(raw)
        return _QUOTED_PAIR.sub(r"\1", quoted.group(1)) if quoted else None
    return raw if _TCHAR.fullmatch(raw) else None


@lru_cache(maxsize=512)
def _parse_cc(value: str) -> dict[str, str | None]:
    """Memoised parser behind :func:`parse_cache_control`; callers must not mutate the result."""
    out: dict[str, str | None] = {}
    for member in _split_list(value):
        member = member.strip(" \t")
        if not member:
            continue
        name, eq, raw = member.partition("=")
        if not _TCHAR.fullmatch(name):
            continue  # junk such as "max-age =5" or stray quotes
        name = name.lower()
        if eq:
            parsed = _directive_value(raw)
            if parsed is None:
                continue  # "max-age= 5", unterminated quotes, ...
        else:
            parsed = None
        if name not in out:  # RFC 9111 §4.2.1: the first occurrence wins
            out[name] = parsed
    return out


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives of a Cache-Control value: lower-cased names -> unquoted value or None.

    Commas inside quoted strings do not split; malformed members are skipped; when a
    directive repeats, its first occurrence wins.
    """
    if not value:
        return {}
    return dict(_parse_cc(value))


def _delta_seconds(value: str | None) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds (digits only), capped at 2^31; None when invalid."""
    if value is None or not value.isascii() or not value.isdigit():
        return None
    digits = value.lstrip("0")
    if len(digits) > 10:
        return MAX_DELTA
    return min(int(digits or "0"), MAX_DELTA)


# ------------------------------------------------------------------- Structured dictionary

_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*", re.IGNORECASE)  # lenient: any case
_SF_ITEM = re.compile(
    r"""
    (?P<int>-?[0-9]{1,15})(?![0-9.])
    | (?P<dec>-?[0-9]{1,12}\.[0-9]{1,3})
    | "(?P<str>(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"
    | (?P<tok>[A-Za-z*][!#$%&'*+\-.^_`|~:/0-9A-Za-z]*)
    | :(?P<bin>[A-Za-z0-9+/=]*):
    | \?(?P<bool>[01])
    """,
    re.VERBOSE,
)
_NUMERIC_DIRECTIVES = ("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error")


def _sf_item(text: str, pos: int) -> tuple[object, int] | None:
    """One RFC 8941 bare item at ``pos``: (value, new pos), or None on a parse error."""
    m = _SF_ITEM.match(text, pos)
    if m is None:
        return None
    if m.group("int") is not None:
        return int(m.group("int")), m.end()
    if m.group("dec") is not None:
        return float(m.group("dec")), m.end()
    if m.group("str") is not None:
        return _QUOTED_PAIR.sub(r"\1", m.group("str")), m.end()
    if m.group("bool") is not None:
        return m.group("bool") == "1", m.end()
    return (m.group("tok") if m.group("tok") is not None else m.group(0)), m.end()


def _sf_parameters(text: str, pos: int) -> int | None:
    """Skip ``;key[=item]`` parameters; the position after them, or None on error."""
    while pos < len(text) and text[pos] == ";":
        pos += 1
        while pos < len(text) and text[pos] == " ":
            pos += 1
        key = _SF_KEY.match(text, pos)
        if key is None:
            return None
        pos = key.end()
        if pos < len(text) and text[pos] == "=":
            item = _sf_item(text, pos + 1)
            if item is None:
                return None
            pos = item[1]
    return pos


def _parse_sf_dictionary(value: str) -> dict[str, object] | None:
    """An RFC 8941 Dictionary (inner lists unsupported); None when the value does not parse.

    Keys are lower-cased first (lenient: ``MaX-aGe`` is accepted); a repeated key keeps its
    last value, as RFC 8941 requires.
    """
    text = value.strip(" \t")
    out: dict[str, object] = {}
    pos = 0
    while pos < len(text):
        key = _SF_KEY.match(text, pos)
        if key is None:
            return None
        name, pos = key.group(0).lower(), key.end()
        item: object = True
        if pos < len(text) and text[pos] == "=":
            parsed = _sf_item(text, pos + 1)
            if parsed is None:
                return None
            item, pos = parsed
        end = _sf_parameters(text, pos)
        if end is None:
            return None
        out[name] = item
        pos = end
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos == len(text):
            break
        if text[pos] != ",":
            return None
        pos += 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos == len(text):
            return None  # trailing comma
    return out


@lru_cache(maxsize=256)
def _parse_targeted(value: str) -> dict[str, str | None] | None:
    """CDN-Cache-Control (RFC 9213) as Cache-Control-style directives; None when invalid/empty."""
    parsed = _parse_sf_dictionary(value)
    if not parsed:
        return None
    out: dict[str, str | None] = {}
    for name, item in parsed.items():
        if name in _NUMERIC_DIRECTIVES:
            if type(item) is not int or item < 0:
                return None  # wrong type: the whole field is ignored
            out[name] = str(item)
        elif item is True:
            out[name] = None
        else:
            out[name] = str(item)
    return out


# -------------------------------------------------------------------------------- Dates

_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_LONG_DAY = r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(
    rf"{_DAY}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} gmt", re.IGNORECASE | re.ASCII
)
_RFC850 = re.compile(
    rf"{_LONG_DAY}, ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) {_TIME} gmt", re.IGNORECASE | re.ASCII
)
_ASCTIME = re.compile(
    rf"{_DAY} {_MONTH} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})", re.IGNORECASE | re.ASCII
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}
_SECONDS_PER_YEAR = 365.2425 * 86400


def _timestamp(year: int, month: str, day: int, hh: str, mm: str, ss: str) -> float | None:
    mon = _MONTHS[month.lower()]
    hour, minute, second = int(hh), int(mm), int(ss)
    if hour > 23 or minute > 59 or second > 60 or day < 1:
        return None
    if day > calendar.monthrange(year, mon)[1]:
        return None
    return float(calendar.timegm((year, mon, day, hour, minute, min(second, 59), 0, 0, 0)))


def _rfc850_year(yy: int, now: float) -> int:
    """RFC 9110 §5.6.7: a 2-digit year more than 50 years ahead belongs to the last century."""
    current = int(1970 + now / _SECONDS_PER_YEAR)
    year = current - current % 100 + yy
    if year > current + 50:
        year -= 100
    return year


@lru_cache(maxsize=1024)
def _parse_http_date(value: str) -> float | None:
    text = value.strip(" \t")
    if m := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hh, mm, ss = m.groups()
        return _timestamp(int(year), month, int(day), hh, mm, ss)
    if m := _RFC850.fullmatch(text):
        day, month, yy, hh, mm, ss = m.groups()
        year = _rfc850_year(int(yy), time.time())
        return _timestamp(year, month, int(day), hh, mm, ss)
    if m := _ASCTIME.fullmatch(text):
        month, day, hh, mm, ss, year = m.groups()
        return _timestamp(int(year), month, int(day), hh, mm, ss)
    return None


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as epoch seconds; None when invalid.

    Strict about layout (a missing comma, doubled spaces, a 2-digit year in IMF-fixdate or a
    zone other than GMT make it invalid) but not about the case of names.
    """
    if not value:
        return None
    return _parse_http_date(value)


def format_http_date(ts: float) -> str:
    """IMF-fixdate for ``ts``, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return formatdate(ts, usegmt=True)


# ---------------------------------------------------------------------------- Freshness


@dataclass(slots=True)
class Freshness:
    """What the cache keeps about a stored response so later hits need no header parsing."""

    response_time: float  # local clock when the response arrived
    corrected_initial_age: float  # RFC 9111 §4.2.3
    lifetime: float  # freshness lifetime in seconds (0 = stale at once)
    no_cache: bool = False  # response `no-cache` -> every reuse needs revalidation
    must_revalidate: bool = False  # must-revalidate, proxy-revalidate or s-maxage
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    etag: str | None = None
    last_modified: str | None = None
    vary: tuple[str, ...] = ()  # lower-cased field names from Vary, sorted, deduplicated
    invalidated: bool = False  # soft purge: stale from now on (lifetime treated as 0)

    def age(self, now: float) -> float:
        """current_age = corrected_initial_age + resident_time (RFC 9111 §4.2.3)."""
        resident = now - self.response_time
        return self.corrected_initial_age + resident if resident > 0 else self.corrected_initial_age

    def ttl(self, now: float) -> float:
        """Seconds of freshness left; negative once stale (minus the staleness)."""
        lifetime = 0.0 if self.invalidated else self.lifetime
        return lifetime - self.age(now)

    def fresh_until(self) -> float:
        """Absolute time at which the response goes stale (-inf when invalidated)."""
        if self.invalidated:
            return float("-inf")
        return self.response_time + self.lifetime - self.corrected_initial_age

    def to_dict(self) -> dict:
        """A JSON-able dict (for the disk tier's index)."""
        return {
            "response_time": self.response_time,
            "corrected_initial_age": self.corrected_initial_age,
            "lifetime": self.lifetime,
            "no_cache": self.no_cache,
            "must_revalidate": self.must_revalidate,
            "stale_while_revalidate": self.stale_while_revalidate,
            "stale_if_error": self.stale_if_error,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "vary": list(self.vary),
            "invalidated": self.invalidated,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Freshness:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones defaulted."""
        return cls(
            response_time=float(d["response_time"]),
            corrected_initial_age=float(d["corrected_initial_age"]),
            lifetime=float(d["lifetime"]),
            no_cache=bool(d.get("no_cache", False)),
            must_revalidate=bool(d.get("must_revalidate", False)),
            stale_while_revalidate=float(d.get("stale_while_revalidate", 0.0)),
            stale_if_error=float(d.get("stale_if_error", 0.0)),
            etag=d.get("etag"),
            last_modified=d.get("last_modified"),
            vary=tuple(d.get("vary", ())),
            invalidated=bool(d.get("invalidated", False)),
        )


# ------------------------------------------------------------------------------ analyze


def _parse_age(value: str | None) -> int:
    """The Age field: the largest valid member (most conservative), 0 when none is valid."""
    if not value:
        return 0
    ages = [
        d for d in map(_delta_seconds, (p.strip(" \t") for p in value.split(","))) if d is not None
    ]
    return max(ages) if ages else 0


def _parse_vary(value: str | None) -> tuple[str, ...] | None:
    """Sorted, de-duplicated lower-case names; None for ``*`` (never matches)."""
    if not value:
        return ()
    names = {n.strip(" \t").lower() for n in value.split(",")}
    names.discard("")
    if "*" in names:
        return None
    return tuple(sorted(names))


@dataclass(slots=True)
class _Origin:
    """The parts of a response that storability and freshness depend on, parsed once."""

    headers: Mapping[str, str]
    status: int
    cc: Mapping[str, str | None]  # Cache-Control, or CDN-Cache-Control when that applies
    surrogate: Mapping[str, str | None]  # Surrogate-Control (empty when not honoured)
    targeted: bool  # CDN-Cache-Control replaced Cache-Control (and Expires)
    date: float  # Date, or the response time when Date is missing or invalid
    has_validator: bool


def _origin(
    status: int,
    headers: Mapping[str, str],
    response_time: float,
    cdn_cache_control: bool,
    surrogate_control: bool,
) -> _Origin:
    """Pick the directives that govern this cache: CDN-Cache-Control > Surrogate-Control > CC."""
    targeted = None
    if cdn_cache_control and headers.get("cdn-cache-control"):
        targeted = _parse_targeted(headers["cdn-cache-control"])
    surrogate = _EMPTY
    if targeted is None and surrogate_control and headers.get("surrogate-control"):
        surrogate = _parse_cc(headers["surrogate-control"])
    date = parse_http_date(headers.get("date"))
    return _Origin(
        headers=headers,
        status=status,
        cc=targeted if targeted is not None else _parse_cc(headers.get("cache-control") or ""),
        surrogate=surrogate,
        targeted=targeted is not None,
        date=response_time if date is None else date,
        has_validator=bool(headers.get("etag") or headers.get("last-modified")),
    )


def _corrected_initial_age(o: _Origin, request_time: float, response_time: float) -> float:
    """RFC 9111 §4.2.3 corrected_initial_age."""
    apparent_age = max(0.0, response_time - o.date)
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = _parse_age(o.headers.get("age")) + response_delay
    return max(apparent_age, corrected_age_value)


def _forbids_storing(o: _Origin) -> bool:
    """no-store in the governing directives (§5.2.2.5), unless must-understand (§5.2.2.3)."""
    if "no-store" in o.surrogate:
        return True
    if "must-understand" in o.cc:  # overrides no-store for statuses this cache understands
        return o.status not in UNDERSTOOD_STATUSES
    return "no-store" in o.cc


def _explicit_lifetime(o: _Origin) -> float | None:
    """Surrogate-Control max-age, s-maxage, max-age, then Expires - Date (§4.2.1); None if none.

    An invalid value counts as present and already stale (lifetime 0).
    """
    if "max-age" in o.surrogate:
        return float(_delta_seconds(o.surrogate["max-age"]) or 0)
    for name in ("s-maxage", "max-age"):
        if name in o.cc:
            return float(_delta_seconds(o.cc[name]) or 0)
    if not o.targeted and "expires" in o.headers:
        expires = parse_http_date(o.headers["expires"])
        if expires is None:
            return 0.0  # §5.3: invalid dates (e.g. "0") mean already expired
        return max(0.0, expires - o.date)
    return None


def _heuristic_lifetime(o: _Origin, fraction: float, maximum: float) -> float | None:
    """§4.2.2: a fraction of the time since Last-Modified, for heuristically cacheable responses."""
    if o.status not in HEURISTICALLY_CACHEABLE and "public" not in o.cc:
        return None
    last_modified = parse_http_date(o.headers.get("last-modified"))
    if last_modified is None:
        return None
    return min(maximum, max(0.0, (o.date - last_modified) * fraction))


def _lifetime(o: _Origin, rule_ttl: float | None, fraction: float, maximum: float) -> float | None:
    """Freshness lifetime per the precedence in :func:`analyze`; None when not storable."""
    explicit = _explicit_lifetime(o)
    if explicit is not None:
        return explicit
    understood = o.status in UNDERSTOOD_STATUSES
    if not understood and "public" not in o.cc:
        return None  # other statuses need explicit freshness (or public, for a heuristic)
    if rule_ttl is not None and understood:
        return float(rule_ttl)
    heuristic = _heuristic_lifetime(o, fraction, maximum)
    if heuristic is not None:
        return heuristic
    return 0.0 if o.has_validator and understood else None


def _refuses_shared_storage(o: _Origin, request_headers: Mapping[str, str]) -> bool:
    """§3.5 / §5.2.2.7: private responses and responses to authenticated requests."""
    if "private" in o.cc:
        return True
    return "authorization" in request_headers and not (
        "public" in o.cc or "must-revalidate" in o.cc or "s-maxage" in o.cc
    )


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    """How a cache applies RFC 9111 to one rule's responses, built once from the config (in
    the spirit of http-cache-semantics' ``CachePolicy(options)``) and passed whole to every
    decision, so a fill and a 304 refresh can never disagree on a setting.

    ``rule_ttl``: the operator's TTL (used when the origin says nothing, or always with
    ``rule_override``); ``heuristic_fraction`` / ``heuristic_max``: Last-Modified heuristic
    (§4.2.2); ``cdn_cache_control`` / ``surrogate_control``: honour those targeted fields.
    """

    rule_ttl: float | None = None
    rule_override: bool = False
    heuristic_fraction: float = 0.1
    heuristic_max: float = 86400.0
    cdn_cache_control: bool = True
    surrogate_control: bool = True


DEFAULT_OPTIONS = PolicyOptions()


def analyze(
    *,
    method: str,
    status: int,
    request_headers: Mapping[str, str],
    response_headers: Mapping[str, str],
    request_time: float,
    response_time: float,
    options: PolicyOptions = DEFAULT_OPTIONS,
) -> Freshness | None:
    """Decide whether a response may be stored (RFC 9111 §3) and how long it stays fresh.

    Returns None when it must not be stored: method not GET/HEAD; ``no-store`` in the request
    or the response; response ``private`` (with or without field names); ``Authorization`` in
    the request unless the response has ``public``, ``must-revalidate`` or ``s-maxage``;
    1xx, 206, 304 or an unknown status; a status outside :data:`UNDERSTOOD_STATUSES` without
    explicit freshness or ``public``; ``Vary: *``; ``no-cache`` without a validator (it could
    never be reused); no freshness, validator, heuristic or ``rule_ttl`` at all. The
    settings (:class:`PolicyOptions`) come in ``options``.

    Lifetime: Surrogate-Control ``max-age`` > ``s-maxage`` > ``max-age`` > ``Expires - Date``
    (Date missing or invalid -> ``response_time``) > ``rule_ttl`` > heuristic (heuristically
    cacheable status or ``public``, with Last-Modified) > 0 when a validator exists.

    ``rule_override`` forces ``lifetime = rule_ttl`` (statuses in UNDERSTOOD_STATUSES only)
    and ignores the origin's cache directives (``no-store`` still honoured) and Expires;
    Vary, Age and Authorization still apply. ``cdn_cache_control`` honours RFC 9213
    CDN-Cache-Control, which then replaces Cache-Control, Expires and Surrogate-Control;
    ``surrogate_control`` honours Surrogate-Control ``max-age`` and ``no-store``.
    """
    if method.upper() not in _STORABLE_METHODS:
        return None
    if not 200 <= status <= 599 or status in (206, 304):
        return None
    request_cc = request_headers.get("cache-control")
    if request_cc and "no-store" in _parse_cc(request_cc):
        return None
    rule_ttl, rule_override = options.rule_ttl, options.rule_override
    o = _origin(status, response_headers, response_time, options.cdn_cache_control,
                options.surrogate_control)
    if _forbids_storing(o):
        return None
    vary = _parse_vary(response_headers.get("vary"))
    if vary is None:
        return None
    if rule_override and rule_ttl is not None:
        if status not in UNDERSTOOD_STATUSES:
            return None
        o.cc = o.surrogate = _EMPTY
        lifetime: float | None = float(rule_ttl)
    else:
        lifetime = _lifetime(o, rule_ttl, options.heuristic_fraction, options.heuristic_max)
    if lifetime is None or _refuses_shared_storage(o, request_headers):
        return None
    no_cache = "no-cache" in o.cc
    if no_cache and not o.has_validator:
        return None
    overridden = rule_override and rule_ttl is not None
    return Freshness(
        response_time=response_time,
        # an operator's forced TTL counts from arrival here, not from the origin's Date/Age
        corrected_initial_age=0.0 if overridden else _corrected_initial_age(o, request_time, response_time),
        lifetime=max(0.0, lifetime),
        no_cache=no_cache,
        must_revalidate=any(d in o.cc for d in ("must-revalidate", "proxy-revalidate", "s-maxage")),
        stale_while_revalidate=float(_delta_seconds(o.cc.get("stale-while-revalidate")) or 0),
        stale_if_error=float(_delta_seconds(o.cc.get("stale-if-error")) or 0),
        etag=response_headers.get("etag"),
        last_modified=response_headers.get("last-modified"),
        vary=vary,
    )


# ----------------------------------------------------------------------------- evaluate


class Verdict(enum.Enum):
    FRESH = "fresh"  # serve as is
    STALE_OK = "stale-ok"  # stale but the request's max-stale allows it
    STALE_WHILE_REVALIDATE = "swr"  # serve stale now, refresh in background
    REVALIDATE = "revalidate"  # conditional request to origin before use


def evaluate(f: Freshness, request_headers: Mapping[str, str], now: float) -> Verdict:
    """May the stored response answer this request (RFC 9111 §4, §4.2.4, §5.2.1)?"""
    if f.no_cache:
        return Verdict.REVALIDATE
    raw = request_headers.get("cache-control")
    age = f.age(now)
    ttl = (0.0 if f.invalidated else f.lifetime) - age
    if raw is None:
        # Pragma: no-cache is deprecated (RFC 9111 §5.4) and, like nginx, Varnish and ATS,
        # not honoured: a browser's reload sends Cache-Control: no-cache as well.
        if ttl > 0:
            return Verdict.FRESH
        return _stale_verdict(f, -ttl, None)
    req = _parse_cc(raw)
    if "no-cache" in req:
        return Verdict.REVALIDATE
    max_age = _delta_seconds(req.get("max-age"))
    if max_age is not None and age > max_age:
        return Verdict.REVALIDATE
    min_fresh = _delta_seconds(req.get("min-fresh"))
    if min_fresh is not None and ttl < min_fresh:
        return Verdict.REVALIDATE
    if ttl > 0:
        return Verdict.FRESH
    return _stale_verdict(f, -ttl, req)


def _stale_verdict(f: Freshness, staleness: float, req: Mapping[str, str | None] | None) -> Verdict:
    if f.must_revalidate:
        return Verdict.REVALIDATE
    if req and "max-stale" in req:
        raw = req["max-stale"]
        if raw is None:
            return Verdict.STALE_OK
        limit = _delta_seconds(raw)
        if limit is not None and staleness <= limit:
            return Verdict.STALE_OK
    if f.stale_while_revalidate > 0.0 and staleness <= f.stale_while_revalidate:
        return Verdict.STALE_WHILE_REVALIDATE
    return Verdict.REVALIDATE


def stale_if_error_ok(
    f: Freshness, request_headers: Mapping[str, str], now: float, *, grace: float = 0.0
) -> bool:
    """May the stored response be served because the origin failed (RFC 5861 §4)?

    True while fresh, or while stale within the response's or the request's
    ``stale-if-error`` window (or the operator's ``grace``), unless the response carries
    must-revalidate / proxy-revalidate / s-maxage or no-cache.
    """
    if f.must_revalidate or f.no_cache:
        return False
    staleness = -f.ttl(now)
    if staleness < 0:
        return True
    window = max(f.stale_if_error, grace)
    raw = request_headers.get("cache-control")
    if raw:
        requested = _delta_seconds(_parse_cc(raw).get("stale-if-error"))
        if requested is not None:
            window = max(window, requested)
    return window > 0.0 and staleness <= window


def only_if_cached(request_headers: Mapping[str, str]) -> bool:
    """The request has ``only-if-cached``: answer 504 on a miss (RFC 9111 §5.2.1.7)."""
    raw = request_headers.get("cache-control")
    return bool(raw) and "only-if-cached" in _parse_cc(raw)  # type: ignore[arg-type]


# -------------------------------------------------------------------------- validation


def _quote_etag(etag: str) -> str:
    """An entity-tag as sent: unquoted (invalid) origin tags get quotes added."""
    etag = etag.strip(" \t")
    if etag.startswith('"') or etag.startswith('W/"'):
        return etag
    return f'"{etag}"' if '"' not in etag else etag


def revalidation_headers(f: Freshness) -> list[tuple[str, str]]:
    """Conditional request fields for refreshing ``f`` (RFC 9111 §4.3.1)."""
    out: list[tuple[str, str]] = []
    if f.etag:
        out.append(("If-None-Match", _quote_etag(f.etag)))
    if f.last_modified:
        out.append(("If-Modified-Since", f.last_modified))
    return out


def merge_304(
    stored: Iterable[tuple[str, str]], not_modified: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The stored header fields updated from a 304 (RFC 9111 §3.2, §4.3.4).

    Every field in the 304 replaces all stored instances of that field (in the position of
    the first one; new fields are appended), except Content-Length, Content-Encoding,
    Transfer-Encoding, Content-Range, hop-by-hop fields and fields named in the 304's
    Connection. A stored ``Age`` is dropped when the 304 has none: it described the old
    message, not the refreshed one. Names keep their original case.
    """
    not_modified = list(not_modified)
    skip = set(_NOT_UPDATED_BY_304)
    for name, value in not_modified:
        if name.lower() == "connection":
            skip.update(t.strip(" \t").lower() for t in value.split(",") if t.strip(" \t"))
    updates: dict[str, list[tuple[str, str]]] = {}
    for name, value in not_modified:
        key = name.lower()
        if key not in skip:
            updates.setdefault(key, []).append((name, value))
    out: list[tuple[str, str]] = []
    emitted: set[str] = set()
    for name, value in stored:
        key = name.lower()
        if key in updates:
            if key not in emitted:
                out.extend(updates[key])
                emitted.add(key)
        elif key != "age":
            out.append((name, value))
    for key, fields in updates.items():
        if key not in emitted:
            out.extend(fields)
    return out


def _opaque_tag(tag: str) -> str:
    """Weak-comparison form of an entity-tag: no W/ prefix, no quotes (lenient on both)."""
    tag = tag.strip(" \t")
    if tag[:2] in ("W/", "w/"):
        tag = tag[2:]
    if len(tag) >= 2 and tag[0] == '"' and tag[-1] == '"':
        tag = tag[1:-1]
    return tag


def not_modified_for(
    request_headers: Mapping[str, str],
    etag: str | None,
    last_modified: str | None,
    *,
    stored_date: float | None = None,
) -> bool:
    """Does the client's own precondition let the edge answer 304 from the stored response?

    If-None-Match (weak comparison, ``*``, lists) takes precedence; without it,
    If-Modified-Since is compared with Last-Modified or, when the response has none, with
    ``stored_date`` (its Date or the time it was received, RFC 9111 §4.3.2).
    """
    inm = request_headers.get("if-none-match")
    if inm is not None:
        members = [m for m in _split_list(inm) if m.strip(" \t")]
        if any(m.strip(" \t") == "*" for m in members):
            return True
        if not etag:
            return False
        ours = _opaque_tag(etag)
        return any(_opaque_tag(m) == ours for m in members)
    since = parse_http_date(request_headers.get("if-modified-since"))
    if since is None:
        return False
    modified = parse_http_date(last_modified) if last_modified else stored_date
    return modified is not None and modified <= since


# ------------------------------------------------------------------------------ helpers


def secondary_key(vary: tuple[str, ...], request_headers: Mapping[str, str]) -> str:
    """The request's values of the Vary fields, normalised, as one string ('' for no Vary).

    Whitespace around commas and at the ends is removed, so ``"1,2"``, ``" 1, 2 "`` and two
    ``Foo`` lines ``1`` and ``2`` match; an absent field differs from an empty one.
    """
    if not vary:
        return ""
    parts = []
    for name in vary:
        value = request_headers.get(name)
        if value is None:
            parts.append(name)
        else:
            if name in _CASELESS_VARY_FIELDS:
                value = value.lower()
            parts.append(name + "=" + ",".join(p.strip(" \t") for p in value.split(",")))
    return "\n".join(parts)


# Request fields whose values compare case-insensitively (language tags, codings, charsets).
_CASELESS_VARY_FIELDS = frozenset({"accept-language", "accept-encoding", "accept-charset"})


def invalidates(method: str, status: int) -> bool:
    """RFC 9111 §4.4: an unsafe method with a non-error (2xx/3xx) response invalidates."""
    return method.upper() not in _SAFE_METHODS and 200 <= status < 400


def age_value(f: Freshness, now: float) -> int:
    """The Age header value: whole seconds, capped at 2^31."""
    return min(int(f.age(now)), MAX_DELTA)
