"""The router's authoritative DNS server: one zone, answers from the routing table.

It answers as NSD or Knot would for the zone (AA on every in-zone answer, SOA in the
authority section of NXDOMAIN and NODATA, NS with in-zone glue, REFUSED outside the zone,
no recursion), with EDNS(0) and EDNS Client Subnet (RFC 7871) so that a public resolver's
clients are routed by their own subnet rather than by the resolver's address.

Why it is built this way:

* Sans-I/O core. :func:`answer` takes one DNS message and returns one; the UDP and TCP
  transports around it are thin. The router swaps whole routing tables, so the server asks
  ``resolver()`` for the current one on every query and never holds on to it.
* dnslib (0.9.26) parses and builds the messages. It is small, pure Python, keeps names in
  the case they were asked in (the answer echoes the question) and hands over EDNS options
  as raw bytes, which we need anyway: ECS is parsed here, strictly, so that a malformed
  option gets FORMERR as RFC 7871 section 6 asks. dnspython was the other candidate; it is
  more complete but parsing a query and building an answer took ~190 us against dnslib's
  ~60 us on this machine, and it would bring a stub resolver we do not use.
* A fast path without dnslib for the common query: one A/AAAA/ANY question for a name in
  the zone, at most an OPT record, an answer with records that fits. It is read and written
  with struct in ~8 us plus the routing table's own time, byte for byte what the dnslib path
  would send (a property test compares them); anything else, or any doubt, takes the dnslib
  path (~65 us), which decides every error and corner case.
* A packet cache in the UDP server (the PowerDNS approach). An answer depends only on the
  query's bytes after the ID, on the address routed for (the source address; an ECS subnet
  is part of the query bytes) and on the routing table. So the UDP server keeps answers by
  (query bytes, source address) for the current table — dropped when the table is swapped,
  after one second at most, and when it holds 4096 answers — and a repeated query costs a
  dict lookup and the ID patched in. Misses and TCP go through :func:`answer`.

Limits: a server bound to a wildcard address answers from the address the kernel picks
(no IP_PKTINFO in asyncio), so bind the router to the address resolvers query. There is no
per-query log line: at tens of thousands of queries per second it would cost more than the
answer. Bad packets are logged at debug level and never stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple, Protocol

from dnslib import AAAA, NS, RR, SOA, A, DNSHeader, DNSQuestion, DNSRecord, EDNSOption

log = logging.getLogger("verge.dns")

IPAddress = IPv4Address | IPv6Address

# Header fields and codes (RFC 1035, 6891).
OPCODE_QUERY = 0
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended RCODE: the upper 8 bits travel in the OPT record
_QR, _AA, _RD, _CD = 0x8000, 0x0400, 0x0100, 0x0010
CLASS_IN, CLASS_ANY = 1, 255
TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_OPT = 1, 2, 6, 28, 41
TYPE_IXFR, TYPE_AXFR, TYPE_ANY = 251, 252, 255
OPTION_ECS = 8

UDP_PLAIN_LIMIT = 512  # a query without EDNS gets at most this much over UDP
UDP_EDNS_CAP = 4096  # we never send larger UDP answers, whatever the client offers
OUR_UDP_PAYLOAD = 1232  # what we advertise (DNS flag day 2020: no fragmentation)
TCP_LIMIT = 65535
NS_TTL = 3600  # nameservers are configuration, not routing: they may be cached longer
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400
MAX_NAME_OCTETS = 255

TCP_IDLE_TIMEOUT = 10.0
MAX_TCP_CONNECTIONS = 128
CACHE_ENTRIES = 4096
CACHE_SECONDS = 1.0
CACHE_MAX_QUERY = 512  # longer queries are answered but not cached (bounds the cache's memory)


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """What the routing table says about one name: its addresses for this client."""

    ipv4: tuple[str, ...]  # A records (may be empty: the name exists but has no A -> NODATA)
    ipv6: tuple[str, ...]  # AAAA records
    scope_prefix: int = 0  # ECS SCOPE PREFIX-LENGTH to return (0 = holds for any client)


class Resolver(Protocol):
    """The routing table as the DNS server sees it (one immutable snapshot)."""

    zone: str  # lower-case, no trailing dot, e.g. "verge.test"
    ttl: int  # TTL of A/AAAA answers and of negative answers (SOA minimum)
    serial: int  # SOA serial
    nameservers: tuple[tuple[str, tuple[str, ...]], ...]  # (("ns1.verge.test", ("127.0.0.1",)),)

    def resolve(self, name: str, client: IPAddress | None) -> DnsAnswer | None:
        """Addresses of `name` (lower-case, no trailing dot, in the zone) for `client`;
        None when the name does not exist."""
        ...


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 us more to build per query
class ClientSubnet:
    """An EDNS Client Subnet option (RFC 7871), as received."""

    family: int  # 1 = IPv4, 2 = IPv6
    source_prefix: int
    address: bytes  # the significant octets only, as sent

    @property
    def network(self) -> IPAddress:
        width = 4 if self.family == 1 else 16
        padded = self.address.ljust(width, b"\0")
        return IPv4Address(padded) if self.family == 1 else IPv6Address(padded)

    def reply_data(self, scope_prefix: int) -> bytes:
        """The option data echoed in the answer: same family, source and address, our scope."""
        max_bits = 32 if self.family == 1 else 128
        scope = 0 if self.source_prefix == 0 else max(0, min(scope_prefix, max_bits))
        return struct.pack("!HBB", self.family, self.source_prefix, scope) + self.address


@dataclass(slots=True)
class Edns:
    """The OPT record of a query."""

    payload: int
    version: int
    dnssec_ok: bool
    subnet: ClientSubnet | None


class FormatError(ValueError):
    """The query is malformed in a way that deserves FORMERR."""


_NOT_RESOLVED = object()  # the general path has not asked the resolver yet


# ----- the sans-I/O core ---------------------------------------------------------------------


def answer(
    query: bytes, resolver: Resolver, source: IPAddress | None, *, tcp: bool
) -> bytes | None:
    """The response to one DNS message, or None when it must be dropped.

    `source` is the address the query came from (routed for unless the query carries ECS);
    `tcp` lifts the UDP size limit. Never raises for any input.
    """
    if len(query) < 12:
        return None  # not even a header: nothing to answer to
    ident, flags = struct.unpack_from("!HH", query)
    if flags & _QR:
        return None  # a response: answering it could start a loop
    simple = _read_simple_query(query)
    if simple is None or not simple.name.endswith("." + resolver.zone):
        return _general_answer(query, resolver, source, tcp)
    try:
        found = resolver.resolve(simple.name, _route_address(simple.edns, source))
        response = _simple_positive_answer(
            simple, found, resolver.ttl, _size_limit(simple.edns, tcp)
        )
    except Exception:
        log.debug("DNS answer failed for %s", simple.name, exc_info=True)
        return _bare_reply(ident, flags, SERVFAIL)
    if response is not None:
        return response
    return _general_answer(query, resolver, source, tcp, known=found)


def _general_answer(
    query: bytes,
    resolver: Resolver,
    source: IPAddress | None,
    tcp: bool,
    known: DnsAnswer | None | object = _NOT_RESOLVED,
) -> bytes:
    """Any query, through dnslib. `known` is the resolver's answer if it was already asked."""
    ident, flags = struct.unpack_from("!HH", query)
    try:
        request = DNSRecord.parse(query)
    except Exception as exc:  # dnslib raises several types, recursion included
        log.debug("unparseable DNS query: %s", exc)
        return _bare_reply(ident, flags, FORMERR)
    try:
        return _answer_parsed(request, resolver, source, tcp, known)
    except Exception:
        log.debug("DNS answer failed for %s", request.questions, exc_info=True)
        return _bare_reply(ident, flags, SERVFAIL)


def _answer_parsed(
    request: DNSRecord, resolver: Resolver, source: IPAddress | None, tcp: bool, known: object
) -> bytes:
    has_opt = any(rr.rtype == TYPE_OPT for rr in request.ar)
    try:
        edns = read_edns(request)
    except FormatError as exc:
        log.debug("bad EDNS in DNS query: %s", exc)
        return _error(request, FORMERR, with_opt=has_opt)
    if request.header.opcode != OPCODE_QUERY:
        return _error(request, NOTIMP, edns)
    if len(request.questions) != 1 or not _plausible_name(request.q.qname.label):
        return _error(request, FORMERR, edns)
    if edns is not None and edns.version != 0:
        return _error(request, BADVERS, edns)
    if request.q.qtype == TYPE_OPT:
        return _error(request, FORMERR, edns)
    reply, scope = _build_reply(request, resolver, _route_address(edns, source), known)
    _add_opt(reply, edns, scope=scope)
    return _pack_within(reply, _size_limit(edns, tcp))


def _build_reply(
    request: DNSRecord, resolver: Resolver, client: IPAddress | None, known: object
) -> tuple[DNSRecord, int]:
    """The answer to a well-formed QUERY, without OPT, and the ECS scope it holds for."""
    question = request.q
    zone = resolver.zone
    name = name_text(question.qname.label)
    in_zone = name == zone or name.endswith("." + zone)
    if question.qclass not in (CLASS_IN, CLASS_ANY) or not in_zone:
        return _reply(request, REFUSED, authoritative=False), 0
    if question.qtype in (TYPE_AXFR, TYPE_IXFR):
        return _reply(request, REFUSED, authoritative=False), 0  # no zone transfers
    found = resolver.resolve(name, client) if known is _NOT_RESOLVED else known
    if found is None and name == zone:
        found = DnsAnswer((), ())  # the apex always exists: it holds the SOA
    if found is None:
        reply = _reply(request, NXDOMAIN)
        reply.add_auth(_soa_record(resolver))
        return reply, 0
    reply = _reply(request, NOERROR)
    _add_answers(reply, question, found, resolver, apex=name == zone)
    if not reply.rr:
        reply.add_auth(_soa_record(resolver))  # NODATA
    return reply, found.scope_prefix


def _add_answers(
    reply: DNSRecord, question: DNSQuestion, found: DnsAnswer, resolver: Resolver, *, apex: bool
) -> None:
    qtype, owner, ttl = question.qtype, question.qname, resolver.ttl
    if apex and qtype in (TYPE_SOA, TYPE_ANY):
        reply.add_answer(_soa_record(resolver, owner))
    if apex and qtype in (TYPE_NS, TYPE_ANY):
        for ns_name, _ in resolver.nameservers:
            reply.add_answer(RR(owner, TYPE_NS, ttl=NS_TTL, rdata=NS(ns_name + ".")))
        reply.add_ar(*_glue(resolver))
    if qtype in (TYPE_A, TYPE_ANY):
        reply.add_answer(*(RR(owner, TYPE_A, ttl=ttl, rdata=A(a)) for a in found.ipv4))
    if qtype in (TYPE_AAAA, TYPE_ANY):
        reply.add_answer(*(RR(owner, TYPE_AAAA, ttl=ttl, rdata=AAAA(a)) for a in found.ipv6))


def _glue(resolver: Resolver) -> list[RR]:
    """A/AAAA of the nameservers inside the zone (outside ones resolve elsewhere)."""
    zone = resolver.zone
    records = []
    for ns_name, addresses in resolver.nameservers:
        if ns_name != zone and not ns_name.endswith("." + zone):
            continue
        for address in addresses:
            if ":" in address:
                records.append(RR(ns_name + ".", TYPE_AAAA, ttl=NS_TTL, rdata=AAAA(address)))
            else:
                records.append(RR(ns_name + ".", TYPE_A, ttl=NS_TTL, rdata=A(address)))
    return records


def _soa_record(resolver: Resolver, owner: object = None) -> RR:
    """The zone's SOA; `minimum` (the negative-caching TTL) is the answer TTL."""
    zone = resolver.zone
    mname = resolver.nameservers[0][0] if resolver.nameservers else f"ns1.{zone}"
    times = (resolver.serial % (1 << 32), SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, resolver.ttl)
    rdata = SOA(mname + ".", f"hostmaster.{zone}.", times)
    return RR(owner if owner is not None else zone + ".", TYPE_SOA, ttl=resolver.ttl, rdata=rdata)


# ----- the fast path: the common query, without dnslib ------------------------------------------
#
# Most queries are A/AAAA for a service name, one question, at most an OPT record, and the
# answer fits. Those are read and answered here with struct, byte for byte what the general
# path would send (tests compare the two); anything else, or any doubt, goes through dnslib.

_HEADER = struct.Struct("!HHHHHH")
_RR_HEAD = struct.Struct("!HHIH")
_OPTION_HEAD = struct.Struct("!HH")
_QUESTION_TAIL = struct.Struct("!HH")
_FAST_TYPES = frozenset((TYPE_A, TYPE_AAAA, TYPE_ANY))


class _SimpleQuery(NamedTuple):  # a tuple: the cheapest record to build per query
    ident: int
    flags: int
    question: bytes  # the question section as sent, echoed verbatim
    name: str  # lower case, no trailing dot
    qtype: int
    edns: Edns | None


def _read_simple_query(query: bytes) -> _SimpleQuery | None:
    """The query if it has the common shape, else None (the general path decides)."""
    try:
        return _read_simple_query_unchecked(query)
    except (IndexError, struct.error, FormatError):
        return None


def _read_simple_query_unchecked(query: bytes) -> _SimpleQuery | None:
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(query)
    if flags & 0xF800 or qdcount != 1 or ancount or nscount or arcount > 1:
        return None  # a response, another opcode, or more than a question and an OPT
    labels = []
    pos = 12
    while length := query[pos]:
        label = query[pos + 1 : pos + 1 + length]
        if length > 63 or len(label) != length or b"." in label:
            return None  # compression, a short packet, or a dot inside a label
        labels.append(label)
        pos += 1 + length
    qtype, qclass = _QUESTION_TAIL.unpack_from(query, pos + 1)
    end = pos + 5
    if qtype not in _FAST_TYPES or qclass != CLASS_IN or end - 12 > MAX_NAME_OCTETS:
        return None
    name = b".".join(labels).lower()
    if not _PLAIN_NAME.fullmatch(name):
        return None  # odd octets (escaped by the general path) or the root
    edns = None
    if arcount:
        edns = _read_simple_opt(query, end)
        if edns is None:
            return None
    elif end != len(query):
        return None
    return _SimpleQuery(ident, flags, query[12:end], name.decode("ascii"), qtype, edns)


def _read_simple_opt(query: bytes, pos: int) -> Edns | None:
    if query[pos] != 0:
        return None
    rtype, payload, ttl, rdlength = _RR_HEAD.unpack_from(query, pos + 1)
    start = pos + 11
    if rtype != TYPE_OPT or start + rdlength != len(query) or (ttl >> 16) & 0xFF:
        return None
    subnet = None
    while start < len(query):
        code, length = _OPTION_HEAD.unpack_from(query, start)
        data = query[start + 4 : start + 4 + length]
        if len(data) != length or length == 0:
            return None
        if code == OPTION_ECS:
            if subnet is not None:
                return None
            subnet = parse_client_subnet(data)
        start += 4 + length
    return Edns(payload=payload, version=0, dnssec_ok=bool(ttl & 0x8000), subnet=subnet)


def _simple_positive_answer(
    query: _SimpleQuery, found: DnsAnswer | None, ttl: int, limit: int
) -> bytes | None:
    """The answer when there are records to give and they fit, else None."""
    if found is None:
        return None
    records = []
    if query.qtype != TYPE_AAAA:
        head = b"\xc0\x0c" + _RR_HEAD.pack(TYPE_A, CLASS_IN, ttl, 4)  # owner: the question
        records += [head + socket.inet_pton(socket.AF_INET, a) for a in found.ipv4]
    if query.qtype != TYPE_A:
        head = b"\xc0\x0c" + _RR_HEAD.pack(TYPE_AAAA, CLASS_IN, ttl, 16)
        records += [head + socket.inet_pton(socket.AF_INET6, a) for a in found.ipv6]
    if not records:
        return None
    edns = query.edns
    flags = _QR | _AA | (query.flags & (_RD | _CD))
    parts = [_HEADER.pack(query.ident, flags, 1, len(records), 0, 0 if edns is None else 1)]
    parts += [query.question, *records]
    if edns is not None:
        options = b""
        if edns.subnet is not None:
            data = edns.subnet.reply_data(found.scope_prefix)
            options = _OPTION_HEAD.pack(OPTION_ECS, len(data)) + data
        opt_ttl = 0x8000 if edns.dnssec_ok else 0
        parts.append(b"\x00" + _RR_HEAD.pack(TYPE_OPT, OUR_UDP_PAYLOAD, opt_ttl, len(options)))
        parts.append(options)
    response = b"".join(parts)
    return response if len(response) <= limit else None


# ----- EDNS ----------------------------------------------------------------------------------


def read_edns(request: DNSRecord) -> Edns | None:
    """The query's OPT record (None without one); FormatError when it is malformed."""
    opts = [rr for rr in request.ar if rr.rtype == TYPE_OPT]
    if not opts:
        return None
    if len(opts) > 1:
        raise FormatError("more than one OPT record")
    opt = opts[0]
    if opt.rname.label:
        raise FormatError("OPT record not owned by the root")
    subnets = [option for option in opt.rdata if option.code == OPTION_ECS]
    if len(subnets) > 1:
        raise FormatError("more than one client-subnet option")
    subnet = parse_client_subnet(subnets[0].data) if subnets else None
    dnssec_ok = bool(opt.ttl & 0x8000)
    return Edns(
        payload=opt.rclass, version=(opt.ttl >> 16) & 0xFF, dnssec_ok=dnssec_ok, subnet=subnet
    )


_FAMILY_BITS = {1: 32, 2: 128}


def parse_client_subnet(data: bytes) -> ClientSubnet:
    """An ECS option's data, checked as RFC 7871 section 6 asks."""
    if len(data) < 4:
        raise FormatError("client-subnet option shorter than 4 octets")
    family, source_prefix, scope_prefix = struct.unpack_from("!HBB", data)
    address = bytes(data[4:])
    max_bits = _FAMILY_BITS.get(family)
    if max_bits is None:
        raise FormatError(f"client-subnet family {family} unknown")
    if source_prefix > max_bits or scope_prefix != 0:
        raise FormatError("client-subnet prefix lengths out of range")
    if len(address) != (source_prefix + 7) // 8:
        raise FormatError("client-subnet address length does not match its prefix")
    spare_bits = -source_prefix % 8
    if address and address[-1] & ((1 << spare_bits) - 1):
        raise FormatError("client-subnet address has bits set beyond its prefix")
    return ClientSubnet(family, source_prefix, address)


def _route_address(edns: Edns | None, source: IPAddress | None) -> IPAddress | None:
    """Whom to route for: the client subnet when the resolver sent one, else the source."""
    subnet = edns.subnet if edns is not None else None
    if subnet is not None and subnet.source_prefix > 0:
        return subnet.network
    return source


def _add_opt(reply: DNSRecord, edns: Edns | None, *, scope: int = 0) -> None:
    if edns is None:
        return
    options = [] if edns.subnet is None else [EDNSOption(OPTION_ECS, edns.subnet.reply_data(scope))]
    _append_opt(reply, options, dnssec_ok=edns.dnssec_ok)


def _append_opt(
    reply: DNSRecord, options: list[EDNSOption], *, dnssec_ok: bool, rcode: int = NOERROR
) -> None:
    """Our OPT record: version 0, our payload size, the DO bit copied (RFC 3225) and the
    upper bits of an extended RCODE."""
    ttl = ((rcode >> 4) << 24) | (0x8000 if dnssec_ok else 0)
    reply.add_ar(RR("", TYPE_OPT, rclass=OUR_UDP_PAYLOAD, ttl=ttl, rdata=options))


def _size_limit(edns: Edns | None, tcp: bool) -> int:
    if tcp:
        return TCP_LIMIT
    if edns is None:
        return UDP_PLAIN_LIMIT
    return max(UDP_PLAIN_LIMIT, min(edns.payload, UDP_EDNS_CAP))


# ----- building and packing --------------------------------------------------------------------


def _reply(request: DNSRecord, rcode: int, *, authoritative: bool = True) -> DNSRecord:
    """An empty response to `request`: same ID, opcode, RD and CD, the question as asked
    (an extended RCODE keeps its low 4 bits here; the OPT record carries the rest)."""
    flags = request.header.bitmap
    bits = _QR | (flags & (0x7800 | _RD | _CD)) | (rcode & 0xF)
    if authoritative:
        bits |= _AA
    header = DNSHeader(id=request.header.id, bitmap=bits)
    return DNSRecord(header, questions=request.questions[:1])


def _error(
    request: DNSRecord, rcode: int, edns: Edns | None = None, *, with_opt: bool = False
) -> bytes:
    reply = _reply(request, rcode, authoritative=False)
    if edns is not None or with_opt:
        _append_opt(reply, [], dnssec_ok=edns.dnssec_ok if edns else False, rcode=rcode)
    return bytes(reply.pack())


def _bare_reply(ident: int, flags: int, rcode: int) -> bytes:
    """A header-only response, for queries whose body cannot be read."""
    bits = _QR | (flags & (0x7800 | _RD | _CD)) | rcode
    return struct.pack("!HHHHHH", ident, bits, 0, 0, 0, 0)


def _pack_within(reply: DNSRecord, limit: int) -> bytes:
    """Pack, dropping glue and then every record (with TC set) until it fits `limit`."""
    wire = reply.pack()
    if len(wire) <= limit:
        return bytes(wire)
    opt = [rr for rr in reply.ar if rr.rtype == TYPE_OPT]
    if len(opt) != len(reply.ar):
        reply.ar = opt  # glue is optional in an authoritative answer
        wire = reply.pack()
        if len(wire) <= limit:
            return bytes(wire)
    reply.rr, reply.auth = [], []
    reply.header.tc = 1
    return bytes(reply.pack())


_PLAIN_LABEL = re.compile(rb"[a-z0-9_*-]+")
_PLAIN_NAME = re.compile(rb"[a-z0-9_*-]+(?:\.[a-z0-9_*-]+)*")
_LABEL_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_*-")


def name_text(labels: tuple[bytes, ...] | list[bytes]) -> str:
    """A wire name as resolvers compare it: lower case, no trailing dot, odd octets \\DDD."""
    parts = []
    for raw in labels:
        label = bytes(raw).lower()
        if _PLAIN_LABEL.fullmatch(label):
            parts.append(label.decode("ascii"))
        else:
            parts.append("".join(chr(c) if c in _LABEL_CHARS else f"\\{c:03d}" for c in label))
    return ".".join(parts)


def _plausible_name(labels: tuple[bytes, ...] | list[bytes]) -> bool:
    """RFC 1035 limits: labels of 1..63 octets, 255 octets in all."""
    return (
        all(0 < len(label) <= 63 for label in labels)
        and sum(len(label) + 1 for label in labels) + 1 <= MAX_NAME_OCTETS
    )


@functools.lru_cache(maxsize=4096)
def source_address(host: str) -> IPAddress | None:
    """A socket's peer host as an address; IPv4-mapped IPv6 becomes IPv4 (memoised: the
    same resolvers ask again and again)."""
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# ----- transports ------------------------------------------------------------------------------


ResolverSource = Callable[[], Resolver]


class _UdpProtocol(asyncio.DatagramProtocol):
    """One datagram, one answer; repeated queries are served from the packet cache."""

    def __init__(self, resolver: ResolverSource) -> None:
        self._resolver = resolver
        self._transport: asyncio.DatagramTransport | None = None
        self._cache: dict[tuple[bytes, str], bytes] = {}
        self._cached_for: object = None
        self._cache_expires = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            resolver = self._resolver()
            key = (data[2:], addr[0])
            cache = self._current_cache(resolver)
            cached = cache.get(key)
            if cached is not None:
                self._transport.sendto(data[:2] + cached, addr)
                return
            response = answer(data, resolver, source_address(addr[0]), tcp=False)
            if response is None:
                return
            if len(data) <= CACHE_MAX_QUERY:
                cache[key] = response[2:]
            self._transport.sendto(response, addr)
        except Exception:
            log.debug("DNS UDP query from %s failed", addr, exc_info=True)

    def _current_cache(self, resolver: Resolver) -> dict[tuple[bytes, str], bytes]:
        now = time.monotonic()
        cache = self._cache
        if (
            resolver is not self._cached_for
            or now >= self._cache_expires
            or (len(cache) >= CACHE_ENTRIES)
        ):
            cache.clear()
            self._cached_for = resolver
            self._cache_expires = now + CACHE_SECONDS
        return cache

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS UDP socket error: %s", exc)


@dataclass(slots=True)
class _TcpSettings:
    resolver: ResolverSource
    idle_timeout: float
    max_connections: int
    connections: set[_TcpProtocol]


class _TcpProtocol(asyncio.Protocol):
    """Length-prefixed messages (RFC 7766): several per connection, closed when idle."""

    def __init__(self, settings: _TcpSettings) -> None:
        self._settings = settings
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._source: IPAddress | None = None
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        settings = self._settings
        if len(settings.connections) >= settings.max_connections:
            log.debug("DNS TCP: %d connections open, refusing one", len(settings.connections))
            transport.close()
            return
        settings.connections.add(self)
        peer = transport.get_extra_info("peername")
        self._source = source_address(peer[0]) if peer else None
        loop = asyncio.get_running_loop()
        self._last_active = loop.time()
        self._idle_timer = loop.call_later(settings.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._last_active = asyncio.get_running_loop().time()
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 2:
            length = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + length:
                return
            message = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            if not self._respond(message):
                self._transport.close()
                return

    def _respond(self, message: bytes) -> bool:
        try:
            response = answer(message, self._settings.resolver(), self._source, tcp=True)
        except Exception:
            log.debug("DNS TCP query failed", exc_info=True)
            response = None
        if response is None:
            log.debug("DNS TCP: dropping a connection that sent an unanswerable message")
            return False
        self._transport.write(len(response).to_bytes(2, "big") + response)
        return True

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle_for = loop.time() - self._last_active
        timeout = self._settings.idle_timeout
        if idle_for >= timeout:
            self._transport.close()
        else:
            self._idle_timer = loop.call_later(timeout - idle_for, self._check_idle)

    def pause_writing(self) -> None:
        self._transport.pause_reading()  # a client that does not read gets no more answers

    def resume_writing(self) -> None:
        self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._settings.connections.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class DnsServer:
    """A running DNS server: UDP and TCP on `port`."""

    def __init__(
        self,
        port: int,
        udp: asyncio.DatagramTransport,
        tcp: asyncio.AbstractServer,
        tcp_settings: _TcpSettings,
    ) -> None:
        self.port = port
        self._udp = udp
        self._tcp = tcp
        self._tcp_settings = tcp_settings

    async def close(self) -> None:
        """Stop listening, drop open TCP connections, and wait until all is closed."""
        self._udp.close()
        self._tcp.close()
        for connection in list(self._tcp_settings.connections):
            connection.abort()
        await self._tcp.wait_closed()

    async def wait_closed(self) -> None:
        await self._tcp.wait_closed()


async def start_dns_server(
    host: str,
    port: int,
    resolver: ResolverSource,
    *,
    tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
    max_tcp_connections: int = MAX_TCP_CONNECTIONS,
) -> DnsServer:
    """Serve DNS over UDP and TCP on host:port (port 0: one free port for both).

    `resolver()` is called for every query and returns the current routing table.
    """
    loop = asyncio.get_running_loop()
    udp_sock, tcp_sock = _bind_pair(host, port)
    try:
        udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(resolver), sock=udp_sock)
    except BaseException:
        udp_sock.close()
        tcp_sock.close()
        raise
    settings = _TcpSettings(resolver, tcp_idle_timeout, max_tcp_connections, set())
    try:
        tcp = await loop.create_server(lambda: _TcpProtocol(settings), sock=tcp_sock, backlog=128)
    except BaseException:
        udp.close()
        tcp_sock.close()
        raise
    return DnsServer(udp_sock.getsockname()[1], udp, tcp, settings)


def _bind_pair(host: str, port: int, attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same port; with port 0, retry until one is free
    for both."""
    family, address = _socket_address(host, port)
    for _ in range(attempts if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp.setblocking(False)
            with contextlib.suppress(OSError):
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            udp.bind(address)
            chosen = udp.getsockname()[1]
            tcp = _tcp_socket(family, (address[0], chosen, *address[2:]))
        except OSError as exc:
            udp.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue
            raise
        return udp, tcp
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")


def _tcp_socket(family: int, address: tuple) -> socket.socket:
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.setblocking(False)
        tcp.bind(address)
        tcp.listen(128)
    except OSError:
        tcp.close()
        raise
    return tcp


def _socket_address(host: str, port: int) -> tuple[int, tuple]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, address


__all__ = [
    "ClientSubnet",
    "DnsAnswer",
    "DnsServer",
    "Edns",
    "FormatError",
    "Resolver",
    "answer",
    "name_text",
    "parse_client_subnet",
    "read_edns",
    "source_address",
    "start_dns_server",
]
