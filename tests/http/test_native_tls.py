"""Session tickets on the native listener: sealed with the node's shared keys, so a session
from one worker resumes on another, older keys still open tickets, rotated-out keys do not.

Two native servers in one process stand for two workers; Python's ssl client (OpenSSL)
carries the session from one to the other.
"""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest

from tests.http.test_native_harness import (
    NativeHarness,
    needs_native,
    read_until_closed,
    session_certs,
)
from verge.http.tls_tickets import TicketKey

pytestmark = [pytest.mark.timeout(60), needs_native]


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


@pytest.fixture
def two_workers(native_certs, tmp_path):
    first = NativeHarness(native_certs, tmp_path / "a")
    second = NativeHarness(native_certs, tmp_path / "b")
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def client(native_certs) -> ssl.SSLContext:
    """One client context: OpenSSL resumes a session only with the context it came from."""
    ctx = ssl.create_default_context(cafile=str(native_certs.ca.cert_file))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def visit(ctx: ssl.SSLContext, server: NativeHarness, session=None) -> tuple[ssl.SSLSession, bool]:
    """One request; (the session, with its ticket, and whether this one was resumed)."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="shop.test", session=session) as sock:
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200 OK")
        return sock.session, sock.session_reused


def test_a_session_from_one_worker_resumes_on_another(two_workers, client):
    first, second = two_workers
    keys = [TicketKey.generate(), TicketKey.generate()]
    for server in two_workers:
        assert server.call(server.server.set_ticket_keys, keys) is True
    session, reused = visit(client, first)
    assert not reused
    assert visit(client, second, session)[1]  # the other worker opens the ticket
    assert visit(client, first, session)[1]


def test_without_shared_keys_each_worker_keeps_its_own(two_workers, client):
    first, second = two_workers
    session, _ = visit(client, first)
    assert visit(client, first, session)[1]  # a per-process key until the node's arrive
    assert not visit(client, second, session)[1]


def test_rotation_keeps_the_previous_key_until_it_is_dropped(two_workers, client):
    first, second = two_workers
    old, new = TicketKey.generate(), TicketKey.generate()
    for server in two_workers:
        server.call(server.server.set_ticket_keys, [old])
    session, _ = visit(client, first)
    second.call(second.server.set_ticket_keys, [new, old])  # rotated: old still opens
    assert visit(client, second, session)[1]
    names = second.call(second.server.native.ticket_key_names)
    assert names == [new.name, old.name]
    second.call(second.server.set_ticket_keys, [new])  # old rotated out
    assert not visit(client, second, session)[1]


def test_bad_ticket_keys_are_refused_and_the_ring_kept(native_certs, tmp_path):
    server = NativeHarness(native_certs, tmp_path)
    try:
        key = TicketKey.generate()
        server.call(server.server.set_ticket_keys, [key])
        with pytest.raises(ValueError, match="80 bytes"):
            server.call(server.server.native.set_ticket_keys, [b"short"])
        with pytest.raises(ValueError, match="at least one"):
            server.call(server.server.native.set_ticket_keys, [])
        assert server.call(server.server.native.ticket_key_names) == [key.name]
    finally:
        server.stop()


def test_an_ip_address_as_sni_gets_the_default_certificate(native_certs, tmp_path):
    """rustls 0.20 refuses it (decode_error); patches/rustls-0.20.8-ip-sni.patch makes it
    "no SNI", as OpenSSL and rustls 0.21 do (wrk and some OpenSSL clients send one)."""
    server = NativeHarness(native_certs, tmp_path)
    try:
        out = subprocess.run(
            ["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{server.port}",
             "-servername", "127.0.0.1", "-alpn", "http/1.1"],
            input="", capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert "CONNECTION ESTABLISHED" in out.stderr, out.stderr
        assert "CN = shop.test" in out.stderr or "CN=shop.test" in out.stderr
    finally:
        server.stop()
