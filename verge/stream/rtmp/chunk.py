"""The RTMP chunk stream: messages cut into chunks, interleaved over one TCP connection.

Reader and writer are sans-I/O. :class:`ChunkReader` takes bytes and returns whole
:class:`Message` objects, reassembled per chunk stream id (csid) however the peer interleaves
them; :class:`ChunkWriter` turns messages into chunks with the shortest valid headers.

Details that real peers depend on (RTMP spec 5.3, checked against FFmpeg's rtmppkt.c):

* Basic header types 0..3 carry 11/7/3/0 bytes of message header; csids 2..65599 in 1..3 bytes.
* Type 0 carries an absolute timestamp, types 1 and 2 a delta; a type-3 chunk that starts a
  new message repeats the previous delta — and after a type-0 chunk that "delta" is the type-0
  timestamp itself (spec 5.3.1.2.4: "a chunk of Type 3 could immediately follow the chunk of
  Type 0"). FFmpeg's writer relies on exactly this.
* A timestamp field of 0xFFFFFF means a 4-byte extended timestamp follows; it is repeated in
  every type-3 chunk of the chunk stream while the last full header used it (FFmpeg, librtmp).
* Set Chunk Size and Abort act on the chunk layer itself, so the reader applies them the moment
  they are parsed (the next chunk in the same buffer already uses the new size) and does not
  return them. All other messages, protocol control included, go up to the session.

Bounds: a message longer than ``max_message_size`` and more than ``max_chunk_streams``
distinct csids are errors; unread input never exceeds one chunk (its payload is at most the
message length), so the buffer is bounded by the message size limit as well.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class MessageType(IntEnum):
    SET_CHUNK_SIZE = 1
    ABORT = 2
    ACK = 3
    USER_CONTROL = 4
    WINDOW_ACK_SIZE = 5
    SET_PEER_BANDWIDTH = 6
    AUDIO = 8
    VIDEO = 9
    DATA_AMF3 = 15
    COMMAND_AMF3 = 17
    DATA_AMF0 = 18
    COMMAND_AMF0 = 20
    AGGREGATE = 22


class UserControl(IntEnum):
    STREAM_BEGIN = 0
    STREAM_EOF = 1
    STREAM_DRY = 2
    SET_BUFFER_LENGTH = 3
    STREAM_IS_RECORDED = 4
    PING_REQUEST = 6
    PING_RESPONSE = 7


class PeerBandwidthLimit(IntEnum):
    HARD = 0
    SOFT = 1
    DYNAMIC = 2


CONTROL_CSID = 2
DEFAULT_CHUNK_SIZE = 128
MAX_CHUNK_SIZE = 0x7FFFFFFF
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_CHUNK_STREAMS = 64
EXTENDED = 0xFFFFFF
MAX_CSID = 65599
_HEADER_SIZE = (11, 7, 3, 0)
_u32 = struct.Struct(">I")


class ChunkError(ValueError):
    """The chunk stream is malformed or exceeds the reader's bounds."""


@dataclass(slots=True)
class Message:
    """One reassembled RTMP message."""

    type_id: int
    payload: bytes
    timestamp: int = 0
    stream_id: int = 0
    csid: int = 0


class _InState:
    """What the previous chunk of one chunk stream established."""

    __slots__ = ("timestamp", "delta", "length", "type_id", "stream_id", "extended", "partial")

    def __init__(self) -> None:
        self.timestamp = 0
        self.delta = 0
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.extended = False
        self.partial: bytearray | None = None


class ChunkReader:
    """Bytes in, messages out. Raises :class:`ChunkError` on malformed input."""

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_chunk_streams: int = DEFAULT_MAX_CHUNK_STREAMS,
    ) -> None:
        self.chunk_size = chunk_size
        self.max_message_size = max_message_size
        self.max_chunk_streams = max_chunk_streams
        self.bytes_received = 0
        self._buffer = bytearray()
        self._streams: dict[int, _InState] = {}

    @property
    def buffered(self) -> int:
        """Bytes held: unparsed input plus partially reassembled messages."""
        partial = sum(len(s.partial) for s in self._streams.values() if s.partial is not None)
        return len(self._buffer) + partial

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self.bytes_received += len(data)
        self._buffer += data
        messages: list[Message] = []
        offset = 0
        try:
            while True:
                consumed = self._read_chunk(offset, messages)
                if consumed == 0:
                    break
                offset += consumed
        finally:
            del self._buffer[:offset]
        return messages

    def _read_chunk(self, start: int, messages: list[Message]) -> int:
        """Parse one chunk at ``start``; return the bytes it took (0: not all there yet)."""
        buf = self._buffer
        available = len(buf) - start
        if available < 1:
            return 0
        first = buf[start]
        fmt = first >> 6
        csid = first & 0x3F
        pos = start + 1
        if csid == 0:
            if available < 2:
                return 0
            csid = 64 + buf[pos]
            pos += 1
        elif csid == 1:
            if available < 3:
                return 0
            csid = 64 + buf[pos] + (buf[pos + 1] << 8)
            pos += 2
        header_size = _HEADER_SIZE[fmt]
        if len(buf) < pos + header_size:
            return 0
        state = self._streams.get(csid)
        if state is None:
            if fmt != 0:
                raise ChunkError(f"chunk stream {csid} starts with a type-{fmt} header")
            if len(self._streams) >= self.max_chunk_streams:
                raise ChunkError(f"more than {self.max_chunk_streams} chunk streams")
            state = self._streams[csid] = _InState()
        elif fmt != 3 and state.partial is not None:
            raise ChunkError(f"type-{fmt} header on chunk stream {csid} inside a message")

        ts_field = length = type_id = stream_id = 0
        if fmt <= 2:
            ts_field = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
        if fmt <= 1:
            length = (buf[pos + 3] << 16) | (buf[pos + 4] << 8) | buf[pos + 5]
            type_id = buf[pos + 6]
        if fmt == 0:
            stream_id = int.from_bytes(buf[pos + 7 : pos + 11], "little")
        pos += header_size
        extended = ts_field == EXTENDED if fmt <= 2 else state.extended
        if extended:
            if len(buf) < pos + 4:
                return 0
            if fmt <= 2:
                ts_field = _u32.unpack_from(buf, pos)[0]
            pos += 4

        new_message = state.partial is None
        if fmt <= 1 and length > self.max_message_size:
            raise ChunkError(f"message of {length} bytes exceeds the {self.max_message_size} limit")
        message_length = length if fmt <= 1 else state.length
        have = 0 if new_message else len(state.partial)  # type: ignore[arg-type]
        size = min(self.chunk_size, message_length - have)
        if len(buf) < pos + size:
            return 0

        # The whole chunk is here: commit the header to the chunk stream state.
        if new_message:
            self._start_message(state, fmt, ts_field, length, type_id, stream_id, extended)
        partial = state.partial
        assert partial is not None
        partial += buf[pos : pos + size]
        pos += size
        if len(partial) >= state.length:
            state.partial = None
            self._complete(csid, state, bytes(partial), messages)
        return pos - start

    @staticmethod
    def _start_message(
        state: _InState,
        fmt: int,
        ts_field: int,
        length: int,
        type_id: int,
        stream_id: int,
        extended: bool,
    ) -> None:
        if fmt == 0:
            state.timestamp = ts_field
            state.delta = ts_field
            state.stream_id = stream_id
        elif fmt <= 2:
            state.delta = ts_field
            state.timestamp = (state.timestamp + ts_field) & 0xFFFFFFFF
        else:
            state.timestamp = (state.timestamp + state.delta) & 0xFFFFFFFF
        if fmt <= 1:
            state.length = length
            state.type_id = type_id
        if fmt <= 2:
            state.extended = extended
        state.partial = bytearray()

    def _complete(
        self, csid: int, state: _InState, payload: bytes, messages: list[Message]
    ) -> None:
        if state.type_id == MessageType.SET_CHUNK_SIZE:
            self._set_chunk_size(payload)
        elif state.type_id == MessageType.ABORT:
            self._abort(payload)
        else:
            messages.append(Message(state.type_id, payload, state.timestamp, state.stream_id, csid))

    def _set_chunk_size(self, payload: bytes) -> None:
        if len(payload) < 4:
            raise ChunkError("Set Chunk Size message shorter than 4 bytes")
        size = _u32.unpack_from(payload)[0] & 0x7FFFFFFF
        if size < 1:
            raise ChunkError("Set Chunk Size of 0")
        self.chunk_size = size

    def _abort(self, payload: bytes) -> None:
        if len(payload) < 4:
            raise ChunkError("Abort message shorter than 4 bytes")
        state = self._streams.get(_u32.unpack_from(payload)[0])
        if state is not None:
            state.partial = None


# ---------------------------------------------------------------------------- writing


class _OutState:
    __slots__ = ("timestamp", "delta", "length", "type_id", "stream_id")

    def __init__(
        self, timestamp: int, delta: int, length: int, type_id: int, stream_id: int
    ) -> None:
        self.timestamp = timestamp
        self.delta = delta
        self.length = length
        self.type_id = type_id
        self.stream_id = stream_id


def basic_header(fmt: int, csid: int) -> bytes:
    if 2 <= csid <= 63:
        return bytes(((fmt << 6) | csid,))
    if 64 <= csid <= 319:
        return bytes((fmt << 6, csid - 64))
    if 320 <= csid <= MAX_CSID:
        rest = csid - 64
        return bytes(((fmt << 6) | 1, rest & 0xFF, rest >> 8))
    raise ValueError(f"chunk stream id {csid} out of range 2..{MAX_CSID}")


class ChunkWriter:
    """Messages in, chunk bytes out, with header compression as FFmpeg does it.

    ``compress=False`` writes a type-0 header for every message (useful in tests, and valid).
    """

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE, compress: bool = True) -> None:
        self.chunk_size = chunk_size
        self.compress = compress
        self._streams: dict[int, _OutState] = {}

    def write(
        self, csid: int, type_id: int, payload: bytes, *, timestamp: int = 0, stream_id: int = 0
    ) -> bytes:
        timestamp &= 0xFFFFFFFF
        fmt, ts_field = self._choose_header(csid, type_id, len(payload), timestamp, stream_id)
        extended = ts_field >= EXTENDED
        out = bytearray(basic_header(fmt, csid))
        if fmt <= 2:
            out += min(ts_field, EXTENDED).to_bytes(3, "big")
        if fmt <= 1:
            out += len(payload).to_bytes(3, "big")
            out.append(type_id)
        if fmt == 0:
            out += stream_id.to_bytes(4, "little")
        ext = _u32.pack(ts_field) if extended else b""
        out += ext
        view = memoryview(payload)
        step = self.chunk_size
        out += view[:step]
        continuation = basic_header(3, csid) + ext
        for offset in range(step, len(payload), step):
            out += continuation
            out += view[offset : offset + step]
        return bytes(out)

    def _choose_header(
        self, csid: int, type_id: int, length: int, timestamp: int, stream_id: int
    ) -> tuple[int, int]:
        prev = self._streams.get(csid)
        if (
            not self.compress
            or prev is None
            or prev.stream_id != stream_id
            or timestamp < prev.timestamp
        ):
            self._streams[csid] = _OutState(timestamp, timestamp, length, type_id, stream_id)
            return 0, timestamp
        delta = timestamp - prev.timestamp
        if prev.type_id != type_id or prev.length != length:
            fmt = 1
        elif prev.delta != delta:
            fmt = 2
        else:
            fmt = 3
        if fmt == 3 and prev.delta >= EXTENDED:
            fmt = 2  # keep the extended field explicit rather than implied
        prev.timestamp, prev.delta, prev.length, prev.type_id = timestamp, delta, length, type_id
        return fmt, delta

    # Protocol control messages (csid 2, message stream 0).

    def set_chunk_size(self, size: int) -> bytes:
        """The Set Chunk Size message; later writes use the new size."""
        if not 1 <= size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {size} out of range")
        data = self.write(CONTROL_CSID, MessageType.SET_CHUNK_SIZE, _u32.pack(size))
        self.chunk_size = size
        return data

    def abort(self, csid: int) -> bytes:
        return self.write(CONTROL_CSID, MessageType.ABORT, _u32.pack(csid))

    def ack(self, sequence: int) -> bytes:
        return self.write(CONTROL_CSID, MessageType.ACK, _u32.pack(sequence & 0xFFFFFFFF))

    def window_ack_size(self, size: int) -> bytes:
        return self.write(CONTROL_CSID, MessageType.WINDOW_ACK_SIZE, _u32.pack(size))

    def set_peer_bandwidth(self, size: int, limit: int = PeerBandwidthLimit.DYNAMIC) -> bytes:
        payload = _u32.pack(size) + bytes((limit,))
        return self.write(CONTROL_CSID, MessageType.SET_PEER_BANDWIDTH, payload)

    def user_control(self, event: int, *values: int) -> bytes:
        payload = struct.pack(">H", event) + b"".join(_u32.pack(v) for v in values)
        return self.write(CONTROL_CSID, MessageType.USER_CONTROL, payload)
