"""verge.compat.aioquic: each replacement of an aioquic internal is in effect, on real QUIC
connections (in memory, sans I/O; the server classes over loopback UDP)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import pytest
from aioquic import tls
from aioquic.asyncio import connect
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, Setting
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamReset
from aioquic.quic.packet import QuicErrorCode, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.compat import loudly
from verge.compat import CompatError, VersionRange
from verge.compat import aioquic as compat
from verge.http.quic_tickets import ticket_from_bytes, ticket_to_bytes

CLIENT_ADDR, SERVER_ADDR = ("10.0.0.1", 1234), ("10.0.0.2", 443)
REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"b.test"),
    (b":path", b"/"),
]


@pytest.mark.parametrize("supported", compat.SUPPORTED, ids=lambda r: r.name)
def test_installed_version_is_supported(supported: VersionRange) -> None:
    loudly(supported.require)


def test_check_passes() -> None:
    loudly(compat.check)


def test_check_fails_loudly_when_an_internal_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(QuicConnection, "_initialize")
    with pytest.raises(
        CompatError,
        match=r"^aioquic \S+ changed QuicConnection._initialize "
        r"\(gone\): see verge/compat/aioquic.py$",
    ):
        compat.check()


# --------------------------------------------------------------------------- in memory


def certificate(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


class Pair:
    """A client and a server QuicConnection that exchange datagrams in memory."""

    def __init__(self, prepare=None, **server_kwargs) -> None:
        cert, key = certificate("placeholder.test")
        self.client = QuicConnection(
            configuration=QuicConfiguration(
                is_client=True,
                alpn_protocols=H3_ALPN,
                server_name="b.test",
                verify_mode=ssl.CERT_NONE,
            ),
            session_ticket_handler=lambda ticket: None,  # (asks the server for tickets)
        )
        self.now = 0.0
        self.client.connect(SERVER_ADDR, now=self.now)
        first = self.client.datagrams_to_send(now=self.now)
        header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
        config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        config.certificate, config.private_key = cert, key
        self.server = QuicConnection(
            configuration=config,
            original_destination_connection_id=header.destination_cid,
            **server_kwargs,
        )
        if prepare is not None:
            prepare(self.server)  # what must happen before the first datagram
        for data, _ in first:
            self.server.receive_datagram(data, CLIENT_ADDR, now=self.now)
        self.client_events: list[QuicEvent] = []

    def exchange(self, rounds: int = 6) -> list[QuicEvent]:
        """Datagrams both ways (timers fired), ``rounds`` times; the client's new events."""
        for _ in range(rounds):
            self.now += 0.03
            for sender, receiver, addr in (
                (self.server, self.client, SERVER_ADDR),
                (self.client, self.server, CLIENT_ADDR),
            ):
                timer = sender.get_timer()
                if timer is not None and timer <= self.now:
                    sender.handle_timer(now=self.now)
                for data, _ in sender.datagrams_to_send(now=self.now):
                    receiver.receive_datagram(data, addr, now=self.now)
        return drain(self.client)

    def server_events(self) -> list[QuicEvent]:
        return drain(self.server)


def drain(quic: QuicConnection) -> list[QuicEvent]:
    events = []
    while (event := quic.next_event()) is not None:
        events.append(event)
    return events


def closed(quic: QuicConnection) -> ConnectionTerminated:
    """The end of a closing connection: its draining period timed out."""
    quic.handle_timer(now=quic.get_timer())
    (event,) = [e for e in drain(quic) if isinstance(e, ConnectionTerminated)]
    return event


def test_the_hello_hook_picks_the_certificate_and_the_ticket_name() -> None:
    chosen, chosen_key = certificate("b.test")
    seen: list[str | None] = []
    tickets: list[tls.SessionTicket] = []

    def on_hello(context: tls.Context, hello: Buffer) -> None:
        name = compat.peek_server_name(hello)
        seen.append(name)
        context.certificate, context.certificate_private_key = chosen, chosen_key
        context.certificate_chain = []
        compat.record_server_name(context, f"recorded-{name}")

    pair = Pair(
        prepare=lambda server: compat.before_client_hello(server, on_hello),
        session_ticket_handler=tickets.append,
    )
    events = pair.exchange()
    assert any(isinstance(e, HandshakeCompleted) for e in events)
    assert seen == ["b.test"]  # peeked once, and aioquic parsed the hello again after
    assert pair.client.tls._peer_certificate == chosen
    assert tickets and tickets[0].server_name == "recorded-b.test"


def test_an_alert_from_the_hook_ends_the_handshake() -> None:
    def refuse(context: tls.Context, hello: Buffer) -> None:
        raise tls.AlertHandshakeFailure("no")

    pair = Pair(prepare=lambda server: compat.before_client_hello(server, refuse))
    pair.exchange()
    assert closed(pair.client).error_code == 0x100 + tls.AlertDescription.handshake_failure


def test_peek_server_name_rewinds_and_turns_garbage_into_an_alert() -> None:
    hello = Buffer(data=b"\x01\x00\x00\x05junk")
    with pytest.raises(tls.AlertDecodeError):
        compat.peek_server_name(hello)
    assert hello.tell() == 0


def test_initial_max_streams_bidi_is_what_the_client_gets() -> None:
    pair = Pair(prepare=lambda server: compat.set_initial_max_streams_bidi(server, 4))
    pair.exchange()
    assert pair.client._remote_max_streams_bidi == 4


def test_unacked_bytes_fall_to_zero_once_acknowledged() -> None:
    pair = Pair()
    pair.exchange()
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"hello")
    pair.exchange(1)
    assert compat.unacked_bytes(pair.server, stream_id) == 0
    pair.server.send_stream_data(stream_id, b"x" * 3000)
    assert compat.unacked_bytes(pair.server, stream_id) == 3000
    pair.exchange()
    assert compat.unacked_bytes(pair.server, stream_id) == 0
    assert compat.unacked_bytes(pair.server, 404) == 0  # no such stream


class RecordingH3(compat.HookedH3Connection):
    def __init__(self, quic: QuicConnection) -> None:
        self.frames: list[tuple[int, int]] = []
        super().__init__(quic, qpack_max_table_capacity=0, qpack_blocked_streams=0)

    def local_settings(self, settings: dict[int, int]) -> dict[int, int]:
        settings[Setting.MAX_FIELD_SECTION_SIZE] = 1234
        return settings

    def check_request_frame(self, frame_type: int, frame_size: int) -> None:
        self.frames.append((frame_type, frame_size))


def test_h3_hooks_shape_settings_see_frames_and_reset_streams() -> None:
    pair = Pair()
    pair.exchange()
    server_h3, client_h3 = RecordingH3(pair.server), H3Connection(pair.client)
    stream_id = pair.client.get_next_available_stream_id()
    client_h3.send_headers(stream_id, REQUEST, end_stream=True)
    for event in pair.exchange():
        client_h3.handle_event(event)
    received = [h for e in pair.server_events() for h in server_h3.handle_event(e)]

    assert client_h3._received_settings[Setting.MAX_FIELD_SECTION_SIZE] == 1234
    assert client_h3._received_settings[Setting.QPACK_MAX_TABLE_CAPACITY] == 0
    assert server_h3._decoder is not None and server_h3._max_table_capacity == 0
    (request,) = [e for e in received if isinstance(e, HeadersReceived)]
    assert request.headers == REQUEST
    ((frame_type, frame_size),) = server_h3.frames
    assert frame_type == FrameType.HEADERS and 0 < frame_size < 100

    server_h3.reset_sending(stream_id, 0x10C)
    assert stream_id not in server_h3._stream  # both halves ended: forgotten
    resets = [e for e in pair.exchange() if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(stream_id, 0x10C)]


def test_the_refusal_closes_the_attempt_with_connection_refused() -> None:
    client = QuicConnection(configuration=QuicConfiguration(is_client=True))
    client.connect(SERVER_ADDR, now=0.0)
    (data, _), *_ = client.datagrams_to_send(now=0.0)
    header = pull_quic_header(Buffer(data=data), host_cid_length=8)
    refusal = compat.refusal_datagram(header.version, header.destination_cid, header.source_cid)
    assert len(refusal) < len(data)  # no amplification
    client.receive_datagram(refusal, SERVER_ADDR, now=0.01)
    assert closed(client).error_code == QuicErrorCode.CONNECTION_REFUSED


def test_every_session_ticket_field_survives_the_ticket_store() -> None:
    """quic_tickets stores tickets field by field: a new aioquic field would be lost."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ticket = tls.SessionTicket(
        age_add=7,
        cipher_suite=tls.CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + dt.timedelta(hours=1),
        not_valid_before=now,
        resumption_secret=b"secret",
        server_name="b.test",
        ticket=b"label",
        max_early_data_size=1024,
        other_extensions=[(42, b"ext")],
    )
    assert ticket_from_bytes(b"label", ticket_to_bytes(ticket)) == ticket


# --------------------------------------------------------------------------- over UDP


class Protocol(compat.QuicProtocol):
    made: list[Protocol] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        Protocol.made.append(self)


class Server(compat.QuicServerBase):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.terminated = asyncio.Event()
        self.ended: list[compat.QuicProtocol] = []

    def on_connection_terminated(self, protocol) -> None:
        self.ended.append(protocol)
        self.terminated.set()


async def test_server_and_protocol_state_under_public_names() -> None:
    cert, key = certificate("b.test")
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.certificate, config.private_key = cert, key
    loop = asyncio.get_running_loop()
    _, server = await loop.create_datagram_endpoint(
        lambda: Server(configuration=config, create_protocol=Protocol),
        local_addr=("127.0.0.1", 0),
    )
    try:
        assert server.configuration is config
        assert compat.server_transport(server) is server.udp_transport is not None
        port = server.udp_transport.get_extra_info("sockname")[1]
        client_config = QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name="b.test",
            verify_mode=ssl.CERT_NONE,
        )
        Protocol.made.clear()
        async with connect("127.0.0.1", port, configuration=client_config) as client:
            await client.ping()
            (protocol,) = Protocol.made
            assert isinstance(protocol.quic, QuicConnection)
            assert protocol.udp_transport is server.udp_transport
            assert server.knows_connection_id(protocol.quic.host_cid)
        await asyncio.wait_for(server.terminated.wait(), 5)
        assert server.ended == [protocol]
        assert not server.knows_connection_id(protocol.quic.host_cid)
    finally:
        server.close()
