"""Content-coding negotiation and streaming compression, checked against reference decoders."""

from __future__ import annotations

import gzip
import io
import random
import shutil
import subprocess
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import brotli
import pytest
import zstandard

from verge.edge.compress import (
    Compressor,
    choose_encoding,
    compress_bytes,
    decompress_bytes,
    is_compressible,
)

ENCODINGS = ("gzip", "br", "zstd")


def _sample_body() -> bytes:
    """Half text, half pseudo-random bytes: compressible but not trivially so."""
    rng = random.Random(1234)
    text = b"".join(b"line %d: the quick brown fox\n" % i for i in range(4000))
    noise = bytes(rng.getrandbits(8) for _ in range(50_000))
    return text + noise


BODY = _sample_body()


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def _stream(encoding: str, data: bytes, chunk_size: int, level: int | None = None) -> bytes:
    compressor = Compressor(encoding, level)
    out = [compressor.compress(chunk) for chunk in _chunks(data, chunk_size)]
    out.append(compressor.finish())
    return b"".join(out)


def _reference_decode(encoding: str, data: bytes) -> bytes:
    """Decode with the reference library for each format, not our own helper."""
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "br":
        return brotli.decompress(data)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return reader.read()


# --- choose_encoding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("deflate", None),
        ("compress, deflate", None),
        # ties go to the order of `available` (zstd, br, gzip)
        ("gzip, deflate, br", "br"),
        ("gzip, br, zstd", "zstd"),
        ("br;q=0.9, gzip;q=0.9", "br"),
        # q-values
        ("br;q=0.5, gzip", "gzip"),
        ("zstd;q=0.1, br;q=0.2, gzip;q=0.3", "gzip"),
        ("gzip;q=0.001", "gzip"),
        ("gzip;q=1.000", "gzip"),
        ("GZIP;Q=0.5", "gzip"),
        ("gzip ; q=0.5", "gzip"),
        ("gzip;level=1;q=0.5", "gzip"),
        # q=0 refuses a coding
        ("gzip;q=0", None),
        ("gzip;q=0.000", None),
        ("br;q=0, gzip", "gzip"),
        ("zstd;q=0, br;q=0, gzip;q=0", None),
        # "*" covers every coding not listed
        ("*", "zstd"),
        ("*;q=0.5", "zstd"),
        ("br;q=0, *", "zstd"),
        ("zstd;q=0, *;q=0.5", "br"),
        ("zstd;q=0, br;q=0, *", "gzip"),
        ("*;q=0", None),
        ("*;q=0, gzip", "gzip"),
        ("*;q=0, gzip;q=0.2", "gzip"),
        # identity
        ("identity", None),
        ("identity;q=0", None),
        ("identity;q=0, gzip;q=0.1", "gzip"),
        ("identity;q=0, *;q=0", None),
        ("gzip;q=0.5, identity", None),  # the client prefers identity
        ("gzip, identity", "gzip"),  # a tie with identity goes to compression
        ("*;q=0.5, identity;q=0.8", None),
        ("gzip;q=1.0, identity; q=0.5, *;q=0", "gzip"),
        # x-gzip is gzip (RFC 9110 §8.4.1.3)
        ("x-gzip", "gzip"),
        ("x-gzip;q=0, br", "br"),
        # malformed weights: the element is ignored
        ("gzip;q=1.5", None),
        ("gzip;q=abc", None),
        ("gzip;q=-1", None),
        ("gzip;q=", None),
        ("br;q=2, gzip", "gzip"),
        # list syntax oddities
        (" , ,gzip,", "gzip"),
        (";q=1, gzip", "gzip"),
        # first listing of a coding wins
        ("gzip;q=0, gzip", None),
        ("gzip, gzip;q=0", "gzip"),
    ],
)
def test_choose_encoding(header: str | None, expected: str | None) -> None:
    assert choose_encoding(header) == expected


@pytest.mark.parametrize(
    ("header", "available", "expected"),
    [
        ("gzip, br, zstd", ("gzip", "br"), "gzip"),
        ("gzip, br, zstd", ["br", "gzip"], "br"),
        ("br", ("gzip",), None),
        ("*", ("gzip",), "gzip"),
        ("gzip", (), None),
        ("GZip", ("gzip",), "gzip"),
    ],
)
def test_choose_encoding_available(
    header: str, available: tuple[str, ...] | list[str], expected: str | None
) -> None:
    assert choose_encoding(header, available) == expected


# --- is_compressible ---------------------------------------------------------------------

PATTERNS = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "image/svg+xml",
)


@pytest.mark.parametrize(
    ("content_type", "patterns", "expected"),
    [
        ("text/html", PATTERNS, True),
        ("text/html; charset=utf-8", PATTERNS, True),
        ("TEXT/CSS;charset=UTF-8", PATTERNS, True),
        ("application/json", PATTERNS, True),
        ("application/problem+json", PATTERNS, True),
        ("application/ld+json; profile=x", PATTERNS, True),
        ("application/javascript", PATTERNS, True),
        ("image/svg+xml", PATTERNS, True),
        ("image/png", PATTERNS, False),
        ("application/octet-stream", PATTERNS, False),
        ("application/json5", PATTERNS, False),
        ("application/jsonx", PATTERNS, False),
        ("video/mp2t", PATTERNS, False),
        ("xtext/html", PATTERNS, False),
        (None, PATTERNS, False),
        ("", PATTERNS, False),
        ("; charset=utf-8", ("*",), False),
        ("text/html", (), False),
        ("text/html", ["TEXT/*"], True),
        ("anything/at-all", ("*/*",), True),
    ],
)
def test_is_compressible(
    content_type: str | None, patterns: tuple[str, ...], expected: bool
) -> None:
    assert is_compressible(content_type, patterns) is expected


# --- streaming compression ---------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000, 65536, 10**9])
def test_streamed_round_trip(encoding: str, chunk_size: int) -> None:
    data = BODY if chunk_size > 1 else BODY[:3000]  # byte-at-a-time on a shorter body
    compressed = _stream(encoding, data, chunk_size)
    assert _reference_decode(encoding, compressed) == data
    assert decompress_bytes(compressed, encoding) == data


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("data", [b"", b"x", b"hello world" * 1000])
def test_compress_bytes_round_trip(encoding: str, data: bytes) -> None:
    compressed = compress_bytes(data, encoding)
    assert _reference_decode(encoding, compressed) == data
    assert decompress_bytes(compressed, encoding) == data


@pytest.mark.parametrize(
    ("encoding", "levels"), [("gzip", (0, 1, 9)), ("br", (0, 5, 11)), ("zstd", (-5, 1, 19))]
)
def test_levels_round_trip(encoding: str, levels: tuple[int, ...]) -> None:
    for level in levels:
        assert _reference_decode(encoding, compress_bytes(BODY, encoding, level)) == BODY


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_text_actually_shrinks(encoding: str) -> None:
    text = b"<p>hello edge</p>\n" * 5000
    assert len(compress_bytes(text, encoding)) < len(text) // 20


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_accepts_memoryview_and_bytearray(encoding: str) -> None:
    compressor = Compressor(encoding)
    out = compressor.compress(memoryview(b"abc" * 100)) + compressor.compress(bytearray(b"def"))
    out += compressor.finish()
    assert decompress_bytes(out, encoding) == b"abc" * 100 + b"def"


def _incremental_decoder(encoding: str):
    if encoding == "gzip":
        return zlib.decompressobj(31).decompress
    if encoding == "br":
        return brotli.Decompressor().process
    return zstandard.ZstdDecompressor().decompressobj().decompress


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_flush_makes_everything_so_far_decodable(encoding: str) -> None:
    compressor = Compressor(encoding)
    decode = _incremental_decoder(encoding)
    received = b""
    for event in (b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"):
        received += decode(compressor.compress(event) + compressor.flush())
        assert received.endswith(event)
    received += decode(compressor.finish())
    assert received == b"data: one\n\ndata: two\n\ndata: three\n\n"


def test_zstd_frame_has_unknown_size_and_checksum() -> None:
    compressed = _stream("zstd", BODY, 4096)
    params = zstandard.get_frame_parameters(compressed)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert params.has_checksum
    decoder = zstandard.ZstdDecompressor().decompressobj()
    assert decoder.decompress(compressed) == BODY
    assert decoder.eof and not decoder.unused_data  # finish() ended the one frame


def test_gzip_has_gzip_magic() -> None:
    assert compress_bytes(b"abc", "gzip")[:2] == b"\x1f\x8b"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_use_after_finish_raises(encoding: str) -> None:
    compressor = Compressor(encoding)
    compressor.finish()
    for call in (lambda: compressor.compress(b"x"), compressor.flush, compressor.finish):
        with pytest.raises(RuntimeError):
            call()


@pytest.mark.parametrize(
    ("encoding", "level"),
    [("deflate", None), ("identity", None), ("gzip", 10), ("gzip", -2), ("br", 12), ("zstd", 23)],
)
def test_bad_encoding_or_level(encoding: str, level: int | None) -> None:
    with pytest.raises(ValueError):
        Compressor(encoding, level)


# --- decompression -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decompress_rejects_truncated_and_garbage(encoding: str) -> None:
    compressed = compress_bytes(BODY, encoding)
    for bad in (compressed[: len(compressed) // 2], compressed[:-1], b"", b"not compressed"):
        with pytest.raises(ValueError):
            decompress_bytes(bad, encoding)


def test_decompress_unknown_encoding() -> None:
    with pytest.raises(ValueError):
        decompress_bytes(b"abc", "deflate")


def test_decompress_multi_member_gzip_and_multi_frame_zstd() -> None:
    gz = gzip.compress(b"one ") + compress_bytes(b"two", "gzip")
    assert decompress_bytes(gz, "gzip") == b"one two"
    zst = zstandard.ZstdCompressor().compress(b"one ") + compress_bytes(b"two", "zstd")
    assert decompress_bytes(zst, "zstd") == b"one two"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decompress_reference_output(encoding: str) -> None:
    if encoding == "gzip":
        produced = gzip.compress(BODY)
    elif encoding == "br":
        produced = brotli.compress(BODY)
    else:
        produced = zstandard.ZstdCompressor().compress(BODY)
    assert decompress_bytes(produced, encoding) == BODY


# --- real decoders: command-line tools and curl ------------------------------------------


@pytest.mark.parametrize(("encoding", "tool"), [("zstd", "zstd"), ("gzip", "gzip")])
def test_command_line_tool_decodes_stream(encoding: str, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    compressed = _stream(encoding, BODY, 8192)
    result = subprocess.run([tool, "-d", "-c"], input=compressed, capture_output=True, check=True)
    assert result.stdout == BODY


class _EncodedHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        encoding = self.path.strip("/")
        body = _stream(encoding, BODY, 8192)
        self.send_response(200)
        self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def encoded_origin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EncodedHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_curl_decodes_each_encoding(encoded_origin: str, encoding: str) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--fail", "--compressed", f"{encoded_origin}/{encoding}"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert result.stdout == BODY
