"""The compute phase: edge functions (WebAssembly, WAGI ABI) in the request pipeline.

After the route phase, a function whose routes match the path gets the request first
(compare Cloudflare Workers and Fermyon Spin). It may answer (the response goes to the client
as is), or pass — optionally rewriting the path and headers — and the request carries on
through the cache to the origin. A function that breaks its limits (CPU, memory, response
size, sub-requests) or crashes gets the client a clear 5xx; it is logged with the request id
and its stderr, and counted. Nothing it does can reach the node: see :mod:`verge.compute`.

Invocations run on a small thread pool, never on the event loop: a function may use its whole
CPU budget, and ``fetch`` sub-requests are synchronous HTTP calls made from that thread.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from verge.compute.host import Capabilities, DictKV, FetchRequest, FetchResponse, HostServices
from verge.compute.wagi import CgiRequest

log = logging.getLogger("verge.compute")

MiB = 1024 * 1024
FUNCTION_THREADS = 2
FUNCTION_BODY_LIMIT = 8 * MiB  # a request body a function reads on stdin (larger: 413)


@dataclass
class FunctionStats:
    invocations: int = 0
    errors: int = 0
    cpu_ms: float = 0.0
    peak_memory: int = 0


@dataclass
class Deployed:
    spec: object  # verge.config.EdgeFunction
    function: object  # verge.compute.runtime.Function
    stats: FunctionStats = field(default_factory=FunctionStats)


class EdgeCompute:
    """One per worker: the runtime, the deployed functions by service, the local KV."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir) / "functions"
        self.runtime = None  # created on the first deployment: wasmtime only when used
        self.by_service: dict[str, list[Deployed]] = {}
        self.kv = DictKV()
        self._pool: ThreadPoolExecutor | None = None
        self._http: httpx.Client | None = None

    # ----- deployment ----------------------------------------------------------------------
    def apply(self, specs) -> None:
        """Load the config's functions (compiling only what is new); a function that fails
        to load is left out with an error in the log, the others deploy."""
        by_service: dict[str, list[Deployed]] = {}
        for spec in specs:
            try:
                deployed = Deployed(spec, self._load(spec))
            except (OSError, ValueError) as exc:
                log.error("edge function %s not deployed: %s", spec.name, exc)
                continue
            by_service.setdefault(spec.service, []).append(deployed)
        self.by_service = by_service

    def _load(self, spec):
        from verge.compute.runtime import Limits, Runtime

        if self.runtime is None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.runtime = Runtime(self.cache_dir)
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
    async def invoke(self, deployed: Deployed, request, body: bytes, request_id: str):
        """Run the function for one request on the pool; returns the runtime's Invocation."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FUNCTION_THREADS, thread_name_prefix="verge-fn")
        cgi = CgiRequest(method=request.method, target=request.target,
                         headers=list(request.headers), body=body, scheme=request.scheme,
                         host=request.hmap.get("host", ""), remote_addr=request.client,
                         route=next(iter(deployed.spec.routes)))
        services = HostServices(kv=self.kv, fetch=self._fetch)
        loop = asyncio.get_running_loop()
        invocation = await loop.run_in_executor(
            self._pool, lambda: self.runtime.invoke(deployed.function, cgi, services=services,
                                                    request_id=request_id))
        self._count(deployed, invocation)
        return invocation

    def _count(self, deployed: Deployed, invocation) -> None:
        stats = deployed.stats
        stats.invocations += 1
        stats.cpu_ms += invocation.cpu_ms or 0.0
        stats.peak_memory = max(stats.peak_memory, invocation.peak_memory or 0)
        if not invocation.ok:
            stats.errors += 1
            log.warning("edge function %s failed: %s", deployed.spec.name,
                        invocation.log_record())
        elif invocation.stderr:
            log.info("edge function %s stderr: %s", deployed.spec.name, invocation.log_record())

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
