"""The router's authoritative DNS server.

Unit tests drive the sans-I/O `answer()` with queries built by dnslib and a fake resolver;
integration tests start the server on 127.0.0.1 port 0 and query it with dnspython and dig
(the client every operator will use), over UDP and TCP.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord, EDNSOption
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.routing import dns as dns_module
from verge.routing.dns import (
    BADVERS,
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    DnsAnswer,
    _general_answer,
    _read_simple_query,
    answer,
    name_text,
    start_dns_server,
)

pytestmark = pytest.mark.timeout(30)

LOCAL = IPv4Address("127.0.0.1")
EAST = ip_network("10.1.0.0/16")
WEST = ip_network("10.2.0.0/16")
MANY = tuple(f"10.9.{i // 250}.{i % 250 + 1}" for i in range(60))


@dataclass
class FakeTable:
    """A routing table in miniature: demo.verge.test goes east or west by client region."""

    zone: str = "verge.test"
    ttl: int = 10
    serial: int = 7
    nameservers: tuple = (
        ("ns1.verge.test", ("127.0.0.1", "::1")),
        ("ns.elsewhere.example", ("192.0.2.53",)),
    )
    label: str = "1"  # tells two tables apart in the swap test
    calls: list = field(default_factory=list)

    def resolve(self, name, client):
        self.calls.append((name, client))
        if name == "demo.verge.test":
            if client is not None and client in EAST:
                return DnsAnswer(("10.1.0.5",), ("2001:db8:1::5",), scope_prefix=16)
            if client is not None and client in WEST:
                return DnsAnswer(("10.2.0.5",), ("2001:db8:2::5",), scope_prefix=16)
            return DnsAnswer((f"127.0.0.{self.label}",), ("::1",))
        if name == "v4only.verge.test":
            return DnsAnswer(("192.0.2.1",), ())
        if name == "big.verge.test":
            return DnsAnswer(MANY, ())
        if name == "ns1.verge.test":
            return DnsAnswer(("127.0.0.1",), ("::1",))
        if name == "boom.verge.test":
            raise RuntimeError("resolver bug")
        return None


def query(name, qtype="A", *, edns=None, ecs=None, do=False, version=0, ident=4242) -> bytes:
    """A query as dnslib builds it; `edns` is the UDP payload size (None: no OPT)."""
    record = DNSRecord(DNSHeader(id=ident, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None or ecs is not None or do or version:
        opts = [EDNSOption(8, ecs)] if ecs is not None else []
        record.add_ar(
            EDNS0(udp_len=edns or 1232, opts=opts, flags="do" if do else "", version=version)
        )
    return bytes(record.pack())


def ecs_data(subnet: str, *, scope: int = 0) -> bytes:
    network = ip_network(subnet)
    family = 1 if network.version == 4 else 2
    significant = network.network_address.packed[: (network.prefixlen + 7) // 8]
    return struct.pack("!HBB", family, network.prefixlen, scope) + significant


def ask(wire: bytes, table=None, source=LOCAL, *, tcp=False) -> DNSRecord:
    response = answer(wire, table or FakeTable(), source, tcp=tcp)
    assert response is not None
    return DNSRecord.parse(response)


def rcode(reply: DNSRecord) -> int:
    opt = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    extended = (opt[0].ttl >> 24) << 4 if opt else 0
    return reply.header.rcode | extended


def records(section, rtype: str) -> list[str]:
    return [str(rr.rdata) for rr in section if rr.rtype == getattr(QTYPE, rtype)]


def ecs_reply(reply: DNSRecord) -> tuple[int, int, int, bytes]:
    (opt,) = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    (option,) = [o for o in opt.rdata if o.code == 8]
    family, source, scope = struct.unpack_from("!HBB", option.data)
    return family, source, scope, bytes(option.data[4:])


# ----- answer(): names in the zone -------------------------------------------------------------


def test_a_record_is_authoritative_without_recursion():
    reply = ask(query("demo.verge.test"))
    assert rcode(reply) == NOERROR
    assert reply.header.qr and reply.header.aa and not reply.header.ra and reply.header.rd
    assert reply.header.id == 4242
    assert records(reply.rr, "A") == ["127.0.0.1"]
    assert reply.rr[0].ttl == 10
    assert str(reply.q.qname) == "demo.verge.test."


def test_aaaa_and_any():
    assert records(ask(query("demo.verge.test", "AAAA")).rr, "AAAA") == ["::1"]
    both = ask(query("demo.verge.test", "ANY")).rr
    assert records(both, "A") == ["127.0.0.1"] and records(both, "AAAA") == ["::1"]


def test_names_are_case_insensitive_and_the_question_is_echoed_as_asked():
    table = FakeTable()
    reply = ask(query("DeMo.VERGE.test."), table)
    assert records(reply.rr, "A") == ["127.0.0.1"]
    assert str(reply.q.qname) == "DeMo.VERGE.test."
    assert str(reply.rr[0].rname) == "DeMo.VERGE.test."
    assert table.calls == [("demo.verge.test", LOCAL)]


def test_nxdomain_carries_the_soa():
    reply = ask(query("nope.verge.test"))
    assert rcode(reply) == NXDOMAIN and reply.header.aa and not reply.rr
    (soa,) = reply.auth
    assert str(soa.rname) == "verge.test."
    assert str(soa.rdata.mname) == "ns1.verge.test."
    assert str(soa.rdata.rname) == "hostmaster.verge.test."
    assert soa.rdata.times == (7, 3600, 600, 86400, 10)
    assert soa.ttl == 10


@pytest.mark.parametrize(
    ("name", "qtype"),
    [("v4only.verge.test", "AAAA"), ("demo.verge.test", "MX"), ("demo.verge.test", "TXT"),
     ("verge.test", "A"), ("demo.verge.test", "SOA")],
)  # fmt: skip
def test_nodata_when_the_name_exists_without_that_type(name, qtype):
    reply = ask(query(name, qtype))
    assert rcode(reply) == NOERROR and reply.header.aa and not reply.rr
    assert records(reply.auth, "SOA") and len(reply.auth) == 1


def test_soa_at_the_apex():
    reply = ask(query("verge.test", "SOA"))
    (soa,) = reply.rr
    assert soa.rdata.times[0] == 7 and str(soa.rdata.mname) == "ns1.verge.test."
    assert not reply.auth


def test_ns_at_the_apex_with_glue_for_in_zone_nameservers_only():
    reply = ask(query("verge.test", "NS"))
    assert rcode(reply) == NOERROR and reply.header.aa
    assert records(reply.rr, "NS") == ["ns1.verge.test.", "ns.elsewhere.example."]
    glue = {(str(rr.rname), str(rr.rdata)) for rr in reply.ar}
    assert glue == {("ns1.verge.test.", "127.0.0.1"), ("ns1.verge.test.", "::1")}


def test_the_apex_exists_even_if_the_resolver_does_not_know_it():
    reply = ask(query("verge.test", "A"), FakeTable(zone="verge.test"))
    assert rcode(reply) == NOERROR  # FakeTable returns None for the apex: still NODATA


def test_odd_octets_in_a_name_cannot_alias_another_name():
    assert name_text([b"demo.verge", b"test"]) == "demo\\046verge.test"
    reply = ask(query("x.verge.test"))
    assert rcode(reply) == NXDOMAIN
    tricky = DNSRecord(DNSHeader(id=1), q=DNSQuestion("x.verge.test"))
    tricky.q.qname.label = (b"demo.verge", b"test")
    assert rcode(ask(bytes(tricky.pack()))) == REFUSED  # "demo\046verge.test" is not in the zone


# ----- answer(): refusals and errors ---------------------------------------------------------


@pytest.mark.parametrize("name", ["example.com", "notverge.test", "test", "."])
def test_names_outside_the_zone_are_refused(name):
    reply = ask(query(name))
    assert rcode(reply) == REFUSED and not reply.header.aa and not reply.header.ra
    assert not reply.rr and not reply.auth


def test_zone_transfers_and_other_classes_are_refused():
    assert rcode(ask(query("verge.test", "AXFR"))) == REFUSED
    chaos = DNSRecord(DNSHeader(id=1), q=DNSQuestion("verge.test", QTYPE.TXT, 3))
    assert rcode(ask(bytes(chaos.pack()))) == REFUSED


@pytest.mark.parametrize("opcode", [1, 2, 4, 5])
def test_opcodes_other_than_query_are_not_implemented(opcode):
    record = DNSRecord.parse(query("demo.verge.test"))
    record.header.opcode = opcode
    reply = ask(bytes(record.pack()))
    assert rcode(reply) == NOTIMP and reply.header.opcode == opcode and not reply.rr


def test_question_count_other_than_one_is_a_format_error():
    none = DNSRecord(DNSHeader(id=9))
    assert rcode(ask(bytes(none.pack()))) == FORMERR
    two = DNSRecord(
        DNSHeader(id=9), questions=[DNSQuestion("a.verge.test"), DNSQuestion("b.verge.test")]
    )
    reply = ask(bytes(two.pack()))
    assert rcode(reply) == FORMERR and reply.header.id == 9


def test_a_readable_header_with_a_broken_body_gets_formerr_with_its_id():
    wire = query("demo.verge.test", ident=777)
    reply = ask(wire[:20])
    assert rcode(reply) == FORMERR and reply.header.id == 777 and reply.header.qr


def test_no_header_or_a_response_is_dropped():
    assert answer(b"\x01\x02\x03", FakeTable(), LOCAL, tcp=False) is None
    assert answer(b"", FakeTable(), LOCAL, tcp=True) is None
    response = answer(query("demo.verge.test"), FakeTable(), LOCAL, tcp=False)
    assert answer(response, FakeTable(), LOCAL, tcp=False) is None


def test_a_failing_resolver_gives_servfail():
    reply = ask(query("boom.verge.test"))
    assert rcode(reply) == SERVFAIL and reply.header.id == 4242


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_never_raises(data):
    response = answer(data, FakeTable(), LOCAL, tcp=False)
    assert response is None or len(response) >= 12


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_queries_never_raise_and_both_paths_agree(data):
    wire = bytearray(query("demo.verge.test", ecs=ecs_data("10.1.0.0/24"), do=True))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    mutated = bytes(wire[: data.draw(st.integers(0, len(wire)))])
    response = answer(mutated, FakeTable(), LOCAL, tcp=False)
    assert response is None or DNSRecord.parse(response).header.qr
    if response is not None:
        assert response == _general_answer(mutated, FakeTable(), LOCAL, False)


# ----- answer(): EDNS and client subnet -----------------------------------------------------------


def test_opt_is_echoed_only_when_the_query_has_one():
    assert not [rr for rr in ask(query("demo.verge.test")).ar if rr.rtype == QTYPE.OPT]
    reply = ask(query("demo.verge.test", edns=4096, do=True))
    (opt,) = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    assert opt.rclass == 1232 and opt.edns_do and (opt.ttl >> 16) & 0xFF == 0


def test_unknown_edns_version_gets_badvers():
    reply = ask(query("demo.verge.test", version=1))
    assert rcode(reply) == BADVERS and not reply.rr


def test_two_opt_records_are_a_format_error():
    record = DNSRecord.parse(query("demo.verge.test", edns=1232))
    record.add_ar(EDNS0(udp_len=1232))
    assert rcode(ask(bytes(record.pack()))) == FORMERR


def test_client_subnet_routes_by_the_subnet_and_returns_the_scope():
    table = FakeTable()
    east = ask(query("demo.verge.test", ecs=ecs_data("10.1.0.0/24")), table)
    west = ask(query("demo.verge.test", ecs=ecs_data("10.2.0.0/24")), table)
    assert records(east.rr, "A") == ["10.1.0.5"] and records(west.rr, "A") == ["10.2.0.5"]
    assert ecs_reply(east) == (1, 24, 16, bytes([10, 1, 0]))
    assert table.calls == [("demo.verge.test", IPv4Address("10.1.0.0")),
                           ("demo.verge.test", IPv4Address("10.2.0.0"))]  # fmt: skip


def test_client_subnet_ipv6_and_odd_prefixes():
    table = FakeTable()
    reply = ask(query("demo.verge.test", ecs=ecs_data("2001:db8:42::/56")), table)
    assert ecs_reply(reply) == (2, 56, 0, IPv6Address("2001:db8:42::").packed[:7])
    assert table.calls[-1][1] == IPv6Address("2001:db8:42::")
    reply = ask(query("demo.verge.test", ecs=ecs_data("10.1.128.0/17")), table)
    assert ecs_reply(reply)[:3] == (1, 17, 16)


def test_client_subnet_of_length_zero_routes_by_source_with_scope_zero():
    table = FakeTable()
    reply = ask(query("demo.verge.test", ecs=ecs_data("0.0.0.0/0")), table, IPv4Address("10.1.2.3"))
    assert records(reply.rr, "A") == ["10.1.0.5"]
    assert ecs_reply(reply) == (1, 0, 0, b"")


def test_without_client_subnet_the_source_address_routes():
    reply = ask(query("demo.verge.test"), FakeTable(), IPv4Address("10.2.9.9"))
    assert records(reply.rr, "A") == ["10.2.0.5"]


def test_negative_answers_hold_for_every_subnet():
    reply = ask(query("nope.verge.test", ecs=ecs_data("10.1.0.0/24")))
    assert rcode(reply) == NXDOMAIN and ecs_reply(reply)[2] == 0


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01\x18",  # shorter than the fixed part
        b"\x00\x03\x18\x00\x0a\x01\x00",  # unknown family
        b"\x00\x01\x21\x00" + bytes(5),  # IPv4 prefix longer than 32
        b"\x00\x01\x18\x00\x0a\x01",  # /24 with two address octets
        b"\x00\x01\x18\x00\x0a\x01\x00\x00",  # /24 with four
        b"\x00\x01\x17\x00\x0a\x01\x01",  # /23 with a bit set past the prefix
        b"\x00\x01\x18\x08\x0a\x01\x00",  # SCOPE set in a query
    ],
)
def test_malformed_client_subnet_is_a_format_error(data):
    reply = ask(query("demo.verge.test", ecs=data))
    assert rcode(reply) == FORMERR and not reply.rr
    assert [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]


# ----- answer(): sizes -------------------------------------------------------------------------


def test_large_udp_answer_without_edns_is_truncated():
    reply = ask(query("big.verge.test"))
    assert reply.header.tc and not reply.rr and rcode(reply) == NOERROR
    assert str(reply.q.qname) == "big.verge.test."


def test_edns_payload_size_is_honoured_with_a_floor_and_a_cap():
    assert len(ask(query("big.verge.test", edns=1232)).rr) == 60
    assert ask(query("big.verge.test", edns=100)).header.tc  # below 512 counts as 512
    wire = answer(query("big.verge.test", edns=65000), FakeTable(), LOCAL, tcp=False)
    assert len(wire) <= 4096


def test_tcp_has_no_udp_limit():
    reply = ask(query("big.verge.test"), tcp=True)
    assert not reply.header.tc and len(reply.rr) == 60


def test_glue_is_dropped_before_the_answer_is_truncated():
    table = FakeTable(nameservers=tuple((f"ns{i}.verge.test", (f"127.0.1.{i}", f"fd00::{i}"))
                                        for i in range(1, 12)))  # fmt: skip
    reply = ask(query("verge.test", "NS"), table)
    assert not reply.header.tc and len(reply.rr) == 11 and not reply.ar
    assert len(ask(query("verge.test", "NS", edns=4096), table).ar) == 23  # glue + OPT


# ----- answer(): the fast path says exactly what the general path says -----------------------------


def test_common_queries_take_the_fast_path():
    assert _read_simple_query(query("demo.verge.test")) is not None
    assert (
        _read_simple_query(query("Demo.verge.test", "AAAA", ecs=ecs_data("10.1.0.0/24")))
        is not None
    )
    assert _read_simple_query(query("demo.verge.test", "MX")) is None


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(["demo.verge.test", "DEMO.Verge.TEST", "v4only.verge.test", "big.verge.test",
                          "nope.verge.test", "verge.test", "ns1.verge.test", "boom.verge.test",
                          "example.com", "a.b.demo.verge.test", "*.verge.test"]),
    qtype=st.sampled_from(["A", "AAAA", "ANY", "MX", "NS", "SOA"]),
    edns=st.sampled_from([None, 100, 512, 1232, 4096]),
    ecs=st.sampled_from([None, "10.1.0.0/24", "10.2.0.0/16", "0.0.0.0/0", "2001:db8::/48",
                         "10.1.128.0/17"]),
    do=st.booleans(),
    source=st.sampled_from(["127.0.0.1", "10.1.2.3", "10.2.3.4", "::1"]),
    tcp=st.booleans(),
)  # fmt: skip
def test_fast_and_general_paths_agree(name, qtype, edns, ecs, do, source, tcp):
    wire = query(name, qtype, edns=edns, ecs=ecs_data(ecs) if ecs else None, do=do)
    address = ip_address(source)
    assert answer(wire, FakeTable(), address, tcp=tcp) == _general_answer(
        wire, FakeTable(), address, tcp
    )


# ----- the server over sockets ---------------------------------------------------------------------


class Tables:
    """What the router does: one current table, swapped by assignment."""

    def __init__(self) -> None:
        self.current = FakeTable()

    def __call__(self) -> FakeTable:
        return self.current


@pytest.fixture
async def server():
    tables = Tables()
    dns_server = await start_dns_server("127.0.0.1", 0, tables)
    dns_server.tables = tables
    yield dns_server
    await dns_server.close()


def dp_query(name: str, qtype: str = "A", **kwargs) -> dns.message.Message:
    return dns.message.make_query(name, qtype, **kwargs)


async def udp(server, message: dns.message.Message, **kwargs) -> dns.message.Message:
    return await dns.asyncquery.udp(message, "127.0.0.1", port=server.port, timeout=3, **kwargs)


async def tcp(server, message: dns.message.Message) -> dns.message.Message:
    return await dns.asyncquery.tcp(message, "127.0.0.1", port=server.port, timeout=3)


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rdata.address for rrset in response.answer for rdata in rrset)


async def test_udp_and_tcp_share_the_chosen_port(server):
    assert server.port > 0
    assert addresses(await udp(server, dp_query("demo.verge.test"))) == ["127.0.0.1"]
    assert addresses(await tcp(server, dp_query("demo.verge.test", "AAAA"))) == ["::1"]


async def test_dnspython_sees_authoritative_answers_and_errors(server):
    nx = await udp(server, dp_query("nope.verge.test"))
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
    assert nx.authority[0].rdtype == dns.rdatatype.SOA
    refused = await udp(server, dp_query("example.com"))
    assert refused.rcode() == dns.rcode.REFUSED and not refused.flags & dns.flags.RA
    ns = await udp(server, dp_query("verge.test", "NS"))
    assert {str(r.name) for r in ns.additional} == {"ns1.verge.test."}


async def test_dnspython_client_subnet(server):
    option = dns.edns.ECSOption("10.1.0.0", 24)
    response = await udp(server, dp_query("demo.verge.test", use_edns=0, options=[option]))
    assert addresses(response) == ["10.1.0.5"]
    (echo,) = response.options
    assert (echo.address, echo.srclen, echo.scopelen) == ("10.1.0.0", 24, 16)


async def test_truncated_udp_then_tcp_fallback(server):
    truncated = await udp(server, dp_query("big.verge.test"), ignore_trailing=True)
    assert truncated.flags & dns.flags.TC and not truncated.answer
    response, used_tcp = await dns.asyncquery.udp_with_fallback(
        dp_query("big.verge.test"), "127.0.0.1", port=server.port, timeout=3
    )
    assert used_tcp and len(addresses(response)) == 60


async def test_several_queries_on_one_tcp_connection_even_pipelined(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    names = ["demo.verge.test", "nope.verge.test", "verge.test", "big.verge.test"]
    wires = [dp_query(name).to_wire() for name in names]
    writer.write(b"".join(len(w).to_bytes(2, "big") + w for w in wires))  # all at once
    for wire in wires:
        length = int.from_bytes(await reader.readexactly(2), "big")
        response = dns.message.from_wire(await reader.readexactly(length))
        assert response.id == dns.message.from_wire(wire).id
    writer.write(len(wires[0]).to_bytes(2, "big") + wires[0][:5])  # a frame in two pieces
    await writer.drain()
    await asyncio.sleep(0)
    writer.write(wires[0][5:])
    length = int.from_bytes(await reader.readexactly(2), "big")
    assert addresses(dns.message.from_wire(await reader.readexactly(length))) == ["127.0.0.1"]
    writer.close()


async def test_garbage_then_a_valid_query_is_still_answered(server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for junk in (b"", b"\x00", b"hello world, not dns", bytes(range(256)), b"\xff" * 12):
            sock.sendto(junk, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\x00\x03abc")  # no header: the server hangs up on this connection only
    assert await reader.read() == b""
    writer.close()
    assert addresses(await udp(server, dp_query("demo.verge.test"))) == ["127.0.0.1"]
    assert addresses(await tcp(server, dp_query("demo.verge.test"))) == ["127.0.0.1"]


async def test_a_swapped_table_is_answered_at_once(server):
    first = await udp(server, dp_query("demo.verge.test"))
    again = await udp(server, dp_query("demo.verge.test"))  # from the packet cache
    assert addresses(first) == addresses(again) == ["127.0.0.1"]
    server.tables.current = FakeTable(label="9")
    assert addresses(await udp(server, dp_query("demo.verge.test"))) == ["127.0.0.9"]


async def test_cached_answers_carry_the_new_query_id(server):
    for ident in (1, 2, 65535):
        message = dp_query("demo.verge.test")
        message.id = ident
        assert (await udp(server, message)).id == ident


async def exchange(reader, writer, message: dns.message.Message) -> dns.message.Message:
    wire = message.to_wire()
    writer.write(len(wire).to_bytes(2, "big") + wire)
    length = int.from_bytes(await reader.readexactly(2), "big")
    return dns.message.from_wire(await reader.readexactly(length))


async def test_tcp_connections_are_bounded_and_closed_when_idle():
    dns_server = await start_dns_server(
        "127.0.0.1", 0, Tables(), tcp_idle_timeout=0.4, max_tcp_connections=2
    )
    try:
        kept = [await asyncio.open_connection("127.0.0.1", dns_server.port) for _ in range(2)]
        for reader, writer in kept:  # both accepted and served
            assert addresses(await exchange(reader, writer, dp_query("demo.verge.test")))
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", dns_server.port)
        assert await asyncio.wait_for(extra_reader.read(), 0.3) == b""  # over the bound
        extra_writer.close()
        loop = asyncio.get_running_loop()
        started = loop.time()
        for reader, writer in kept:
            assert await asyncio.wait_for(reader.read(), 2) == b""  # idle: closed by the server
            writer.close()
        assert loop.time() - started >= 0.1
    finally:
        await dns_server.close()


async def test_a_fixed_port_serves_both_protocols():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    dns_server = await start_dns_server("127.0.0.1", port, Tables())
    try:
        assert dns_server.port == port
        with pytest.raises(OSError):
            await start_dns_server("127.0.0.1", port, Tables())
        assert addresses(await tcp(dns_server, dp_query("demo.verge.test"))) == ["127.0.0.1"]
    finally:
        await dns_server.close()


# ----- dig ------------------------------------------------------------------------------------

needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) not installed")


async def dig(server, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(server.port), "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    return out.decode()


def status(output: str) -> str:
    return re.search(r"status: (\w+)", output).group(1)


def flags(output: str) -> set[str]:
    return set(re.search(r";; flags: ([a-z ]+);", output).group(1).split())


@needs_dig
async def test_dig_a_aaaa_soa_ns(server):
    assert (await dig(server, "demo.verge.test", "+short")).split() == ["127.0.0.1"]
    assert (await dig(server, "demo.verge.test", "AAAA", "+short")).split() == ["::1"]
    soa = await dig(server, "verge.test", "SOA", "+short")
    assert soa.split() == ["ns1.verge.test.", "hostmaster.verge.test.", "7", "3600", "600",
                           "86400", "10"]  # fmt: skip
    ns = await dig(server, "verge.test", "NS")
    assert "aa" in flags(ns) and "ra" not in flags(ns)
    assert re.search(r"^ns1\.verge\.test\.\s+3600\s+IN\s+A\s+127\.0\.0\.1$", ns, re.M)
    assert re.search(r"^ns1\.verge\.test\.\s+3600\s+IN\s+AAAA\s+::1$", ns, re.M)


@needs_dig
async def test_dig_negative_answers(server):
    nx = await dig(server, "nope.verge.test")
    assert status(nx) == "NXDOMAIN" and "aa" in flags(nx)
    assert re.search(r"AUTHORITY SECTION:\nverge\.test\.\s+10\s+IN\s+SOA", nx)
    nodata = await dig(server, "v4only.verge.test", "AAAA")
    assert status(nodata) == "NOERROR" and "ANSWER: 0," in nodata and "IN\tSOA" in nodata
    refused = await dig(server, "www.example.com")
    assert status(refused) == "REFUSED" and "aa" not in flags(refused)


@needs_dig
async def test_dig_subnet_routes_two_subnets_apart(server):
    east = await dig(server, "demo.verge.test", "+subnet=10.1.0.0/24")
    west = await dig(server, "demo.verge.test", "+subnet=10.2.0.0/24")
    assert re.search(r"IN\s+A\s+10\.1\.0\.5", east) and re.search(r"IN\s+A\s+10\.2\.0\.5", west)
    assert "CLIENT-SUBNET: 10.1.0.0/24/16" in east
    assert "CLIENT-SUBNET: 10.2.0.0/24/16" in west


@needs_dig
async def test_dig_truncation_and_tcp_retry(server):
    truncated = await dig(server, "big.verge.test", "+ignore", "+noedns")
    assert "tc" in flags(truncated) and "ANSWER: 0," in truncated
    retried = await dig(server, "big.verge.test", "+noedns", "+short")
    assert len(retried.split()) == 60


@needs_dig
async def test_dig_tcp_keeps_one_connection_for_several_queries(server, monkeypatch):
    accepted = []
    original = dns_module._TcpProtocol.connection_made

    def counting(self, transport):
        accepted.append(transport)
        original(self, transport)

    monkeypatch.setattr(dns_module._TcpProtocol, "connection_made", counting)
    out = await dig(server, "+tcp", "+keepopen", "demo.verge.test", "nope.verge.test",
                    "verge.test", "SOA")  # fmt: skip
    assert re.findall(r"status: (\w+)", out) == ["NOERROR", "NXDOMAIN", "NOERROR"]
    assert len(accepted) == 1
