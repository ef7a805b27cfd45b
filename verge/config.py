"""Declarative configuration: one validated model for the YAML file and the control-plane bundle.

Config is data. An operator writes a YAML file; the control plane pushes the same structure
as JSON (``Config.model_dump(mode="json")`` round-trips through ``Config.model_validate``).
Both go through the pydantic models below, so a typo or a wrong value is rejected before it
can reach a running node, and the message says where: ``verge.yaml:12:7: services[0].rules[1].ttl:
invalid duration 'abc' ...``. Line numbers come from composing the YAML into nodes (which keep
their position) and following pydantic's error path back through those nodes.

The models also answer the two per-request questions cheaply: which service serves a Host
(``Config.service_for_host``, a dict lookup) and which rule applies to a path
(``Service.match_rule``, with globs compiled once). This module imports nothing from verge.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from verge.protect.settings import MAX_TRUSTED_PROXIES, CidrText, Protection

__all__ = [
    "ByteSize",
    "CacheSettings",
    "Compression",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Duration",
    "HeaderRules",
    "HealthCheck",
    "Limits",
    "OriginSpec",
    "OriginTimeouts",
    "Redirect",
    "Rule",
    "Service",
    "SignedUrls",
    "config_for_origin",
    "config_from_data",
    "load_config",
    "parse_bytes",
    "parse_config",
    "parse_duration",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

# ---------------------------------------------------------------------------------------------
# Bounds: the most that any config, bundle or control-plane request may ask of an edge
# ---------------------------------------------------------------------------------------------
# One table for every number, string, list and map a model accepts: the models below, the
# control-plane API's request bodies and parameters (verge.control.api) and the edge's Wasm
# runtime (verge.compute.runtime) all use these names, so what the API accepts is what an
# edge can run. A tenant writes services and functions through the API: per-service bounds
# keep one tenant's config from starving every other tenant on the same edge workers.
# tests/control/test_bounds.py fails for any field of the config or the API without a bound.

# Text
MAX_NAME = 63
"""Slugs and names: services, tenants, functions, certificates, nodes, KV namespaces."""
MAX_LABEL = 200
"""Short free text and identifiers: token names, variable and parameter names, media types
(200: the control plane's label columns)."""
MAX_HOST = 255
"""A host name (253) with a "*." wildcard prefix; also Host headers and TLS server names."""
MAX_URL = 8 * KiB
"""An absolute URL or a URL to purge (the edge's default max_url_bytes)."""
MAX_URL_PATH = 1024
"""A URL path or path glob: rule paths, function routes, health-check paths."""
MAX_FILE_PATH = 4096
"""A file system path (PATH_MAX)."""
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8 * KiB
MAX_SECRET = 1024
"""Secrets and tokens (signing secrets, upload tokens)."""
MAX_PEM = 256 * KiB
"""One PEM text: a certificate chain or a private key."""
MAX_TEXT = 64 * KiB
"""Free text carried but not interpreted (environment values, log lines)."""

# One service (the unit a tenant controls)
MAX_HOSTS_PER_SERVICE = 1000
MAX_ORIGINS = 100
"""Origins of one service, or of one rule."""
MAX_ORIGIN_WEIGHT = 1000
MAX_RULES = 200
"""Rules of one service: every request scans them in order."""
MAX_HEADER_EDITS = 64
"""Entries of one header list or map (added, removed, cache-key headers)."""
MAX_STATUS_PATTERNS = 100
MAX_HEALTH_STREAK = 100
"""Health-check fails/passes thresholds."""
MIN_HEALTH_INTERVAL = 0.1
"""Seconds; a shorter interval would turn health checks into a flood against the origin."""

# Time
MAX_TIMEOUT = 86_400.0
"""Seconds, for any timeout or interval (timers beyond a day are a mistake, not a wish)."""
MAX_TTL = 10 * 365 * 86_400.0
"""Seconds, for cache lifetimes and HSTS max-age (ten years)."""

# Sizes
MAX_BYTE_SIZE = PiB
"""Any byte count (caches, quotas, body limits): caps and comparisons, not allocations."""
MAX_REQUEST_HEAD_BYTES = 1 * MiB
"""max_header_bytes and max_url_bytes: buffered for every connection."""

# The whole config (all tenants' services, as the control plane bundles them)
MAX_SERVICES = 100_000
MAX_CERTIFICATES = 100_000
MAX_CERTIFICATE_HOSTS = 1000
MAX_FUNCTIONS = 10_000
MAX_INGEST_ROUTES = 1000
MAX_LIST = 100
"""Short lists: compression types, function routes and fetch hosts, environment variables."""

# Edge functions
MAX_FUNCTION_MEMORY_MB = 256
"""The largest linear memory a function may have; verge.compute.runtime sizes its pooling
allocator's slots from it, so every deployable function fits an edge."""
MAX_FUNCTION_CPU_MS = 60_000.0
MAX_SUBREQUESTS = 100

# Streaming and device ingest
MAX_STREAM_APPS = 100
MAX_STREAM_KEYS = 10_000
MAX_RENDITIONS = 16
MAX_WEBRTC_CANDIDATES = 16
"""Addresses a stream server gathers or advertises WebRTC candidates on."""
MAX_WEBRTC_VIEWERS = 100_000
MAX_QUOTA_RECORDS = 1_000_000_000
MAX_BATCH_RECORDS = 100_000

# Control-plane inputs (verge.control.api)
MAX_SEQ = 2**63 - 1
"""Purge sequence numbers, config versions, KV sequence numbers: 64-bit columns."""
MAX_VERSION = 2**31 - 1
"""Service and function versions: 32-bit columns."""
MAX_TIMESTAMP = 253_402_300_799.0
"""Epoch seconds of 9999-12-31T23:59:59Z, the last instant a datetime can hold."""
MAX_SAMPLE_COUNT = 2**40
"""One stats sample's counter (requests, bytes, ...) over a few seconds of one node."""
MAX_STATS_SAMPLES = 100_000
"""Samples in one stats upload."""
MAX_LOG_RECORDS = 10_000
"""Function log records in one upload."""
MAX_REPORT_KEYS = 64
"""Keys of one reported map: a heartbeat's health or load, one log record."""
MAX_REPORT_LIST = 1000
"""Items of one list in a report (a log record's denied capabilities)."""
MAX_OFFSET = 1_000_000_000
"""Paging offset."""
MAX_WAIT = 3600.0
"""Seconds a long poll may ask for (the server clips it further to its own max_wait)."""
MAX_PURGE_URLS = 10_000
MAX_PURGE_PREFIXES = 1000
MAX_PURGE_TAGS = 1000
MAX_NODE_URL = 500
"""An edge node's public or admin URL (500-character columns)."""

# ---------------------------------------------------------------------------------------------
# Sizes and durations (also used by the CLI for flags like --memory 512MiB)
# ---------------------------------------------------------------------------------------------

# Every multiple is binary, as in nginx and Varnish: 1k = 1kB = 1KiB = 1024 bytes.
_BYTE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "ib"):
        _BYTE_UNITS[_suffix] = KiB**_power
_BYTES_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)")
_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def _non_negative_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"invalid {what} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {what} {value!r}: must be a finite number >= 0")
    return value


def parse_bytes(value: object) -> int:
    """A byte count from an int or a string like "500k", "64MiB", "1.5GiB" (binary multiples)."""
    if not isinstance(value, str):
        return int(_non_negative_number(value, "byte size"))
    match = _BYTES_RE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in _BYTE_UNITS:
        raise ValueError(
            f"invalid byte size {value!r}: use a number of bytes or a number with a unit, "
            "e.g. 500k, 64MiB, 1GiB"
        )
    size = float(match.group(1)) * _BYTE_UNITS[match.group(2)]
    if not math.isfinite(size):
        raise ValueError(f"invalid byte size {value!r}: too large")
    return int(size)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "500ms", "30s", "5m", "1h", "1d" or "1h30m"."""
    if not isinstance(value, str):
        return float(_non_negative_number(value, "duration"))
    text = value.strip().lower().replace(" ", "")
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    parts = _DURATION_PART_RE.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(
            f"invalid duration {value!r}: use a number of seconds or a number with a unit, "
            "e.g. 500ms, 30s, 5m, 1h, 1d"
        )
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _bytes_input(value: object) -> object:
    """Parse unit strings; let pydantic judge everything else (so a list says 'valid integer')."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size, got {value!r}")
    return parse_bytes(value) if isinstance(value, str) else value


def _duration_input(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    return parse_duration(value) if isinstance(value, str) else value


# The bounds come before the BeforeValidator: so they reach the JSON schema as minimum/maximum.
ByteSize = Annotated[int, Field(ge=0, le=MAX_BYTE_SIZE), BeforeValidator(_bytes_input)]
"""Bytes: an int or "64MiB"-style string; stored as int."""
RequestHeadSize = Annotated[
    int, Field(ge=0, le=MAX_REQUEST_HEAD_BYTES), BeforeValidator(_bytes_input)
]
Duration = Annotated[float, Field(ge=0, le=MAX_TTL), BeforeValidator(_duration_input)]
"""Seconds: a number or "30s"-style string; stored as float."""
PositiveDuration = Annotated[float, Field(gt=0, le=MAX_TIMEOUT), BeforeValidator(_duration_input)]
"""A timeout or interval: more than 0, at most MAX_TIMEOUT."""
HealthInterval = Annotated[
    float, Field(ge=MIN_HEALTH_INTERVAL, le=MAX_TIMEOUT), BeforeValidator(_duration_input)
]

Name = Annotated[str, Field(max_length=MAX_NAME)]
Label = Annotated[str, Field(max_length=MAX_LABEL)]
HostText = Annotated[str, Field(max_length=MAX_HOST)]
Url = Annotated[str, Field(max_length=MAX_URL)]
UrlPath = Annotated[str, Field(max_length=MAX_URL_PATH)]
FilePath = Annotated[str, Field(max_length=MAX_FILE_PATH)]
Secret = Annotated[str, Field(max_length=MAX_SECRET)]
Pem = Annotated[str, Field(max_length=MAX_PEM)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]

# ---------------------------------------------------------------------------------------------
# Names: header names, hosts, slugs
# ---------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_MIME_PATTERN_RE = re.compile(r"[a-z0-9!#$&^_.+*-]+/[a-z0-9!#$&^_.+*-]+")


def _header_name(name: str) -> str:
    """Header names are stored lower-cased (HTTP/2 needs it; matching is case-insensitive)."""
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    return name.lower()


def _header_value(value: str) -> str:
    if any(char in value for char in "\r\n\0"):
        raise ValueError(f"header value {value!r} contains a line break or NUL")
    return value


HeaderName = Annotated[str, Field(max_length=MAX_HEADER_NAME), AfterValidator(_header_name)]
HeaderValue = Annotated[str, Field(max_length=MAX_HEADER_VALUE), AfterValidator(_header_value)]


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _config_host(value: str) -> str:
    """Normalise a configured host: lower-case, no trailing dot, IDNA, "*" or "*.suffix" wildcards."""
    host = value.strip().lower().rstrip(".")
    if host == "*":
        return host
    ip = _ip_literal(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    if ip is not None:
        return ip
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise ValueError(f"invalid host {value!r}: {exc}") from None
    name = host.removeprefix("*.")
    if ":" in name:
        raise ValueError(f"host {value!r} has a port; hosts are matched without the port")
    if not _HOSTNAME_RE.fullmatch(name) or len(name) > 253:
        raise ValueError(
            f"invalid host {value!r}: use a name like example.com, a wildcard like "
            "*.example.com, or * for every host"
        )
    return host


def _request_host_name(host: str) -> str:
    """The name part of a Host header: no port, no brackets, lower-case, no trailing dot."""
    if host.startswith("["):
        end = host.find("]")
        name = host[1:end] if end > 0 else host
    else:
        name = host.partition(":")[0]
    return name.rstrip(".").lower()


def _conflict(at: tuple[str | int, ...], reason: str) -> PydanticCustomError:
    """A cross-field error; `at` extends the error path so the message points at the right line."""
    return PydanticCustomError("config_conflict", "{reason}", {"reason": reason, "at": at})


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class _Model(BaseModel):
    """Base for all sections: unknown keys are errors, numbers must be finite.

    Per-request methods read private attributes through ``self.__pydantic_private__[...]``:
    plain ``self._x`` on a pydantic model goes through ``__getattr__`` and costs ~2 µs.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


class CacheSettings(_Model):
    memory_bytes: ByteSize = 256 * MiB
    disk_bytes: ByteSize = 1 * GiB
    max_memory_object_bytes: ByteSize = 8 * MiB
    """Objects larger than this are kept on disk only."""
    eviction: Literal["s3fifo", "lru"] = "s3fifo"
    # Disk hits with sendfile(2) (zero-copy) instead of pread + write. Off by default: on
    # the reference VM copying was 1.9x faster for 10 MiB hits, for nginx as for Verge.
    sendfile: bool = False
    heuristic_fraction: float = Field(0.1, ge=0, le=1)
    """Heuristic freshness (RFC 9111 4.2.2): this fraction of the time since Last-Modified."""
    heuristic_max: Duration = 86400.0


class Limits(_Model):
    max_header_bytes: RequestHeadSize = 16 * KiB
    max_url_bytes: RequestHeadSize = 8 * KiB
    max_body_bytes: ByteSize = 100 * MiB
    header_timeout: PositiveDuration = 10.0
    keepalive_timeout: PositiveDuration = 75.0
    body_timeout: PositiveDuration = 60.0


class OriginTimeouts(_Model):
    connect: PositiveDuration = 3.0
    first_byte: PositiveDuration = 30.0
    idle: PositiveDuration = 30.0


_DEFAULT_COMPRESSIBLE_TYPES = [
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/*+json",
    "application/*+xml",
    "image/svg+xml",
]


class Compression(_Model):
    enabled: bool = True
    algorithms: list[Literal["zstd", "br", "gzip"]] = Field(
        default_factory=lambda: ["zstd", "br", "gzip"], min_length=1, max_length=3
    )
    """Offered encodings, most preferred first."""
    min_bytes: ByteSize = 256
    max_bytes: ByteSize = 8 * MiB
    types: list[Label] = Field(
        default_factory=lambda: list(_DEFAULT_COMPRESSIBLE_TYPES), max_length=MAX_LIST
    )
    """Media types worth compressing; "*" matches any run of characters."""
    gzip_level: int = Field(6, ge=1, le=9)
    brotli_quality: int = Field(4, ge=0, le=11)
    zstd_level: int = Field(3, ge=1, le=22)

    _exact_types: frozenset[str] = PrivateAttr(frozenset())
    _type_globs: re.Pattern[str] | None = PrivateAttr(None)

    @field_validator("algorithms")
    @classmethod
    def _unique_algorithms(cls, algorithms: list[str]) -> list[str]:
        if len(set(algorithms)) != len(algorithms):
            raise ValueError(f"algorithms are listed more than once: {algorithms}")
        return algorithms

    @field_validator("types")
    @classmethod
    def _mime_patterns(cls, patterns: list[str]) -> list[str]:
        lowered = [pattern.strip().lower() for pattern in patterns]
        for pattern in lowered:
            if not _MIME_PATTERN_RE.fullmatch(pattern):
                raise ValueError(f"invalid media type pattern {pattern!r} (e.g. text/*)")
        return lowered

    @model_validator(mode="after")
    def _compile_types(self) -> Compression:
        if self.min_bytes > self.max_bytes:
            raise _conflict(("min_bytes",), "min_bytes is larger than max_bytes")
        globs = [_glob_regex(pattern) for pattern in self.types if "*" in pattern]
        self._exact_types = frozenset(pattern for pattern in self.types if "*" not in pattern)
        self._type_globs = re.compile("|".join(globs)) if globs else None
        return self

    def compressible(self, content_type: str) -> bool:
        """Whether a response with this Content-Type (parameters allowed) may be compressed."""
        mime = content_type.partition(";")[0].strip().lower()
        private = self.__pydantic_private__
        if mime in private["_exact_types"]:
            return True
        globs = private["_type_globs"]
        return globs is not None and globs.fullmatch(mime) is not None


class HeaderRules(_Model):
    """Header edits. Names are stored lower-case; numbers in values are taken as text."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    request_add: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, max_length=MAX_HEADER_EDITS
    )
    request_remove: list[HeaderName] = Field(default_factory=list, max_length=MAX_HEADER_EDITS)
    response_add: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, max_length=MAX_HEADER_EDITS
    )
    response_remove: list[HeaderName] = Field(default_factory=list, max_length=MAX_HEADER_EDITS)


_PLACEHOLDER_RE = re.compile(r"\$([A-Za-z_]\w*)")
_REDIRECT_PLACEHOLDERS = ("path", "query")


class Redirect(_Model):
    to: Url
    """Absolute URL or path; $path and $query are filled in from the request (see location)."""
    status: Literal[301, 302, 303, 307, 308] = 301

    @model_validator(mode="before")
    @classmethod
    def _bare_target(cls, data: object) -> object:
        return {"to": data} if isinstance(data, str) else data

    @field_validator("to")
    @classmethod
    def _check_target(cls, target: str) -> str:
        if not target.startswith(("/", "$path", "http://", "https://")):
            raise ValueError(f"redirect target {target!r} must be a path or an http(s):// URL")
        if any(char.isspace() for char in target):
            raise ValueError(f"redirect target {target!r} contains whitespace")
        for name in _PLACEHOLDER_RE.findall(target):
            if name not in _REDIRECT_PLACEHOLDERS:
                raise ValueError(f"unknown placeholder ${name} in {target!r}; use $path or $query")
        return target

    def location(self, path: str, query: str = "") -> str:
        """The Location for a request path and raw query string (without "?").

        $query right after "?" or "&" is the raw query (the separator is dropped when there is
        none); anywhere else it is "?query", or nothing when the request has no query.
        """
        target = self.to

        def expand(match: re.Match[str]) -> str:
            if match.group(1) == "path":
                return path
            glued = match.start() > 0 and target[match.start() - 1] in "?&"
            return query if glued or not query else "?" + query

        location = _PLACEHOLDER_RE.sub(expand, target)
        if not query and target.endswith(("?$query", "&$query")):
            location = location[:-1]
        return location


def _glob_regex(pattern: str) -> str:
    """Regex source for a glob where "*" matches any run of characters, "/" included.

    Matching takes time linear in the path whatever the glob: every "*" but the last takes
    the earliest occurrence of the text after it and never gives it back (an atomic group),
    which finds a match whenever there is one. A plain ".*" per star would backtrack: a
    tenant's rule "/*a*a*b" against a long path of "a"s would stall the edge worker.
    """
    literals = re.split(r"\*+", pattern)
    if len(literals) == 1:
        return re.escape(pattern)
    first, *middle, last = literals
    committed = "".join(f"(?>.*?{re.escape(part)})" for part in middle)
    return f"{re.escape(first)}{committed}.*{re.escape(last)}"


_PARAM_RE = re.compile(r"[A-Za-z0-9_.~-]+")


class SignedUrls(_Model):
    """A rule's signed-URL check (verge.edge.signing): 403 without a valid HMAC token."""

    secret: Secret | None = Field(default=None, repr=False)
    """The HMAC secret (at least 16 characters); or give secret_env."""
    secret_env: Label | None = None
    """Read the secret from this environment variable of the edge instead."""
    param: Label = "token"
    """The query parameter that carries the token (removed before the cache and the origin)."""
    cookie: bool = True
    """Also accept the token in the verge_token cookie, and set it from a query token."""

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, secret: str | None) -> str | None:
        if secret is not None and len(secret) < 16:  # (a value_error: the secret is not echoed)
            raise ValueError("the secret must be at least 16 characters")
        return secret

    @field_validator("param")
    @classmethod
    def _check_param(cls, param: str) -> str:
        if not _PARAM_RE.fullmatch(param):
            raise ValueError(f"param {param!r} must be a plain query parameter name")
        return param

    @model_validator(mode="after")
    def _one_secret(self) -> SignedUrls:
        if (self.secret is None) == (self.secret_env is None):
            raise _conflict(("secret",), "give the secret inline (secret) or by name (secret_env)")
        value = os.environ.get(self.secret_env) if self.secret_env else None
        if value is not None and len(value) < 16:
            raise _conflict(("secret_env",), f"${self.secret_env} must be at least 16 characters")
        return self

    def secret_value(self) -> str | None:
        """The secret; None when secret_env names a variable this process does not have
        (requests are then refused: the check fails closed)."""
        if self.secret is not None:
            return self.secret
        value = os.environ.get(self.secret_env or "")
        return value if value and len(value) >= 16 else None


class Rule(_Model):
    path: UrlPath
    """A prefix ("/static/") or a glob matching the whole path ("/api/*.json")."""
    kind: Literal["static", "dynamic", "api", "default"] = "default"
    ttl: Duration | None = None
    """Lifetime when the origin gives no freshness information."""
    override: bool = False
    """Cache for ttl whatever the origin's Cache-Control/Expires say."""
    bypass: bool = False
    """Never cache; every request goes to the origin."""
    micro_cache: PositiveDuration | None = None
    """Cache for this many seconds whatever the origin says (sets ttl and override)."""
    ignore_query: bool = False
    ignore_cookies: bool = False
    """Strip Cookie from the origin request and Set-Cookie from the cached response."""
    sort_query: bool = False
    key_headers: list[HeaderName] = Field(default_factory=list, max_length=MAX_HEADER_EDITS)
    """Request headers that become part of the cache key."""
    headers: HeaderRules = Field(default_factory=HeaderRules)
    redirect: Redirect | None = None
    origins: Annotated[list[OriginSpec], Field(max_length=MAX_ORIGINS)] | None = None
    """Send this path to these origins instead of the service's (e.g. /live/ to a stream server)."""
    signed: SignedUrls | None = None
    """Require a signed token (query parameter or cookie) for this path: see verge.edge.signing."""

    _glob: re.Pattern[str] | None = PrivateAttr(None)

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"rule path {path!r} must start with '/'")
        if any(char.isspace() or char in "?#" for char in path):
            raise ValueError(
                f"rule path {path!r} must be a URL path (no spaces, query or fragment)"
            )
        return path

    @field_validator("key_headers")
    @classmethod
    def _dedupe_key_headers(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _resolve(self) -> Rule:
        given = set(self.model_fields_set)
        if self.micro_cache is not None:
            self._apply_micro_cache(given)
        self._apply_kind_defaults(given)
        if self.override and self.ttl is None:
            raise _conflict(("override",), "override: true needs a ttl")
        self._glob = re.compile(_glob_regex(self.path)) if "*" in self.path else None
        return self

    def _apply_micro_cache(self, given: set[str]) -> None:
        if self.bypass:
            raise _conflict(("bypass",), "bypass: true contradicts micro_cache; choose one")
        if "override" in given and not self.override:
            raise _conflict(("override",), "micro_cache always overrides; drop override: false")
        if self.ttl is not None and self.ttl != self.micro_cache:
            raise _conflict(("ttl",), "micro_cache sets the ttl; drop ttl or make them equal")
        self.ttl = self.micro_cache
        self.override = True

    def _apply_kind_defaults(self, given: set[str]) -> None:
        if self.kind == "static":
            if self.ttl is None and "ttl" not in given:
                self.ttl = 86400.0
            if "ignore_cookies" not in given:
                self.ignore_cookies = True
        elif self.kind == "api":
            if "sort_query" not in given:
                self.sort_query = True
        elif self.kind == "dynamic" and self.micro_cache is None and "bypass" not in given:
            self.bypass = True

    def matches(self, path: str) -> bool:
        glob = self.__pydantic_private__["_glob"]
        if glob is None:
            return path.startswith(self.path)
        return glob.fullmatch(path) is not None


def _status_pattern(value: object) -> int | str:
    """200 (one status) or "2xx" (a class); digit strings become ints."""
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"[1-5]xx", text):
            return text
        value = int(text) if text.isdigit() else value
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    raise ValueError(f"invalid status {value!r}: use a code like 200 or a class like 2xx")


StatusPattern = Annotated[
    Annotated[int, Field(ge=100, le=599)] | Annotated[str, Field(max_length=3)],
    BeforeValidator(_status_pattern),
]


class HealthCheck(_Model):
    path: UrlPath = "/"
    interval: HealthInterval = 5.0
    timeout: PositiveDuration = 2.0
    fails: int = Field(3, ge=1, le=MAX_HEALTH_STREAK)
    """Consecutive failures that mark an origin down."""
    passes: int = Field(2, ge=1, le=MAX_HEALTH_STREAK)
    """Consecutive successes that mark it up again."""
    expect_status: list[StatusPattern] = Field(
        default_factory=lambda: ["2xx", "3xx"], min_length=1, max_length=MAX_STATUS_PATTERNS
    )
    """Healthy statuses: codes (200) or classes ("2xx"); the default means any status < 400."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/") or any(char.isspace() for char in path):
            raise ValueError(f"health check path {path!r} must start with '/' and have no spaces")
        return path

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthCheck:
        if self.timeout > self.interval:
            raise _conflict(("timeout",), "timeout is longer than interval")
        return self

    def is_healthy_status(self, status: int) -> bool:
        return status in self.expect_status or f"{status // 100}xx" in self.expect_status


class OriginSpec(_Model):
    """An origin server; a bare "http://host:port" string is accepted in place of the mapping."""

    url: Url
    """http:// or https:// plus host[:port]; nothing else."""
    weight: int = Field(1, ge=1, le=MAX_ORIGIN_WEIGHT)
    """Share of the requests relative to the other origins (1 to MAX_ORIGIN_WEIGHT)."""
    host_header: HostText | None = None
    """Host header sent to this origin (default: the client's)."""
    tls_ca: FilePath | None = None
    """https only: PEM file of the CA(s) to trust for this origin, instead of the system store."""
    tls_verify: bool = True
    """https only: check the origin's certificate and name. false is UNSAFE (anyone on the path
    can pose as the origin); only for a self-signed origin on a network you trust."""
    tls_server_name: HostText | None = None
    """https only: name sent as SNI and checked in the certificate (default: host_header
    without its port, else the URL's host)."""

    _scheme: str = PrivateAttr("http")
    _host: str = PrivateAttr("")
    _port: int = PrivateAttr(80)

    @model_validator(mode="before")
    @classmethod
    def _bare_url(cls, data: object) -> object:
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        scheme, host, port = _split_origin_url(url)
        netloc = f"[{host}]" if ":" in host else host
        return f"{scheme}://{netloc}" + (f":{port}" if port is not None else "")

    @field_validator("host_header")
    @classmethod
    def _check_host_header(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(char.isspace() for char in value)):
            raise ValueError(f"host_header {value!r} must be a non-empty name without spaces")
        return value

    @field_validator("tls_server_name")
    @classmethod
    def _check_server_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() or c in "/:" for c in value)):
            raise ValueError(f"tls_server_name {value!r} must be a host name")
        return value

    @model_validator(mode="after")
    def _remember_parts(self) -> OriginSpec:
        scheme, host, port = _split_origin_url(self.url)
        self._scheme, self._host = scheme, host
        self._port = port if port is not None else (443 if scheme == "https" else 80)
        tls_set = self.tls_ca is not None or not self.tls_verify or self.tls_server_name
        if scheme != "https" and tls_set:
            raise ValueError(
                "tls_ca, tls_verify and tls_server_name apply to https:// origins only"
            )
        return self

    def tls_options(self) -> dict[str, Any]:
        """Keyword arguments for ``verge.http.client.Origin.parse``: CA, verification, SNI."""
        if not self.tls:
            return {}
        server_name = self.tls_server_name
        if server_name is None and self.host_header:
            server_name = urlsplit(f"//{self.host_header}").hostname
        return {
            "tls_ca": self.tls_ca,
            "tls_verify": self.tls_verify,
            "tls_server_name": server_name,
        }

    @property
    def scheme(self) -> str:
        return self.__pydantic_private__["_scheme"]

    @property
    def host(self) -> str:
        """Host name or IP address (IPv6 without brackets)."""
        return self.__pydantic_private__["_host"]

    @property
    def port(self) -> int:
        """The port, defaulted from the scheme."""
        return self.__pydantic_private__["_port"]

    @property
    def tls(self) -> bool:
        return self.__pydantic_private__["_scheme"] == "https"


def _split_origin_url(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, explicit port or None) of an origin URL, or ValueError saying what is wrong."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"origin URL {url!r} must look like http://host[:port] or https://host[:port]"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"origin URL {url!r} must not contain credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"origin URL {url!r} must be scheme://host[:port] only, without a path")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"origin URL {url!r} has an invalid port") from None
    if port == 0:
        raise ValueError(f"origin URL {url!r} has an invalid port")
    host = parts.hostname or ""
    if not (_ip_literal(host) or _HOSTNAME_RE.fullmatch(host)):
        raise ValueError(f"origin URL {url!r} has an invalid host {host!r}")
    return scheme, _ip_literal(host) or host, port


class Certificate(_Model):
    """A PEM certificate (chain) and its key, for the hostnames it serves (SNI).

    Either file paths (``cert`` + ``key``) or the PEM text inline (``cert_pem`` + ``key_pem``,
    as the control-plane bundle carries them; the edge writes them to private files).
    """

    cert: FilePath | None = None
    """Path of the PEM chain (server certificate first)."""
    key: FilePath | None = None
    """Path of its private key."""
    cert_pem: Pem | None = None
    """The PEM chain itself, instead of ``cert``."""
    key_pem: Pem | None = Field(default=None, repr=False)
    """The private key PEM itself, instead of ``key`` (never logged)."""
    name: Label | None = None
    """A label (the control plane's certificate name)."""
    hosts: list[HostText] = Field(default_factory=list, max_length=MAX_CERTIFICATE_HOSTS)
    """Host names or "*.example.com" wildcards picked by SNI; empty: only as the default."""
    ocsp_response: FilePath | None = None
    """Path of a DER OCSP response to staple (re-read when the file changes)."""

    @model_validator(mode="after")
    def _files_or_inline(self) -> Certificate:
        files, inline = (self.cert, self.key), (self.cert_pem, self.key_pem)
        if all(files) and not any(inline) or all(inline) and not any(files):
            return self
        raise ValueError("give either cert + key (file paths) or cert_pem + key_pem (PEM text)")


class TlsSettings(_Model):
    certificates: list[Certificate] = Field(default_factory=list, max_length=MAX_CERTIFICATES)
    default: Certificate | None = None
    """Served when the client's SNI matches no certificate (none: the handshake fails)."""


def _slug(value: str) -> str:
    if not _SLUG_RE.fullmatch(value) or len(value) > 63:
        raise ValueError(f"{value!r} must be a slug: lower-case letters, digits and '-'")
    return value


Slug = Annotated[str, Field(max_length=MAX_NAME), AfterValidator(_slug)]


FunctionEnv = Annotated[dict[Label, Text], Field(max_length=MAX_LIST)]
"""A function's environment variables (also the control-plane API's deploy body)."""


class EdgeFunction(_Model):
    """A WebAssembly function (WASI, WAGI-style CGI) run on the edge for matching requests.

    Capabilities are what the deployment grants, nothing more: environment variables, the
    hosts `fetch` may reach, a KV namespace (read; write only with `kv_write`)."""

    name: Slug
    service: Slug
    """The service whose requests it sees."""
    routes: list[UrlPath] = Field(min_length=1, max_length=MAX_LIST)
    """Path prefixes ("/api/") or globs matching the whole path ("/api/hello*")."""
    module: FilePath
    """Path of the .wasm (or .wat) file; or ``sha256:<hex>`` for a module deployed through the
    control plane (the edge fetches it into CACHE_DIR/control/modules before using it)."""
    env: FunctionEnv = Field(default_factory=dict)
    fetch_hosts: list[HostText] = Field(default_factory=list, max_length=MAX_LIST)
    kv_namespace: Name | None = None
    kv_write: bool = False
    cpu_ms: float = Field(50.0, gt=0, le=MAX_FUNCTION_CPU_MS)
    memory_mb: int = Field(64, ge=1, le=MAX_FUNCTION_MEMORY_MB)
    """Linear memory limit; at most what the edge runtime reserves per instance."""
    max_subrequests: int = Field(8, ge=0, le=MAX_SUBREQUESTS)
    phase: Literal["request", "response"] = "request"
    """request: sees the request before the cache (answer or pass); response: sees the response
    (from the cache or the origin) before the client does, and may replace or edit it."""

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, routes: list[str]) -> list[str]:
        for route in routes:
            if not route.startswith("/"):
                raise ValueError(f"route {route!r} must start with '/'")
        return routes

    def matches(self, path: str) -> bool:
        for route in self.routes:
            if any(c in route for c in "*?["):
                if re.fullmatch(_glob_regex(route), path):
                    return True
            elif path.startswith(route):
                return True
        return False


class IngestRoute(_Model):
    """Devices POST readings here; they are spooled durably on the edge and forwarded in
    batches to a central sink (store and forward: nothing lost across outages or crashes)."""

    name: Slug
    service: Slug
    path: UrlPath = "/ingest"
    sink: Url
    """URL the batches are POSTed to (with an Idempotency-Key per batch)."""
    aggregate: Label = "identity"
    """"identity" (every reading), or "window:SECONDS" (per-device averages per window)."""
    function: Name | None = None
    """An edge function (from `functions`) that filters/transforms each POST's readings:
    NDJSON readings on stdin, NDJSON readings to keep on stdout."""
    quota_records: int = Field(1_000_000, ge=1, le=MAX_QUOTA_RECORDS)
    quota_bytes: ByteSize = 256 * MiB
    """Spool size beyond which the route answers 429 (per worker)."""
    batch_records: int = Field(500, ge=1, le=MAX_BATCH_RECORDS)
    max_age: PositiveDuration = 1.0
    """Longest a reading waits for its batch to fill."""

    @field_validator("sink")
    @classmethod
    def _check_sink(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"sink must be an http(s) URL, got {url!r}")
        return url

    @field_validator("aggregate")
    @classmethod
    def _check_aggregate(cls, value: str) -> str:
        if value != "identity" and not re.fullmatch(r"window:\d+(\.\d+)?(:\d+(\.\d+)?)?", value):
            raise ValueError('aggregate must be "identity" or "window:SECONDS[:GRACE]"')
        return value


class Rendition(_Model):
    """One rung of an ABR ladder; `height: null` is the source, passed through (no re-encode)."""

    name: Slug
    height: int | None = Field(None, ge=64, le=4320)
    video_bitrate: int = Field(0, ge=0, le=100_000_000)
    """Bits per second of the encoded video (0 for the source)."""
    audio_bitrate: int = Field(128_000, ge=8_000, le=512_000)


def _default_ladder() -> list[Rendition]:
    return [Rendition(name="source"),
            Rendition(name="720p", height=720, video_bitrate=2_800_000, audio_bitrate=128_000),
            Rendition(name="480p", height=480, video_bitrate=1_400_000, audio_bitrate=96_000),
            Rendition(name="360p", height=360, video_bitrate=800_000, audio_bitrate=96_000)]


class StreamApp(_Model):
    """An RTMP application (rtmp://HOST/APP/NAME?key=KEY) and how its streams are packaged."""

    name: Name = "live"
    keys: dict[Label, Secret] = Field(default_factory=dict, max_length=MAX_STREAM_KEYS)
    """Stream name -> publish key; "*" matches any name. Empty: publishing needs no key."""
    ladder: list[Rendition] = Field(
        default_factory=_default_ladder, min_length=1, max_length=MAX_RENDITIONS
    )
    record: bool = True
    """Keep the stream as VOD when it ends."""
    encrypt: bool = False
    """AES-128 HLS: segments and parts encrypted with a per-stream key served at /APP/NAME/key
    (protect it with a signed rule at the edge). DASH and HTTP-FLV stay in the clear."""


def _ip_address(value: str) -> str:
    ip = _ip_literal(value.strip())
    if ip is None:
        raise ValueError(f"invalid IP address {value!r}")
    return ip


class WebRtcSettings(_Model):
    """WebRTC playback (WHEP at /APP/NAME/whep): candidates, viewer limits, reaping."""

    candidates: list[Annotated[str, Field(max_length=64), AfterValidator(_ip_address)]] = Field(
        default_factory=list, max_length=MAX_WEBRTC_CANDIDATES
    )
    """Host candidate addresses. Local ones are gathered on (instead of every interface but
    127.0.0.1); others (a 1:1 NAT's public address) are advertised with a gathered port."""
    max_viewers_per_stream: int = Field(50, ge=1, le=MAX_WEBRTC_VIEWERS)
    max_viewers: int = Field(500, ge=1, le=MAX_WEBRTC_VIEWERS)
    """WebRTC viewers of the whole server; beyond either limit a WHEP offer gets 503."""
    session_timeout: Annotated[
        float, Field(ge=0.5, le=MAX_TIMEOUT), BeforeValidator(_duration_input)
    ] = 15.0
    """A session whose viewer sent no RTCP receiver report this long (never connected, or
    vanished) is ended."""


class StreamSettings(_Model):
    """`verge stream`: live ingest, packaging (LL-HLS, HLS, DASH, HTTP-FLV) and VOD."""

    apps: list[StreamApp] = Field(
        default_factory=lambda: [StreamApp()], min_length=1, max_length=MAX_STREAM_APPS
    )
    part_target: Duration = 0.5
    """LL-HLS part duration target (seconds)."""
    segment_target: Duration = 2.0
    """Segment duration target: segments start at the first keyframe past it."""
    dvr_window: Duration = 120.0
    """How much of a live stream stays in the playlists."""
    grace: Duration = 10.0
    """A publisher gone this long ends the stream (EXT-X-ENDLIST); back sooner: a discontinuity."""
    data_dir: FilePath = "./stream-data"
    """Where recordings and VOD live."""
    max_upload_bytes: ByteSize = 4 * GiB
    """Largest file accepted by the VOD upload API (POST /vod/NAME)."""
    upload_token: Secret | None = Field(default=None, repr=False)
    """Bearer token for the VOD upload API; unset: uploads are disabled."""
    webrtc: WebRtcSettings = Field(default_factory=WebRtcSettings)
    """WebRTC playback (WHEP): candidate addresses, viewer limits, session reaping."""


class Hsts(_Model):
    max_age: Duration = 31536000.0
    include_subdomains: bool = False
    preload: bool = False

    def header(self) -> str:
        value = f"max-age={int(self.max_age)}"
        if self.include_subdomains:
            value += "; includeSubDomains"
        if self.preload:
            value += "; preload"
        return value


class Service(_Model):
    name: Name
    """A slug: lower-case letters, digits and "-"."""
    hosts: list[Annotated[HostText, AfterValidator(_config_host)]] = Field(
        min_length=1, max_length=MAX_HOSTS_PER_SERVICE
    )
    """Host names ("example.com"), wildcards ("*.example.com": any subdomain) or "*" (any host)."""
    default: bool = False
    """Serve requests whose Host matches no service."""
    origins: list[OriginSpec] = Field(min_length=1, max_length=MAX_ORIGINS)
    health_check: HealthCheck | None = None
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)
    """Tried in order; the first match applies."""
    headers: HeaderRules = Field(default_factory=HeaderRules)
    """Service-wide header edits, applied before the matching rule's."""
    https_redirect: bool = False
    """Answer plain-HTTP requests with a 308 to the same URL over HTTPS."""
    hsts: Hsts | None = None
    """Strict-Transport-Security on HTTPS responses."""
    encoded_slashes: Literal["reject", "keep"] = "reject"
    """Paths with an encoded '/' or '\\' (%2F, %5C): "reject" answers 400 (an origin that
    decodes them would see a path no rule saw); "keep" forwards them still encoded."""
    protection: Protection | None = None
    """Rate limits, deny lists and the WAF of this service (verge.protect)."""

    _matchers: tuple[tuple[str, re.Pattern[str] | None, Rule], ...] = PrivateAttr(())

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _SLUG_RE.fullmatch(name) or len(name) > 63:
            raise ValueError(
                f"service name {name!r} must be a slug: lower-case letters, digits and '-' "
                "(e.g. my-site)"
            )
        return name

    @model_validator(mode="after")
    def _index_rules(self) -> Service:
        first_with_path: dict[str, int] = {}
        for index, rule in enumerate(self.rules):
            if rule.path in first_with_path:
                earlier = first_with_path[rule.path]
                raise _conflict(
                    ("rules", index, "path"),
                    f"never matches: rules[{earlier}] has the same path {rule.path!r}",
                )
            first_with_path[rule.path] = index
        self._matchers = tuple((rule.path, rule._glob, rule) for rule in self.rules)
        return self

    def match_rule(self, path: str) -> Rule | None:
        """The first rule whose prefix or glob matches the URL path (no query string)."""
        for prefix, glob, rule in self.__pydantic_private__["_matchers"]:
            if glob is None:
                if path.startswith(prefix):
                    return rule
            elif glob.fullmatch(path) is not None:
                return rule
        return None


@dataclass(slots=True)
class _HostIndex:
    """Host -> service tables: exact names, wildcard suffixes (".example.com"), "*", default."""

    exact: dict[str, Service] = field(default_factory=dict)
    suffixes: dict[str, Service] = field(default_factory=dict)
    any_host: Service | None = None
    default: Service | None = None


class Config(_Model):
    cache: CacheSettings = Field(default_factory=CacheSettings)
    limits: Limits = Field(default_factory=Limits)
    proxy_protocol: list[CidrText] = Field(default_factory=list,
                                           max_length=MAX_TRUSTED_PROXIES)
    """Load balancers (addresses or CIDRs) in front of the plain-HTTP port that send the
    PROXY protocol (v1 or v2): the header is then required and read, only from these peers
    (others are closed), and names the client for rate limits, deny lists, the connection
    cap and logs. Empty: off."""
    origin_timeouts: OriginTimeouts = Field(default_factory=OriginTimeouts)
    compression: Compression = Field(default_factory=Compression)
    access_log: FilePath | None = None
    """"-" for stdout, a file path, or null for no access log."""
    geoip: FilePath | None = None
    """A MaxMind-format database (GeoLite2-Country or -City; the router's ``geoip`` setting):
    where the edge looks up the country of a service's ``deny.countries``. A node setting
    (``verge edge --geoip PATH`` wins): opened once per worker at start."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    functions: list[EdgeFunction] = Field(default_factory=list, max_length=MAX_FUNCTIONS)
    ingest: list[IngestRoute] = Field(default_factory=list, max_length=MAX_INGEST_ROUTES)
    """Store-and-forward routes for device data."""
    """Edge functions (WebAssembly), run before the cache for the routes they claim."""
    services: list[Service] = Field(default_factory=list, max_length=MAX_SERVICES)

    _hosts: _HostIndex = PrivateAttr(default_factory=_HostIndex)

    @field_validator("access_log")
    @classmethod
    def _check_access_log(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError('access_log must be "-", a file path, or null')
        return value

    @model_validator(mode="after")
    def _index_services(self) -> Config:
        self._check_unique_names()
        self._hosts = _index_hosts(self.services)
        return self

    def _check_unique_names(self) -> None:
        seen: set[str] = set()
        for number, service in enumerate(self.services):
            if service.name in seen:
                raise _conflict(
                    ("services", number, "name"),
                    f"another service is already named {service.name!r}",
                )
            seen.add(service.name)

    def key_host(self, service: Service, host: str) -> str:
        """The host a request's objects are cached (and purged) under: the service's first
        plain host name whichever of its names, or address as the default service, the
        request used — so one purge of the service's URL clears them all. A name matched
        by one of its wildcards ("*.example.com") keeps its own objects (another site under
        the wildcard), as does a service with no plain name."""
        name = _request_host_name(host)
        index: _HostIndex = self.__pydantic_private__["_hosts"]
        if index.exact.get(name) is not service and index.suffixes:
            dot = name.find(".")
            while dot != -1:
                if index.suffixes.get(name[dot:]) is service:
                    return host
                dot = name.find(".", dot + 1)
        return next((h for h in service.hosts if "*" not in h), host)

    def service_for_host(self, host: str) -> Service | None:
        """The service for a Host header: exact name, then the most specific wildcard, then "*",
        then the default service."""
        index: _HostIndex = self.__pydantic_private__["_hosts"]
        service = index.exact.get(host)
        if service is not None:
            return service
        name = _request_host_name(host)
        service = index.exact.get(name)
        if service is not None:
            return service
        if index.suffixes:
            dot = name.find(".")
            while dot != -1:
                service = index.suffixes.get(name[dot:])
                if service is not None:
                    return service
                dot = name.find(".", dot + 1)
        return index.any_host or index.default


def _index_hosts(services: list[Service]) -> _HostIndex:
    """Host tables for service_for_host; a host may belong to one service, one service is default."""
    index = _HostIndex()
    owners: dict[str, Service] = {}
    for number, service in enumerate(services):
        if service.default:
            if index.default is not None:
                raise _conflict(
                    ("services", number, "default"),
                    f"only one service can be the default; {index.default.name!r} already is",
                )
            index.default = service
        for position, host in enumerate(service.hosts):
            if host in owners:
                owner = owners[host]
                where = "this service" if owner is service else repr(owner.name)
                raise _conflict(
                    ("services", number, "hosts", position),
                    f"host {host!r} is already listed for {where}",
                )
            owners[host] = service
            _add_host(index, host, service)
    return index


def _add_host(index: _HostIndex, host: str, service: Service) -> None:
    if host == "*":
        index.any_host = service
    elif host.startswith("*."):
        index.suffixes[host[1:]] = service
    else:
        index.exact[host] = service


# ---------------------------------------------------------------------------------------------
# Error reporting: pydantic error paths -> YAML positions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: where (source, 1-based line and column when known), which setting, why."""

    source: str
    line: int | None
    column: int | None
    path: str
    reason: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class ConfigError(Exception):
    """Rejected configuration. str() is the operator-facing message, one issue per line."""

    def __init__(self, message: str, issues: Sequence[ConfigIssue] = ()) -> None:
        super().__init__(message)
        self.issues = tuple(issues)

    @classmethod
    def from_issues(cls, issues: Sequence[ConfigIssue]) -> ConfigError:
        return cls("\n".join(str(issue) for issue in issues), issues)


Loc = tuple[str | int, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"


def format_path(loc: Loc) -> str:
    """A setting's location as errors spell it: ``services[0].origins[1].url``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "[key]":
            text += f".{part}" if text else str(part)
    return text


def _mapping_entry(node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key node, value node) that supplied `key`: the last one, as YAML keeps the last.

    Constructing the data flattens `<<` merges into the mapping (merged entries first), so the
    last match is also right for merges; unflattened merges are searched after explicit keys.
    """
    merged: list[yaml.Node] = []
    for key_node, value_node in reversed(node.value):
        if key_node.tag == _MERGE_TAG:
            merged.extend(
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
        elif isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    for source in merged:
        if isinstance(source, yaml.MappingNode) and (entry := _mapping_entry(source, key)):
            return entry
    return None


def _node_at(root: yaml.Node, loc: Loc, at_key: bool) -> yaml.Node:
    """The deepest node along `loc`; the key node instead of its value when `at_key`."""
    node = root
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            entry = _mapping_entry(node, part)
            if entry is None:
                break
            wants_key = (at_key and depth == len(loc) - 1) or loc[depth + 1 : depth + 2] == (
                "[key]",
            )
            node = entry[0] if wants_key else entry[1]
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            node = node.value[part]
        else:
            break
    return node


def _strip_optional(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def _model_at(loc: Loc, root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class that the mapping at `loc` is validated as (for 'did you mean')."""
    annotation: Any = root
    for part in loc:
        annotation = _strip_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model_field = annotation.model_fields.get(str(part))
            annotation = model_field.annotation if model_field else None
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]
        else:
            return None
    annotation = _strip_optional(annotation)
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _unknown_key_reason(loc: Loc, root: type[BaseModel]) -> str:
    model = _model_at(loc[:-1], root)
    if model is None:
        return "unknown key"
    allowed = list(model.model_fields)
    close = get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return "unknown key; expected one of: " + ", ".join(allowed)


def _reason(error: Mapping[str, Any], loc: Loc, root: type[BaseModel] | None = None) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required but missing"
    if kind == "extra_forbidden":
        return _unknown_key_reason(loc, root or Config)
    if kind == "model_type":
        return f"expected a mapping of settings, got {type(error.get('input')).__name__}"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if kind not in ("value_error", "config_conflict") and isinstance(
        value, str | int | float | bool
    ):
        shown = repr(value)
        if len(shown) <= 60 and shown not in message:
            message += f" (got {shown})"
    return message


def _issue_from_error(
    error: Mapping[str, Any], source: str, root: yaml.Node | None, model: type[BaseModel]
) -> ConfigIssue:
    loc: Loc = tuple(error["loc"]) + tuple((error.get("ctx") or {}).get("at", ()))
    line = column = None
    if root is not None:
        mark = _node_at(root, loc, at_key=error["type"] == "extra_forbidden").start_mark
        line, column = mark.line + 1, mark.column + 1
    return ConfigIssue(source, line, column, format_path(loc), _reason(error, loc, model))


def _duplicate_keys(root: yaml.Node, source: str) -> list[ConfigIssue]:
    """YAML silently keeps the last of two equal keys; a config file should say so instead."""
    issues: list[ConfigIssue] = []
    pending, visited = [root], set()
    while pending:
        node = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    if key_node.value in seen:
                        mark = key_node.start_mark
                        reason = f"duplicate key {key_node.value!r}"
                        issues.append(
                            ConfigIssue(source, mark.line + 1, mark.column + 1, "", reason)
                        )
                    seen.add(key_node.value)
                pending.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
    return issues


def _sorted(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    unique = dict.fromkeys(issues)
    return sorted(unique, key=lambda issue: (issue.line or 0, issue.column or 0))


def _validate(
    data: object,
    source: str,
    root: yaml.Node | None,
    issues: Sequence[ConfigIssue] = (),
    model: type[M] = Config,  # type: ignore[assignment]
) -> M:
    """Validate parsed data; every problem (with its position when `root` is known) is reported."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        position = 1 if root is not None else None
        reason = f"the top level must be a mapping of settings, not {type(data).__name__}"
        raise ConfigError.from_issues([ConfigIssue(source, position, position, "", reason)])
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        issues = [
            *issues, *(_issue_from_error(error, source, root, model) for error in exc.errors())
        ]
    else:
        if not issues:
            return config
    raise ConfigError.from_issues(_sorted(list(issues)))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
M = TypeVar("M", bound=BaseModel)


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return ConfigError(f"{source}: invalid YAML: {exc}")
    mark = exc.problem_mark
    reason = f"invalid YAML: {exc.problem}"
    if exc.context and exc.context_mark is not None:
        reason += f" ({exc.context} at line {exc.context_mark.line + 1})"
    issue = ConfigIssue(source, mark.line + 1, mark.column + 1, "", reason)
    return ConfigError.from_issues([issue])


def _load_yaml(text: str, source: str) -> tuple[yaml.Node | None, object, list[ConfigIssue]]:
    """One parse: the node tree (for positions), its data, and any duplicate keys.

    Duplicates are looked for before constructing, which flattens `<<` merges into the nodes.
    """
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None, []
        duplicates = _duplicate_keys(root, source)
        return root, loader.construct_document(root), duplicates
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Validate YAML (or JSON) text; ConfigError names filename:line:column, setting and reason."""
    root, data, duplicates = _load_yaml(text, filename)
    return _validate(data, filename, root, duplicates)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; None gives the defaults."""
    if path is None:
        return Config()
    return load_model_file(path, Config)


def load_model_file(path: str | Path, model: type[M]) -> M:
    """Read a YAML file and validate it as `model`, with load_config's file:line errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text ({exc.reason})") from None
    root, data, duplicates = _load_yaml(text, str(path))
    return _validate(data, str(path), root, duplicates, model)


def config_from_data(data: Mapping[str, Any], source: str = "<bundle>") -> Config:
    """Validate already-parsed data (a control-plane bundle); errors name the setting, no line."""
    return _validate(data, source, None)


def config_for_origin(origin_url: str, base: Config | None = None) -> Config:
    """`verge edge --origin URL`: add a default service named "default" for every host ("*")."""
    try:
        origin = OriginSpec.model_validate(origin_url)
    except ValidationError as exc:
        reason = _reason(exc.errors()[0], ("url",))
        raise ConfigError(f"--origin: {reason}") from None
    base = base if base is not None else Config()
    for service in base.services:
        if service.default:
            raise ConfigError(
                f"--origin: adds a default service, but service {service.name!r} is already "
                "the default in the config"
            )
    data = base.model_dump(mode="json")
    data["services"].append(
        {
            "name": "default",
            "hosts": ["*"],
            "default": True,
            "origins": [origin.model_dump(mode="json")],
        }
    )
    return _validate(data, "--origin", None)
