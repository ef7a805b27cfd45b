"""The node-wide sections of how an edge serves: cache sizes, client limits, origin timeouts
and compression."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from verge.config.base import Label, Model, conflict, glob_regex
from verge.config.bounds import MAX_LIST, GiB, KiB, MiB
from verge.config.units import ByteSize, Duration, PositiveDuration, RequestHeadSize


class CacheSettings(Model):
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


class Limits(Model):
    # What one client connection may send and how long it may take: each field is the
    # verge.http.server.ServerLimits field of the same name (verge.edge.worker.server_limits).
    max_header_bytes: RequestHeadSize = 16 * KiB
    max_url_bytes: RequestHeadSize = 8 * KiB
    max_body_bytes: ByteSize = 100 * MiB
    header_timeout: PositiveDuration = 10.0
    keepalive_timeout: PositiveDuration = 75.0
    body_timeout: PositiveDuration = 60.0


class OriginTimeouts(Model):
    connect: PositiveDuration = 3.0
    first_byte: PositiveDuration = 30.0
    idle: PositiveDuration = 30.0


_MIME_PATTERN_RE = re.compile(r"[a-z0-9!#$&^_.+*-]+/[a-z0-9!#$&^_.+*-]+")
_DEFAULT_COMPRESSIBLE_TYPES = [
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/*+json",
    "application/*+xml",
    "image/svg+xml",
]


class Compression(Model):
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
            raise conflict(("min_bytes",), "min_bytes is larger than max_bytes")
        globs = [glob_regex(pattern) for pattern in self.types if "*" in pattern]
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
