"""h2 (and hpack) as :mod:`verge.http.h2server` uses them beyond their documented API.

What is touched, and why:

* **Validation off** (:func:`server_configuration`): ``validate_inbound_headers``,
  ``validate_outbound_headers`` and ``normalize_outbound_headers`` are False, and
  ``header_encoding`` is None (fields stay bytes). Inbound fields are checked in one pass by
  :func:`verge.http.h2server.request_from_fields` (RFC 9113 §8.2-8.3); h2's own validation
  makes ~10 generator passes and was a fifth of the cost of a request. Outbound fields are
  ours, already lower-cased and without connection-specific fields. So with these flags h2
  must pass fields through untouched in both directions: an h2 that ignored a flag would cost
  that fifth again, one that rejected what it no longer validates would break requests.
* **The CONTINUATION buffer** (:func:`pending_header_block_bytes`): the private
  ``FrameBuffer._headers_buffer`` (``conn.incoming_buffer``) holds the HEADERS and
  CONTINUATION frames of a header block until END_HEADERS. h2 caps their number
  (``h2.frame_buffer.CONTINUATION_BACKLOG``) but not their bytes, and HPACK's
  ``max_header_list_size`` applies only once the block is complete; summing the buffered
  payloads lets the server close a connection whose unfinished block grows past its limit
  (CONTINUATION flood) before it is buffered further.
* **hpack, for** :mod:`verge.http.hpack_memo` (no private names, but assumptions):
  ``H2Connection.encoder`` may be replaced by an ``hpack.Encoder`` subclass before any frame
  is sent, h2 calling only ``encode`` and ``header_table_size``; the memo identifies a table
  state by ``HeaderTable.dynamic_entries`` (newest first), ``maxsize`` and ``resized``.

When upgrading h2 or hpack: read h2's ``frame_buffer.py`` (is ``_headers_buffer`` still the
list of pending frames, each with ``.data``, emptied at END_HEADERS?), ``config.py`` (the
four flags) and ``connection.py`` (is ``self.encoder`` still the encoder used for HEADERS?),
and hpack's ``table.py``; run ``tests/compat/test_h2.py`` and ``tests/http/test_h2server.py``
and ``tests/http/test_hpack_memo.py``; then move ``SUPPORTED``.
"""

from __future__ import annotations

import collections

import h2.config
import h2.connection
import h2.frame_buffer
import hpack
from hyperframe.frame import HeadersFrame

from verge.compat import Expect, VersionRange

__all__ = ["SUPPORTED", "check", "pending_header_block_bytes", "server_configuration"]

_MODULE = "verge/compat/h2.py"
H2 = VersionRange("h2", minimum="4.4.1", below="4.5", tested="4.4.1", module=_MODULE)
HPACK = VersionRange("hpack", minimum="4.2.0", below="4.3", tested="4.2.0", module=_MODULE)
SUPPORTED = (H2, HPACK)

_UNCHECKED = {
    "validate_inbound_headers": False,
    "validate_outbound_headers": False,
    "normalize_outbound_headers": False,
}


def server_configuration() -> h2.config.H2Configuration:
    """A server-side configuration with h2's field validation and normalisation off."""
    return h2.config.H2Configuration(client_side=False, header_encoding=None, **_UNCHECKED)


def pending_header_block_bytes(conn: h2.connection.H2Connection) -> int:
    """Payload bytes of a HEADERS + CONTINUATION sequence still waiting for END_HEADERS."""
    frames = getattr(conn.incoming_buffer, "_headers_buffer", None) or ()
    return sum(len(frame.data) for frame in frames)


# --------------------------------------------------------------------------- check


def check() -> None:
    """CompatError unless h2 and hpack still have every shape this module relies on."""
    versions = {r.name: r.installed() for r in SUPPORTED}
    _check_configuration(Expect("h2", versions["h2"], _MODULE))
    _check_headers_buffer(Expect("h2", versions["h2"], _MODULE))
    _check_hpack(Expect("hpack", versions["hpack"], _MODULE))


def _check_configuration(expect: Expect) -> None:
    config = server_configuration()
    for flag, value in _UNCHECKED.items():
        expect.that(getattr(config, flag, None) is value, f"H2Configuration.{flag}")
    expect.that(config.header_encoding is None, "H2Configuration.header_encoding")


def _check_headers_buffer(expect: Expect) -> None:
    """A HEADERS frame without END_HEADERS must sit in ``_headers_buffer``, with its data."""
    conn = h2.connection.H2Connection(config=server_configuration())
    buffer = expect.attribute(conn, "incoming_buffer", "H2Connection.incoming_buffer")
    expect.that(isinstance(buffer, h2.frame_buffer.FrameBuffer), "H2Connection.incoming_buffer")
    pending = expect.attribute(buffer, "_headers_buffer", "FrameBuffer._headers_buffer")
    expect.that(isinstance(pending, list), "FrameBuffer._headers_buffer (not a list)")
    expect.that(
        isinstance(getattr(h2.frame_buffer, "CONTINUATION_BACKLOG", None), int),
        "h2.frame_buffer.CONTINUATION_BACKLOG",
    )
    conn.initiate_connection()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    unfinished = HeadersFrame(1, data=b"\x82" * 10, flags=["END_STREAM"]).serialize()
    events = conn.receive_data(preface + unfinished)
    expect.that(
        pending_header_block_bytes(conn) == 10 and not events[1:],
        "FrameBuffer._headers_buffer (an unfinished header block is not kept there)",
    )


def _check_hpack(expect: Expect) -> None:
    conn = h2.connection.H2Connection(config=server_configuration())
    expect.that(isinstance(conn.encoder, hpack.Encoder), "H2Connection.encoder")
    expect.that(hasattr(conn.decoder, "max_header_list_size"), "hpack.Decoder.max_header_list_size")
    encoder = hpack.Encoder()
    expect.function(hpack.Encoder, "encode", ["self", "headers", "huffman"])
    encoder.header_table_size = 4096
    table = expect.attribute(encoder, "header_table", "hpack.Encoder.header_table")
    entries = expect.attribute(table, "dynamic_entries", "HeaderTable.dynamic_entries")
    expect.that(isinstance(entries, collections.deque), "HeaderTable.dynamic_entries")
    expect.attribute(table, "maxsize", "HeaderTable.maxsize")
    expect.attribute(table, "resized", "HeaderTable.resized")
    encoder.encode([(b"x-verge", b"compat")])
    expect.that(entries and entries[0] == (b"x-verge", b"compat"), "HeaderTable.dynamic_entries")
