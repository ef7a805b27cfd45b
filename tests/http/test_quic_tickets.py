"""HTTP/3 session tickets shared through SQLite: sealed rows, single use, key rotation, and a
real resumption across two servers that share the store (as two workers of a node do)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3

import pytest
from aioquic.asyncio import connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import CipherSuite, SessionTicket

from tests.http.test_h3server import H3Client
from verge.certs import dev_certificates
from verge.http.h3server import QuicCertificates, serve_h3, server_port
from verge.http.quic_tickets import QuicTicketStore, ticket_from_bytes, ticket_to_bytes
from verge.http.server import ServerLimits, text_response
from verge.http.tls import CertSpec
from verge.http.tls_tickets import TicketKey

pytestmark = pytest.mark.timeout(30)


def make_ticket(label: bytes = b"L" * 64, lifetime: float = 3600.0) -> SessionTicket:
    now = dt.datetime.now(dt.UTC)
    return SessionTicket(
        age_add=12345,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + dt.timedelta(seconds=lifetime),
        not_valid_before=now,
        resumption_secret=b"S" * 32,
        server_name="shop.test",
        ticket=label,
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"\x01\x02")],
    )


def test_ticket_serialisation_round_trip():
    ticket = make_ticket()
    again = ticket_from_bytes(ticket.ticket, ticket_to_bytes(ticket))
    assert again.resumption_secret == ticket.resumption_secret
    assert again.cipher_suite is CipherSuite.AES_128_GCM_SHA256
    assert abs(again.not_valid_after - ticket.not_valid_after) < dt.timedelta(milliseconds=1)
    assert (again.server_name, again.age_add, again.other_extensions) == (
        "shop.test",
        12345,
        [(0x39, b"\x01\x02")],
    )


def test_two_stores_on_one_file_share_tickets_once(tmp_path):
    key = TicketKey.generate()
    worker_a = QuicTicketStore(tmp_path / "t.db", [key])
    worker_b = QuicTicketStore(tmp_path / "t.db", [key])
    worker_a.add(make_ticket())
    found = worker_b.pop(b"L" * 64)
    assert found is not None and found.resumption_secret == b"S" * 32
    assert worker_a.pop(b"L" * 64) is None  # single use: a label resumes once
    assert worker_b.pop(b"unknown") is None


def test_secret_is_sealed_at_rest(tmp_path):
    store = QuicTicketStore(tmp_path / "t.db", [TicketKey.generate()])
    store.add(make_ticket())
    (sealed,) = (
        sqlite3.connect(tmp_path / "t.db").execute("SELECT sealed FROM quic_tickets").fetchone()
    )
    assert b"S" * 8 not in sealed and b"shop.test" not in sealed
    assert (tmp_path / "t.db").stat().st_mode & 0o777 == 0o600


def test_key_rotation(tmp_path):
    old, new = TicketKey.generate(), TicketKey.generate()
    store = QuicTicketStore(tmp_path / "t.db", [old])
    store.add(make_ticket(b"a" * 64))
    store.add(make_ticket(b"b" * 64))
    store.set_keys([new, old])  # rotated: the old key still opens
    assert store.pop(b"a" * 64) is not None
    store.set_keys([new])  # the old key is gone: its rows are unreadable, no error
    assert store.pop(b"b" * 64) is None
    store.add(make_ticket(b"c" * 64))
    assert QuicTicketStore(tmp_path / "t.db", [TicketKey.generate()]).pop(b"c" * 64) is None


def test_without_node_keys_a_store_only_reads_its_own(tmp_path):
    mine, other = QuicTicketStore(tmp_path / "t.db"), QuicTicketStore(tmp_path / "t.db")
    mine.add(make_ticket(b"a" * 64))
    mine.add(make_ticket(b"b" * 64))
    assert other.pop(b"a" * 64) is None
    assert mine.pop(b"b" * 64) is not None


def test_expiry_and_entry_cap(tmp_path):
    store = QuicTicketStore(tmp_path / "t.db", [TicketKey.generate()], max_entries=3)
    store.add(make_ticket(b"x" * 64, lifetime=-1))  # already expired
    assert store.pop(b"x" * 64) is None
    for i in range(5):
        store.add(make_ticket(bytes([i]) * 64, lifetime=100 + i))
    store.add(make_ticket(b"y" * 64, lifetime=-1))
    assert store.purge() == 3  # the expired one, then the two that expire first
    assert len(store) == 3
    assert store.pop(bytes([0]) * 64) is None and store.pop(bytes([4]) * 64) is not None


def test_lifetime_is_capped(tmp_path):
    store = QuicTicketStore(tmp_path / "t.db", max_lifetime=-1)  # forgets at once
    store.add(make_ticket(lifetime=86400))
    assert store.pop(b"L" * 64) is None


def test_reusable_store_keeps_rows(tmp_path):
    store = QuicTicketStore(tmp_path / "t.db", single_use=False)
    store.add(make_ticket())
    assert store.pop(b"L" * 64) is not None and store.pop(b"L" * 64) is not None


# --------------------------------------------------------------------------- real handshakes


class TinyApp:
    def handle_fast(self, request):
        return text_response(200, f"hello {request.host}")

    async def handle(self, request, writer) -> None:  # pragma: no cover - never reached
        raise AssertionError


@pytest.fixture
def certs(tmp_path):
    return dev_certificates(tmp_path / "certs", hosts=["shop.test", "blog.test"])


@pytest.fixture
async def two_workers(tmp_path, certs):
    """Two servers (two "workers") with their own store objects on one file."""
    specs = [
        CertSpec(str(certs.hosts[h].cert_file), str(certs.hosts[h].key_file), (h,))
        for h in ("shop.test", "blog.test")
    ]
    key = TicketKey.generate()
    stores = [QuicTicketStore(tmp_path / "tickets.db", [key]) for _ in range(2)]
    servers = [
        await serve_h3(
            TinyApp(), "127.0.0.1", 0, QuicCertificates(specs), ServerLimits(), tickets=store
        )
        for store in stores
    ]
    yield servers, stores
    for server in servers:
        server.close()


async def handshake(server, ca, server_name: str, ticket: SessionTicket | None = None):
    """Connect, make one request, wait for the new ticket: (resumed?, new ticket)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name)
    config.load_verify_locations(str(ca))
    config.session_ticket = ticket
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    def keep(new: SessionTicket) -> None:
        if not got.done():
            got.set_result(new)

    async with connect(
        "127.0.0.1",
        server_port(server),
        configuration=config,
        create_protocol=H3Client,
        session_ticket_handler=keep,
    ) as client:
        headers, body = await client.request("GET", "/", authority=server_name)
        assert headers[b":status"] == b"200" and body == f"hello {server_name}".encode()
        new_ticket = await asyncio.wait_for(got, 5)
        return client._quic.tls.session_resumed, new_ticket


async def test_ticket_from_one_worker_resumes_on_the_other(two_workers, certs):
    (a, b), _ = two_workers
    resumed, ticket = await handshake(a, certs.ca.cert_file, "shop.test")
    assert not resumed
    resumed, ticket = await handshake(b, certs.ca.cert_file, "shop.test", ticket)
    assert resumed
    resumed, _ = await handshake(a, certs.ca.cert_file, "shop.test", ticket)  # and back
    assert resumed


async def test_used_ticket_does_not_resume_again(two_workers, certs):
    (a, b), _ = two_workers
    _, ticket = await handshake(a, certs.ca.cert_file, "shop.test")
    assert (await handshake(b, certs.ca.cert_file, "shop.test", ticket))[0]
    assert not (await handshake(a, certs.ca.cert_file, "shop.test", ticket))[0]


async def test_rotated_out_key_means_a_full_handshake(two_workers, certs):
    (a, b), stores = two_workers
    _, ticket = await handshake(a, certs.ca.cert_file, "shop.test")
    rotated = TicketKey.generate()
    for store in stores:
        store.set_keys([rotated])
    resumed, fresh = await handshake(b, certs.ca.cert_file, "shop.test", ticket)
    assert not resumed  # no error either: the request above was answered
    assert (await handshake(a, certs.ca.cert_file, "shop.test", fresh))[0]


async def test_ticket_is_bound_to_its_server_name(two_workers, certs):
    (a, b), _ = two_workers
    _, ticket = await handshake(a, certs.ca.cert_file, "shop.test")
    ticket.server_name = "blog.test"  # a client offering it under another name
    resumed, _ = await handshake(b, certs.ca.cert_file, "blog.test", ticket)
    assert not resumed


def test_unreadable_database_means_no_ticket(tmp_path, caplog):
    store = QuicTicketStore(tmp_path / "t.db", [TicketKey.generate()])
    store.add(make_ticket())
    store._db.execute("DROP TABLE quic_tickets")
    store.add(make_ticket())
    assert store.pop(b"L" * 64) is None
    assert "full handshakes" in caplog.text
