"""verge.compat.h2: h2's validation stays off with our configuration, and the CONTINUATION
buffer read sees every pending frame (what verge.http.h2server relies on)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.compat import loudly
from verge.compat import CompatError, VersionRange
from verge.compat import h2 as compat

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"a.test"),
    (b":path", b"/"),
]


@pytest.mark.parametrize("supported", compat.SUPPORTED, ids=lambda r: r.name)
def test_installed_version_is_supported(supported: VersionRange) -> None:
    loudly(supported.require)


def test_check_passes() -> None:
    loudly(compat.check)


def connected_pair(
    server_config: h2.config.H2Configuration,
) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """(client, server), settings exchanged; the client checks nothing either."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    server = h2.connection.H2Connection(server_config)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def test_inbound_fields_reach_us_unchecked() -> None:
    """Fields h2 would refuse arrive as sent, as bytes: request_from_fields checks them."""
    fields = [*REQUEST, (b"X-Upper", b"yes"), (b"connection", b"keep-alive")]
    client, server = connected_pair(compat.server_configuration())
    client.send_headers(1, fields, end_stream=True)
    events = server.receive_data(client.data_to_send())
    (request,) = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert list(request.headers) == fields

    client, checking = connected_pair(h2.config.H2Configuration(client_side=False))
    client.send_headers(1, fields, end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError):  # what the flags turn off
        checking.receive_data(client.data_to_send())


def test_outbound_fields_leave_untouched() -> None:
    fields = [(b":status", b"200"), (b"x-Mixed", b" padded "), (b"cookie", b"a=1; b=2")]
    client, server = connected_pair(compat.server_configuration())
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, fields, end_stream=True)
    events = client.receive_data(server.data_to_send())
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert list(response.headers) == fields


def test_pending_header_block_bytes_counts_headers_and_continuations() -> None:
    client, server = connected_pair(compat.server_configuration())
    block = hpack.Encoder().encode([*REQUEST, (b"x-filler", b"f" * 300)], huffman=False)
    first, middle, last = block[:100], block[100:250], block[250:]
    assert compat.pending_header_block_bytes(server) == 0

    server.receive_data(HeadersFrame(1, data=first, flags=["END_STREAM"]).serialize())
    assert compat.pending_header_block_bytes(server) == 100
    server.receive_data(ContinuationFrame(1, data=middle).serialize())
    assert compat.pending_header_block_bytes(server) == 250

    events = server.receive_data(ContinuationFrame(1, data=last, flags=["END_HEADERS"]).serialize())
    assert compat.pending_header_block_bytes(server) == 0
    (request,) = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert request.headers[-1] == (b"x-filler", b"f" * 300)


def test_check_fails_loudly_when_the_buffer_is_renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    original = h2.frame_buffer.FrameBuffer.__init__

    def renamed(self: h2.frame_buffer.FrameBuffer, server: bool = False) -> None:
        original(self, server)
        self._header_frames = self.__dict__.pop("_headers_buffer")

    monkeypatch.setattr(h2.frame_buffer.FrameBuffer, "__init__", renamed)
    with pytest.raises(
        CompatError,
        match=r"^h2 \S+ changed FrameBuffer._headers_buffer .*"
        r"see verge/compat/h2.py$",
    ):
        compat.check()
