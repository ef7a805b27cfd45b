"""IP addresses as integers and sets of CIDR prefixes with a fast membership test.

Deny lists and trusted-proxy lists hold up to thousands of prefixes and are consulted on
every request (or connection), so a lookup must not walk them. The prefixes are merged into
disjoint, sorted integer intervals per IP version (``ipaddress.collapse_addresses``) and a
lookup is one ``bisect`` over the interval starts: O(log n) in C, the same cost for 10 or
10,000 prefixes. Addresses are parsed with ``inet_pton`` (a tenth of ``ipaddress``'s cost),
and an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack socket reports for
an IPv4 peer) counts as the IPv4 address it carries, so one deny entry covers both forms
(and IPv6 prefixes, even ::/0, never cover it: it is an IPv4 client).
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def parse_ip(text: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an int) of an address text; None when it is not one.

    A zone suffix (``fe80::1%eth0``) is dropped; IPv4-mapped IPv6 addresses become IPv4.
    """
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text.partition("%")[0])
            if packed[:12] == _V4_MAPPED:
                return 4, int.from_bytes(packed[12:], "big")
            return 6, int.from_bytes(packed, "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError, TypeError):
        return None


def format_ip(version: int, value: int) -> str:
    """The canonical text of an address from :func:`parse_ip`."""
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def normalize_ip(text: str) -> str | None:
    """The canonical text of an address (IPv4-mapped -> IPv4); None when it is not one."""
    parsed = parse_ip(text)
    return format_ip(*parsed) if parsed is not None else None


def parse_network(text: str) -> IPNetwork:
    """A CIDR prefix ("192.0.2.0/24", "2001:db8::/32") or a single address (a /32 or /128).

    Host bits must be zero: "192.0.2.7/24" is refused rather than silently widened, because
    the operator may have meant the single address.
    """
    if not isinstance(text, str) or not text or len(text) > 64:
        raise ValueError(f"invalid CIDR {text!r}")
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        try:
            wide = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"invalid CIDR {text!r}: {exc}") from None
        raise ValueError(f"invalid CIDR {text!r}: host bits set; did you mean {wide}?") from None


class CidrSet:
    """A set of prefixes; ``address in cidrs`` for address texts, :meth:`contains` for ints."""

    __slots__ = ("_starts", "_ends", "size")

    def __init__(self, networks: Iterable[str | IPNetwork] = ()) -> None:
        parsed = [n if isinstance(n, IPNetwork) else parse_network(n) for n in networks]
        self.size = len(parsed)
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        for version in (4, 6):
            same = [n for n in parsed if n.version == version]
            for network in ipaddress.collapse_addresses(same):
                self._starts[version].append(int(network.network_address))
                self._ends[version].append(int(network.broadcast_address))

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def contains(self, version: int, value: int) -> bool:
        starts = self._starts[version]
        index = bisect_right(starts, value) - 1
        return index >= 0 and value <= self._ends[version][index]

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        parsed = parse_ip(address)
        return parsed is not None and self.contains(*parsed)
