"""The PROXY protocol parser (sans-I/O): versions 1 and 2, incremental input, hostile headers."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from verge.http.proxy_protocol import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)


def v2(command: int = 1, family: int = 0x11, addresses: bytes | None = None,
       tlvs: bytes = b"", length: int | None = None) -> bytes:
    if addresses is None:
        addresses = ipaddress.ip_address("198.51.100.7").packed + \
            ipaddress.ip_address("192.0.2.1").packed + struct.pack("!HH", 40000, 80)
    payload = addresses + tlvs
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + payload


V6_ADDRESSES = (ipaddress.ip_address("2001:db8::7").packed + ipaddress.ip_address("::1").packed
                + struct.pack("!HH", 443, 8080))


@pytest.mark.parametrize(("header", "expected"), [
    (b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 80\r\n", ProxyHeader("198.51.100.7", 40000)),
    (b"PROXY TCP6 2001:db8::7 ::1 443 8080\r\n", ProxyHeader("2001:db8::7", 443)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(None)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(None)),  # the rest is ignored
    (v2(), ProxyHeader("198.51.100.7", 40000)),
    (v2(family=0x21, addresses=V6_ADDRESSES), ProxyHeader("2001:db8::7", 443)),
    (v2(tlvs=b"\x04\x00\x03abc"), ProxyHeader("198.51.100.7", 40000)),  # TLVs skipped
    (v2(command=0), ProxyHeader(None)),  # LOCAL: the balancer's own health check
    (v2(family=0x00, addresses=b""), ProxyHeader(None)),  # UNSPEC
])
def test_headers_name_the_client(header, expected):
    follows = b"GET / HTTP/1.1\r\n"
    assert parse(header + follows) == (expected, len(header))


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 80\r\n",
    v2(tlvs=b"\x04\x00\x03abc"),
])
def test_a_header_arriving_byte_by_byte_waits_until_whole(header):
    for end in range(len(header)):
        assert parse(header[:end]) is None, end
    assert parse(header)[1] == len(header)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",  # no header on a PROXY listener
    b"PROXX TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",  # LF only
    b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",  # a field missing
    b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family and address disagree
    b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",  # a port too large
    b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n",  # leading zero
    b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n",
    b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
    "PROXY TCP4 1.2.3.4 1.2.3.\u0664 1 2\r\n".encode(),  # not ASCII
    b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",  # two spaces
    v2(length=2000),  # over the payload cap
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
    v2(family=0x12),  # UDP over IPv4
    v2(family=0x21, addresses=b"\x00" * 12),  # IPv6 block cut short
    b"\r\n\r\n\x00\r\nQUIX\n",
])
def test_hostile_headers_are_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_the_header_is_bounded():
    assert MAX_HEADER <= 2048
    with pytest.raises(ProxyHeaderError):
        parse(v2(tlvs=b"\x00" * 5000, length=5000 + 12))
