"""The compute phase: edge functions (WebAssembly, WAGI ABI) in the request pipeline.

After the route phase, a function whose routes match the path gets the request first
(compare Cloudflare Workers and Fermyon Spin). It may answer (the response goes to the client
as is), or pass — optionally rewriting the path and headers — and the request carries on
through the cache to the origin. A function that breaks its limits (CPU, memory, response
size, sub-requests) or crashes gets the client a clear 5xx; it is logged with the request id
and its stderr, and counted. Nothing it does can reach the node: see :mod:`verge.compute`.

Invocations run on a small thread pool: a function may use its whole CPU budget, and
``fetch`` sub-requests are synchronous HTTP calls made from that thread. A function that
cannot touch the world (no ``fetch``, no KV writes) is first tried right on the event loop
with a CPU budget of ``INLINE_CPU_MS``: most answer well within it, and skip the hand-over
to a thread and back (and the GIL hand-over that comes with it), which is most of what a
small function costs. One that outruns the budget has had no effect anywhere, so it is run
again on the pool with its full budget, and for ``INLINE_BACKOFF_S`` it goes straight there
(unless a pool run shows it was a one-off, such as a cold first run): the loop is never held
for more than a few milliseconds.

The edge KV (:class:`EdgeKV`) is the control plane's KV replicated to this node: the agent
writes changes to ``CACHE_DIR/control/kv.db`` (SQLite WAL, with the last sequence number) and
tells the workers, which read the new rows into an in-memory dict: a function's read is one
dict lookup, and a node restarted without the control plane starts from the file.

Each worker keeps the last ``LOGS_KEPT`` log records (failures, stderr, load errors) that the
agent collects and ships to the control plane (``verge fn logs``).

A function that cannot run fails closed. When its module does not load (not a valid module,
a memory limit over the runtime's cap, a module artefact that is missing) and no running
version can stand in for it, it is deployed all the same as an *unavailable* stand-in that
claims its routes and answers every request with 503 and Retry-After: a route a function
guards never reaches the origin unguarded. The load error is in the worker's log, in
``verge fn logs``, in the function's stats (``load_error``, ``refused``; the admin's
``/stats``) and counted as an error in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sqlite3
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from verge.compute.host import Capabilities, FetchRequest, FetchResponse, HostServices
from verge.compute.wagi import Answer, CgiRequest
from verge.http.response import write_body

log = logging.getLogger("verge.compute")

MiB = 1024 * 1024
FUNCTION_THREADS = 2
INLINE_CPU_MS = 5.0  # a first, speculative run on the event loop (epoch ticks: 6-8 ms at most)
INLINE_BACKOFF_S = 10.0  # a function that outran it goes to the pool this long
FUNCTION_BODY_LIMIT = 8 * MiB  # a request body a function reads on stdin (larger: 413)
LOGS_KEPT = 200  # log records a worker holds until the agent collects them
MODULE_PREFIX = "sha256:"  # a module the agent fetches from the control plane
KV_FILE = "kv.db"  # under CACHE_DIR/control
UNAVAILABLE_RETRY_AFTER_S = 30  # a function that failed to load: until a redeploy, likely


class EdgeKV:
    """The node's replica of the control plane's KV: SQLite on disk, a dict in memory.

    The agent (``writer=True``) applies changes from the control plane with :meth:`apply`,
    in one transaction with the new last sequence number. Workers read the same file:
    :meth:`refresh` loads rows newer than what they hold. Function reads (:meth:`get`) touch
    only the dict. A function's own writes (``kv_write``) stay in its worker's memory until
    the control plane writes the same key: the control plane is the source of truth.
    """

    def __init__(self, path: str | Path, writer: bool = False) -> None:
        self.path = Path(path)
        self.writer = writer
        self.seq = 0
        self.data: dict[tuple[str, bytes], bytes] = {}
        self._db: sqlite3.Connection | None = None
        self.refresh()

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None and (self.writer or self.path.exists()):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            if self.writer:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE IF NOT EXISTS kv (namespace TEXT NOT NULL, key BLOB "
                           "NOT NULL, value BLOB, seq INTEGER NOT NULL, "
                           "PRIMARY KEY (namespace, key))")
                db.execute("CREATE INDEX IF NOT EXISTS kv_by_seq ON kv (seq)")
            self._db = db
        return self._db

    # ----- what functions see (KVStore protocol) ----------------------------------------
    def get(self, namespace: str, key: bytes) -> bytes | None:
        return self.data.get((namespace, key))

    def put(self, namespace: str, key: bytes, value: bytes) -> None:
        self.data[(namespace, key)] = value

    # ----- replication ------------------------------------------------------------------------
    def refresh(self) -> int:
        """Load rows with a newer seq than this replica holds (workers); the new seq."""
        db = self._connect()
        if db is None:
            return self.seq
        try:
            if self.writer:  # the agent keeps no copy in memory, only the position
                self.seq = db.execute("SELECT coalesce(max(seq), 0) FROM kv").fetchone()[0]
                return self.seq
            rows = db.execute("SELECT namespace, key, value, seq FROM kv WHERE seq > ? "
                              "ORDER BY seq", (self.seq,)).fetchall()
        except sqlite3.OperationalError as exc:  # no table yet: the agent has not written
            log.debug("edge KV not readable yet: %s", exc)
            return self.seq
        for namespace, key, value, seq in rows:
            self._set(namespace, bytes(key), None if value is None else bytes(value))
            self.seq = max(self.seq, seq)
        return self.seq

    def apply(self, changes: list[dict]) -> int:
        """Persist control-plane changes (``{"seq","namespace","key","value": base64|null}``)
        in one transaction (agent); returns the new last seq. Workers then :meth:`refresh`."""
        db = self._connect()
        assert db is not None and self.writer
        fresh = [c for c in changes if int(c["seq"]) > self.seq]
        if not fresh:
            return self.seq
        rows = [(c["namespace"], c["key"].encode(),
                 None if c["value"] is None else base64.b64decode(c["value"]), int(c["seq"]))
                for c in fresh]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO kv VALUES (?, ?, ?, ?) ON CONFLICT (namespace, key) "
                           "DO UPDATE SET value = excluded.value, seq = excluded.seq", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.seq = max(seq for *_, seq in rows)
        return self.seq

    def _set(self, namespace: str, key: bytes, value: bytes | None) -> None:
        if value is None:  # a deletion (tombstone)
            self.data.pop((namespace, key), None)
        else:
            self.data[(namespace, key)] = value

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


@dataclass
class FunctionStats:
    invocations: int = 0
    errors: int = 0
    cpu_ms: float = 0.0
    peak_memory: int = 0
    refused: int = 0  # requests answered 503 because the function could not be loaded
    load_error: str | None = None


@dataclass
class Deployed:
    spec: object  # verge.config.EdgeFunction
    function: object | None  # verge.compute.runtime.Function; None: it failed to load
    stats: FunctionStats = field(default_factory=FunctionStats)
    pool_until: float = 0.0  # monotonic time until which it skips the inline attempt

    @property
    def available(self) -> bool:
        return self.function is not None


@dataclass(slots=True)
class Refusal:
    """What :meth:`EdgeCompute.invoke` returns for a function that failed to load: an answer
    (503, Retry-After) the pipeline sends like any function's, so the request stops here."""

    function: str
    error: str
    result: Answer
    outcome: str = "unavailable"
    ok: bool = False
    error_status: int = 503
    cpu_ms: float = 0.0
    peak_memory: int = 0
    stderr: bytes = b""


def unavailable(spec, error: str) -> Deployed:
    """The stand-in for a function that failed to load: it claims the function's routes
    and refuses their requests. It runs in the request phase whatever the function's phase
    is: a response-phase function would otherwise see the request reach the origin first."""
    claim = spec.model_copy(update={"phase": "request"})
    return Deployed(claim, None, FunctionStats(load_error=error))


class EdgeCompute:
    """One per worker: the runtime, the deployed functions by service, the local KV."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir) / "functions"
        self.runtime = None  # created on the first deployment: wasmtime only when used
        self.by_service: dict[str, list[Deployed]] = {}
        self.kv = EdgeKV(Path(cache_dir) / "control" / KV_FILE)
        self.logs: deque[dict] = deque(maxlen=LOGS_KEPT)
        self._pool: ThreadPoolExecutor | None = None
        self._http: httpx.Client | None = None

    # ----- deployment ----------------------------------------------------------------------
    def apply(self, specs) -> None:
        """Load the config's functions (compiling only what is new) and switch to them in one
        assignment. A function that fails to load keeps its running version if that one
        claims the same requests (same service, routes and phase), else it is deployed as
        unavailable (see the module docstring); either way the error is logged and kept for
        `verge fn logs`."""
        running = {d.spec.name: d for ds in self.by_service.values() for d in ds
                   if d.available}
        by_service: dict[str, list[Deployed]] = {}
        for spec in specs:
            try:
                deployed = Deployed(spec, self._load(spec))
            except Exception as exc:  # whatever breaks a load, the routes stay claimed
                deployed = self._failed(spec, exc, running.get(spec.name))
            by_service.setdefault(deployed.spec.service, []).append(deployed)
        self.by_service = by_service

    def _failed(self, spec, exc: Exception, running: Deployed | None) -> Deployed:
        """What serves a function whose load failed: its running version, else a refusal."""
        if running is not None and not _same_claim(running.spec, spec):
            running = None
        if running is not None:
            outcome = "; the running version stays"
        else:
            outcome = "; its routes answer 503 until it loads"
        error = f"{exc}" or type(exc).__name__
        log.error("edge function %s not deployed: %s%s", spec.name, error, outcome)
        self.logs.append({"function": spec.name, "t": time.time(),
                          "outcome": "load_error", "error": error + outcome})
        return running if running is not None else unavailable(spec, error)

    def _load(self, spec):
        from verge.compute.runtime import Limits, Runtime

        if self.runtime is None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.runtime = Runtime(self.cache_dir)
        if spec.module.startswith(MODULE_PREFIX):  # the node supervisor resolves these
            raise ValueError(f"module {spec.module} was not fetched from the control plane")
        module = Path(spec.module)
        source = module.read_text() if module.suffix == ".wat" else module.read_bytes()
        caps = Capabilities.of(env=spec.env, fetch_hosts=spec.fetch_hosts,
                               kv_namespace=spec.kv_namespace, kv_write=spec.kv_write)
        limits = Limits(cpu_ms=spec.cpu_ms, memory_bytes=spec.memory_mb * MiB,
                        max_subrequests=spec.max_subrequests)
        return self.runtime.load(source, name=spec.name, caps=caps, limits=limits)

    def match(self, service: str, path: str) -> Deployed | None:
        for deployed in self.by_service.get(service, ()):
            if deployed.spec.matches(path):
                return deployed
        return None

    # ----- invocation ------------------------------------------------------------------------
    async def invoke(self, deployed: Deployed, request, body: bytes, request_id: str,
                     response: tuple[int, list, bytes] | None = None):
        """Run the function for one request (inline if it may, else on the pool); returns the
        runtime's Invocation (a :class:`Refusal` for a function that failed to load). With
        `response` (status, headers, body) it runs in response-editing mode."""
        if not deployed.available:
            return self._refuse(deployed)
        cgi = CgiRequest(method=request.method, target=request.target,
                         headers=list(request.headers), body=body, scheme=request.scheme,
                         host=request.hmap.get("host", ""), remote_addr=request.client,
                         route=next(iter(deployed.spec.routes)))
        invocation = self._invoke_inline(deployed, cgi, request_id, response)
        if invocation is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FUNCTION_THREADS, thread_name_prefix="verge-fn")
            services = HostServices(kv=self.kv, fetch=self._fetch)
            invocation = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: self.runtime.invoke(deployed.function, cgi,
                                                        services=services,
                                                        request_id=request_id,
                                                        response=response))
            if invocation.cpu_ms < INLINE_CPU_MS / 2:  # it was a one-off (a cold first run)
                deployed.pool_until = 0.0
        self._count(deployed, invocation)
        return invocation

    def _invoke_inline(self, deployed: Deployed, cgi: CgiRequest, request_id: str, response):
        """The speculative run on the event loop (see the module docstring), or None when
        the function must run, or run again, on the pool."""
        fn = deployed.function
        if fn.caps.fetch_hosts or fn.caps.kv_write or fn.limits.cpu_ms <= INLINE_CPU_MS \
                or time.monotonic() < deployed.pool_until:
            return None
        for _ in range(2):
            invocation = self.runtime.invoke(fn, cgi, services=HostServices(kv=self.kv),
                                             request_id=request_id, response=response,
                                             cpu_ms=INLINE_CPU_MS)
            if invocation.outcome != "timeout":  # (Outcome.TIMEOUT: wasmtime loads lazily)
                return invocation
            deployed.stats.cpu_ms += invocation.cpu_ms  # spent all the same
            if invocation.cpu_ms >= INLINE_CPU_MS:  # it really needs more: the pool, a while
                deployed.pool_until = time.monotonic() + INLINE_BACKOFF_S
                return None
            # else the epoch ticker caught up on ticks it owed (it had waited for the GIL)
            # just as the run started: the deadline came early; once more, then the pool —
            # for a while too: twice cut short is a busy machine or a heavy function, and
            # either way the loop should not pay for a third try
        deployed.pool_until = time.monotonic() + INLINE_BACKOFF_S
        return None

    def _refuse(self, deployed: Deployed) -> Refusal:
        """The answer of a function that failed to load (the error stays on the node)."""
        name = deployed.spec.name
        stats = deployed.stats
        stats.refused += 1
        stats.errors += 1
        body = (f"edge function {name} is unavailable on this edge (it failed to load); "
                f"the request was not forwarded\n").encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Retry-After", str(UNAVAILABLE_RETRY_AFTER_S)),
                   ("Cache-Control", "no-store")]
        return Refusal(name, f"not loaded: {stats.load_error}", Answer(503, headers, body))

    def _count(self, deployed: Deployed, invocation) -> None:
        stats = deployed.stats
        stats.invocations += 1
        stats.cpu_ms += invocation.cpu_ms or 0.0
        stats.peak_memory = max(stats.peak_memory, invocation.peak_memory or 0)
        if not invocation.ok:
            stats.errors += 1
            record = self._remember(deployed, invocation)
            log.warning("edge function %s failed: %s", deployed.spec.name, record)
        elif invocation.stderr:
            record = self._remember(deployed, invocation)
            log.info("edge function %s stderr: %s", deployed.spec.name, record)

    def _remember(self, deployed: Deployed, invocation) -> dict:
        """Keep a failure's or stderr's log record for the control plane (verge fn logs)."""
        record = invocation.log_record()
        record["t"] = time.time()
        record["module_sha256"] = getattr(deployed.function, "digest", None)
        self.logs.append(record)
        return record

    def take_logs(self) -> list[dict]:
        """The log records kept since the last call (the agent ships them)."""
        taken = list(self.logs)
        self.logs.clear()
        return taken

    def _fetch(self, request: FetchRequest) -> FetchResponse:
        """A function's sub-request (already checked against its allow-list by the runtime)."""
        if self._http is None:
            self._http = httpx.Client(trust_env=False, follow_redirects=False)
        response = self._http.request(request.method, request.url, headers=request.headers,
                                      content=request.body or None, timeout=request.timeout)
        return FetchResponse(response.status_code, list(response.headers.multi_items()),
                             response.content)

    def stats(self) -> dict[str, dict]:
        return {d.spec.name: vars(d.stats) for ds in self.by_service.values() for d in ds}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.close()
        if self.runtime is not None:
            self.runtime.close()
        self.kv.close()


def _same_claim(old_spec, new_spec) -> bool:
    """Whether two versions of a function see the same requests."""
    return (old_spec.service, old_spec.routes, old_spec.phase) == \
        (new_spec.service, new_spec.routes, new_spec.phase)


class ResponseTooLarge(Exception):
    """The response is bigger than a response-phase function may see."""


class CapturedResponse:
    """Stands in for the client's ResponseWriter while a response-phase function is pending:
    the pipeline (cache hit, fill, pass-through) writes its response here, whole, and the
    function then sees it. Bounded: past `limit` body bytes the capture gives up."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.started = False
        self.keep_alive = True
        self.bytes_sent = 0

    def start(self, status: int, headers, *, content_length: int | None = None,
              reason: str | None = None) -> None:
        self.status, self.headers, self.started = status, list(headers), True

    async def write(self, data: bytes) -> None:
        self._add(data)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        self._add(os.pread(fd, count, offset))

    async def send(self, response) -> None:
        """A whole response (verge.http.response): its fields and body, read in full."""
        self.start(response.status, response.headers)
        await write_body(self, response.body)

    async def end(self) -> None:
        return None

    def _add(self, data: bytes) -> None:
        self.body += data
        self.bytes_sent = len(self.body)
        if len(self.body) > self.limit:
            raise ResponseTooLarge(f"response over {self.limit} bytes")
