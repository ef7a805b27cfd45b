"""What verge.compute runs on an edge: WebAssembly functions and device ingest routes."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from verge.config.base import (
    FilePath,
    HostText,
    Label,
    Model,
    Name,
    Slug,
    Text,
    Url,
    UrlPath,
    glob_regex,
)
from verge.config.bounds import (
    MAX_BATCH_RECORDS,
    MAX_FUNCTION_CPU_MS,
    MAX_FUNCTION_MEMORY_MB,
    MAX_LIST,
    MAX_QUOTA_RECORDS,
    MAX_SUBREQUESTS,
    MiB,
)
from verge.config.units import ByteSize, PositiveDuration

FunctionEnv = Annotated[dict[Label, Text], Field(max_length=MAX_LIST)]
"""A function's environment variables (also the control-plane API's deploy body)."""


class EdgeFunction(Model):
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
                if re.fullmatch(glob_regex(route), path):
                    return True
            elif path.startswith(route):
                return True
        return False


class IngestRoute(Model):
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
