"""The PROXY protocol (HAProxy's, versions 1 and 2): the client address a load balancer saw.

Why it exists: behind a TCP load balancer (HAProxy ``send-proxy``, AWS NLB, Envoy) every
connection's peer is the balancer, so rate limits, deny lists and logs would all see one
address. The balancer writes one header before the client's bytes naming the real client;
the edge reads it only from peers it trusts (nginx ``listen ... proxy_protocol`` with
``set_real_ip_from``), and on such a listener the header is required: a connection without
one is closed, as nginx does.

Sans-I/O: :func:`parse` takes the bytes received so far and returns the header and how many
bytes it used, or None while more are needed; a malformed header raises
:class:`ProxyHeaderError`. Written by hand because the protocol is two small fixed formats
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt) and the PyPI parsers are
unmaintained or asyncio-stream-bound. Version 2's TLVs are skipped; a ``LOCAL`` command
(the balancer's own health check) or an ``UNKNOWN``/``UNSPEC``/UNIX family keeps the peer
as the client (``client`` is None).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the whole line, CRLF included (the spec's bound)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family, length
V2_MAX_PAYLOAD = 1024  # addresses plus TLVs; real balancers send well under this
MAX_HEADER = V2_FIXED + V2_MAX_PAYLOAD  # what a connection may hold before its header is whole

_V2_ADDRESSES = {0x11: (4, 12), 0x21: (16, 36)}  # TCP over IPv4 / IPv6: (address size, block)
_V2_NO_ADDRESS = {0x00, 0x31}  # UNSPEC, UNIX stream: the peer stays the client


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header (the connection is closed)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the balancer says: the client's address and port (None: keep the peer)."""

    client: str | None
    client_port: int | None = None


def parse(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length, or None when more bytes are
    needed. Raises :class:`ProxyHeaderError` when ``data`` cannot start a valid header."""
    data = bytes(data[:MAX_HEADER])
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data:
        raise ProxyHeaderError("no PROXY protocol header")
    return None


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyHeaderError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end == -1:
        if len(data) >= V1_MAX or b"\n" in data:
            raise ProxyHeaderError("PROXY v1 line too long or not ended by CRLF")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == "UNKNOWN":
        return ProxyHeader(None), end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    version = 4 if parts[1] == "TCP4" else 6
    client = _address(parts[2], version)
    _address(parts[3], version)
    _port(parts[5])
    return ProxyHeader(client, _port(parts[4])), end + 2


def _address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"not an IPv{version} address: {text[:46]!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"not an IPv{version} address: {text!r}")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise ProxyHeaderError(f"not a port: {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProxyHeaderError("no PROXY protocol header")
    if len(data) < V2_FIXED:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header too long ({length} bytes)")
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection
        return ProxyHeader(None), total
    if family in _V2_NO_ADDRESS:
        return ProxyHeader(None), total
    if family not in _V2_ADDRESSES:
        raise ProxyHeaderError(f"unsupported PROXY v2 address family 0x{family:02x}")
    size, block = _V2_ADDRESSES[family]
    if length < block:
        raise ProxyHeaderError("PROXY v2 addresses cut short")
    source = data[V2_FIXED:V2_FIXED + size]
    (port,) = struct.unpack_from("!H", data, V2_FIXED + 2 * size)
    return ProxyHeader(str(ipaddress.ip_address(source)), port), total
