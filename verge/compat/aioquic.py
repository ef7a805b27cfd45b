"""aioquic (and pylsqpack) as :mod:`verge.http.h3server` uses them beyond their documented API.

What is touched, and why (the call sites in h3server say what each feature is for):

* **SNI certificates** (:func:`before_client_hello`, :func:`peek_server_name`,
  :func:`record_server_name`): aioquic gives a server one certificate. A connection builds
  its TLS context in the private ``QuicConnection._initialize(peer_cid)`` (on the first
  datagram) and reads the certificate only while answering the ClientHello in the private
  ``tls.Context._server_handle_hello(input_buf, initial_buf, handshake_buf)``. So
  ``_initialize`` is wrapped (on the one connection) to wrap ``_server_handle_hello`` (on its
  context): the hook peeks at the hello with ``tls.pull_client_hello``, may set the public
  ``certificate`` / ``certificate_chain`` / ``certificate_private_key`` /
  ``get_session_ticket_cb``, then aioquic goes on. The private ``Context._server_name`` is
  what a ticket issued on the connection records as its server name.
* **HTTP/3 hooks** (:class:`HookedH3Connection`): ``H3Connection`` has no settings for
  SETTINGS_MAX_FIELD_SECTION_SIZE, the QPACK dynamic table or a frame-size check, and no way
  to reset a request stream. The subclass overrides the private ``_init_connection`` (runs
  inside ``__init__`` before SETTINGS go out: sets ``_max_table_capacity``,
  ``_blocked_streams`` and a new ``_decoder = pylsqpack.Decoder(capacity, blocked)``),
  ``_get_local_settings`` and ``_check_request_or_push_frame_type(frame_type, stream)`` (the
  private ``H3Stream.frame_size`` is known there, before the payload is buffered), and reads
  ``_quic`` and ``_stream`` (``H3Stream.sending_ended`` / ``is_ended()``).
* **QUIC limits and buffers**: :func:`set_initial_max_streams_bidi` writes the private
  ``QuicConnection._local_max_streams_bidi`` (a ``Limit``: ``value`` and ``sent``) before the
  handshake, as ``QuicConfiguration`` has no such setting (aioquic announces 128);
  :func:`unacked_bytes` reads ``QuicConnection._streams[id].sender._buffer_start`` /
  ``_buffer_stop``: aioquic has no "data acknowledged" event, and async writers wait on it.
* **Protocol and server state** (:class:`QuicProtocol`, :class:`QuicServerBase`):
  ``QuicConnectionProtocol._quic`` / ``_transport`` and ``QuicServer._configuration`` /
  ``_protocols`` / ``_transport``, and ``QuicServer._connection_terminated(protocol)`` (bound
  by aioquic to each new protocol) for a public ``on_connection_terminated`` hook.
* **Refusing a connection** (:func:`refusal_datagram`): a CONNECTION_REFUSED Initial built
  with aioquic's packet internals (``CryptoPair.setup_initial``, ``QuicPacketBuilder``,
  ``TRANSPORT_CLOSE_FRAME_CAPACITY``): it has no API to refuse before a connection exists.
* **Session tickets**: :mod:`verge.http.quic_tickets` stores every ``tls.SessionTicket``
  field by name (``SESSION_TICKET_FIELDS``); a new field would be lost on resumption.

When upgrading aioquic: diff ``quic/connection.py`` (``_initialize``,
``_local_max_streams_bidi``, ``_streams``), ``quic/stream.py`` (``QuicStreamSender``
buffer offsets), ``tls.py`` (``_server_handle_hello``, ``_server_name``,
``pull_client_hello``, ``SessionTicket``), ``h3/connection.py`` (the three overridden
methods, ``H3Stream``), ``asyncio/server.py`` and ``asyncio/protocol.py``, and
``quic/packet_builder.py``; run ``tests/compat/test_aioquic.py``,
``tests/http/test_h3server.py`` and ``tests/http/test_quic_tickets.py``; move ``SUPPORTED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import pylsqpack
from aioquic import tls
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3Connection, H3Stream, Setting
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY, QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder

from verge.compat import Expect, VersionRange

__all__ = [
    "SESSION_TICKET_FIELDS",
    "SUPPORTED",
    "HelloHook",
    "HookedH3Connection",
    "QuicProtocol",
    "QuicServerBase",
    "before_client_hello",
    "check",
    "peek_server_name",
    "record_server_name",
    "refusal_datagram",
    "server_transport",
    "set_initial_max_streams_bidi",
    "unacked_bytes",
]

_MODULE = "verge/compat/aioquic.py"
AIOQUIC = VersionRange("aioquic", minimum="1.7.2", below="1.8", tested="1.7.2", module=_MODULE)
PYLSQPACK = VersionRange("pylsqpack", minimum="1.0.0", below="1.1", tested="1.0.0", module=_MODULE)
SUPPORTED = (AIOQUIC, PYLSQPACK)

SESSION_TICKET_FIELDS = frozenset(
    {
        "age_add",
        "cipher_suite",
        "not_valid_after",
        "not_valid_before",
        "resumption_secret",
        "server_name",
        "ticket",
        "max_early_data_size",
        "other_extensions",
    }
)

# --------------------------------------------------------------------------- SNI

HelloHook = Callable[[tls.Context, Buffer], None]


def before_client_hello(quic: QuicConnection, hook: HelloHook) -> None:
    """Call ``hook(context, hello)`` on this server connection's TLS context just before
    aioquic answers the ClientHello in ``hello`` (read from, then rewound, by the hook).

    The hook may set the context's certificate, chain, key and ticket fetcher, or raise a
    ``tls.Alert`` to end the handshake. Call before the connection sees its first datagram.
    """
    initialize = quic._initialize

    def initialize_then_hook(peer_cid: bytes) -> None:
        initialize(peer_cid)
        context = quic.tls
        handle_hello = context._server_handle_hello

        def hooked(input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer) -> None:
            hook(context, input_buf)
            handle_hello(input_buf, initial_buf, handshake_buf)

        context._server_handle_hello = hooked

    quic._initialize = initialize_then_hook


def peek_server_name(hello: Buffer) -> str | None:
    """The SNI of the ClientHello at ``hello``'s position, which is left where it was.

    A hello that does not parse ends the handshake with aioquic's own decode_error alert.
    """
    start = hello.tell()
    try:
        return tls.pull_client_hello(hello).server_name
    except ValueError as exc:
        raise tls.AlertDecodeError("Could not parse ClientHello") from exc
    finally:
        hello.seek(start)


def record_server_name(context: tls.Context, name: str | None) -> None:
    """The server name that tickets issued on this connection record (and resume under)."""
    context._server_name = name


# --------------------------------------------------------------------------- HTTP/3


class HookedH3Connection(H3Connection):
    """``H3Connection`` with its private steps turned into hooks a subclass can override.

    ``qpack_max_table_capacity`` and ``qpack_blocked_streams`` replace aioquic's defaults
    (4096 and 16) for the decoder and the SETTINGS sent; :meth:`local_settings` edits the
    SETTINGS; :meth:`check_request_frame` sees each frame's type and size on a request
    stream before its payload is buffered; :meth:`reset_sending` resets a stream.
    """

    def __init__(
        self, quic: QuicConnection, *, qpack_max_table_capacity: int, qpack_blocked_streams: int
    ) -> None:
        self.qpack_max_table_capacity = qpack_max_table_capacity
        self.qpack_blocked_streams = qpack_blocked_streams
        super().__init__(quic)

    @property
    def quic(self) -> QuicConnection:
        return self._quic

    def local_settings(self, settings: dict[int, int]) -> dict[int, int]:
        """The SETTINGS to send (aioquic's, given): override to add or change some."""
        return settings

    def check_request_frame(self, frame_type: int, frame_size: int) -> None:
        """Raise an ``aioquic.h3.exceptions.ProtocolError`` subclass to refuse a frame."""

    def reset_sending(self, stream_id: int, code: int) -> None:
        """RESET_STREAM our half of a request stream, and forget it once both halves ended."""
        with contextlib.suppress(Exception):  # already finished or discarded: nothing to do
            self._quic.reset_stream(stream_id, code)
        stream = self._stream.get(stream_id)
        if stream is not None:
            stream.sending_ended = True
            if stream.is_ended():
                del self._stream[stream_id]

    # ----- aioquic's private methods -------------------------------------------------------
    def _init_connection(self) -> None:
        # runs inside H3Connection.__init__, before the SETTINGS frame is sent
        self._max_table_capacity = self.qpack_max_table_capacity
        self._blocked_streams = self.qpack_blocked_streams
        self._decoder = pylsqpack.Decoder(self._max_table_capacity, self._blocked_streams)
        super()._init_connection()

    def _get_local_settings(self) -> dict[int, int]:
        return self.local_settings(super()._get_local_settings())

    def _check_request_or_push_frame_type(self, frame_type: int, stream: H3Stream) -> None:
        super()._check_request_or_push_frame_type(frame_type, stream)
        self.check_request_frame(frame_type, stream.frame_size)


# --------------------------------------------------------------------------- QUIC


def set_initial_max_streams_bidi(quic: QuicConnection, count: int) -> None:
    """The MAX_STREAMS (bidi) the transport parameters announce: call before the handshake.

    aioquic grants one more stream each time one is fully closed, so this is the number of
    request streams a client can have open at once.
    """
    limit = quic._local_max_streams_bidi
    limit.value = limit.sent = count


def unacked_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes sent on a stream and not yet acknowledged (0 for a stream that is gone)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return sender._buffer_stop - sender._buffer_start


class QuicProtocol(QuicConnectionProtocol):
    """``QuicConnectionProtocol`` with its connection and transport under public names."""

    @property
    def quic(self) -> QuicConnection:
        return self._quic

    @property
    def udp_transport(self) -> asyncio.DatagramTransport | None:
        return self._transport


class QuicServerBase(QuicServer):
    """``QuicServer`` with its configuration, transport and connection table readable, and
    :meth:`on_connection_terminated` called after aioquic forgets a connection."""

    @property
    def configuration(self) -> QuicConfiguration:
        return self._configuration

    @property
    def udp_transport(self) -> asyncio.DatagramTransport | None:
        return self._transport

    def knows_connection_id(self, cid: bytes) -> bool:
        """True when ``cid`` routes to a live connection of this server."""
        return cid in self._protocols

    def on_connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        """A connection ended and was dropped from the table: override to react."""

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        super()._connection_terminated(protocol)
        self.on_connection_terminated(protocol)


def server_transport(server: QuicServer) -> asyncio.DatagramTransport | None:
    """The UDP transport a ``QuicServer`` listens on (None before ``connection_made``)."""
    return server._transport


def refusal_datagram(version: int, source_cid: bytes, destination_cid: bytes) -> bytes:
    """An Initial packet closing a connection attempt with CONNECTION_REFUSED (RFC 9000 §20.1).

    Initial keys derive from the client's destination connection ID (our ``source_cid``), so
    no state is needed; the packet is far smaller than the padded Initial it answers.
    """
    crypto = CryptoPair()
    crypto.setup_initial(cid=source_cid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=source_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=destination_cid,
        version=version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(
        QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY
    )
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(0)  # no reason phrase
    datagrams, _ = builder.flush()
    return datagrams[0]


# --------------------------------------------------------------------------- check


def check() -> None:
    """CompatError unless aioquic and pylsqpack have every shape this module relies on."""
    expect = Expect("aioquic", AIOQUIC.installed(), _MODULE)
    _check_tls(expect)
    _check_quic_connection(expect)
    _check_h3(expect, Expect("pylsqpack", PYLSQPACK.installed(), _MODULE))
    _check_asyncio(expect)
    _check_packets(expect)


def _check_tls(expect: Expect) -> None:
    expect.function(QuicConnection, "_initialize", ["self", "peer_cid"])
    expect.function(
        tls.Context, "_server_handle_hello", ["self", "input_buf", "initial_buf", "handshake_buf"]
    )
    expect.function(tls, "pull_client_hello", ["buf"])
    context = tls.Context(is_client=False)
    for name in (
        "_server_name",
        "certificate",
        "certificate_chain",
        "certificate_private_key",
        "get_session_ticket_cb",
    ):
        expect.attribute(context, name, f"tls.Context.{name}")
    fields = {f.name for f in dataclasses.fields(tls.SessionTicket)}
    expect.that(
        fields == SESSION_TICKET_FIELDS,
        f"tls.SessionTicket fields ({sorted(fields ^ SESSION_TICKET_FIELDS)} differ; "
        "verge/http/quic_tickets.py stores each by name)",
    )


def _check_quic_connection(expect: Expect) -> None:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    limit = expect.attribute(
        quic, "_local_max_streams_bidi", "QuicConnection._local_max_streams_bidi"
    )
    for name in ("value", "sent"):
        expect.that(isinstance(getattr(limit, name, None), int), f"Limit.{name}")
    streams = expect.attribute(quic, "_streams", "QuicConnection._streams")
    expect.that(isinstance(streams, dict), "QuicConnection._streams (not a dict)")
    stream_id = quic.get_next_available_stream_id()
    quic.send_stream_data(stream_id, b"x" * 10)
    sender = expect.attribute(streams.get(stream_id), "sender", "QuicStream.sender")
    for name in ("_buffer_start", "_buffer_stop"):
        expect.that(isinstance(getattr(sender, name, None), int), f"QuicStreamSender.{name}")
    expect.that(unacked_bytes(quic, stream_id) == 10, "QuicStreamSender._buffer_stop - _start")


def _check_h3(expect: Expect, expect_lsqpack: Expect) -> None:
    for name, params in (
        ("_init_connection", ["self"]),
        ("_get_local_settings", ["self"]),
        ("_check_request_or_push_frame_type", ["self", "frame_type", "stream"]),
    ):
        expect.function(H3Connection, name, params)
    client = QuicConnection(configuration=QuicConfiguration(is_client=True))
    h3 = HookedH3Connection(client, qpack_max_table_capacity=0, qpack_blocked_streams=0)
    for name in ("_quic", "_stream", "_max_table_capacity", "_blocked_streams", "_decoder"):
        expect.attribute(h3, name, f"H3Connection.{name}")
    expect.that(
        h3._max_table_capacity == 0
        and h3._sent_settings.get(Setting.QPACK_MAX_TABLE_CAPACITY) == 0,
        "H3Connection._init_connection (the QPACK capacity set there is not the one sent)",
    )
    stream = H3Stream(0)
    for name in ("frame_size", "sending_ended"):
        expect.attribute(stream, name, f"H3Stream.{name}")
    expect.function(H3Stream, "is_ended", ["self"])
    expect_lsqpack.that(isinstance(h3._decoder, pylsqpack.Decoder), "pylsqpack.Decoder")


def _check_asyncio(expect: Expect) -> None:
    expect.function(QuicServer, "_connection_terminated", ["self", "protocol"])
    # (both need a running event loop to construct: their __init__ must assign the names)
    for cls, names in (
        (QuicServer, ("_configuration", "_protocols", "_transport")),
        (QuicConnectionProtocol, ("_quic", "_transport")),
    ):
        for name in names:
            expect.that(name in cls.__init__.__code__.co_names, f"{cls.__name__}.{name}")


def _check_packets(expect: Expect) -> None:
    expect.function(CryptoPair, "setup_initial", ["self", "cid", "is_client", "version"])
    expect.that(isinstance(TRANSPORT_CLOSE_FRAME_CAPACITY, int), "TRANSPORT_CLOSE_FRAME_CAPACITY")
    version = QuicConfiguration(is_client=False).supported_versions[0]
    packet = refusal_datagram(version, b"\x01" * 8, b"\x02" * 8)
    expect.that(0 < len(packet) < SMALLEST_MAX_DATAGRAM_SIZE, "QuicPacketBuilder (refusal size)")
