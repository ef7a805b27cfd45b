"""Rate-limit keys: who sent a request (client address), and with which credential or path.

A rule's ``key`` is one part or several joined by "+":

- ``client_ip``: the client's address. The TCP peer, unless the peer is a trusted proxy:
  then ``X-Forwarded-For`` is read from the right, each hop a trusted proxy appended, and the
  first hop that is not a trusted proxy is the client (nginx ``real_ip_recursive on``). A
  client cannot spoof it: what it writes into the header sits left of what the proxies
  appended, and the walk stops before it. A peer that is not trusted is the client, whatever
  its header says. A hop that is not an address (garbage, ``unknown``) stops the walk at the
  last trusted proxy. IPv6 clients are keyed by their /64 (``ipv6_prefix``): one host
  usually owns a whole /64 and could otherwise rotate through 2^64 keys.
- ``header:NAME``, ``cookie:NAME``: the field's or cookie's value. A request without it is
  keyed by its client address instead (a separate key space), so leaving the credential out
  does not escape the limit.
- ``path``: the normalised URL path (a per-URL limit shared by every client).

Keys are strings, injective in their parts: every credential/path part is tagged ("=" value,
"#" hash of a value longer than MAX_PART chars, "!" client-address fallback), and several
parts are length-prefixed, so no header value can pose as another key. Long values are
replaced by a BLAKE2b digest, so an 8 KiB header cannot make a table hold 8 KiB per key.

The RFC 7239 ``Forwarded`` header and the PROXY protocol are not read here: the server sets
``request.client`` from a PROXY header before the request reaches these functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from verge.cidr import CidrSet, format_ip, parse_ip

MAX_PART = 128  # longer values are keyed by their hash
MAX_HOPS = 16  # X-Forwarded-For hops examined from the right
MEMO_SIZE = 4096
DEFAULT_IPV6_PREFIX = 64
KEY_PARTS = ("client_ip", "path")
KEY_PREFIXES = ("header:", "cookie:")
MAX_KEY_PARTS = 4


class RequestLike(Protocol):
    """What key functions read of verge.http.message.Request."""

    method: str
    target: str
    client: str

    @property
    def path(self) -> str: ...

    @property
    def hmap(self) -> Mapping[str, str]: ...


KeyFunction = Callable[[RequestLike], str]


class ClientAddresses:
    """The client address of a request, as seen through the trusted proxies."""

    __slots__ = ("trusted", "trusts_proxies", "ipv6_prefix", "max_hops", "_v6_mask", "_memo")

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        *,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
        max_hops: int = MAX_HOPS,
    ) -> None:
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 0..128, not {ipv6_prefix}")
        self.trusted = CidrSet(trusted_proxies)
        self.trusts_proxies = bool(self.trusted)  # a plain attribute: read on every request
        self.ipv6_prefix = ipv6_prefix
        self.max_hops = max(1, max_hops)
        self._v6_mask = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
        self._memo: dict[str, str] = {}  # peer text -> key text, for peers not plain IPv4

    def address(self, request: RequestLike) -> str:
        """The client's address text (canonical; IPv4-mapped shown as IPv4)."""
        peer = request.client
        if self.trusts_proxies:
            return self._through_proxies(peer, request.hmap.get("x-forwarded-for"))
        if ":" not in peer:
            return peer  # IPv4 from the kernel: already canonical
        parsed = parse_ip(peer)
        return format_ip(*parsed) if parsed is not None else peer

    def key(self, request: RequestLike) -> str:
        """The client part of a rate-limit key: the address, IPv6 reduced to its prefix."""
        peer = request.client
        if self.trusts_proxies:
            peer = self._through_proxies(peer, request.hmap.get("x-forwarded-for"))
        if ":" not in peer:
            return peer
        return self._memo.get(peer) or self._key_of(peer)

    def peer_key(self, peer: str) -> str:
        """:meth:`key` for a connection's peer address alone (the connection cap's key)."""
        if ":" not in peer:
            return peer
        return self._memo.get(peer) or self._key_of(peer)

    def _key_of(self, address: str) -> str:
        parsed = parse_ip(address)
        if parsed is None:
            key = address
        elif parsed[0] == 4:
            key = format_ip(4, parsed[1])
        elif self.ipv6_prefix == 128:
            key = format_ip(6, parsed[1])
        else:
            key = f"{format_ip(6, parsed[1] & self._v6_mask)}/{self.ipv6_prefix}"
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[address] = key
        return key

    def _through_proxies(self, peer: str, forwarded: str | None) -> str:
        parsed = parse_ip(peer)
        if parsed is None or not self.trusted.contains(*parsed):
            return format_ip(*parsed) if parsed is not None else peer
        client = format_ip(*parsed)
        if not forwarded:
            return client
        for hop in reversed(forwarded.rsplit(",", self.max_hops)[-self.max_hops :]):
            parsed = _parse_hop(hop)
            if parsed is None:
                return client  # garbage from (or before) the last trusted proxy
            client = format_ip(*parsed)
            if not self.trusted.contains(*parsed):
                return client
        return client


def _parse_hop(hop: str) -> tuple[int, int] | None:
    """One X-Forwarded-For entry: "192.0.2.1", "192.0.2.1:8080", "2001:db8::1",
    "[2001:db8::1]:8080"."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]  # IPv4 with a port
    return parse_ip(hop) if hop else None


def check_key_spec(spec: str) -> list[str]:
    """The parts of a key spec, or ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec or len(spec) > 300:
        raise ValueError(f"invalid key {spec!r}")
    parts = [part.strip() for part in spec.split("+")]
    if len(parts) > MAX_KEY_PARTS:
        raise ValueError(f"key {spec!r} has more than {MAX_KEY_PARTS} parts")
    if len(set(parts)) != len(parts):
        raise ValueError(f"key {spec!r} repeats a part")
    for part in parts:
        kind, _, name = part.partition(":")
        if part in KEY_PARTS:
            continue
        if kind + ":" not in KEY_PREFIXES or not _is_token(name):
            raise ValueError(
                f"invalid key part {part!r}: use client_ip, path, header:NAME or cookie:NAME, "
                "joined by '+'"
            )
    return [_normal_part(part) for part in parts]


_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _is_token(name: str) -> bool:
    return 0 < len(name) <= 256 and all(char in _TOKEN_CHARS for char in name)


def _normal_part(part: str) -> str:
    """Header names are case-insensitive (stored lower-case); cookie names are not."""
    return part.lower() if part.startswith("header:") else part


def steerable(spec: str) -> bool:
    """Whether every request of one key comes from one client address (so steering the
    client's connections to one worker keeps the key on that worker)."""
    return "client_ip" in check_key_spec(spec)


def compile_key(spec: str, addresses: ClientAddresses) -> KeyFunction:
    """The function that computes a rule's key from a request."""
    parts = check_key_spec(spec)
    if parts == ["client_ip"]:
        return addresses.key
    getters = [_part_getter(part, addresses) for part in parts]
    if len(getters) == 1:
        return getters[0]

    def combined(request: RequestLike) -> str:
        values = [getter(request) for getter in getters]
        return "".join(f"{len(value)}:{value}" for value in values)

    return combined


def _part_getter(part: str, addresses: ClientAddresses) -> KeyFunction:
    if part == "client_ip":
        return addresses.key
    if part == "path":
        return lambda request: _tagged(request.path)
    kind, _, name = part.partition(":")
    if kind == "header":
        field = name.lower()

        def header(request: RequestLike) -> str:
            value = request.hmap.get(field)
            return _tagged(value) if value is not None else "!" + addresses.key(request)

        return header

    def cookie(request: RequestLike) -> str:
        value = cookie_value(request.hmap.get("cookie"), name)
        return _tagged(value) if value is not None else "!" + addresses.key(request)

    return cookie


def _tagged(value: str) -> str:
    if len(value) <= MAX_PART:
        return "=" + value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16)
    return "#" + digest.hexdigest()


def cookie_value(field: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie field (first one wins; quotes dropped).

    Several Cookie fields arrive joined with ", " (HTTP/2 splits them), so "," separates
    pairs too; a value holding a comma (not allowed by RFC 6265) is cut there.
    """
    if not field or name + "=" not in field:
        return None
    for pair in field.replace(",", ";").split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None
