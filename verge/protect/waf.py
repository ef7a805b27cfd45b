"""The web application firewall: the OWASP Core Rule Set, evaluated by libmodsecurity.

Why a real engine: the CRS (Debian's ``modsecurity-crs``, 3.3.4 on bookworm) is ~720
SecLanguage rules with transformations, libinjection and anomaly scoring; rewriting it would
be a different, weaker WAF. libmodsecurity 3.0.15 comes with the ``libmodsecurity`` wheel
and is driven through its C API (verge.protect._modsec explains why not through the wheel's
own bindings: they keep the GIL). ``scripts/waf-deps.sh`` installs both.

What it costs, and so where it runs: a benign browser GET takes 0.6–0.7 ms of CPU at
paranoia 1 (0.9 at 4), five to six times a whole cache hit, and every byte of arguments
~1.4 µs more (~3.5 µs at paranoia 4; bench/waf_bench.py). The edge therefore asks
:meth:`Waf.applies` first: by default (``on: [dynamic, misses]``) only requests that reach
the origin and requests with a query string or a body are inspected, never plain hits.
Call it after the cache lookup, before serving a hit that carries arguments or fetching
from the origin; ``on: [all]`` inspects every request::

    if waf.applies(request, cache_hit=hit, has_body=has_body):
        verdict = await waf.inspect(request, body_prefix)  # max_body_bytes + 1 bytes suffice
        if verdict.blocked: ...answer verdict.status, no-store; log verdict.rule_ids

How a request is inspected: :meth:`Waf.inspect` prepares the bytes on the event loop (within
the inspection limits: URL, header and body sizes), then runs the engine in a bounded thread
pool; ctypes releases the GIL, so the loop keeps serving hits meanwhile. The request waits at
most ``budget_ms`` (queueing included). The engine cannot be interrupted: a transaction past
its budget finishes in its thread and its verdict is dropped; the request is served or
refused as ``fail`` says. The pool's queue is bounded too: when it is full the request is
failed open or closed at once (a flood of costly requests occupies ``threads`` cores at most).

Engine set-up: the rule engine is always On; detect mode is applied here (the verdict is
counted and returned, the request is served), so both modes evaluate identically. Bodies
use the JSON and XML processors and ModSecurity's recommended body-error rules (200000–
200007), except that a body truncated at the inspection limit may fail to parse. Per-path
exclusions become phase-1 rules that ``ctl:ruleRemoveById`` for matching paths (ids from
90000, the local range). REQUEST-910-IP-REPUTATION.conf is not loaded: it needs GeoIP, which
the bundled library is built without (the edge's deny lists cover countries).

Counters (:class:`WafCounters`, plain ints and one dict) are updated on the event loop; the
edge exposes them on /metrics and logs :attr:`WafResult.rule_ids` per request.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from verge.http.message import Request
from verge.protect._modsec import Engine, EngineError, Verdict
from verge.protect.waf_settings import WafExclusion, WafSettings

__all__ = [
    "CRS_DIR",
    "InspectLimits",
    "Waf",
    "WafCounters",
    "WafResult",
    "WafUnavailable",
    "crs_files",
    "crs_version",
    "engine_config",
    "exclusion_rules",
    "load_engine",
    "prepare",
    "rule_messages",
    "wants_inspection",
]

CRS_DIR = Path("/usr/share/modsecurity-crs/rules")
"""Where Debian's modsecurity-crs puts the rules (scripts/waf-deps.sh installs it)."""
SKIPPED_FILES = {"REQUEST-910-IP-REPUTATION.conf": "needs GeoIP (not built into the library)"}
EXCLUSION_FIRST_ID = 90_000
FAIL_CLOSED_STATUS = 503
OVERSIZE_STATUS = {"url": 414, "headers": 431, "body": 413}
ALLOWED_HTTP_VERSIONS = "HTTP/1.0 HTTP/1.1 HTTP/2 HTTP/2.0 HTTP/3 HTTP/3.0"
SAFE_METHODS = frozenset({"GET", "HEAD"})

KiB = 1024


class WafUnavailable(RuntimeError):
    """The engine or the rule set is not installed (run scripts/waf-deps.sh)."""


class EngineLike(Protocol):
    def evaluate(self, **request: object) -> Verdict: ...


@dataclass(frozen=True, slots=True)
class InspectLimits:
    """The most of one request given to the engine (its cost grows with every byte)."""

    url_bytes: int = 8 * KiB
    """The request-target: ~1.4 µs of CPU per byte of query string at paranoia 1, ~3.5 µs at
    4 (the edge's default max_url_bytes is 8 KiB too)."""
    header_bytes: int = 16 * KiB
    """Names and values of all header fields together (~0.5 µs a byte; the edge's default
    max_header_bytes)."""
    headers: int = 100
    """Header fields."""


@dataclass(slots=True)
class WafResult:
    """The verdict on one request."""

    blocked: bool
    """The edge must answer ``status`` (with no body from the origin) instead of serving."""
    status: int
    """403 (rules), 413/414/431 (oversize: block), 503 (fail closed); 200 when passing."""
    rule_ids: list[int]
    """The rules that matched, in order (949110 is CRS's anomaly-score verdict)."""
    messages: list[str]
    """Each matched rule's message (its ``msg``, from the rule files, not from the request)."""
    elapsed: float
    """Seconds from inspect() to the verdict, waiting for a thread included."""
    reason: str = ""
    """"" clean; "rules" flagged (refused in block mode, served in detect mode); "timeout",
    "overload" (the pool's queue was full), "error" (the engine failed): handled as `fail`
    says; "oversize": over the inspection limits with oversize: block."""


@dataclass(slots=True)
class WafCounters:
    """Totals since start, for /metrics; updated on the event loop only."""

    inspected: int = 0
    blocked: int = 0
    """Requests refused, whatever the reason."""
    detected: int = 0
    """Requests the rules flagged, in either mode."""
    timeouts: int = 0
    overloads: int = 0
    errors: int = 0
    oversize: int = 0
    by_rule: dict[int, int] = field(default_factory=dict)
    """Rule id -> requests it matched (bounded by the rule set's size)."""


def wants_inspection(
    on: Collection[str], *, method: str, query: str, has_body: bool, cache_hit: bool
) -> bool:
    """Whether a request is inspected under ``on`` (see WafSettings.on)."""
    if "all" in on:
        return True
    if "misses" in on and not cache_hit:
        return True
    return "dynamic" in on and bool(query or has_body or method not in SAFE_METHODS)


# ---- rules -----------------------------------------------------------------------------------


def crs_files(crs_dir: Path = CRS_DIR) -> list[Path]:
    """The CRS request-phase rule files, in load order (response rules are never run)."""
    files = sorted(p for p in crs_dir.glob("REQUEST-*.conf") if p.name not in SKIPPED_FILES)
    if not files:
        raise WafUnavailable(f"no OWASP CRS rules in {crs_dir}: run scripts/waf-deps.sh")
    return files


def crs_version(files: Sequence[Path]) -> tuple[int, int, int]:
    """(3, 3, 4) from the rules' ver:'OWASP_CRS/3.3.4' action."""
    for path in files:
        match = re.search(r"OWASP_CRS/(\d+)\.(\d+)\.(\d+)", path.read_text(errors="replace"))
        if match:
            major, minor, patch = (int(part) for part in match.groups())
            return major, minor, patch
    raise WafUnavailable("cannot tell the CRS version from its rule files")


def engine_config(settings: WafSettings, version: tuple[int, int, int]) -> str:
    """The directives before the CRS: engine limits, body rules, the CRS's setup variables."""
    level = settings.paranoia
    body_limit = settings.max_body_bytes
    body = (
        f"SecRequestBodyAccess On\nSecRequestBodyLimit {body_limit}\n"
        f"SecRequestBodyNoFilesLimit {body_limit}\nSecRequestBodyLimitAction ProcessPartial\n"
        if body_limit
        else "SecRequestBodyAccess Off\n"
    )
    setup_version = version[0] * 100 + version[1] * 10 + min(version[2], 9)
    return (
        "SecRuleEngine On\n"
        f"{body}"
        "SecRequestBodyJsonDepthLimit 512\n"
        "SecArgumentsLimit 1000\n"
        "SecPcreMatchLimit 1000\n"
        "SecPcreMatchLimitRecursion 1000\n"
        "SecResponseBodyAccess Off\n"
        "SecAuditEngine Off\n"
        'SecDefaultAction "phase:1,log,auditlog,pass"\n'
        'SecDefaultAction "phase:2,log,auditlog,pass"\n'
        f"{_BODY_RULES}"
        f'SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={level},'
        f'setvar:tx.blocking_paranoia_level={level}"\n'
        'SecAction "id:900230,phase:1,nolog,pass,t:none,'
        f"setvar:'tx.allowed_http_versions={ALLOWED_HTTP_VERSIONS}'\"\n"
        f'SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version={setup_version}"\n'
    )


# ModSecurity's recommended request-body rules (modsecurity.conf-recommended), except that the
# parse-error rules spare a body truncated at the inspection limit (INBOUND_DATA_ERROR).
_BODY_RULES = r"""SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\+|/)|text/)xml" "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "^application/json" "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule &ARGS "@ge 1000" "id:200007,phase:2,t:none,log,deny,status:400,msg:'Failed to fully parse request body due to large argument count'"
SecRule REQBODY_ERROR "!@eq 0" "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body',chain"
  SecRule INBOUND_DATA_ERROR "@eq 0" "t:none"
SecRule MULTIPART_STRICT_ERROR "!@eq 0" "id:200003,phase:2,t:none,log,deny,status:400,msg:'Multipart request body failed strict validation',chain"
  SecRule INBOUND_DATA_ERROR "@eq 0" "t:none"
SecRule MULTIPART_UNMATCHED_BOUNDARY "@eq 1" "id:200004,phase:2,t:none,log,deny,msg:'Multipart parser detected a possible unmatched boundary',chain"
  SecRule INBOUND_DATA_ERROR "@eq 0" "t:none"
SecRule TX:/^MSC_/ "!@streq 0" "id:200005,phase:2,t:none,log,deny,msg:'ModSecurity internal error flagged'"
"""


def exclusion_rules(exclusions: Sequence[WafExclusion]) -> str:
    """One phase-1 rule per exclusion: for a matching path, remove those rules."""
    lines = []
    for offset, exclusion in enumerate(exclusions):
        removals = ",".join(f"ctl:ruleRemoveById={rule}" for rule in exclusion.rules)
        lines.append(
            f'SecRule REQUEST_FILENAME "{_path_operator(exclusion.path)}" '
            f'"id:{EXCLUSION_FIRST_ID + offset},phase:1,pass,nolog,t:none,t:normalizePath,'
            f'{removals}"\n'
        )
    return "".join(lines)


def _path_operator(path: str) -> str:
    """@beginsWith for a prefix, @rx for a glob (the same matching as service rules)."""
    if "*" not in path:
        return f"@beginsWith {path}"
    literals = re.split(r"\*+", path)
    first, *middle, last = literals  # atomic groups: linear time, as verge.config's globs
    committed = "".join(f"(?>.*?{re.escape(part)})" for part in middle)
    return f"@rx ^{re.escape(first)}{committed}.*{re.escape(last)}$"


_RULE_MESSAGE_RE = re.compile(r"\bid:(\d+)(.*?)(?=\bid:\d|\Z)", re.S)
_MSG_RE = re.compile(r"msg:'((?:[^'\\]|\\.)*)'")
_MACRO_RE = re.compile(r"%\{[^}]*\}")


def rule_messages(texts: Sequence[str]) -> dict[int, str]:
    """Rule id -> its msg, read from rule texts (macros like %{tx.anomaly_score} as '…')."""
    messages: dict[int, str] = {}
    for text in texts:
        for rule_id, rest in _RULE_MESSAGE_RE.findall(text):
            found = _MSG_RE.search(rest)
            if found:
                message = found.group(1).replace("\\'", "'")
                messages[int(rule_id)] = _MACRO_RE.sub("…", message)
    return messages


def load_engine(
    settings: WafSettings, crs_dir: Path = CRS_DIR, library: str | None = None
) -> tuple[Engine, dict[int, str]]:
    """A libmodsecurity engine with the CRS as ``settings`` configure it, and its messages."""
    files = crs_files(crs_dir)
    try:
        engine = Engine(library)
    except EngineError as error:
        raise WafUnavailable(f"{error} (run scripts/waf-deps.sh)") from error
    setup = engine_config(settings, crs_version(files)) + exclusion_rules(settings.exclude)
    engine.add_rules(setup)
    for path in files:
        engine.add_file(path)
    return engine, rule_messages([setup, *(path.read_text(errors="replace") for path in files)])


# ---- requests --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Prepared:
    request: dict[str, object]
    oversize: str = ""
    """"url", "headers" or "body" when a part was over its limit (and was truncated)."""


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def prepare(
    request: Request, body: bytes | None, max_body: int, limits: InspectLimits
) -> _Prepared:
    """The engine's input for one request, within the limits (cheap: runs on the loop)."""
    oversize = ""
    uri = _encode(request.target).replace(b"\0", b"%00")
    if len(uri) > limits.url_bytes:
        uri, oversize = uri[: limits.url_bytes], "url"
    headers, complete = _bounded_headers(request.headers, limits)
    if not complete:
        oversize = oversize or "headers"
    if body and max_body and len(body) > max_body:
        body, oversize = body[: max_body + 1], oversize or "body"  # the engine keeps max_body
    fields = {
        "method": _encode(request.method),
        "uri": uri,
        "version": _encode(request.version),
        "headers": headers,
        "body": body if max_body else None,
        "client": _encode(request.client or "0.0.0.0"),
        "server_port": 443 if request.scheme == "https" else 80,
    }
    return _Prepared(fields, oversize)


def _bounded_headers(
    headers: Sequence[tuple[str, str]], limits: InspectLimits
) -> tuple[list[tuple[bytes, bytes]], bool]:
    out: list[tuple[bytes, bytes]] = []
    size = 0
    for name, value in headers:
        pair = (_encode(name), _encode(value))
        size += len(pair[0]) + len(pair[1])
        if len(out) >= limits.headers or size > limits.header_bytes:
            return out, False
        out.append(pair)
    return out, True


# ---- the firewall ----------------------------------------------------------------------------


class Waf:
    """One service's firewall: ``await waf.inspect(request, body)`` -> :class:`WafResult`.

    ``threads`` sizes the worker pool (or pass a shared ``executor``, which close() leaves
    running); at most ``queue`` inspections wait or run at once (default 16 per thread).
    ``engine`` replaces the CRS engine (tests use a double). Loading the CRS takes ~0.3 s.
    """

    def __init__(
        self,
        settings: WafSettings,
        *,
        crs_dir: Path = CRS_DIR,
        library: str | None = None,
        threads: int = 2,
        queue: int | None = None,
        executor: Executor | None = None,
        engine: EngineLike | None = None,
        limits: InspectLimits = InspectLimits(),
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.counters = WafCounters()
        self.messages: dict[int, str] = {}
        if engine is None:
            engine, self.messages = load_engine(settings, crs_dir, library)
        self.engine = engine
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(threads, thread_name_prefix="verge-waf")
        self._slots = threading.BoundedSemaphore(queue or 16 * threads)
        self._budget = settings.budget_ms / 1000
        self._on = frozenset(settings.on)

    def applies(self, request: Request, *, cache_hit: bool, has_body: bool) -> bool:
        """Whether this request is to be inspected (``on``); plain hits are not by default."""
        return wants_inspection(
            self._on,
            method=request.method,
            query=request.query,
            has_body=has_body,
            cache_hit=cache_hit,
        )

    async def inspect(self, request: Request, body: bytes | None = None) -> WafResult:
        """The verdict on one request, within the time budget; never raises for bad input."""
        start = time.perf_counter()
        self.counters.inspected += 1
        prepared = prepare(request, body, self.settings.max_body_bytes, self.limits)
        if prepared.oversize:
            self.counters.oversize += 1
            if self.settings.oversize == "block" and self.settings.blocking:
                self.counters.blocked += 1
                status = OVERSIZE_STATUS[prepared.oversize]
                return WafResult(True, status, [], [], time.perf_counter() - start, "oversize")
        if not self._slots.acquire(blocking=False):
            self.counters.overloads += 1
            return self._failed("overload", start)
        try:
            future = self._executor.submit(self._evaluate, prepared.request)
        except RuntimeError:  # the pool is shut down
            self._slots.release()
            self.counters.errors += 1
            return self._failed("error", start)
        future.add_done_callback(self._release)
        try:
            verdict = await asyncio.wait_for(asyncio.wrap_future(future), self._budget)
        except TimeoutError:
            self.counters.timeouts += 1
            return self._failed("timeout", start)
        except Exception:  # the engine failed on this input: treated like a timeout
            self.counters.errors += 1
            return self._failed("error", start)
        return self._decided(verdict, start)

    def _evaluate(self, request: dict[str, object]) -> Verdict:
        return self.engine.evaluate(**request)

    def _release(self, _future: object) -> None:
        self._slots.release()

    def _failed(self, reason: str, start: float) -> WafResult:
        closed = self.settings.fail == "closed" and self.settings.blocking
        if closed:
            self.counters.blocked += 1
        status = FAIL_CLOSED_STATUS if closed else 200
        return WafResult(closed, status, [], [], time.perf_counter() - start, reason)

    def _decided(self, verdict: Verdict, start: float) -> WafResult:
        counters = self.counters
        for rule_id in verdict.rule_ids:
            counters.by_rule[rule_id] = counters.by_rule.get(rule_id, 0) + 1
        blocked = verdict.disruptive and self.settings.blocking
        if verdict.disruptive:
            counters.detected += 1
        if blocked:
            counters.blocked += 1
        messages = [self.messages.get(rule_id, "") for rule_id in verdict.rule_ids]
        return WafResult(
            blocked,
            verdict.status if blocked else 200,
            list(verdict.rule_ids),
            messages,
            time.perf_counter() - start,
            "rules" if verdict.disruptive else "",
        )

    def close(self) -> None:
        """Stop the pool (waiting for running inspections) and free the engine."""
        if not self._owns_executor:
            return
        self._executor.shutdown(wait=True, cancel_futures=True)
        close: Callable[[], None] | None = getattr(self.engine, "close", None)
        if close is not None:
            close()
