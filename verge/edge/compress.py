"""Content-coding negotiation and streaming compression (gzip, brotli, zstd).

The edge compresses compressible responses on the way out, choosing the coding from the
client's Accept-Encoding (RFC 9110 §12.5.3). Bodies are streamed, never buffered whole, so
compression is a :class:`Compressor` fed chunk by chunk; its output is a standard stream any
client decodes (gzip member via zlib wbits=31, a brotli stream, one zstd frame with
unknown content size and a checksum). :func:`decompress_bytes` lets the edge serve identity
from a stored compressed variant.

Default levels favour speed, as on-the-fly compression must: gzip 6, brotli 4, zstd 3.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from fnmatch import translate
from functools import lru_cache
from typing import Protocol

import brotli
import zstandard

ENCODINGS = ("zstd", "br", "gzip")
# encoding -> (lowest level, highest level, default level)
_LEVELS = {"gzip": (0, 9, 6), "br": (0, 11, 4), "zstd": (-(1 << 17), 22, 3)}
_GZIP_WBITS = 31  # zlib with a gzip header and trailer
_QVALUE = re.compile(r"[01](?:\.[0-9]*)?")


# --- negotiation -------------------------------------------------------------------------


def _parse_qvalue(params: list[str]) -> float | None:
    """The weight among ``;``-parameters: 1.0 when absent, None when malformed."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() != "q":
            continue
        value = value.strip()
        if not _QVALUE.fullmatch(value) or float(value) > 1.0:
            return None
        return float(value)
    return 1.0


def _parse_accept_encoding(header: str) -> dict[str, float]:
    """coding (lower-case, x-gzip folded to gzip) -> q; first listing wins, bad ones skipped."""
    weights: dict[str, float] = {}
    for element in header.split(","):
        name, *params = element.split(";")
        name = name.strip().lower()
        if name == "x-gzip":
            name = "gzip"  # RFC 9110 §8.4.1.3
        q = _parse_qvalue(params)
        if name and q is not None:
            weights.setdefault(name, q)
    return weights


@lru_cache(maxsize=1024)
def _choose(accept_encoding: str, available: tuple[str, ...]) -> str | None:
    weights = _parse_accept_encoding(accept_encoding)
    star = weights.get("*")
    unlisted_q = 0.0 if star is None else star
    # Identity competes only when weighted explicitly (itself or via "*"); a client that
    # prefers it gets it, ties go to compression.
    identity_q = weights.get("identity", unlisted_q)
    best, best_q = None, 0.0
    for coding in available:
        q = weights.get(coding.lower(), unlisted_q)
        if q > best_q:
            best, best_q = coding, q
    return best if best is not None and best_q >= identity_q else None


def choose_encoding(
    accept_encoding: str | None, available: Sequence[str] = ENCODINGS
) -> str | None:
    """The content coding to send, or None for identity (RFC 9110 §12.5.3).

    Honours q-values, ``*`` (any coding not listed) and refusals with ``q=0``. Ties go to
    the earlier entry of ``available``. Identity wins only when the client weights it above
    every coding (``gzip;q=0.5, identity``). No header or an empty one means identity. When
    nothing is acceptable, not even identity (``identity;q=0`` or ``*;q=0``), the answer is
    still None: like nginx, the edge then sends identity rather than a 406.
    """
    if not accept_encoding:
        return None
    return _choose(accept_encoding, tuple(available))


@lru_cache(maxsize=64)
def _pattern_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(translate(pattern.strip().lower()) for pattern in patterns))


def is_compressible(content_type: str | None, patterns: Sequence[str]) -> bool:
    """Whether a media type matches one of ``patterns`` (``text/*``, ``application/*+json``).

    Parameters such as ``; charset=utf-8`` are ignored; matching is case-insensitive.
    """
    if not content_type or not patterns:
        return False
    media_type = content_type.partition(";")[0].strip().lower()
    return bool(media_type) and _pattern_regex(tuple(patterns)).match(media_type) is not None


# --- streaming compression ---------------------------------------------------------------


class _Stream(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> bytes: ...


class _Gzip:
    def __init__(self, level: int) -> None:
        self._obj = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._obj.flush(zlib.Z_FINISH)


class _Brotli:
    def __init__(self, level: int) -> None:
        self._obj = brotli.Compressor(quality=level)

    def compress(self, data: bytes) -> bytes:
        return self._obj.process(data)

    def flush(self) -> bytes:
        return self._obj.flush()

    def finish(self) -> bytes:
        return self._obj.finish()


class _Zstd:
    def __init__(self, level: int) -> None:
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._obj = compressor.compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        return self._obj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)  # ends the frame


_STREAMS: dict[str, type[_Gzip] | type[_Brotli] | type[_Zstd]] = {
    "gzip": _Gzip,
    "br": _Brotli,
    "zstd": _Zstd,
}


def _check_level(encoding: str, level: int | None) -> int:
    if encoding not in _LEVELS:
        raise ValueError(f"unsupported content coding {encoding!r}")
    lowest, highest, default = _LEVELS[encoding]
    if level is None:
        return default
    if not lowest <= level <= highest:
        raise ValueError(f"{encoding} level must be in {lowest}..{highest}, got {level}")
    return level


class Compressor:
    """Streaming compressor for one body: ``compress()`` each chunk, then ``finish()``.

    ``flush()`` (optional) pushes out everything fed so far, as a decodable prefix, for
    bodies whose chunks must reach the client promptly (server-sent events, live playlists).
    """

    def __init__(self, encoding: str, level: int | None = None) -> None:
        level = _check_level(encoding, level)
        self.encoding = encoding
        self._stream: _Stream = _STREAMS[encoding](level)
        self._finished = False

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("compressor already finished")

    def compress(self, data: bytes) -> bytes:
        """Feed one chunk; returns whatever compressed output is ready (often b'')."""
        self._check_open()
        return self._stream.compress(data) if data else b""

    def flush(self) -> bytes:
        """Emit all pending output so the receiver can decode everything fed so far."""
        self._check_open()
        return self._stream.flush()

    def finish(self) -> bytes:
        """End the stream (gzip trailer, brotli last block, zstd frame end)."""
        self._check_open()
        self._finished = True
        return self._stream.finish()


def compress_bytes(data: bytes, encoding: str, level: int | None = None) -> bytes:
    """Compress a whole body at once, in the same format :class:`Compressor` streams."""
    compressor = Compressor(encoding, level)
    return compressor.compress(data) + compressor.finish()


# --- decompression -----------------------------------------------------------------------


def _gunzip(data: bytes) -> bytes:
    """All gzip members of ``data`` (RFC 1952 allows several), rejecting truncation."""
    out = []
    while True:
        decoder = zlib.decompressobj(_GZIP_WBITS)
        out.append(decoder.decompress(data))
        if not decoder.eof:
            raise ValueError("truncated gzip stream")
        data = decoder.unused_data
        if not data:
            return b"".join(out)


def _unzstd(data: bytes) -> bytes:
    """All zstd frames of ``data``, rejecting a truncated last frame."""
    out = []
    decompressor = zstandard.ZstdDecompressor()
    while True:
        decoder = decompressor.decompressobj()
        out.append(decoder.decompress(data))
        if not decoder.eof:
            raise ValueError("truncated zstd stream")
        data = decoder.unused_data
        if not data:
            return b"".join(out)


_DECODERS = {"gzip": _gunzip, "br": brotli.decompress, "zstd": _unzstd}


def decompress_bytes(data: bytes, encoding: str) -> bytes:
    """Decode a whole ``gzip``/``br``/``zstd`` body; ValueError if corrupt or truncated."""
    decoder = _DECODERS.get(encoding)
    if decoder is None:
        raise ValueError(f"unsupported content coding {encoding!r}")
    try:
        return decoder(bytes(data))
    except (zlib.error, brotli.error, zstandard.ZstdError) as exc:
        raise ValueError(f"corrupt {encoding} stream: {exc}") from exc
