"""HTTP/3 server against aioquic's own QUIC + H3 client, certificate verified by the dev CA:
fast-path Responses (small, large and file bodies), the async writer path and request
bodies, SO_REUSEPORT sharing of the UDP port, certificates chosen by SNI and reloaded, and
the DoS caps (streams, reset flood, header size, connections)."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, H3Connection, Setting
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509

from verge.certs import dev_certificates, issue_cert
from verge.http.h3server import (
    H3_EXCESSIVE_LOAD,
    H3Server,
    H3ServerProtocol,
    QuicCertificates,
    serve_h3,
    server_port,
)
from verge.http.response import FileBody, Response
from verge.http.server import ServerLimits, text_response
from verge.http.tls import CertSpec

BIG = os.urandom(1024 * 1024)
pytestmark = pytest.mark.timeout(60)


class FakeApp:
    """A tiny application with both entry points, like the edge's."""

    def __init__(self, tmp_path) -> None:
        self.file = tmp_path / "big.bin"
        self.file.write_bytes(BIG)
        self.gate = asyncio.Event()
        self.holding = 0  # handlers waiting at the gate now
        self.peak = 0
        self.want = 0  # set `reached` once this many are holding
        self.reached = asyncio.Event()
        self.idle = asyncio.Event()  # set whenever the last holding handler leaves

    async def _hold(self) -> None:
        self.holding += 1
        self.idle.clear()
        self.peak = max(self.peak, self.holding)
        if self.holding >= self.want:
            self.reached.set()
        try:
            await self.gate.wait()
        finally:
            self.holding -= 1
            if not self.holding:
                self.idle.set()

    def handle_fast(self, request):
        if request.path == "/fast":
            body = f"fast {request.host} {request.version} {request.scheme}".encode()
            return text_response(200, body, [("X-Fast", "yes")])
        if request.path == "/tuple":
            return Response(200, [], BIG)
        if request.path == "/file":
            fd = os.open(self.file, os.O_RDONLY)
            return Response(200, [], FileBody(fd, 0, len(BIG)), len(BIG))
        return None

    async def handle(self, request, writer) -> None:
        if request.path == "/hold":  # waits for the test to open the gate
            await self._hold()
            writer.start(200, [], content_length=2)
            await writer.write(b"ok")
            return
        if request.path == "/boom":
            raise RuntimeError("app bug")
        if request.path == "/echo":
            body = await request.body.read_all(1 << 24)
            writer.start(201, [("X-Echo", "yes")], content_length=len(body))
            await writer.write(body)
        else:
            writer.start(200, [("X-Stream", "yes"), ("Transfer-Encoding", "chunked")])
            await writer.write(b"hello ")
            await writer.write(request.target.encode())


class H3Client(QuicConnectionProtocol):
    """Minimal HTTP/3 client: one future per request stream resolving to (headers, body)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self._responses: dict[int, tuple[list, bytearray, asyncio.Future]] = {}
        self.terminated: ConnectionTerminated | None = None

    def quic_event_received(self, event) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
            for _, _, done in self._responses.values():
                if not done.done():
                    done.set_exception(ConnectionError(event.reason_phrase))
        for h3_event in self.http.handle_event(event):
            entry = self._responses.get(h3_event.stream_id)
            if entry is None:
                continue
            headers, body, done = entry
            if isinstance(h3_event, HeadersReceived):
                headers.extend(h3_event.headers)
            elif isinstance(h3_event, DataReceived):
                body.extend(h3_event.data)
            if h3_event.stream_ended and not done.done():
                done.set_result((dict(headers), bytes(body)))

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        authority: str = "localhost",
        extra: list | None = None,
    ) -> tuple[dict, bytes]:
        stream_id = self._quic.get_next_available_stream_id()
        done = self._loop.create_future()
        self._responses[stream_id] = ([], bytearray(), done)
        head = [*request_head(method, path, authority), *(extra or [])]
        self.http.send_headers(stream_id, head, end_stream=not body)
        if body:
            self.http.send_data(stream_id, body, end_stream=True)
        self.transmit()
        return await done


def request_head(method: str, path: str, authority: str = "localhost") -> list:
    return [(b":method", method.encode()), (b":scheme", b"https"),
            (b":authority", authority.encode()), (b":path", path.encode())]


@pytest.fixture
async def h3(tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["localhost"])
    files = certs.hosts["localhost"]
    server = await serve_h3(
        FakeApp(tmp_path),
        "127.0.0.1",
        0,
        QuicCertificates.single(str(files.cert_file), str(files.key_file)),
        ServerLimits(max_body_bytes=300_000),
    )
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(str(certs.ca.cert_file))
    async with connect(
        "127.0.0.1", server_port(server), configuration=config, create_protocol=H3Client
    ) as client:
        yield client, server
    server.close()


async def test_fast_path_wire_bytes(h3):
    client, _ = h3
    headers, body = await client.request("GET", "/fast")
    assert headers[b":status"] == b"200"
    assert headers[b"x-fast"] == b"yes"
    assert body == b"fast localhost 3 https"


async def test_fast_path_tuple_and_file(h3):
    client, _ = h3
    for path in ("/tuple", "/file"):
        headers, body = await client.request("GET", path)
        assert headers[b":status"] == b"200"
        assert b"connection" not in headers
        assert headers[b"content-length"] == str(len(BIG)).encode()
        assert body == BIG


async def test_async_writer_path(h3):
    client, _ = h3
    headers, body = await client.request("GET", "/stream?x=1")
    assert headers[b":status"] == b"200"
    assert headers[b"x-stream"] == b"yes"
    assert b"transfer-encoding" not in headers
    assert body == b"hello /stream?x=1"


async def test_request_body_echo(h3):
    client, _ = h3
    payload = os.urandom(200_000)
    headers, body = await client.request("POST", "/echo", payload)
    assert headers[b":status"] == b"201"
    assert headers[b"x-echo"] == b"yes"
    assert body == payload


async def test_oversized_body_is_413(h3):
    client, _ = h3
    headers, body = await client.request("POST", "/echo", os.urandom(400_000))
    assert headers[b":status"] == b"413"
    assert b"too large" in body
    headers, _ = await client.request("GET", "/fast")  # the connection is still usable
    assert headers[b":status"] == b"200"


async def test_app_error_is_500(h3):
    client, _ = h3
    headers, body = await client.request("GET", "/boom")
    assert headers[b":status"] == b"500"
    assert body == b"internal error\n"


async def test_concurrent_streams(h3):
    client, _ = h3
    paths = [f"/stream?n={i}" for i in range(20)]
    results = await asyncio.gather(*(client.request("GET", p) for p in paths))
    assert [body for _, body in results] == [f"hello {p}".encode() for p in paths]


async def test_head_request_has_no_body(h3):
    client, _ = h3
    # aioquic's client checks content-length against DATA even for HEAD (it does not know the
    # method of a response), so that check is switched off for this request only.
    client.http._check_content_length = lambda stream: None
    headers, body = await client.request("HEAD", "/fast")
    assert headers[b"content-length"] == b"22"
    assert headers[b":status"] == b"200"
    assert body == b""


async def test_reuse_port_lets_two_servers_share_the_port(tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["localhost"])
    files = certs.hosts["localhost"]
    args = (QuicCertificates.single(str(files.cert_file), str(files.key_file)), ServerLimits())
    app = FakeApp(tmp_path)
    first = await serve_h3(app, "127.0.0.1", 0, *args)
    second = await serve_h3(app, "127.0.0.1", server_port(first), *args)
    assert server_port(second) == server_port(first)
    second.close()
    first.close()
    with pytest.raises(OSError):
        lone = await serve_h3(app, "127.0.0.1", 0, *args, reuse_port=False)
        try:
            await serve_h3(app, "127.0.0.1", server_port(lone), *args, reuse_port=False)
        finally:
            lone.close()


# --------------------------------------------------------------------------- helpers


def h3_client(server, server_name: str = "localhost", ca=None):
    """An aioquic H3 client context; ``ca=None`` skips certificate verification."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name)
    if ca is None:
        config.verify_mode = ssl.CERT_NONE
    else:
        config.load_verify_locations(str(ca))
    return connect("127.0.0.1", server_port(server), configuration=config, create_protocol=H3Client)


def peer_names(client: H3Client) -> list[str]:
    """DNS names in the certificate the server presented."""
    cert = client._quic.tls._peer_certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def spec(certs, host: str, names: tuple[str, ...] | None = None) -> CertSpec:
    files = certs.hosts[host]
    return CertSpec(str(files.cert_file), str(files.key_file), names or (host,))


@pytest.fixture
def sni_certs(tmp_path):
    return dev_certificates(
        tmp_path / "sni", hosts=["shop.test", "blog.test", "*.wild.test", "fallback.test"]
    )


async def local_server(tmp_path, app=None, limits=None, **kwargs):
    certs = dev_certificates(tmp_path / "certs", hosts=["localhost"])
    server = await serve_h3(
        app or FakeApp(tmp_path),
        "127.0.0.1",
        0,
        QuicCertificates([spec(certs, "localhost")]),
        limits or ServerLimits(),
        **kwargs,
    )
    return server, certs.ca.cert_file


# --------------------------------------------------------------------------- SNI


async def test_sni_picks_each_certificate_and_the_default(tmp_path, sni_certs):
    certificates = QuicCertificates(
        [
            spec(sni_certs, "shop.test"),
            spec(sni_certs, "blog.test"),
            spec(sni_certs, "*.wild.test"),
        ],
        default=spec(sni_certs, "fallback.test"),
    )
    server = await serve_h3(FakeApp(tmp_path), "127.0.0.1", 0, certificates, ServerLimits())
    try:
        expected = {
            "shop.test": "shop.test",
            "blog.test": "blog.test",
            "a.wild.test": "*.wild.test",
        }
        for name, cert_name in expected.items():
            async with h3_client(server, name, sni_certs.ca.cert_file) as client:  # verified
                assert peer_names(client) == [cert_name]
                headers, body = await client.request("GET", "/fast", authority=name)
                assert headers[b":status"] == b"200"
        async with h3_client(server, "BLOG.test.") as client:  # matched once normalised
            assert peer_names(client) == ["blog.test"]
        for unknown in ("unknown.test", "b.a.wild.test"):  # a wildcard covers one label only
            async with h3_client(server, unknown) as client:
                assert peer_names(client) == ["fallback.test"]
    finally:
        server.close()


async def test_unknown_name_without_default_fails_only_that_handshake(tmp_path, sni_certs):
    certificates = QuicCertificates([spec(sni_certs, "shop.test")])
    server = await serve_h3(FakeApp(tmp_path), "127.0.0.1", 0, certificates, ServerLimits())
    try:
        with pytest.raises(ConnectionError):
            async with h3_client(server, "blog.test"):
                pass
        async with h3_client(server, "shop.test", sni_certs.ca.cert_file) as client:
            headers, _ = await client.request("GET", "/fast", authority="shop.test")
            assert headers[b":status"] == b"200"
    finally:
        server.close()


async def test_reload_adds_and_rotates_certificates_without_restart(tmp_path, sni_certs):
    certificates = QuicCertificates([spec(sni_certs, "shop.test")])
    server = await serve_h3(FakeApp(tmp_path), "127.0.0.1", 0, certificates, ServerLimits())
    ca = sni_certs.ca.cert_file
    try:
        async with h3_client(server, "shop.test", ca) as before:
            old_serial = before._quic.tls._peer_certificate.serial_number
            renewed = issue_cert(
                sni_certs.ca, ["shop.test"], tmp_path / "shop2.pem", tmp_path / "shop2-key.pem"
            )
            certificates.reload(
                [
                    CertSpec(str(renewed.cert_file), str(renewed.key_file), ("shop.test",)),
                    spec(sni_certs, "blog.test"),
                ]
            )
            async with h3_client(server, "blog.test", ca) as client:  # added
                assert peer_names(client) == ["blog.test"]
            async with h3_client(server, "shop.test", ca) as client:  # rotated
                assert client._quic.tls._peer_certificate.serial_number != old_serial
            headers, _ = await before.request("GET", "/fast", authority="shop.test")
            assert headers[b":status"] == b"200"  # an open connection keeps going
    finally:
        server.close()


def test_bad_reload_keeps_the_running_certificates(sni_certs):
    certificates = QuicCertificates([spec(sni_certs, "shop.test")])
    shop, blog = sni_certs.hosts["shop.test"], sni_certs.hosts["blog.test"]
    mismatched = CertSpec(str(shop.cert_file), str(blog.key_file), ("shop.test",))
    with pytest.raises(ValueError, match="is not the key"):
        certificates.reload([mismatched])
    assert certificates.lookup("shop.test") is not None
    assert certificates.lookup("blog.test") is None


async def test_no_certificate_at_all_is_refused_before_binding(tmp_path):
    with pytest.raises(ValueError, match="at least one certificate"):
        await serve_h3(FakeApp(tmp_path), "127.0.0.1", 0, QuicCertificates(), ServerLimits())


# --------------------------------------------------------------------------- DoS caps


async def test_request_streams_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(H3ServerProtocol, "MAX_CONCURRENT_STREAMS", 4)
    app = FakeApp(tmp_path)
    app.want = 4
    server, ca = await local_server(tmp_path, app)
    try:
        async with h3_client(server, ca=ca) as client:
            assert client._quic._remote_max_streams_bidi == 4
            requests = [
                asyncio.ensure_future(client.request("GET", f"/hold?{i}")) for i in range(10)
            ]
            await app.reached.wait()
            assert len(client._quic._streams_blocked_bidi) == 6  # waiting for MAX_STREAMS
            app.gate.set()
            results = await asyncio.gather(*requests)
        assert [headers[b":status"] for headers, _ in results] == [b"200"] * 10
        assert app.peak == 4
        app.gate.clear()
        async with h3_client(server, ca=ca) as rude:  # ignores the limit: the connection ends
            rude._quic._remote_max_streams_bidi = 100
            requests = [asyncio.ensure_future(rude.request("GET", "/hold")) for _ in range(6)]
            results = await asyncio.gather(*requests, return_exceptions=True)
            assert all(isinstance(r, ConnectionError) for r in results)
            assert rude.terminated.error_code == QuicErrorCode.STREAM_LIMIT_ERROR
    finally:
        server.close()


async def test_cancelled_requests_give_their_stream_back(tmp_path, monkeypatch):
    """A client RESET_STREAM ends our half too, else each cancel would leak a stream slot."""
    monkeypatch.setattr(H3ServerProtocol, "MAX_CONCURRENT_STREAMS", 2)
    app = FakeApp(tmp_path)
    app.want = 2
    server, ca = await local_server(tmp_path, app)
    head = request_head("POST", "/hold")
    try:
        async with h3_client(server, ca=ca) as client:
            for _ in range(3):  # three rounds through two slots
                app.reached.clear()
                stream_ids = [client._quic.get_next_available_stream_id() + 4 * i for i in range(2)]
                for stream_id in stream_ids:
                    client.http.send_headers(stream_id, head, end_stream=False)
                client.transmit()
                await asyncio.wait_for(app.reached.wait(), 5)  # a leaked slot: no room
                for stream_id in stream_ids:
                    client._quic.reset_stream(stream_id, 0x10C)
                client.transmit()
                await app.idle.wait()
            headers, _ = await client.request("GET", "/fast")
            assert headers[b":status"] == b"200"
    finally:
        server.close()


async def test_reset_flood_closes_that_connection_only(tmp_path, monkeypatch):
    monkeypatch.setattr(H3ServerProtocol, "MAX_RESETS_PER_SECOND", 5)
    app = FakeApp(tmp_path)
    server, ca = await local_server(tmp_path, app)
    head = request_head("GET", "/hold")
    try:
        async with h3_client(server, ca=ca) as bystander, h3_client(server, ca=ca) as flooder:
            for i in range(20):  # open a request, then cancel it at once (rapid reset)
                stream_id = flooder._quic.get_next_available_stream_id()
                whole = i % 2 == 0  # a whole request is cancelled with STOP_SENDING
                flooder.http.send_headers(stream_id, head, end_stream=whole)
                flooder.transmit()
                if whole:
                    flooder._quic.stop_stream(stream_id, 0x10C)
                else:
                    flooder._quic.reset_stream(stream_id, 0x10C)
            flooder.transmit()
            await flooder.wait_closed()
            assert flooder.terminated.error_code == H3_EXCESSIVE_LOAD
            headers, _ = await bystander.request("GET", "/fast")
            assert headers[b":status"] == b"200"
        assert app.holding == 0  # the cancelled requests' handlers were stopped
    finally:
        server.close()


async def test_oversized_header_sections_are_rejected(tmp_path):
    server, ca = await local_server(tmp_path, limits=ServerLimits(max_header_bytes=1024))
    try:
        async with h3_client(server, ca=ca) as client:
            headers, body = await client.request("GET", "/fast", extra=[(b"x-big", b"a" * 2000)])
            assert headers[b":status"] == b"431"
            settings = client.http._received_settings
            assert settings[Setting.MAX_FIELD_SECTION_SIZE] == 1024 + 4096
            assert settings[Setting.QPACK_MAX_TABLE_CAPACITY] == 0
            headers, _ = await client.request("GET", "/fast")  # the connection stays usable
            assert headers[b":status"] == b"200"
        async with h3_client(server, ca=ca) as client:  # beyond the advertised size: closed
            huge = os.urandom(15_000).hex().encode()
            with pytest.raises(ConnectionError):
                await client.request("GET", "/fast", extra=[(b"x-huge", huge)])
            assert client.terminated.error_code == H3_EXCESSIVE_LOAD
    finally:
        server.close()


async def test_connections_beyond_the_cap_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(H3Server, "MAX_CONNECTIONS", 1)
    server, ca = await local_server(tmp_path)
    try:
        async with h3_client(server, ca=ca) as first:
            with pytest.raises(ConnectionError):
                async with h3_client(server, ca=ca):
                    pass
            assert server.refused == 1
            headers, _ = await first.request("GET", "/fast")
            assert headers[b":status"] == b"200"
    finally:
        server.close()


async def test_retry_address_validation_option(tmp_path):
    server, ca = await local_server(tmp_path, retry=True)
    try:
        async with h3_client(server, ca=ca) as client:
            headers, _ = await client.request("GET", "/fast")
            assert headers[b":status"] == b"200"
    finally:
        server.close()
