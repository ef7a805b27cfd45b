"""Chunk stream: splitting at any chunk size, header types 0-3, extended timestamps,
interleaving, Set Chunk Size / Abort in-band, and the reader's bounds."""

from __future__ import annotations

import struct

import pytest

from verge.stream.rtmp.chunk import (
    ChunkError,
    ChunkReader,
    ChunkWriter,
    Message,
    MessageType,
    UserControl,
    basic_header,
)


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


def fmt0(csid: int, timestamp: int, length: int, type_id: int, stream_id: int) -> bytes:
    return (
        basic_header(0, csid)
        + timestamp.to_bytes(3, "big")
        + length.to_bytes(3, "big")
        + bytes((type_id,))
        + stream_id.to_bytes(4, "little")
    )


def feed_bytewise(reader: ChunkReader, data: bytes) -> list[Message]:
    messages: list[Message] = []
    for i in range(len(data)):
        messages += reader.feed(data[i : i + 1])
    return messages


MESSAGES = [
    (6, MessageType.VIDEO, payload(0), 0, 1),
    (6, MessageType.VIDEO, payload(1), 40, 1),
    (4, MessageType.AUDIO, payload(127), 23, 1),
    (4, MessageType.AUDIO, payload(128), 46, 1),
    (4, MessageType.AUDIO, payload(129), 69, 1),
    (6, MessageType.VIDEO, payload(10_000, 3), 80, 1),
    (6, MessageType.VIDEO, payload(10_000, 5), 120, 1),  # same length and delta: type 3
    (6, MessageType.VIDEO, payload(4097), 100, 1),  # timestamp goes back: type 0 again
    (3, MessageType.COMMAND_AMF0, payload(300), 0, 0),
]


@pytest.mark.parametrize("chunk_size", [1, 7, 128, 129, 300, 4096, 65536])
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_at_any_chunk_size(chunk_size: int, compress: bool) -> None:
    writer = ChunkWriter(chunk_size=chunk_size, compress=compress)
    data = b"".join(
        writer.write(csid, t, body, timestamp=ts, stream_id=sid)
        for csid, t, body, ts, sid in MESSAGES
    )
    received = ChunkReader(chunk_size=chunk_size).feed(data)
    assert [(m.csid, m.type_id, m.payload, m.timestamp, m.stream_id) for m in received] == MESSAGES


@pytest.mark.parametrize("chunk_size", [128, 4096, 333])
def test_byte_by_byte_feeding_gives_the_same_messages(chunk_size: int) -> None:
    writer = ChunkWriter(chunk_size=chunk_size)
    data = b"".join(writer.write(c, t, b, timestamp=ts, stream_id=s) for c, t, b, ts, s in MESSAGES)
    reader = ChunkReader(chunk_size=chunk_size)
    assert [m.payload for m in feed_bytewise(reader, data)] == [m[2] for m in MESSAGES]
    assert reader.buffered == 0
    assert reader.bytes_received == len(data)


def test_chunk_sizes_of_a_split_message() -> None:
    data = ChunkWriter(chunk_size=128).write(6, MessageType.VIDEO, payload(300))
    # 12-byte header + 128, then two 1-byte type-3 headers with 128 and 44 bytes.
    assert len(data) == 12 + 128 + 1 + 128 + 1 + 44
    assert data[140] == data[269] == 0xC6


def test_interleaved_chunk_streams_reassemble_independently() -> None:
    video, audio = payload(300, 1), payload(200, 2)
    data = (
        fmt0(4, 1000, 300, 9, 1)
        + video[:128]
        + fmt0(6, 1010, 200, 8, 1)
        + audio[:128]
        + basic_header(3, 4)
        + video[128:256]
        + basic_header(3, 6)
        + audio[128:]
        + basic_header(3, 4)
        + video[256:]
    )
    messages = ChunkReader().feed(data)
    assert [(m.csid, m.type_id, m.timestamp, m.payload) for m in messages] == [
        (6, 8, 1010, audio),
        (4, 9, 1000, video),
    ]


def test_timestamp_deltas_of_header_types_1_2_3() -> None:
    data = (
        fmt0(4, 1000, 2, 8, 1)
        + b"aa"
        + basic_header(2, 4)
        + (20).to_bytes(3, "big")
        + b"bb"  # type 2: delta 20
        + basic_header(3, 4)
        + b"cc"  # type 3, new message: the same delta again
        + basic_header(1, 4)
        + (5).to_bytes(3, "big")
        + (3).to_bytes(3, "big")
        + b"\x09"
        + b"ddd"  # type 1: delta 5, new length and type
        + basic_header(3, 4)
        + b"eee"
    )
    messages = ChunkReader().feed(data)
    assert [(m.timestamp, m.type_id, m.payload) for m in messages] == [
        (1000, 8, b"aa"),
        (1020, 8, b"bb"),
        (1040, 8, b"cc"),
        (1045, 9, b"ddd"),
        (1050, 9, b"eee"),
    ]


def test_type_3_after_type_0_uses_the_type_0_timestamp_as_delta() -> None:
    """Spec 5.3.1.2.4; FFmpeg's writer relies on it."""
    data = fmt0(4, 40, 1, 8, 1) + b"a" + basic_header(3, 4) + b"b" + basic_header(3, 4) + b"c"
    assert [m.timestamp for m in ChunkReader().feed(data)] == [40, 80, 120]


def test_extended_timestamp_repeats_in_type_3_chunks() -> None:
    stamp = 0x01234567
    data = ChunkWriter(chunk_size=128).write(
        6, MessageType.VIDEO, payload(300), timestamp=stamp, stream_id=1
    )
    ext = struct.pack(">I", stamp)
    assert data[1:4] == b"\xff\xff\xff" and data[12:16] == ext
    assert data[16 + 128 : 16 + 128 + 5] == b"\xc6" + ext  # continuation carries it too
    [message] = ChunkReader().feed(data)
    assert message.timestamp == stamp and message.payload == payload(300)


@pytest.mark.parametrize("chunk_size", [128, 4096, 77])
def test_extended_timestamps_and_deltas_round_trip(chunk_size: int) -> None:
    stamps = [0xFFFFFE, 0xFFFFFF, 0x1000000, 0x1000028, 0x3000000, 0x3000000 + 0xFFFFFF * 2]
    writer = ChunkWriter(chunk_size=chunk_size)
    data = b"".join(
        writer.write(6, MessageType.VIDEO, payload(500), timestamp=t, stream_id=1) for t in stamps
    )
    reader = ChunkReader(chunk_size=chunk_size)
    assert [m.timestamp for m in feed_bytewise(reader, data)] == stamps


@pytest.mark.parametrize("csid", [2, 63, 64, 319, 320, 65599])
def test_chunk_stream_ids_in_one_two_and_three_byte_forms(csid: int) -> None:
    data = ChunkWriter(chunk_size=64).write(csid, MessageType.AUDIO, payload(200))
    [message] = ChunkReader(chunk_size=64).feed(data)
    assert message.csid == csid and message.payload == payload(200)


def test_basic_header_rejects_reserved_ids() -> None:
    with pytest.raises(ValueError):
        basic_header(0, 1)
    with pytest.raises(ValueError):
        basic_header(0, 65600)


def test_set_chunk_size_applies_to_the_next_chunk_in_the_same_buffer() -> None:
    writer = ChunkWriter(chunk_size=128)
    data = writer.set_chunk_size(4096) + writer.write(6, MessageType.VIDEO, payload(5000))
    reader = ChunkReader()
    [message] = reader.feed(data)  # the Set Chunk Size message itself is consumed
    assert reader.chunk_size == 4096 and message.payload == payload(5000)


def test_abort_discards_the_partial_message() -> None:
    abort = ChunkWriter().abort(6)
    data = fmt0(6, 0, 300, 9, 1) + payload(128) + abort + fmt0(6, 50, 3, 9, 1) + b"new"
    [message] = ChunkReader().feed(data)
    assert (message.timestamp, message.payload) == (50, b"new")


def test_protocol_control_messages_have_the_spec_layout() -> None:
    writer = ChunkWriter()
    assert writer.window_ack_size(2_500_000) == fmt0(2, 0, 4, 5, 0) + struct.pack(">I", 2_500_000)
    assert writer.set_peer_bandwidth(2_500_000, 2)[-5:] == struct.pack(">IB", 2_500_000, 2)
    begin = ChunkReader().feed(ChunkWriter().user_control(UserControl.STREAM_BEGIN, 1))
    assert begin[0].type_id == MessageType.USER_CONTROL and begin[0].payload == b"\0\0\0\0\0\1"


def test_writer_compresses_repeated_headers_to_one_byte() -> None:
    writer = ChunkWriter()
    first = writer.write(4, MessageType.AUDIO, b"x" * 10, timestamp=0, stream_id=1)
    second = writer.write(4, MessageType.AUDIO, b"y" * 10, timestamp=23, stream_id=1)
    third = writer.write(4, MessageType.AUDIO, b"z" * 10, timestamp=46, stream_id=1)
    assert (len(first), len(second), len(third)) == (22, 14, 11)


def test_message_size_limit() -> None:
    reader = ChunkReader(max_message_size=1000)
    with pytest.raises(ChunkError, match="exceeds"):
        reader.feed(fmt0(6, 0, 1001, 9, 1))


def test_chunk_stream_count_limit() -> None:
    reader = ChunkReader(max_chunk_streams=3)
    data = b"".join(fmt0(csid, 0, 1, 9, 1) + b"x" for csid in (3, 4, 5, 6))
    with pytest.raises(ChunkError, match="more than 3 chunk streams"):
        reader.feed(data)


@pytest.mark.parametrize(
    "data, message",
    [
        (basic_header(1, 6) + b"\0" * 7, "starts with a type-1 header"),
        (basic_header(3, 6), "starts with a type-3 header"),
        (fmt0(6, 0, 300, 9, 1) + payload(128) + fmt0(6, 0, 5, 9, 1), "inside a message"),
        (fmt0(2, 0, 4, 1, 0) + b"\0\0\0\0", "Set Chunk Size of 0"),
        (fmt0(2, 0, 2, 1, 0) + b"\0\1", "shorter than 4 bytes"),
    ],
)
def test_malformed_chunks(data: bytes, message: str) -> None:
    with pytest.raises(ChunkError, match=message):
        ChunkReader().feed(data)


def test_set_chunk_size_ignores_the_reserved_top_bit() -> None:
    reader = ChunkReader()
    reader.feed(fmt0(2, 0, 4, 1, 0) + struct.pack(">I", 0x80000100))
    assert reader.chunk_size == 256


def test_unfinished_input_is_kept_until_completed() -> None:
    data = ChunkWriter().write(6, MessageType.VIDEO, payload(1000), timestamp=7, stream_id=1)
    reader = ChunkReader()
    assert reader.feed(data[:500]) == []
    assert reader.buffered == 500 - 14  # the headers of three whole chunks are gone
    [message] = reader.feed(data[500:])
    assert message.payload == payload(1000) and reader.buffered == 0
