"""The control plane's HTTP API (FastAPI): operators manage tenants, tokens, services and
purges; edge nodes join, long-poll for config and purges, and report heartbeats and stats.

``create_app(store, settings)`` builds the app; the contract is .notes/CONTROL_API.md. Every
``/api/v1`` call carries ``Authorization: Bearer TOKEN``. Who may call an endpoint at all is
decided here by role (a dependency per gate); what a tenant may see inside it is decided by
the store, which answers 404 for another tenant's service exactly as for a missing one.

Blocking database work never runs on the event loop: plain ``def`` endpoints run in the thread
pool, and the two long-poll endpoints (``async``) call the store through it. A long poll holds
no thread while it waits: it sleeps on a :class:`VersionWatch`, woken at once by a change
committed in this process and, on PostgreSQL, by another replica's (its NOTIFY, heard by the
store's listener). While no notification can be heard (SQLite, or the LISTEN connection is
down) a change another replica committed wakes waiters within ``poll_interval``, because
while anyone waits one poller per watch re-reads the counter.

Errors are JSON ``{"error": "...", "field": "..."}``; pydantic errors name the field the way
the config file errors do (``origins[0].url``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TextIO, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from verge import config as vconfig
from verge.control import protection as events_store
from verge.control.auth import Principal
from verge.control.functions import (
    KV_NODE_WRITES,
    MAX_KEY_BYTES,
    MAX_MODULE_BYTES,
    MAX_VALUE_BYTES,
    VALUE_BASE64_CHARS,
    FunctionStore,
    TooLarge,
)
from verge.control.protection import ProtectionCounts, ProtectionEvents
from verge.control.store import Store, StoreError, pydantic_error
from verge.health import HealthMonitor, Target

log = logging.getLogger("verge.control")

API = "/api/v1"
T = TypeVar("T")


@dataclass
class Settings:
    max_wait: float = 60.0
    """Longest long poll a node may ask for (seconds)."""
    poll_interval: float = 0.5
    """How often waiting long polls re-check the database (changes by other replicas)."""
    stats_retention_days: float = 7.0
    prune_interval: float = 3600.0
    """Seconds between deletions of stats older than the retention."""
    access_log: TextIO | None = None
    """Where to write one JSON line per request (None: no access log)."""
    monitor_interval: float = 1.0
    """Seconds between health checks of every edge (0: no health monitor)."""
    monitor_timeout: float = 1.0
    monitor_fails: int = 2
    """Failed checks in a row that mark an edge down for the routers."""
    monitor_passes: int = 2
    """Good checks in a row that bring it back."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


# ---------------------------------------------------------------------------------------------
# Long-poll wake-ups
# ---------------------------------------------------------------------------------------------


class VersionWatch:
    """Wakes long-poll waiters when a counter (config version, purge seq) may have moved.

    ``notify()`` (any thread) wakes every waiter at once: this process, or another replica
    (heard through PostgreSQL NOTIFY), committed a change. While anyone waits, one poller task
    reads the counter every ``interval`` seconds and wakes the waiters when it differs from
    the last reading: a change nobody announced. While ``live()`` (notifications are heard)
    it reads only every ``LIVE_POLL_INTERVAL`` seconds, as a safety net.
    Waiters re-check with their own query, so a spurious wake-up costs one read.
    """

    LIVE_POLL_INTERVAL = 10.0

    def __init__(
        self, read: Callable[[], int], interval: float, live: Callable[[], bool] | None = None
    ) -> None:
        self._read, self._interval = read, interval
        self._live = live or (lambda: False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()
        self._waiters = 0
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    def notify(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
            loop.call_soon_threadsafe(self._wake)

    def close(self) -> None:
        """Release every waiter now (shutdown); later waits return at once."""
        self._closed = True
        self._wake()
        if self._poller is not None:
            self._poller.cancel()

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new loop (the app was restarted)
            self._loop, self._event, self._poller = loop, asyncio.Event(), None
            self._closed = False
        return loop

    async def wait(self, check: Callable[[], Awaitable[T | None]], timeout: float) -> T | None:
        """``await check()`` now and after each wake-up until it gives something or time is up."""
        loop = self._attach()
        deadline = loop.time() + timeout
        self._waiters += 1
        try:
            while True:
                event = self._event  # taken before checking: a wake-up in between is not lost
                result = await check()
                remaining = deadline - loop.time()
                if result is not None or remaining <= 0 or self._closed:
                    return result
                self._start_poller()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
        finally:
            self._waiters -= 1

    def _start_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        last: int | None = None
        while self._waiters > 0 and not self._closed:
            try:
                value = await run_in_threadpool(self._read)
            except Exception as exc:  # database briefly away: keep waiting, try again
                log.warning("long-poll check failed: %s", exc)
                value = last
            if value != last:  # the first reading wakes too: a change may predate the poller
                self._wake()
                last = value
            await self._pause()

    async def _pause(self) -> None:
        """Sleep until the next reading: short while notifications are not heard."""
        slept, step = 0.0, max(self._interval, 0.01)
        while slept < self.LIVE_POLL_INTERVAL and not self._closed and self._waiters > 0:
            await asyncio.sleep(step)
            slept += step
            if not self._live():
                return


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------

# Every field is bounded by the table in verge.config (tests/control/test_bounds.py checks the
# OpenAPI schema): what the API accepts is what the store's columns and the edges can hold.
Slug = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=vconfig.MAX_NAME)
]
NodeName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=vconfig.MAX_NAME)
]
HttpUrl = Annotated[
    str, StringConstraints(pattern=r"^https?://\S+$", max_length=vconfig.MAX_NODE_URL)
]
NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_URL)]
Name = Annotated[str, StringConstraints(max_length=vconfig.MAX_NAME)]
"""A tenant, service or region name given by reference (the store says if it exists)."""
Label = Annotated[str, StringConstraints(max_length=vconfig.MAX_LABEL)]
Seq = Annotated[int, Field(ge=0, le=vconfig.MAX_SEQ)]
Timestamp = Annotated[float, Field(ge=0, le=vconfig.MAX_TIMESTAMP, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=vconfig.MAX_SAMPLE_COUNT)]
ReportKey = Annotated[str, StringConstraints(max_length=vconfig.MAX_LABEL)]
ReportText = Annotated[str, StringConstraints(max_length=vconfig.MAX_TEXT)]
ReportNumber = Annotated[float, Field(ge=-vconfig.MAX_SEQ, le=vconfig.MAX_SEQ, allow_inf_nan=False)]
ReportInt = Annotated[int, Field(ge=-vconfig.MAX_SEQ, le=vconfig.MAX_SEQ)]
ReportValue = (
    bool
    | ReportInt
    | ReportNumber
    | ReportText
    | Annotated[list[ReportText], Field(max_length=vconfig.MAX_REPORT_LIST)]
    | None
)
"""A value an edge reports (heartbeat, function log record): JSON scalars and lists of text."""
ReportMap = Annotated[dict[ReportKey, ReportValue], Field(max_length=vconfig.MAX_REPORT_KEYS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


ZoneName = Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_HOST)]
"""A DNS zone delegated to a tenant (example.com); the store normalises and checks it."""
Zones = Annotated[list[ZoneName], Field(max_length=vconfig.MAX_HOSTS_PER_SERVICE)]


class TenantIn(_Body):
    name: Slug
    zones: Zones = Field(default_factory=list)
    """Zones whose hosts the tenant's services may claim (admins add more later)."""


class ZonesIn(_Body):
    zones: Annotated[Zones, Field(min_length=1)]


class TokenIn(_Body):
    role: Label
    name: Annotated[Label, StringConstraints(min_length=1)] | None = None
    tenant: Name | None = None


class ServiceIn(vconfig.Service):
    """A ``verge.config.Service`` plus where it belongs."""

    tenant: Name | None = None
    """Tenant name (admins only; tenant tokens always write to their own tenant)."""
    version: int | None = Field(None, ge=0, le=vconfig.MAX_VERSION)
    """Ignored (as returned by GET); If-Match carries the version a change is based on."""

    def spec(self) -> vconfig.Service:
        return vconfig.Service.model_validate(self.model_dump(exclude={"tenant", "version"}))


Pem = Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_PEM)]


class CertificateIn(_Body):
    name: Slug
    cert_pem: Pem
    """The certificate chain, PEM: the server certificate first, then its issuers."""
    key_pem: Pem = Field(repr=False)
    """The private key, PEM (unencrypted). Stored sealed; never returned."""
    tenant: Name | None = None
    """Owning tenant (admins only; tenant tokens always use their own)."""


class CertificateRotateIn(_Body):
    cert_pem: Pem
    key_pem: Pem = Field(repr=False)


def _splittable_url(value: str) -> str:
    """A URL, //host/path or host/path that can be split (urlsplit refuses "http://[x")."""
    try:
        urlsplit(value if "://" in value or value.startswith("//") else "//" + value)
    except ValueError as exc:
        raise ValueError(f"invalid URL {value!r}: {exc}") from None
    return value


PurgeUrl = Annotated[NonEmpty, AfterValidator(_splittable_url)]


class PurgeIn(_Body):
    service: Name | None = None
    urls: list[PurgeUrl] = Field(default_factory=list, max_length=vconfig.MAX_PURGE_URLS)
    prefixes: list[PurgeUrl] = Field(default_factory=list, max_length=vconfig.MAX_PURGE_PREFIXES)
    tags: list[NonEmpty] = Field(default_factory=list, max_length=vconfig.MAX_PURGE_TAGS)
    soft: bool = False


_MODULE_BASE64_CHARS = (MAX_MODULE_BYTES // 3 + 1) * 4 + 64
"""Base64 of the largest module: a longer text is refused with 413 before decoding."""
Route = Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_URL_PATH)]
FetchHost = Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_HOST)]


class FunctionIn(_Body):
    """A deployment: an EdgeFunction's fields plus the module, base64 (at most 16 MiB).

    The limits share their upper bounds with ``verge.config.EdgeFunction`` (so with what the
    edge runtime can run); below those, what the field means (memory_mb: 0) is the store's to
    refuse, with 400 like every other deployment error.
    """

    name: Slug
    service: Slug
    routes: list[Route] = Field(min_length=1, max_length=vconfig.MAX_LIST)
    module_base64: Annotated[
        str, StringConstraints(min_length=1, max_length=2 * _MODULE_BASE64_CHARS)
    ] = Field(repr=False)
    env: vconfig.FunctionEnv = Field(default_factory=dict, repr=False)
    fetch_hosts: list[FetchHost] = Field(default_factory=list, max_length=vconfig.MAX_LIST)
    kv_namespace: Name | None = None
    kv_write: bool = False
    cpu_ms: Annotated[float, Field(ge=0, le=vconfig.MAX_FUNCTION_CPU_MS)] | None = None
    memory_mb: Annotated[int, Field(ge=0, le=vconfig.MAX_FUNCTION_MEMORY_MB)] | None = None
    max_subrequests: Annotated[int, Field(ge=0, le=vconfig.MAX_SUBREQUESTS)] | None = None
    phase: Literal["request", "response"] = "request"

    def module(self) -> bytes:
        if len(self.module_base64) > _MODULE_BASE64_CHARS:
            raise TooLarge(f"the module is over {MAX_MODULE_BYTES} bytes", "module_base64")
        try:
            return base64.b64decode(self.module_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "module_base64 is not valid base64", "module_base64") from None


class RollbackIn(_Body):
    version: int | None = Field(None, ge=1, le=vconfig.MAX_VERSION)
    """The version to make active; absent: the one before the active one."""


class LogsIn(BaseModel):
    records: list[ReportMap] = Field(max_length=vconfig.MAX_LOG_RECORDS)


class KvWriteIn(_Body):
    """One function write queued on an edge (its outbox); the store checks namespace, key
    and value one by one, so one bad write does not get the others refused."""

    id: Annotated[int, Field(ge=1, le=vconfig.MAX_SEQ)]
    """Grows per outbox: a write id not above the last one applied is a duplicate."""
    namespace: Name
    key: Annotated[str, StringConstraints(min_length=1, max_length=4 * MAX_KEY_BYTES)]
    value: Annotated[str, StringConstraints(max_length=2 * VALUE_BASE64_CHARS)] | None
    """The value, base64; null: a deletion. Over 1 MiB decoded: that write is refused (413);
    a text over twice that gets the whole batch refused (422)."""
    t: Timestamp | None = None
    """When the function wrote it (informative: the order is the control plane's)."""
    function: Name | None = None


class KvWritesIn(_Body):
    outbox: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16,64}$", max_length=64)]
    """The outbox's random id (write ids are counted per outbox)."""
    writes: list[KvWriteIn] = Field(max_length=KV_NODE_WRITES)


_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
"""No control characters (PostgreSQL refuses NUL in text; a terminal would obey the rest)."""
EventClient = Annotated[
    str, StringConstraints(max_length=events_store.MAX_CLIENT, pattern=_PRINTABLE)
]
EventMethod = Annotated[
    str, StringConstraints(max_length=events_store.MAX_METHOD, pattern=_PRINTABLE)
]
EventHost = Annotated[str, StringConstraints(max_length=events_store.MAX_HOST, pattern=_PRINTABLE)]
EventTarget = Annotated[
    str, StringConstraints(max_length=events_store.MAX_TARGET, pattern=_PRINTABLE)
]
EventDetail = Annotated[
    str, StringConstraints(max_length=events_store.MAX_DETAIL, pattern=_PRINTABLE)
]


class ProtectionEventIn(BaseModel):
    """One request an edge refused (verge.edge.protect); unknown keys are ignored, so that
    a newer edge's extra field does not get its whole batch refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    service: Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_NAME)]
    t: Timestamp
    client: EventClient = ""
    method: EventMethod = ""
    host: EventHost = ""
    target: EventTarget = ""
    status: Annotated[int, Field(ge=0, le=events_store.MAX_STATUS)]
    """The answer's status; 0: the connection was dropped without one."""
    kind: Literal["deny", "rate-limit", "challenge", "waf", "drop"]
    detail: EventDetail = ""


class ProtectionEventsIn(_Body):
    events: list[ProtectionEventIn] = Field(max_length=events_store.MAX_EVENTS_PER_UPLOAD)


class JoinIn(_Body):
    name: NodeName
    url: HttpUrl
    admin_url: HttpUrl
    region: Name | None = None


class HeartbeatIn(_Body):
    health: ReportMap = Field(default_factory=dict)
    load: ReportMap = Field(default_factory=dict)
    config_version: Seq = 0
    purge_seq: Seq = 0
    url: HttpUrl | None = None
    admin_url: HttpUrl | None = None
    region: Name | None = None


class AckIn(_Body):
    seq: Seq


class SampleIn(BaseModel):
    """One node's counters for one service over a few seconds (unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    t: Timestamp
    service: Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_NAME)]
    requests: Count = 0
    hits: Count = 0
    bytes: Count = 0
    status_2xx: Count = 0
    status_3xx: Count = 0
    status_4xx: Count = 0
    status_5xx: Count = 0
    origin_ms_sum: float = Field(0.0, ge=0, le=vconfig.MAX_SAMPLE_COUNT)
    origin_count: Count = 0


class ProtectionCountIn(BaseModel):
    """What one node's protect phase counted for one service and rule over a few seconds
    (verge.control.protection.ProtectionCounts; unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    t: Timestamp
    service: Annotated[str, StringConstraints(min_length=1, max_length=vconfig.MAX_NAME)]
    kind: Literal["rate-limit", "deny", "waf"]
    rule: Annotated[str, StringConstraints(max_length=vconfig.MAX_NAME, pattern=r"^[a-z0-9_-]*$")]
    """The rate-limit rule's name; "" for the deny lists and the WAF."""
    allowed: Count = 0
    limited: Count = 0
    blocked: Count = 0


class StatsIn(BaseModel):
    samples: list[SampleIn] = Field(max_length=vconfig.MAX_STATS_SAMPLES)
    protection: list[ProtectionCountIn] = Field(
        default_factory=list, max_length=events_store.MAX_COUNTS_PER_UPLOAD
    )
    """Per-rule protection counters (deltas), counted once per idempotency key as well."""


# ---------------------------------------------------------------------------------------------
# Dependencies: the store, the caller, role gates, paging, ETags
# ---------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API token or node credential (vrg_...)")


def _store(request: Request) -> Store:
    return request.app.state.store


def _functions(request: Request) -> FunctionStore:
    return request.app.state.functions


def _protection_events(request: Request) -> ProtectionEvents:
    return request.app.state.protection_events


def _protection_counts(request: Request) -> ProtectionCounts:
    return request.app.state.protection_counts


StoreDep = Annotated[Store, Depends(_store)]
FunctionsDep = Annotated[FunctionStore, Depends(_functions)]
EventsDep = Annotated[ProtectionEvents, Depends(_protection_events)]
CountsDep = Annotated[ProtectionCounts, Depends(_protection_counts)]


def authenticated(
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return _check_token(store, credentials.credentials if credentials else None)


def _check_token(store: Store, token: str | None) -> Principal:
    if not token:
        raise ApiError(401, "missing token: send Authorization: Bearer TOKEN")
    principal = store.authenticate(token)
    if principal is None:
        raise ApiError(401, "unknown or revoked token")
    return principal


def _token_of(request: Request) -> str | None:
    """The bearer token of a request, as HTTPBearer reads it (None for another scheme)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _body_unparsed(exc: RequestValidationError) -> bool:
    """Whether FastAPI refused the body before resolving dependencies (it is not JSON)."""
    errors = exc.errors()
    return bool(errors) and errors[0]["type"] == "json_invalid"


_BODY_PARSE_FAILED = "There was an error parsing the body"
"""FastAPI's 400 for a body it cannot even decode (also raised before any dependency)."""


def _gate(allowed: Callable[[Principal], bool], what: str) -> Any:
    def dependency(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not allowed(principal):
            raise ApiError(403, f"a {principal.role} token cannot {what}")
        return principal

    return Depends(dependency)


Reader = Annotated[Principal, _gate(lambda p: p.is_operator, "use the operator API")]
Writer = Annotated[Principal, _gate(lambda p: p.can_write, "change anything")]
Admin = Annotated[Principal, _gate(lambda p: p.role == "admin", "do this (admins only)")]
FleetReader = Annotated[Principal, _gate(lambda p: p.sees_all, "see the fleet (admins only)")]
Joiner = Annotated[Principal, _gate(lambda p: p.role in ("join", "admin"), "join nodes")]
NodeCaller = Annotated[Principal, _gate(lambda p: p.role == "node", "use the node API")]

Limit = Annotated[int, Query(ge=1, le=1000, description="Page size")]
Offset = Annotated[int, Query(ge=0, le=vconfig.MAX_OFFSET, description="Items to skip")]


def _seq_query(description: str) -> Any:
    return Query(ge=0, le=vconfig.MAX_SEQ, description=description)


def _wait_query(description: str) -> Any:
    return Query(ge=0, le=vconfig.MAX_WAIT, allow_inf_nan=False, description=description)


def _epoch_query(description: str) -> Any:
    """A finite epoch time: nan, inf or -1e308 are refused (422), never reach the store."""
    return Query(ge=0, le=vconfig.MAX_TIMESTAMP, allow_inf_nan=False, description=description)


# A time series' range and resolution (/stats, /services/{name}/protection/stats).
Since = Annotated[float | None, _epoch_query("Epoch seconds (default: 1 h ago)")]
Until = Annotated[float | None, _epoch_query("Epoch seconds")]
Step = Annotated[int, Query(ge=1, le=86400, description="Seconds per point")]


NameQuery = Annotated[str | None, Query(max_length=vconfig.MAX_NAME)]
NamePath = Annotated[str, Path(max_length=vconfig.MAX_NAME)]
"""A service, certificate, function, node or KV namespace name in the path."""
IdPath = Annotated[str, Path(max_length=vconfig.MAX_LABEL)]
KeyPath = Annotated[str, Path(max_length=4 * MAX_KEY_BYTES)]
"""A KV key. The store refuses one over MAX_KEY_BYTES bytes of UTF-8 (400, naming the key);
this looser bound only keeps absurd paths out."""
IfMatch = Annotated[str | None, Header(max_length=vconfig.MAX_LABEL)]
"""If-Match / If-None-Match: one ETag or a short list of them."""


def _etag(version: int) -> str:
    return f'"{version}"'


def _if_match(value: str | None, required: bool) -> int | None:
    """The version an If-Match header names; None for "*" (any) or, if allowed, absent."""
    if value is None:
        if required:
            raise ApiError(
                428, 'this change needs If-Match: "<version>" (the ETag from GET)', "If-Match"
            )
        return None
    first = value.split(",")[0].strip()
    if first == "*":
        return None
    text = first.removeprefix("W/").strip('"')
    if not text.isdigit():
        raise ApiError(400, f'If-Match must be an ETag like "3", got {value!r}', "If-Match")
    return int(text)


def _versioned(response: Response, service: dict) -> dict:
    response.headers["ETag"] = _etag(service["version"])
    return service


# ---------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------

health = APIRouter(tags=["health"])
tenants = APIRouter(prefix=API, tags=["tenants"])
tokens = APIRouter(prefix=API, tags=["tokens"])
services = APIRouter(prefix=API, tags=["services"])
purges = APIRouter(prefix=API, tags=["purge"])
certificates = APIRouter(prefix=API, tags=["certificates"])
fleet = APIRouter(prefix=API, tags=["nodes"])
reports = APIRouter(prefix=API, tags=["audit and stats"])
functions = APIRouter(prefix=API, tags=["edge functions"])
kv = APIRouter(prefix=API, tags=["edge KV"])
edge = APIRouter(prefix=API, tags=["edge nodes"])


@health.get("/healthz")
@health.get(API + "/healthz", include_in_schema=False)
def healthz(store: StoreDep) -> JSONResponse:
    """Liveness and database reachability (no token)."""
    try:
        store.config_version()
    except Exception as exc:
        return JSONResponse({"status": "error", "error": f"store unreachable: {exc}"}, 503)
    return JSONResponse({"status": "ok"})


@tenants.post("/tenants", status_code=201)
def create_tenant(body: TenantIn, store: StoreDep, principal: Admin) -> dict:
    """A tenant and the zones its services may claim hosts in (``zones``, optional)."""
    return store.create_tenant(principal, body.name, body.zones)


@tenants.get("/tenants")
def list_tenants(store: StoreDep, principal: Reader, limit: Limit = 50, offset: Offset = 0) -> dict:
    return store.list_tenants(principal, limit, offset)


@tenants.get("/tenants/{name}")
def get_tenant(name: NamePath, store: StoreDep, principal: Reader) -> dict:
    """A tenant and its zones (admins; a tenant's tokens see their own)."""
    return store.get_tenant(principal, name)


@tenants.post("/tenants/{name}/zones")
def add_zones(name: NamePath, body: ZonesIn, store: StoreDep, principal: Admin) -> dict:
    """Delegate zones: 409 naming the tenant whose zone one would nest in or around;
    ``conflicts`` lists other tenants' hosts already inside the new zones."""
    return store.add_zones(principal, name, body.zones)


@tenants.delete("/tenants/{name}/zones/{zone}")
def remove_zone(
    name: NamePath,
    zone: Annotated[str, Path(max_length=vconfig.MAX_HOST)],
    store: StoreDep,
    principal: Admin,
) -> dict:
    """Take a zone back; the tenant's hosts there stay but are listed under ``conflicts``."""
    return store.remove_zone(principal, name, zone)


@tenants.get("/hostnames", tags=["hostnames"])
def list_hostnames(
    store: StoreDep,
    principal: Reader,
    limit: Limit = 50,
    offset: Offset = 0,
    conflicts: Annotated[bool, Query(description="Only hosts with a conflict")] = False,
) -> dict:
    """Every service host -> tenant, service, zone, covering wildcards and conflicts (admins;
    a tenant's tokens see their own hosts); all ``conflicts`` and ``zones`` come with it."""
    return store.hostnames(principal, limit, offset, conflicts)


@tokens.post("/tokens", status_code=201)
def create_token(body: TokenIn, store: StoreDep, principal: Writer) -> dict:
    """A new token; its secret (``token``) is shown only in this answer."""
    return store.create_token(principal, body.role, body.name, body.tenant)


@tokens.get("/tokens")
def list_tokens(store: StoreDep, principal: Reader, limit: Limit = 50, offset: Offset = 0) -> dict:
    return store.list_tokens(principal, limit, offset)


@tokens.delete("/tokens/{token_id}", status_code=204)
def revoke_token(token_id: IdPath, store: StoreDep, principal: Writer) -> Response:
    store.revoke_token(principal, token_id)
    return Response(status_code=204)


@services.post("/services", status_code=201)
def create_service(body: ServiceIn, response: Response, store: StoreDep, principal: Writer) -> dict:
    return _versioned(response, store.create_service(principal, body.spec(), body.tenant))


@services.get("/services")
def list_services(
    store: StoreDep, principal: Reader, limit: Limit = 50, offset: Offset = 0
) -> dict:
    return store.list_services(principal, limit, offset)


@services.get("/services/{name}", response_model=None)
def get_service(
    name: NamePath,
    response: Response,
    store: StoreDep,
    principal: Reader,
    if_none_match: IfMatch = None,
) -> dict | Response:
    service = store.get_service(principal, name)
    if if_none_match is not None and _etag(service["version"]) in if_none_match:
        return Response(status_code=304, headers={"ETag": _etag(service["version"])})
    return _versioned(response, service)


@services.put("/services/{name}")
def update_service(
    name: NamePath,
    body: ServiceIn,
    response: Response,
    store: StoreDep,
    principal: Writer,
    if_match: IfMatch = None,
) -> dict:
    """Replace the service; needs ``If-Match`` with the ETag of the version it is based on."""
    expected = _if_match(if_match, required=True)
    updated = store.update_service(principal, name, body.spec(), expected, body.tenant)
    return _versioned(response, updated)


@services.delete("/services/{name}", status_code=204)
def delete_service(
    name: NamePath, store: StoreDep, principal: Writer, if_match: IfMatch = None
) -> Response:
    store.delete_service(principal, name, _if_match(if_match, required=False))
    return Response(status_code=204)


@services.post("/services/{name}/origins", status_code=201)
def add_origin(
    name: NamePath,
    body: vconfig.OriginSpec,
    response: Response,
    store: StoreDep,
    principal: Writer,
    if_match: IfMatch = None,
) -> dict:
    origin = body.model_dump(mode="json")
    service = store.add_origin(principal, name, origin, _if_match(if_match, required=False))
    return _versioned(response, service)


@services.delete("/services/{name}/origins")
def remove_origin(
    name: NamePath,
    url: Annotated[str, Query(min_length=1, max_length=vconfig.MAX_URL)],
    response: Response,
    store: StoreDep,
    principal: Writer,
    if_match: IfMatch = None,
) -> dict:
    service = store.remove_origin(principal, name, url, _if_match(if_match, required=False))
    return _versioned(response, service)


@services.get("/services/{name}/protection/events")
def protection_events(
    name: NamePath,
    events: EventsDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=events_store.EVENTS_KEPT)] = 100,
) -> dict:
    """A sample of the requests edges refused (deny list, rate limit, WAF, dropped
    connections): the newest ``limit``, oldest first."""
    return events.list(principal, name, limit)


@services.get("/services/{name}/protection/stats")
def protection_stats(
    name: NamePath,
    counts: CountsDep,
    principal: Reader,
    since: Since = None,
    until: Until = None,
    step: Step = 10,
) -> dict:
    """What the edges' protect phase counted for the service, per rule: ``{"service",
    "since", "step", "rules": [{"kind", "rule", "allowed", "limited", "blocked"}] (totals
    over the range), "series": [{"t", "kind", "rule", "allowed", "limited", "blocked"}]}``.
    ``kind`` rate-limit (``rule``: its name), deny or waf (``rule`` "")."""
    return counts.query(principal, name, since=since, until=until, step=step)


@certificates.post("/certificates", status_code=201)
def create_certificate(body: CertificateIn, store: StoreDep, principal: Writer) -> dict:
    """Add a certificate + key: ``{"name", "hosts" (SAN DNS names), "not_after",
    "fingerprint_sha256", "warning"?}``. Edges serve it by SNI with the next bundle."""
    return store.create_certificate(principal, body.name, body.cert_pem, body.key_pem, body.tenant)


@certificates.get("/certificates")
def list_certificates(
    store: StoreDep, principal: Reader, limit: Limit = 50, offset: Offset = 0
) -> dict:
    """Certificates the caller can see (no key material)."""
    return store.list_certificates(principal, limit, offset)


@certificates.get("/certificates/{name}")
def get_certificate(name: NamePath, store: StoreDep, principal: Reader) -> dict:
    return store.get_certificate(principal, name)


@certificates.put("/certificates/{name}")
def rotate_certificate(
    name: NamePath, body: CertificateRotateIn, store: StoreDep, principal: Writer
) -> dict:
    """Rotate: a new chain and key; edges switch new handshakes without a restart."""
    return store.update_certificate(principal, name, body.cert_pem, body.key_pem)


@certificates.delete("/certificates/{name}", status_code=204)
def delete_certificate(name: NamePath, store: StoreDep, principal: Writer) -> Response:
    store.delete_certificate(principal, name)
    return Response(status_code=204)


@purges.post("/purge", status_code=202)
def create_purge(body: PurgeIn, store: StoreDep, principal: Writer) -> dict:
    """Queue a purge for every edge: ``{"seq", "nodes": [names expected to ack]}``."""
    return store.create_purge(
        principal,
        service=body.service,
        urls=body.urls,
        prefixes=body.prefixes,
        tags=body.tags,
        soft=body.soft,
    )


@purges.get("/purge/{seq}")
async def purge_status(
    request: Request,
    seq: Annotated[int, Path(ge=1, le=vconfig.MAX_SEQ, description="The purge's seq")],
    store: StoreDep,
    principal: Reader,
    wait: Annotated[float, _wait_query("Seconds to wait until every node acked")] = 0,
) -> dict:
    """Who has and has not acknowledged; with ``wait``, answers as soon as the job is done
    (nobody pending, or the purge timeout passed: the pending nodes catch up later)."""
    status = await run_in_threadpool(store.purge_status, principal, seq)
    if status["done"] or not wait:
        return status

    async def complete() -> dict | None:
        current = await run_in_threadpool(store.purge_status, principal, seq)
        return current if current["done"] else None

    done = await request.app.state.watches["acks"].wait(complete, _wait(request, wait))
    return done or await run_in_threadpool(store.purge_status, principal, seq)


@fleet.get("/nodes")
def list_nodes(
    store: StoreDep, principal: FleetReader, limit: Limit = 50, offset: Offset = 0
) -> dict:
    return store.list_nodes(limit, offset)


@fleet.delete("/nodes/{name}", status_code=204)
def revoke_node(name: NamePath, store: StoreDep, principal: Admin) -> Response:
    store.revoke_node(principal, name)
    return Response(status_code=204)


@reports.get("/audit")
def list_audit(store: StoreDep, principal: Reader, limit: Limit = 50, offset: Offset = 0) -> dict:
    return store.list_audit(principal, limit, offset)


@reports.get("/stats")
def query_stats(
    store: StoreDep,
    principal: Reader,
    service: NameQuery = None,
    node: NameQuery = None,
    since: Since = None,
    until: Until = None,
    step: Step = 10,
) -> dict:
    return store.query_stats(
        principal, service=service, node=node, since=since, until=until, step=step
    )


@functions.post("/functions", status_code=201)
def deploy_function(body: FunctionIn, fns: FunctionsDep, principal: Writer) -> dict:
    """Deploy a new version (it becomes active; edges switch with the next config poll)."""
    fields = body.model_dump(exclude={"module_base64"})
    return fns.deploy(principal, fields, body.module())


@functions.get("/functions")
def list_functions(
    fns: FunctionsDep, principal: Reader, limit: Limit = 50, offset: Offset = 0
) -> dict:
    """The active version of every function the caller can see."""
    return fns.list(principal, limit, offset)


@functions.get("/functions/{name}")
def get_function(name: NamePath, fns: FunctionsDep, principal: Reader) -> dict:
    """The active version and ``versions`` (newest first)."""
    return fns.get(principal, name)


@functions.post("/functions/{name}/rollback")
def rollback_function(
    name: NamePath, fns: FunctionsDep, principal: Writer, body: RollbackIn | None = None
) -> dict:
    """Make an earlier version active again (``{"version": N}``, default: the previous one)."""
    return fns.rollback(principal, name, body.version if body else None)


@functions.delete("/functions/{name}", status_code=204)
def delete_function(name: NamePath, fns: FunctionsDep, principal: Writer) -> Response:
    fns.delete(principal, name)
    return Response(status_code=204)


@functions.get("/functions/{name}/logs")
def function_logs(
    name: NamePath,
    fns: FunctionsDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """What edges reported: failed invocations, stderr, load errors (oldest first)."""
    return fns.logs(principal, name, limit)


@kv.get("/kv")
def list_namespaces(
    fns: FunctionsDep, principal: Reader, limit: Limit = 50, offset: Offset = 0
) -> dict:
    return fns.kv_namespaces(principal, limit, offset)


@kv.get("/kv/{namespace}")
def list_keys(
    namespace: NamePath,
    fns: FunctionsDep,
    principal: Reader,
    prefix: Annotated[str, Query(max_length=4 * MAX_KEY_BYTES)] = "",
    limit: Limit = 50,
    offset: Offset = 0,
) -> dict:
    return fns.kv_keys(principal, namespace, prefix, limit, offset)


@kv.put("/kv/{namespace}/{key:path}")
async def put_key(
    request: Request,
    namespace: NamePath,
    key: KeyPath,
    fns: FunctionsDep,
    principal: Writer,
    tenant: Annotated[
        str | None,
        Query(max_length=vconfig.MAX_NAME, description="Owner of a new namespace (admins)"),
    ] = None,
) -> dict:
    """Store the raw request body (at most 1 MiB) as the value; edges get it within seconds."""
    value = await _bounded_body(request, MAX_VALUE_BYTES)
    return await run_in_threadpool(fns.kv_put, principal, namespace, key, value, tenant)


@kv.get("/kv/{namespace}/{key:path}", response_model=None)
def get_key(namespace: NamePath, key: KeyPath, fns: FunctionsDep, principal: Reader) -> Response:
    value, seq = fns.kv_get(principal, namespace, key)
    return Response(value, media_type="application/octet-stream", headers={"ETag": _etag(seq)})


@kv.delete("/kv/{namespace}/{key:path}")
def delete_key(namespace: NamePath, key: KeyPath, fns: FunctionsDep, principal: Writer) -> dict:
    return fns.kv_delete(principal, namespace, key)


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the value is over {limit} bytes", "value")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the value is over {limit} bytes", "value")
        chunks.append(chunk)
    return b"".join(chunks)


@edge.post("/nodes/join")
def join(body: JoinIn, store: StoreDep, principal: Joiner) -> dict:
    """Register a node: ``{"node", "credential"}``; joining again replaces the credential."""
    if body.name == "self":
        raise ApiError(400, "'self' cannot be a node name", "name")
    return store.join_node(principal, body.name, body.url, body.admin_url, body.region)


@edge.post("/nodes/self/heartbeat")
def heartbeat(body: HeartbeatIn, store: StoreDep, principal: NodeCaller) -> dict:
    store.heartbeat(
        principal,
        health=body.health,
        load=body.load,
        config_version=body.config_version,
        purge_seq=body.purge_seq,
        whereabouts=body.model_dump(include={"url", "admin_url", "region"}, exclude_none=True),
    )
    return {}


def _wait(request: Request, wait: float) -> float:
    return min(wait, request.app.state.settings.max_wait)


@edge.get(
    "/nodes/self/config",
    response_model=None,
    responses={204: {"description": "No newer bundle within `wait` seconds"}},
)
async def node_config(
    request: Request,
    store: StoreDep,
    principal: NodeCaller,
    after: Annotated[int, _seq_query("The bundle version the node has")] = 0,
    wait: Annotated[float, _wait_query("Seconds to wait for a newer one")] = 0,
    digest: Annotated[
        str | None,
        Query(
            max_length=80,
            description="The digest of the bundle the node has: a bundle with other content "
            "is answered at once, whatever its version",
        ),
    ] = None,
) -> dict | Response:
    """The whole config bundle once its version is greater than ``after`` (or, when the node
    says which ``digest`` it has, once the content differs from it).

    ``ETag`` is the bundle's digest. 503 when this replica cannot build the bundle whole (a
    certificate key it cannot open): never a bundle with a part left out.
    """

    async def newer() -> dict | None:
        bundle = await run_in_threadpool(store.bundle)
        if digest:
            return bundle if bundle["digest"] != digest else None
        return bundle if bundle["version"] > after else None

    bundle = await request.app.state.watches["config"].wait(newer, _wait(request, wait))
    if bundle is None:
        return Response(status_code=204)
    return JSONResponse(bundle, headers={"ETag": f'"{bundle["digest"]}"'})


@edge.get("/nodes/self/purges")
async def node_purges(
    request: Request,
    store: StoreDep,
    principal: NodeCaller,
    after: Annotated[int, _seq_query("The last purge seq the node applied")] = 0,
    wait: Annotated[float, _wait_query("Seconds to wait for a newer one")] = 0,
) -> dict:
    """Purges with seq > ``after`` (``[]`` when none came within ``wait`` seconds).

    Asking for purges after N also acknowledges N: a node polls again as soon as it has
    applied a batch, so the acknowledgement costs no request of its own.
    """
    if after:
        await run_in_threadpool(store.ack_purges, principal, after)

    async def newer() -> list[dict] | None:
        return await run_in_threadpool(store.purges_after, after) or None

    jobs = await request.app.state.watches["purges"].wait(newer, _wait(request, wait))
    return {"purges": jobs or []}


@edge.post("/nodes/self/purges/ack")
def ack_purges(body: AckIn, store: StoreDep, principal: NodeCaller) -> dict:
    store.ack_purges(principal, body.seq)
    return {}


@edge.get("/nodes/self/modules/{sha256}", response_model=None)
def node_module(
    sha256: Annotated[str, Path(max_length=64)], fns: FunctionsDep, principal: NodeCaller
) -> Response:
    """A function's module by its sha256 (named ``sha256:<hex>`` in the bundle)."""
    return Response(fns.module(sha256), media_type="application/wasm")


@edge.get("/nodes/self/kv")
async def node_kv(
    request: Request,
    fns: FunctionsDep,
    principal: NodeCaller,
    after: Annotated[int, _seq_query("The last KV seq the node applied")] = 0,
    wait: Annotated[float, _wait_query("Seconds to wait for a newer one")] = 0,
) -> dict:
    """KV changes with seq > ``after``, oldest first (``[]`` when none came within ``wait``)."""

    async def newer() -> list[dict] | None:
        return await run_in_threadpool(fns.kv_changes, after) or None

    changes = await request.app.state.watches["kv"].wait(newer, _wait(request, wait))
    return {"changes": changes or []}


@edge.post("/nodes/self/kv")
def node_kv_writes(body: KvWritesIn, fns: FunctionsDep, principal: NodeCaller) -> dict:
    """Function KV writes from this node's outbox, applied like API writes (kv seq, audit):
    ``{"kv_seq", "applied", "refused", "duplicates", "results": [{"id", "seq"} | {"id",
    "duplicate": true} | {"id", "error", "field", "status"}]}``. Refused writes (no active
    function may write the namespace, bad key, value over 1 MiB) are answered one by one."""
    return fns.kv_node_writes(
        principal, body.outbox, [write.model_dump() for write in body.writes]
    )


@edge.post("/nodes/self/function-logs")
def node_function_logs(body: LogsIn, fns: FunctionsDep, principal: NodeCaller) -> dict:
    return fns.add_logs(principal, body.records)


@edge.post("/nodes/self/protection-events")
def node_protection_events(
    body: ProtectionEventsIn, events: EventsDep, principal: NodeCaller
) -> dict:
    """Requests this node refused: ``{"accepted", "skipped"}`` (skipped: unknown services)."""
    return events.add(principal, [event.model_dump() for event in body.events])


@edge.post("/nodes/self/stats")
def ingest_stats(
    body: StatsIn,
    store: StoreDep,
    counts: CountsDep,
    principal: NodeCaller,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    samples = [sample.model_dump() for sample in body.samples]
    result = store.ingest_stats(principal, samples, idempotency_key)
    if body.protection:
        result["protection"] = counts.add(
            principal, [count.model_dump() for count in body.protection], idempotency_key
        )
    return result


# ---------------------------------------------------------------------------------------------
# Errors, access log, the app
# ---------------------------------------------------------------------------------------------


def _error(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status, headers=headers)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field (``origins[0].url``), all problems under "errors"."""
    errors = list(exc.errors())
    if not errors:
        return _error(422, "invalid request")
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return _error(422, f"request body is not valid JSON: {reason}".rstrip(": "))
    if tuple(first["loc"]) == ("body",):
        if first["type"] == "missing":
            return _error(422, "a JSON request body is required")
        if first["type"] in ("model_attributes_type", "model_type", "dict_type"):
            return _error(422, "the request body must be a JSON object (application/json)")
    problems = [pydantic_error(error, _error_loc(error)) for error in errors]
    body: dict[str, Any] = {"error": problems[0].message}
    if problems[0].field:
        body["field"] = problems[0].field
    body["errors"] = [{"field": p.field, "error": p.message} for p in problems]
    return JSONResponse(body, 422)


def _error_loc(error: dict) -> tuple:
    """The error's location without FastAPI's "body"/"query" prefix, plus a conflict's "at"."""
    loc = tuple(error["loc"])
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    return (*loc, *(error.get("ctx") or {}).get("at", ()))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StoreError)
    async def store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.message, exc.field, headers)

    async def unless_unauthenticated(request: Request, answer: JSONResponse) -> JSONResponse:
        """FastAPI reads the body before it runs any dependency: a body it cannot parse must
        not tell a caller without a valid token more than the 401 it gets for a good one."""
        try:
            await run_in_threadpool(_check_token, request.app.state.store, _token_of(request))
        except ApiError as refused:
            return await api_error(request, refused)
        return answer

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _body_unparsed(exc):
            return await unless_unauthenticated(request, _validation_response(exc))
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        answer = _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILED:
            return await unless_unauthenticated(request, answer)
        return answer

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")


# The largest body any call needs: a function deployment (a 16 MiB module in base64, plus
# its fields); anything bigger is refused before it is read into memory.
MAX_REQUEST_BODY = 2 * MAX_MODULE_BYTES


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 — by its Content-Length
    before anything is read, or as soon as a chunked body passes the limit (the app then
    sees the client go away, and whatever it answers is dropped). FastAPI reads a JSON body
    whole, before authentication: without this anyone could fill the memory."""

    def __init__(self, app: Any, limit: int = MAX_REQUEST_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received, started, refused = 0, False, False

        async def counted() -> dict:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def noted(message: dict) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, noted)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"error": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class AccessLog:
    """ASGI middleware: one JSON line per request (method, path, status, duration)."""

    def __init__(self, app: Any, stream: TextIO) -> None:
        self.app, self.stream = app, stream

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client")
            line = {
                "t": round(time.time(), 3),
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "ms": round((time.perf_counter() - started) * 1000, 2),
                "client": client[0] if client else None,
            }
            self.stream.write(json.dumps(line) + "\n")
            self.stream.flush()


async def _prune_forever(store: Store, settings: Settings) -> None:
    """Delete stats older than the retention now and then every ``prune_interval``."""
    while True:
        try:
            removed = await run_in_threadpool(store.prune_stats, settings.stats_retention_days)
            removed += await run_in_threadpool(
                ProtectionCounts(store).prune, settings.stats_retention_days
            )
            if removed:
                log.info("pruned %d old stats rows", removed)
        except Exception as exc:
            log.warning("stats pruning failed: %s", exc)
        await asyncio.sleep(settings.prune_interval)


async def _monitor_forever(store: Store, settings: Settings) -> None:
    """The fleet's health monitor: check every edge's /healthz, store verdicts that change.

    The in-memory streaks live here; the stored verdict is what routers and the dashboard
    read, written only when it differs (also after a restart of the control plane).
    """
    monitor = HealthMonitor(interval=settings.monitor_interval, timeout=settings.monitor_timeout,
                            fails=settings.monitor_fails, passes=settings.monitor_passes)
    since: dict[str, float] = {}
    try:
        while True:
            started = time.monotonic()
            try:
                await _monitor_round(store, monitor, since)
            except Exception as exc:
                log.warning("health monitor round failed: %r", exc)
            await asyncio.sleep(max(0.0, settings.monitor_interval - (time.monotonic() - started)))
    finally:
        await monitor.close()


async def _monitor_round(store: Store, monitor: HealthMonitor, since: dict[str, float]) -> None:
    nodes = await run_in_threadpool(store.monitor_targets)
    monitor.set_targets({name: Target(name, admin_url.rstrip("/") + "/healthz", admin_url)
                         for name, admin_url, _ in nodes})
    await monitor.check_all()
    for name, _, stored in nodes:
        state = monitor.states.get(name)
        if state is None:
            continue
        verdict = "up" if state.up else "down"
        if stored.get("state") != verdict:
            since[name] = time.time()
            await run_in_threadpool(store.record_monitor, name, {
                "state": verdict, "since": since[name], "error": state.error})


def create_app(store: Store, settings: Settings | None = None) -> FastAPI:
    """The control-plane API over ``store`` (already migrated)."""
    settings = settings or Settings()
    function_store = FunctionStore(store)
    def hears_others() -> bool:
        return store.hears_others

    watches = {
        "config": VersionWatch(store.config_version, settings.poll_interval, hears_others),
        "purges": VersionWatch(store.purge_seq, settings.poll_interval, hears_others),
        "acks": VersionWatch(store.ack_count, settings.poll_interval, hears_others),
        "kv": VersionWatch(function_store.kv_seq, settings.poll_interval, hears_others),
    }
    store.subscribe(lambda topic: watches[topic].notify())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pruner = asyncio.create_task(_prune_forever(store, settings))
        monitor = (asyncio.create_task(_monitor_forever(store, settings))
                   if settings.monitor_interval > 0 else None)
        try:
            yield
        finally:
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            for watch in watches.values():
                watch.close()
            pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruner

    app = FastAPI(
        title="Verge control plane",
        version="1",
        lifespan=lifespan,
        description="Tenants, services, purges and the edge fleet. See CONTROL_API.md.",
    )
    app.state.store, app.state.settings, app.state.watches = store, settings, watches
    app.state.functions = function_store
    app.state.protection_events = ProtectionEvents(store)
    app.state.protection_counts = ProtectionCounts(store)
    routers = (health, tenants, tokens, services, certificates, purges, functions, kv)
    for router in (*routers, fleet, reports, edge):
        app.include_router(router)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit)
    if settings.access_log is not None:
        app.add_middleware(AccessLog, stream=settings.access_log)
    return app


def release_waiters(app: FastAPI) -> None:
    """Answer every waiting long poll now (call before shutting the server down)."""
    for watch in app.state.watches.values():
        watch.close()


__all__ = ["API", "ApiError", "Settings", "VersionWatch", "create_app", "release_waiters"]
