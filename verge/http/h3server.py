"""HTTP/3 server: aioquic's QUIC + H3 state machines behind the edge's application interface.

Why: the edge pipeline is written once against the HTTP/1.1 application interface of
:mod:`verge.http.server` (``handle_fast`` returning wire bytes, ``handle`` writing through a
ResponseWriter). This module serves that SAME application over HTTP/3 (QUIC, UDP), exactly as
:mod:`verge.http.h2server` does for HTTP/2, so the edge needs no change:

* every request stream becomes a :class:`~verge.http.message.Request` (version ``"3"``,
  scheme ``"https"``, ``host`` from ``:authority``); a request body is collected from DATA
  frames into :class:`H3RequestBody` (same interface as ``RequestBody``), capped at
  ``ServerLimits.max_body_bytes`` (QUIC flow control itself is managed by aioquic);
* a :class:`~verge.http.response.Response` becomes HEADERS (fields memoised on it, shared
  with HTTP/2: :func:`~verge.http.h2server.fields_of`), then DATA;
* :class:`H3ResponseWriter` has the ResponseWriter methods; a writer waits while its stream
  holds more than ``HIGH_WATER`` unacknowledged bytes in aioquic's send buffer.

Certificates (SNI): aioquic gives a server one ``QuicConfiguration``, so one certificate.
:class:`QuicCertificates` holds one per name with the TCP listener's rules (exact names,
``*.example.com`` one-label wildcards, a default; the shared
:class:`~verge.http.tls.HostTable`), and each connection's TLS context is given the matching
certificate once its ClientHello is parsed, before the ServerHello is built. An unknown name
without a default ends that handshake with an ``unrecognized_name`` alert; the server goes
on. :meth:`QuicCertificates.reload` swaps the table for new connections, without a restart.

Resumption: with ``tickets=`` (a :class:`~verge.http.quic_tickets.QuicTicketStore`) the
server issues session tickets and resumes them on any worker of the node. A ticket is bound
to the server name it was issued for; presented under another name it is ignored.

DoS caps, like HTTP/2's: at most ``MAX_CONCURRENT_STREAMS`` request streams per connection
(QUIC's MAX_STREAMS: a client that opens more is closed with STREAM_LIMIT_ERROR), client
stream resets (RESET_STREAM / STOP_SENDING) beyond ``MAX_RESETS_PER_SECOND`` close the
connection with H3_EXCESSIVE_LOAD (rapid reset), a HEADERS frame larger than the advertised
SETTINGS_MAX_FIELD_SECTION_SIZE (``max_header_bytes`` + 4 KiB) closes it before it is buffered
or decoded, a decoded header section over ``ServerLimits.max_header_bytes`` gets 431, and no
QPACK dynamic table is offered (a one-byte reference cannot expand to a 4 KiB entry: decoded
size stays close to frame size). A worker holds at most ``H3Server.MAX_CONNECTIONS``
connections; beyond that a new connection's Initial is answered with CONNECTION_REFUSED.
``retry=True`` makes clients prove their address with a Retry first (one extra round trip).

:func:`serve_h3` binds the UDP socket itself with SO_REUSEPORT so that several worker
processes can share one port (the kernel spreads datagrams by 4-tuple hash).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aioquic import tls
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, FrameType, ProtocolError, Setting
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.h3.exceptions import H3Error
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StopSendingReceived, StreamReset
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from verge.compat import aioquic as aioquic_compat
from verge.http.h2server import (
    RateCap,
    StreamDispatch,
    StreamResponseWriter,
    fields_of,
    request_from_fields,
    request_problem,
)
from verge.http.message import Request
from verge.http.quic_tickets import QuicTicketStore
from verge.http.response import Response
from verge.http.server import (
    NO_BODY_STATUSES,
    ProtocolLimitError,
    QueuedBody,
    ServerLimits,
    text_response,
)
from verge.http.tls import CertSpec, HostTable, normalise_host

H3_INTERNAL_ERROR = 0x102  # RFC 9114 §8.1
H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_CANCELLED = 0x10C
FIELD_SECTION_SLACK = 4096  # frame cap over max_header_bytes, as HTTP/2's header list size


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class QuicCertificate:
    """A certificate as aioquic's TLS context wants it: leaf, chain and private key."""

    certificate: x509.Certificate
    chain: list[x509.Certificate]
    private_key: Any  # an RSA, EC or EdDSA private key from ``cryptography``


def load_quic_certificate(spec: CertSpec) -> QuicCertificate:
    """Load a chain and key; ValueError if the key does not belong to the certificate."""
    scratch = QuicConfiguration(is_client=False)
    scratch.load_cert_chain(spec.cert_file, spec.key_file)
    if _public_bytes(scratch.certificate) != _public_bytes(scratch.private_key):
        raise ValueError(f"{spec.key_file} is not the key of {spec.cert_file}")
    return QuicCertificate(
        scratch.certificate, list(scratch.certificate_chain), scratch.private_key
    )


def _public_bytes(holder: Any) -> bytes:
    return holder.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class QuicCertificates:
    """SNI-selected certificates for HTTP/3: the rules of :class:`~verge.http.tls.TlsStore`."""

    def __init__(self, certs: Sequence[CertSpec] = (), default: CertSpec | None = None) -> None:
        self._table = self._build(certs, default)

    @classmethod
    def single(cls, cert_file: str, key_file: str) -> QuicCertificates:
        """One certificate for every name (the default)."""
        return cls((), CertSpec(cert_file, key_file, ()))

    def reload(self, certs: Sequence[CertSpec], default: CertSpec | None = None) -> None:
        """New connections use these; a bad file raises and the running table stays."""
        self._table = self._build(certs, default)

    def lookup(self, server_name: str | None) -> QuicCertificate | None:
        """The certificate for this SNI (None: the handshake is refused)."""
        return self._table.lookup(server_name)

    def any(self) -> QuicCertificate | None:
        """The default, else some certificate: aioquic's configuration needs one to start."""
        table = self._table
        return table.default or next(iter((*table.exact.values(), *table.wildcard.values())), None)

    @staticmethod
    def _build(certs: Sequence[CertSpec], default: CertSpec | None) -> HostTable[QuicCertificate]:
        return HostTable.build(certs, default, load_quic_certificate)


class AlertUnrecognizedName(tls.Alert):
    description = tls.AlertDescription.unrecognized_name


class _SniSelector:
    """Makes one server connection take its certificate from the ClientHello's server name.

    Just before aioquic answers the ClientHello (the hook of
    :func:`verge.compat.aioquic.before_client_hello`), the server name is peeked at and the
    matching certificate, chain and key put on the connection's TLS context; aioquic then
    picks the signature scheme from that key.
    """

    def __init__(self, quic: QuicConnection, certificates: QuicCertificates) -> None:
        self.certificates = certificates
        aioquic_compat.before_client_hello(quic, self.handle_hello)

    def handle_hello(self, context: tls.Context, hello: Buffer) -> None:
        server_name = aioquic_compat.peek_server_name(hello)
        try:
            name = normalise_host(server_name) if server_name else None
        except ValueError as exc:  # a malformed name: aioquic's own alert
            raise tls.AlertDecodeError("Could not parse ClientHello") from exc
        chosen = self.certificates.lookup(name)
        if chosen is None:
            raise AlertUnrecognizedName(f"no certificate for {name!r}")
        context.certificate = chosen.certificate
        context.certificate_chain = chosen.chain
        context.certificate_private_key = chosen.private_key
        aioquic_compat.record_server_name(context, name)  # in the tickets this one issues
        fetch = context.get_session_ticket_cb
        if fetch is not None:
            context.get_session_ticket_cb = lambda label: _same_name(fetch(label), name)


def _same_name(ticket: tls.SessionTicket | None, name: str | None) -> tls.SessionTicket | None:
    """A ticket resumes only under the server name it was issued for."""
    return ticket if ticket is not None and ticket.server_name == name else None


# --------------------------------------------------------------------------- requests


class H3RequestBody(QueuedBody):
    """A stream's request body: same interface as :class:`verge.http.server.RequestBody`."""

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if data:
            self._chunks.append(data)
            self._wake()

    def fail(self, exc: Exception) -> None:
        self._chunks.clear()  # what is buffered will not be read
        super().fail(exc)

    async def read(self) -> bytes:
        """The next chunk, or b'' at the end of the body."""
        data = await self._next()
        return b"" if data is None else data


# --------------------------------------------------------------------------- connections


class _Stream:
    """Per-stream state: the request, its body, whether the response ended or was reset."""

    __slots__ = ("id", "request", "body", "ended", "reset", "task")

    def __init__(self, stream_id: int, request: Request, body: H3RequestBody | None) -> None:
        self.id = stream_id
        self.request = request
        self.body = body
        self.ended = False
        self.reset = False
        self.task: asyncio.Task | None = None


# The writer is protocol-neutral: it drives the protocol's send_head / queue_data / wait_room /
# send_file_range / send_whole / queue_end, which H3ServerProtocol provides.
H3ResponseWriter = StreamResponseWriter


class HeaderSectionTooLarge(ProtocolError):
    """A HEADERS frame over the SETTINGS_MAX_FIELD_SECTION_SIZE we advertised."""

    error_code = H3_EXCESSIVE_LOAD


class CappedH3Connection(aioquic_compat.HookedH3Connection):
    """aioquic's H3Connection with a bounded header section and no QPACK dynamic table.

    ``max_field_section`` is advertised (SETTINGS_MAX_FIELD_SECTION_SIZE) and enforced on each
    HEADERS frame as soon as its length is known, before its payload is buffered. The
    dynamic table capacity is ``QPACK_TABLE_CAPACITY``: 0 (as Cloudflare's quiche) means
    references only reach the static table, so decoding cannot amplify a small frame.
    ``reset_sending(stream_id, code)`` resets our half of a request stream.
    """

    QPACK_TABLE_CAPACITY = 0

    def __init__(self, quic: QuicConnection, max_field_section: int) -> None:
        self.max_field_section = max_field_section
        super().__init__(  # nothing can block without a dynamic table
            quic, qpack_max_table_capacity=self.QPACK_TABLE_CAPACITY, qpack_blocked_streams=0
        )

    def local_settings(self, settings: dict[int, int]) -> dict[int, int]:
        settings[Setting.MAX_FIELD_SECTION_SIZE] = self.max_field_section
        return settings

    def check_request_frame(self, frame_type: int, frame_size: int) -> None:
        if frame_type == FrameType.HEADERS and frame_size > self.max_field_section:
            raise HeaderSectionTooLarge("header section too large")


def header_section_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """Size of a header section as HTTP/1.1 would carry it ("name: value\\r\\n" per field)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


class H3ServerProtocol(StreamDispatch, aioquic_compat.QuicProtocol):
    """One QUIC connection speaking HTTP/3; ``app`` and ``limits`` are set by the factory."""

    HIGH_WATER = 256 * 1024  # unacknowledged bytes per stream before an async writer waits
    DRAIN_POLL = 0.005  # aioquic has no "data acknowledged" event, so waiting writers poll
    MAX_CONCURRENT_STREAMS = 100  # request streams open at once (QUIC MAX_STREAMS)
    MAX_RESETS_PER_SECOND = 100  # client RESET_STREAM / STOP_SENDING (rapid reset)

    def __init__(self, *args, app, limits: ServerLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.app = app
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self._cap_request_streams(self.MAX_CONCURRENT_STREAMS)
        max_field_section = limits.max_header_bytes + FIELD_SECTION_SLACK
        self.http = CappedH3Connection(self.quic, max_field_section)
        self._streams: dict[int, _Stream] = {}
        self._resets = RateCap(self.MAX_RESETS_PER_SECOND)
        self._closing = False
        self.client = ""

    def _cap_request_streams(self, count: int) -> None:
        """Set the initial MAX_STREAMS (bidi) we announce: runs before the handshake.

        aioquic grants one more stream each time one is fully closed, so this is the number
        of request streams a client can have open at once.
        """
        aioquic_compat.set_initial_max_streams_bidi(self.quic, count)

    # ----- input ---------------------------------------------------------------------------
    def quic_event_received(self, event: QuicEvent) -> None:
        if self._closing:
            return
        if isinstance(event, StreamReset | StopSendingReceived):
            self._on_client_cancel(event)
            if self._closing:
                return
        elif isinstance(event, ConnectionTerminated):
            self._closing = True
            self._kill_all()
            return
        try:
            h3_events = self.http.handle_event(event)
        except H3Error:
            self._abort(H3_INTERNAL_ERROR, "h3 error")
            return
        for h3_event in h3_events:
            self._on_h3_event(h3_event)

    def _on_h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self._on_request(event)
            elif event.stream_ended and stream.body is not None:  # trailers end the body
                stream.body.finish()
        elif isinstance(event, DataReceived):
            self._on_data(event)

    def _on_request(self, event: HeadersReceived) -> None:
        if not self.client:
            transport = self.udp_transport
            peer = transport.get_extra_info("peername") if transport else None
            self.client = peer[0] if peer else ""
        request, malformed = request_from_fields(event.headers, "3", self.client, "https")
        body = None if event.stream_ended else H3RequestBody(self.loop)
        request.body = body
        stream = _Stream(event.stream_id, request, body)
        self._streams[event.stream_id] = stream
        problem = self._header_problem(event.headers) or request_problem(
            request, malformed, self.limits
        )
        if problem is not None:
            status, reason = problem
            self.send_whole(stream, text_response(status, f"{reason}\n"))
            return
        self._dispatch(stream)

    def _header_problem(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        if header_section_bytes(headers) > self.limits.max_header_bytes:
            return 431, "request header fields too large"
        return None

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        body = stream.body if stream is not None else None
        if body is None:
            return
        if body.error is None:
            if body.received + len(event.data) > self.limits.max_body_bytes:
                body.fail(ProtocolLimitError(413, "request body too large"))
            else:
                body.feed(event.data)
        if event.stream_ended:
            body.finish()
            if stream.ended:
                self._streams.pop(stream.id, None)

    def _on_client_cancel(self, event: StreamReset | StopSendingReceived) -> None:
        """The client reset a request stream or asked us to stop: drop its work, count it.

        Both halves end here (our RESET_STREAM too), so the stream's slot is free at once;
        that is what makes rapid reset cheap for the client, hence the cap.
        """
        stream_id = event.stream_id
        if stream_id % 4 != 0:  # not a request stream (control and QPACK streams are uni)
            return
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._kill(stream, ConnectionResetError("stream reset by the client"))
        if stream is not None or isinstance(event, StreamReset):
            self.http.reset_sending(stream_id, H3_REQUEST_CANCELLED)
            if self._resets.hit():
                self._abort(H3_EXCESSIVE_LOAD, "request stream reset flood (rapid reset)")

    def _kill(self, stream: _Stream, exc: Exception) -> None:
        """Fail the body reader of a stream that is gone, and cancel its handler."""
        stream.reset = True
        if stream.body is not None:
            stream.body.fail(exc)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _kill_all(self) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._kill(stream, ConnectionResetError("connection closed"))

    def _abort(self, code: int, reason: str) -> None:
        """Close the whole connection with an HTTP/3 error code."""
        self._closing = True
        self._kill_all()
        self.quic.close(error_code=code, reason_phrase=reason)
        self.transmit()

    # ----- dispatch: StreamDispatch, with these codes --------------------------------------
    CANCEL_CODE = H3_REQUEST_CANCELLED
    INTERNAL_ERROR_CODE = H3_INTERNAL_ERROR

    def _after_handler(self, stream: _Stream) -> None:
        """Nothing to do: QUIC ends or resets the stream on its own."""

    # ----- output --------------------------------------------------------------------------
    def send_head(
        self, stream: _Stream, status: int, fields: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if stream.reset:
            raise ConnectionResetError("stream closed")
        self.http.send_headers(
            stream.id, [(b":status", b"%d" % status), *fields], end_stream=end_stream
        )
        if end_stream:
            self._stream_done(stream)
        self.transmit()

    def send_body(self, stream: _Stream, data: bytes, end_stream: bool = False) -> None:
        if stream.reset:
            raise ConnectionResetError("stream closed")
        self.http.send_data(stream.id, data, end_stream=end_stream)
        if end_stream:
            self._stream_done(stream)
        self.transmit()

    def send_end(self, stream: _Stream) -> None:
        if not stream.ended and not stream.reset:
            self.send_body(stream, b"", end_stream=True)

    def send_whole(self, stream: _Stream, response: Response) -> None:
        """Send a response with a bytes body (or none) as HEADERS + DATA + FIN."""
        if stream.reset:
            return
        status, body = response.status, response.body
        if not body or stream.request.method == "HEAD" or status in NO_BODY_STATUSES:
            self.send_head(stream, status, fields_of(response), end_stream=True)
            return
        self.send_head(stream, status, fields_of(response), end_stream=False)
        self.send_body(stream, body, end_stream=True)

    def _unacked(self, stream: _Stream) -> int:
        return aioquic_compat.unacked_bytes(self.quic, stream.id)

    def queue_data(self, stream: _Stream, data: bytes) -> None:
        self.send_body(stream, data)

    def queue_end(self, stream: _Stream) -> None:
        self.send_end(stream)

    async def wait_room(self, stream: _Stream, high: int | None = None) -> None:
        """Wait until at most ``high`` (default HIGH_WATER) bytes await acknowledgement.

        ``high=0`` (the end of a response) does not wait: QUIC retransmits on its own.
        """
        if high == 0:
            return
        while self._unacked(stream) > self.HIGH_WATER:
            if stream.reset:
                raise ConnectionResetError("stream closed")
            await asyncio.sleep(self.DRAIN_POLL)
        if stream.reset:
            raise ConnectionResetError("stream closed")

    def _stream_done(self, stream: _Stream) -> None:
        stream.ended = True
        if stream.body is None or stream.body.complete:
            self._streams.pop(stream.id, None)

    def reset(self, stream: _Stream, code: int) -> None:
        """Abandon the response: RESET_STREAM (and STOP_SENDING for an unread body)."""
        self._streams.pop(stream.id, None)
        if stream.reset or stream.ended or self._closing:
            return
        stream.reset = True
        if stream.body is not None and not stream.body.complete:
            with contextlib.suppress(Exception):
                self.quic.stop_stream(stream.id, code)
        self.http.reset_sending(stream.id, code)
        self.transmit()


# --------------------------------------------------------------------------- the server


def _udp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def server_configuration(certificates: QuicCertificates) -> QuicConfiguration:
    """The configuration every connection starts from; ValueError without any certificate.

    Its certificate is only a placeholder (aioquic insists on one): each handshake gets the
    one its server name selects.
    """
    placeholder = certificates.any()
    if placeholder is None:
        raise ValueError("HTTP/3 needs at least one certificate")
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.certificate = placeholder.certificate
    config.certificate_chain = placeholder.chain
    config.private_key = placeholder.private_key
    return config


class H3Server(aioquic_compat.QuicServerBase):
    """aioquic's QuicServer serving ``app`` over HTTP/3: SNI certificates, tickets, caps."""

    MAX_CONNECTIONS = 4096  # per worker; beyond it new connections are refused

    def __init__(
        self,
        app,
        limits: ServerLimits,
        certificates: QuicCertificates,
        *,
        tickets: QuicTicketStore | None = None,
        retry: bool = False,
    ) -> None:
        super().__init__(
            configuration=server_configuration(certificates),
            create_protocol=self._new_protocol,
            session_ticket_fetcher=tickets.pop if tickets is not None else None,
            session_ticket_handler=tickets.add if tickets is not None else None,
            retry=retry,
        )
        self.app = app
        self.limits = limits
        self.certificates = certificates
        self.tickets = tickets
        self.connections: set[H3ServerProtocol] = set()
        self.refused = 0  # connection attempts answered with CONNECTION_REFUSED

    def _new_protocol(self, quic: QuicConnection, **kwargs) -> H3ServerProtocol:
        _SniSelector(quic, self.certificates)
        protocol = H3ServerProtocol(quic, app=self.app, limits=self.limits, **kwargs)
        self.connections.add(protocol)
        return protocol

    def datagram_received(self, data: bytes, addr) -> None:
        if len(self.connections) >= self.MAX_CONNECTIONS and self._refused(data, addr):
            return
        super().datagram_received(data, addr)

    def _refused(self, data: bytes, addr) -> bool:
        """At the cap: answer a new connection's first Initial with a refusal (True)."""
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self.configuration.connection_id_length
            )
        except ValueError:
            return False
        if (
            header.packet_type != QuicPacketType.INITIAL
            or len(data) < SMALLEST_MAX_DATAGRAM_SIZE
            or header.version not in self.configuration.supported_versions
            or self.knows_connection_id(header.destination_cid)
        ):
            return False
        # (tiny next to the padded Initial it answers: no amplification)
        packet = aioquic_compat.refusal_datagram(
            header.version, header.destination_cid, header.source_cid
        )
        self.udp_transport.sendto(packet, addr)
        self.refused += 1
        return True

    def on_connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        self.connections.discard(protocol)

    def close(self) -> None:
        super().close()
        self.connections.clear()


async def serve_h3(
    app,
    host: str,
    port: int,
    certificates: QuicCertificates,
    limits: ServerLimits,
    *,
    tickets: QuicTicketStore | None = None,
    retry: bool = False,
    reuse_port: bool = True,
) -> H3Server:
    """Serve ``app`` over HTTP/3 on UDP ``host:port``; returns the server (``.close()``).

    ``certificates`` may be reloaded while serving; ``tickets`` enables resumption (shared
    by every server using the same store file); ``retry`` validates client addresses first.
    """
    server_configuration(certificates)  # fail before binding when there is no certificate
    loop = asyncio.get_running_loop()
    sock = _udp_socket(host, port, reuse_port)
    _, server = await loop.create_datagram_endpoint(
        lambda: H3Server(app, limits, certificates, tickets=tickets, retry=retry), sock=sock
    )
    return server


def server_port(server: QuicServer) -> int:
    """The UDP port a server from :func:`serve_h3` listens on (useful with port 0)."""
    return aioquic_compat.server_transport(server).get_extra_info("sockname")[1]
