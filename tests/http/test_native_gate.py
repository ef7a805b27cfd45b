"""The connection cap on the native listener: the application's connection gate
(`connections_per_ip`, verge.edge.protect.ConnectionGate) admits or closes each connection
before its TLS handshake, counts it until it closes, and counts refusals where the Python
listeners count theirs (`verge_connections_refused_by_cap`).
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.http.test_native_harness import needs_native, running, session_certs
from verge.certs import dev_certificates
from verge.edge.protect import ConnectionGate
from verge.http.server import ServerLimits
from verge.protect.settings import Protection

pytestmark = [pytest.mark.timeout(60), needs_native]

CAP = 2
CLIENT = "127.0.0.1"
HANDSHAKE_TIMEOUT = 0.3  # the native side waits this long for the gate's verdict too


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


@pytest.fixture
def native(native_certs, tmp_path):
    limits = ServerLimits(header_timeout=HANDSHAKE_TIMEOUT)
    with running(native_certs, tmp_path, limits) as harness:
        set_gate(harness, ConnectionGate([Protection(connections_per_ip=CAP)]))
        yield harness


def set_gate(native, gate: ConnectionGate | None) -> None:
    """What a config reload does: a new gate on the app, the listener told of it."""
    native.app.connection_gate = gate
    native.call(native.server.apply_limits)


def served(sock: ssl.SSLSocket) -> bool:
    sock.sendall(b"GET /fast HTTP/1.1\r\nHost: shop.test\r\n\r\n")
    return sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


def refused(native) -> bool:
    """A new TLS connection is closed before or during its handshake."""
    try:
        native.tls(timeout=5).close()
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    return False


def counted(native, gate: ConnectionGate) -> int:
    return native.call(gate.cap.count, CLIENT)


def wait_counted(native, gate: ConnectionGate, count: int) -> bool:
    deadline = time.monotonic() + 5
    while counted(native, gate) != count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_connection_over_the_cap_is_closed_and_counted(native):
    gate = native.app.connection_gate
    held = [native.tls() for _ in range(CAP)]
    try:
        assert all(served(sock) for sock in held)
        assert refused(native)
        assert native.call(lambda: gate.cap.refused) == 1
        assert counted(native, gate) == CAP
        held.pop().close()  # a closed connection no longer counts
        assert wait_counted(native, gate, CAP - 1)
        held.append(native.tls())
        assert served(held[-1])
    finally:
        for sock in held:
            sock.close()
    assert wait_counted(native, gate, 0)


def test_without_a_gate_nothing_is_capped(native):
    set_gate(native, None)
    held = [native.tls() for _ in range(CAP + 2)]
    try:
        assert all(served(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()


def test_a_connection_is_released_on_the_gate_that_counted_it(native):
    old = native.app.connection_gate
    with native.tls() as sock:
        assert served(sock)
        new = ConnectionGate([Protection(connections_per_ip=CAP + 1)])
        set_gate(native, new)
        with native.tls() as second:
            assert served(second)
            assert (counted(native, old), counted(native, new)) == (1, 1)
    assert wait_counted(native, old, 0) and wait_counted(native, new, 0)


def test_a_verdict_that_comes_too_late_is_not_counted(native):
    """The loop stalls longer than the native side waits: the connection is closed, and
    the admission Python makes afterwards is handed back and uncounted."""
    gate, server = native.app.connection_gate, native.server
    released: list[int] = []
    release = server._release
    server._release = lambda conn_id: (released.append(conn_id), release(conn_id))
    native.loop.call_soon_threadsafe(time.sleep, HANDSHAKE_TIMEOUT * 3)
    with socket.create_connection(("127.0.0.1", native.port), timeout=5) as raw:
        assert raw.recv(1024) == b""  # closed, no verdict in time
    deadline = time.monotonic() + 5
    while not native.call(lambda: list(released)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(released) == 1  # admitted late, handed back, uncounted
    assert native.call(lambda: dict(server._admitted)) == {}
    assert counted(native, gate) == 0 and native.call(lambda: gate.cap.refused) == 0
    with native.tls() as sock:  # and the loop serves on
        assert served(sock)


EDGE_CONFIG = """
tls:
  certificates:
    - {{cert: "{cert}", key: "{key}", hosts: [shop.test]}}
services:
  - name: shop
    hosts: [shop.test, 127.0.0.1]
    origins: ["{origin}"]
    protection: {{connections_per_ip: 2}}
"""


def test_the_edge_counts_plain_and_native_tls_connections_against_one_cap(
    edge_factory, origin, tmp_path
):
    origin.route("/*", body=b"ok\n")
    certs = dev_certificates(tmp_path / "certs", hosts=["shop.test"])
    shop = certs.hosts["shop.test"]
    config = EDGE_CONFIG.format(cert=shop.cert_file, key=shop.key_file, origin=origin.url)
    edge = edge_factory(
        config=config, extra_args=("--https", "127.0.0.1:0", "--h2-engine", "native")
    )
    context = ssl.create_default_context(cafile=str(certs.ca.cert_file))

    def tls() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=5)
        return context.wrap_socket(raw, server_hostname="shop.test")

    plain = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
    secure = tls()
    try:
        plain.sendall(b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        assert plain.recv(64).startswith(b"HTTP/1.1 200")
        assert served(secure)
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            tls().close()  # the third connection of 127.0.0.1
    finally:
        plain.close()
        secure.close()
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert "verge_connections_refused_by_cap 1.0" in metrics
