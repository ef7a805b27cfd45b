"""TLS building blocks over real sockets: SNI, versions, ALPN, resumption, reload, dev certs.

A tiny HTTPS server (uvloop, like the edge) runs in a thread; clients are Python's ssl module,
``openssl s_client`` and curl.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import uvloop

from verge.certs import DevCertificates, dev_certificates, issue_cert, load_cert
from verge.cli.cert import register
from verge.http.tls import CertSpec, TlsStore, origin_client_context, safe_server_context

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


class OneResponse(asyncio.Protocol):
    """Answers the first request with the negotiated ALPN protocol, then closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        alpn = self.transport.get_extra_info("ssl_object").selected_alpn_protocol()
        body = f"hello alpn={alpn}\n".encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self.transport.write(head.encode() + body)
        self.transport.close()


class ThreadServer:
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.loop = uvloop.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ctx, ready), daemon=True)
        self.thread.start()
        assert ready.wait(10), "server did not start"

    def _run(self, ctx: ssl.SSLContext, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            self.loop.create_server(OneResponse, "127.0.0.1", 0, ssl=ctx)
        )
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    hosts = ("demo.verge.test", "api.verge.test", "default.verge.test", "*.wild.test")
    return dev_certificates(tmp_path_factory.mktemp("certs"), hosts)


def spec(certs: DevCertificates, host: str) -> CertSpec:
    files = certs.hosts[host]
    return CertSpec(str(files.cert_file), str(files.key_file), (host,))


@pytest.fixture
def store(certs: DevCertificates) -> TlsStore:
    names = ["demo.verge.test", "api.verge.test", "*.wild.test"]
    return TlsStore([spec(certs, n) for n in names], default=spec(certs, "default.verge.test"))


@pytest.fixture
def server(store: TlsStore) -> Iterator[ThreadServer]:
    srv = ThreadServer(store.server_context())
    yield srv
    srv.stop()


def py_client(
    certs: DevCertificates, port: int, sni: str | None, alpn: list[str] | None = None
) -> tuple[dict, str | None, bytes]:
    """(peer certificate, ALPN, response) from a Python ssl client trusting the dev CA."""
    ctx = ssl.create_default_context(cafile=str(certs.ca.cert_file))
    ctx.check_hostname = False  # read whichever certificate comes back
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
        return tls.getpeercert(), tls.selected_alpn_protocol(), data


def common_name(peer: dict) -> str:
    return dict(item[0] for item in peer["subject"])["commonName"]


def s_client(port: int, *args: str, stdin: bytes = b"") -> str:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args]
    done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=20)
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_sni_selects_certificate_python_client(
    server: ThreadServer, certs: DevCertificates
) -> None:
    for sni, expected in [
        ("demo.verge.test", "demo.verge.test"),
        ("API.verge.test.", "api.verge.test"),
        ("a.wild.test", "*.wild.test"),
        ("unknown.example", "default.verge.test"),
        ("x.y.wild.test", "default.verge.test"),
        (None, "default.verge.test"),
    ]:
        peer, _, body = py_client(certs, server.port, sni)
        assert common_name(peer) == expected, sni
        assert body.startswith(b"HTTP/1.1 200 OK")


@needs_openssl
def test_sni_selects_certificate_openssl(server: ThreadServer) -> None:
    for sni, expected in [
        ("demo.verge.test", "demo.verge.test"),
        ("api.verge.test", "api.verge.test"),
        ("nope.test", "default.verge.test"),
    ]:
        out = s_client(server.port, "-servername", sni)
        assert f"subject=CN = {expected}" in out, out


def blocking_handshake(ctx: ssl.SSLContext) -> tuple[int, threading.Thread]:
    """One handshake on a blocking ssl server socket, which (unlike asyncio) sends alerts."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_one() -> None:
        with listener, contextlib.suppress(ssl.SSLError, OSError):
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_unknown_sni_without_default_fails_handshake(certs: DevCertificates) -> None:
    store = TlsStore([spec(certs, "demo.verge.test")])
    srv = ThreadServer(store.server_context())
    try:
        # asyncio and uvloop drop the fatal alert when a handshake fails (cpython#98078):
        # the client sees the connection closed, without a certificate.
        for sni in ("unknown.example", None):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                py_client(certs, srv.port, sni)
        peer, _, _ = py_client(certs, srv.port, "demo.verge.test")
        assert common_name(peer) == "demo.verge.test"
    finally:
        srv.stop()
    port, thread = blocking_handshake(store.server_context())
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):  # the alert our callback asks for
        py_client(certs, port, "unknown.example")
    thread.join(10)


@needs_openssl
def test_protocol_versions(server: ThreadServer, store: TlsStore, certs: DevCertificates) -> None:
    # SECLEVEL=0 so that the refusal comes from the server, not from the client's own policy
    old_args = ["-servername", "demo.verge.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]
    old = s_client(server.port, *old_args)
    assert "Cipher is (NONE)" in old and "subject=" not in old, old  # no handshake
    port, thread = blocking_handshake(store.server_context())  # this one sends the alert
    assert "alert protocol version" in s_client(port, *old_args)
    thread.join(10)
    for flag, name in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")]:
        out = s_client(
            server.port,
            "-servername",
            "demo.verge.test",
            flag,
            "-CAfile",
            str(certs.ca.cert_file),
            "-verify_hostname",
            "demo.verge.test",
        )
        assert f"New, {name}, Cipher is" in out, out
        assert "Verify return code: 0 (ok)" in out


@needs_openssl
def test_tls12_uses_ecdhe_aead_only(server: ThreadServer) -> None:
    out = s_client(server.port, "-servername", "demo.verge.test", "-tls1_2")
    assert "Cipher    : ECDHE-ECDSA-" in out and ("GCM" in out or "CHACHA20" in out), out
    weak = s_client(
        server.port,
        "-servername",
        "demo.verge.test",
        "-tls1_2",
        "-cipher",
        "AES128-SHA:ECDHE-ECDSA-AES128-SHA",
    )
    assert "Cipher    : 0000" in weak or "handshake failure" in weak, weak


@needs_openssl
def test_alpn(server: ThreadServer, certs: DevCertificates) -> None:
    h2 = s_client(server.port, "-servername", "demo.verge.test", "-alpn", "h2,http/1.1")
    assert "ALPN protocol: h2" in h2, h2
    h1 = s_client(server.port, "-servername", "demo.verge.test", "-alpn", "http/1.1")
    assert "ALPN protocol: http/1.1" in h1, h1
    none = s_client(server.port, "-servername", "demo.verge.test")
    assert "No ALPN negotiated" in none, none
    _, alpn, body = py_client(certs, server.port, "api.verge.test", ["http/1.1"])
    assert alpn == "http/1.1" and body.endswith(b"alpn=http/1.1\n")
    _, alpn, _ = py_client(certs, server.port, "unknown.test", ["h2", "http/1.1"])
    assert alpn == "h2"  # also on the default certificate


@needs_openssl
def test_tls13_session_resumption(server: ThreadServer, tmp_path: Path) -> None:
    session = tmp_path / "session.pem"
    args = ["-servername", "demo.verge.test", "-tls1_3", "-ign_eof"]
    first = s_client(server.port, *args, "-sess_out", str(session), stdin=REQUEST)
    assert "New, TLSv1.3" in first and session.stat().st_size > 0, first
    second = s_client(server.port, *args, "-sess_in", str(session), stdin=REQUEST)
    assert "Reused, TLSv1.3" in second, second
    assert "hello alpn=None" in second


@needs_curl
def test_curl_trusts_dev_ca(server: ThreadServer, certs: DevCertificates) -> None:
    url = f"https://demo.verge.test:{server.port}/"
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "--cacert",
            str(certs.ca.cert_file),
            "--resolve",
            f"demo.verge.test:{server.port}:127.0.0.1",
            url,
        ],
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello alpn=http/1.1\n"


def test_reload_swaps_certificate(
    server: ThreadServer, store: TlsStore, certs: DevCertificates, tmp_path: Path
) -> None:
    before, _, _ = py_client(certs, server.port, "demo.verge.test")
    new = issue_cert(
        certs.ca,
        ["demo.verge.test"],
        tmp_path / "new.pem",
        tmp_path / "new-key.pem",
        common_name="demo.verge.test rotated",
    )
    added = issue_cert(
        certs.ca, ["new.verge.test"], tmp_path / "added.pem", tmp_path / "added-key.pem"
    )
    store.reload(
        [
            CertSpec(str(new.cert_file), str(new.key_file), ("demo.verge.test",)),
            CertSpec(str(added.cert_file), str(added.key_file), ("new.verge.test",)),
        ],
        default=None,
    )
    after, _, _ = py_client(certs, server.port, "demo.verge.test")
    assert common_name(before) == "demo.verge.test"
    assert common_name(after) == "demo.verge.test rotated"
    assert common_name(py_client(certs, server.port, "new.verge.test")[0]) == "new.verge.test"
    with pytest.raises(ssl.SSLError):  # default removed: refused (alert dropped, cpython#98078)
        py_client(certs, server.port, "unknown.example")


def test_reload_with_bad_files_keeps_running_table(
    server: ThreadServer, store: TlsStore, certs: DevCertificates, tmp_path: Path
) -> None:
    with pytest.raises(OSError):
        store.reload([CertSpec(str(tmp_path / "missing.pem"), str(tmp_path / "k.pem"), ("x",))])
    assert common_name(py_client(certs, server.port, "demo.verge.test")[0]) == "demo.verge.test"


def test_safe_server_context_settings(certs: DevCertificates) -> None:
    files = certs.hosts["demo.verge.test"]
    ctx = safe_server_context(str(files.cert_file), str(files.key_file), ["h2", "http/1.1"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert not ctx.options & ssl.OP_NO_TICKET
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12)


def test_origin_client_context_pins_ca(
    server: ThreadServer, certs: DevCertificates, tmp_path: Path
) -> None:
    async def fetch(ctx: ssl.SSLContext, host: str) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=ctx, server_hostname=host
        )
        writer.write(REQUEST)
        data = await reader.read()
        writer.close()
        return data

    pinned = origin_client_context(str(certs.ca.cert_file))
    assert asyncio.run(fetch(pinned, "demo.verge.test")).endswith(b"alpn=http/1.1\n")
    with pytest.raises(ssl.SSLCertVerificationError):  # the default cert does not name this host
        asyncio.run(fetch(pinned, "unknown.example"))
    other = dev_certificates(tmp_path / "other", ["x.test"])  # a different CA
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(fetch(origin_client_context(str(other.ca.cert_file)), "demo.verge.test"))
    unverified = origin_client_context(verify=False)
    assert asyncio.run(fetch(unverified, "unknown.example")).startswith(b"HTTP/1.1 200")


def test_dev_certificates_reuse_ca_and_modes(tmp_path: Path) -> None:
    first = dev_certificates(tmp_path)
    assert set(first.hosts) == {
        "demo.verge.test",
        "localhost",
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
    }
    assert stat.S_IMODE(os.stat(first.ca.key_file).st_mode) == 0o600
    for files in first.hosts.values():
        assert stat.S_IMODE(os.stat(files.key_file).st_mode) == 0o600
        load_cert(files.cert_file).verify_directly_issued_by(load_cert(first.ca.cert_file))
    ca_bytes = first.ca.cert_file.read_bytes()
    leaf_bytes = first.hosts["localhost"].cert_file.read_bytes()
    second = dev_certificates(tmp_path, ["localhost", "*.extra.test"])
    assert second.ca.cert_file.read_bytes() == ca_bytes  # CA reused
    assert second.hosts["localhost"].cert_file.read_bytes() == leaf_bytes  # still valid: kept
    assert second.hosts["*.extra.test"].cert_file.name == "_wildcard.extra.test.pem"


@needs_openssl
def test_ip_san_verifies_with_openssl(tmp_path: Path) -> None:
    made = dev_certificates(tmp_path, ["127.0.0.2"])
    done = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(made.ca.cert_file),
            "-verify_ip",
            "127.0.0.2",
            str(made.hosts["127.0.0.2"].cert_file),
        ],
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_cli_cert_dev(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    script = (
        "import typer, sys; from verge.cli.cert import register\n"
        "app = typer.Typer(); register(app)\n"
        "@app.callback()\ndef main() -> None: pass\n"
        "app(sys.argv[1:])\n"
    )
    import sys

    run = [sys.executable, "-c", script, "cert", "dev", "--out", str(out)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    names = {p.name for p in out.iterdir()}
    assert {
        "ca.pem",
        "ca-key.pem",
        "demo.verge.test.pem",
        "demo.verge.test-key.pem",
        "localhost.pem",
        "127.0.0.1.pem",
        "127.0.0.2.pem",
        "127.0.0.3-key.pem",
    } <= names
    ca = (out / "ca.pem").read_bytes()
    again = subprocess.run(
        [*run, "--host", "api.verge.test"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    assert (out / "ca.pem").read_bytes() == ca and (out / "api.verge.test.pem").exists()


def test_register_adds_cert_group() -> None:
    app = typer.Typer()
    register(app)
    assert [group.name for group in app.registered_groups] == ["cert"]
