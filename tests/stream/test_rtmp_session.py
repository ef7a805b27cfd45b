"""The sans-I/O server session driven by a scripted client: the command sequence FFmpeg and
OBS use, the publish decision, media events, codec checks and protocol errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.stream.publisher import (
    AAC_RAW,
    AAC_SEQUENCE_HEADER,
    AVC_INTER,
    AVC_KEYFRAME,
    AVC_SEQUENCE_HEADER,
    Publisher,
    commands,
    status_codes,
)
from verge.stream.rtmp import amf0
from verge.stream.rtmp.chunk import Message, MessageType, UserControl
from verge.stream.rtmp.handshake import PACKET_SIZE, client_c2
from verge.stream.rtmp.session import (
    AudioTag,
    Closed,
    Connect,
    Error,
    Event,
    Metadata,
    Publish,
    RtmpSession,
    Unpublish,
    VideoTag,
    split_aggregate,
)


def handshake(session: RtmpSession, client: Publisher) -> None:
    c0c1 = client.c0c1()
    assert session.feed(c0c1[:100]) == [] and session.data_to_send() == b""
    assert session.feed(c0c1[100:]) == []
    s0s1s2 = session.data_to_send()
    assert len(s0s1s2) == 1 + 2 * PACKET_SIZE
    assert s0s1s2[0] == 3 and s0s1s2[5:9] == b"\0\0\0\0"  # zero version: simple handshake
    assert s0s1s2[1 + PACKET_SIZE :] == c0c1[1:]  # S2 echoes C1 exactly (librtmp compares)
    client.receive(s0s1s2)
    assert session.feed(client_c2(s0s1s2)) == []


def connected(apps: set[str] | None = None) -> tuple[RtmpSession, Publisher]:
    session, client = RtmpSession(apps=apps), Publisher()
    handshake(session, client)
    events = session.feed(client.connect())
    assert events == [Connect("live", "rtmp://127.0.0.1/live", events[0].properties)]
    return session, client


def publishing(name: str = "cam", query: str = "?key=k") -> tuple[RtmpSession, Publisher]:
    session, client = connected()
    events = session.feed(client.publish_sequence(name + query))
    assert [type(e) for e in events] == [Publish]
    assert session.accept_publish() == []
    client.receive(session.data_to_send())
    return session, client


def test_connect_answers_with_control_messages_and_success() -> None:
    session, client = RtmpSession(), Publisher()
    handshake(session, client)
    # C2 and connect in one segment, as clients often send them.
    assert session.feed(client.connect())[0].app == "live"
    messages = client.receive(session.data_to_send())
    types = [m.type_id for m in messages]
    assert types == [
        MessageType.WINDOW_ACK_SIZE,
        MessageType.SET_PEER_BANDWIDTH,
        MessageType.COMMAND_AMF0,
    ]
    assert client.reader.chunk_size == 4096  # Set Chunk Size was applied by the client reader
    [result] = commands(messages)
    assert result[:2] == ["_result", 1.0]
    assert result[3]["code"] == "NetConnection.Connect.Success"
    assert result[3]["objectEncoding"] == 0.0


def test_full_publish_sequence_as_ffmpeg_sends_it() -> None:
    session, client = connected()
    client.receive(session.data_to_send())
    events = session.feed(client.publish_sequence("cam?key=secret&x=1"))
    assert events == [Publish("live", "cam", "secret", {"key": "secret", "x": "1"}, 1, "live")]
    answers = commands(client.receive(session.data_to_send()))
    assert [a[0] for a in answers] == ["_result", "onFCPublish", "_result", "_result"]
    assert answers[3][1:] == [4.0, None, 1.0]  # createStream -> stream id 1
    assert session.awaiting_decision is not None
    assert session.accept_publish() == []
    messages = client.receive(session.data_to_send())
    begin = [m for m in messages if m.type_id == MessageType.USER_CONTROL]
    assert begin[0].payload == struct.pack(">HI", UserControl.STREAM_BEGIN, 1)
    [status] = [c for c in commands(messages) if c[0] == "onStatus"]
    assert status[3]["code"] == "NetStream.Publish.Start" and status[3]["level"] == "status"
    assert session.publishing == ["cam"]


def test_metadata_and_media_events() -> None:
    session, client = publishing()
    data = (
        client.metadata({"width": 320.0, "height": 240.0, "videocodecid": 7.0})
        + client.video(0, AVC_SEQUENCE_HEADER)
        + client.audio(0, AAC_SEQUENCE_HEADER)
        + client.video(40, AVC_KEYFRAME)
        + client.audio(23, AAC_RAW)
        + client.video(80, AVC_INTER)
    )
    events = session.feed(data)
    assert events[0] == Metadata("cam", {"width": 320.0, "height": 240.0, "videocodecid": 7.0})
    assert events[1] == VideoTag("cam", 0, AVC_SEQUENCE_HEADER, 7, True, True, 0)
    assert events[2] == AudioTag("cam", 0, AAC_SEQUENCE_HEADER, 10, True)
    assert events[3] == VideoTag("cam", 40, AVC_KEYFRAME, 7, True, False, 40)
    assert events[4] == AudioTag("cam", 23, AAC_RAW, 10, False)
    assert events[5].is_keyframe is False and events[5].timestamp == 80


def test_metadata_without_set_data_frame() -> None:
    session, client = publishing()
    payload = amf0.encode("onMetaData", {"width": 1.0})
    events = session.feed(client.writer.write(4, MessageType.DATA_AMF0, payload, stream_id=1))
    assert events == [Metadata("cam", {"width": 1.0})]


def test_negative_composition_time() -> None:
    session, client = publishing()
    [tag] = session.feed(client.video(10, bytes([0x27, 1, 0xFF, 0xFF, 0xF6]) + b"nal"))
    assert tag.composition_time == -10


def test_parsing_pauses_while_the_publish_decision_is_pending() -> None:
    session, client = connected()
    data = client.publish_sequence("cam") + client.video(0, AVC_SEQUENCE_HEADER)
    events = session.feed(data)
    assert [type(e) for e in events] == [Publish] and events[0].key is None
    assert session.feed(client.audio(0, AAC_SEQUENCE_HEADER)) == []  # still waiting
    resumed = session.accept_publish()
    assert [type(e) for e in resumed] == [VideoTag, AudioTag]


def test_rejected_publish_gets_an_error_status_and_closes() -> None:
    session, client = connected()
    session.feed(client.publish_sequence("cam?key=wrong"))
    events = session.reject_publish("wrong stream key")
    assert events == [Closed("publish of live/cam refused: wrong stream key")]
    messages = client.receive(session.data_to_send())
    [status] = [c for c in commands(messages) if c[0] == "onStatus"]
    assert status[3] == {
        "level": "error",
        "code": "NetStream.Publish.BadName",
        "description": "wrong stream key",
        "details": "cam",
    }
    assert session.closed and session.feed(client.video(0, AVC_KEYFRAME)) == []


@pytest.mark.parametrize("name", ["", "../etc", ".hidden", "a/b", "x" * 200, "sp ace"])
def test_invalid_stream_names_are_refused_without_a_publish_event(name: str) -> None:
    session, client = connected()
    events = session.feed(client.publish_sequence(name + "?key=k"))
    assert [type(e) for e in events] == [Closed]
    assert "invalid stream name" in events[0].reason
    assert status_codes(client.receive(session.data_to_send())) == ["NetStream.Publish.BadName"]


def test_connect_to_an_unknown_app_is_rejected() -> None:
    session, client = RtmpSession(apps={"live"}), Publisher()
    handshake(session, client)
    events = session.feed(client.connect("other"))
    assert [type(e) for e in events] == [Error] and "other" in events[0].reason
    [answer] = commands(client.receive(session.data_to_send()))
    assert answer[0] == "_error" and answer[3]["code"] == "NetConnection.Connect.Rejected"


@pytest.mark.parametrize(
    "body, label",
    [
        (bytes([0x22, 0, 0, 0, 0]), "Sorenson H.263 (FLV codec id 2)"),
        (bytes([0x1C, 0, 0, 0, 0]), "HEVC (FLV codec id 12)"),
        (bytes([0x90]) + b"hvc1" + b"\0", "'hvc1' (enhanced RTMP)"),
    ],
)
def test_unsupported_video_codec_ends_the_session(body: bytes, label: str) -> None:
    session, client = publishing()
    events = session.feed(client.video(0, body))
    assert events[0] == Unpublish("cam", events[1].reason)
    assert isinstance(events[1], Error) and label in events[1].reason
    assert status_codes(client.receive(session.data_to_send())) == ["NetStream.Failed"]


@pytest.mark.parametrize(
    "body, label",
    [
        (bytes([0x2F, 0xFF]), "MP3 (FLV sound format 2)"),
        (bytes([0x9F]) + b"Opus", "enhanced RTMP audio 'Opus'"),
        (bytes([0xDF, 0]), "Opus (FLV sound format 13)"),
    ],
)
def test_unsupported_audio_codec_ends_the_session(body: bytes, label: str) -> None:
    session, client = publishing()
    events = session.feed(client.audio(0, body))
    assert isinstance(events[-1], Error) and label in events[-1].reason


def test_truncated_avc_message_is_an_error() -> None:
    session, client = publishing()
    assert isinstance(session.feed(client.video(0, b"\x17\x01"))[-1], Error)


def test_media_outside_a_publish_is_dropped() -> None:
    session, client = connected()
    assert session.feed(client.video(0, AVC_KEYFRAME, stream_id=1)) == []
    assert session.dropped_messages == 1


def test_client_unpublish_ends_the_stream() -> None:
    session, client = publishing()
    events = session.feed(client.unpublish("cam?key=k"))
    assert events == [Unpublish("cam", "unpublished by the client")]
    assert session.publishing == [] and not session.closed


def test_connection_lost_while_publishing() -> None:
    session, _ = publishing()
    assert session.connection_lost("eof") == [Unpublish("cam", "eof"), Closed("eof")]
    assert session.connection_lost("again") == []


def test_garbage_instead_of_a_handshake() -> None:
    session = RtmpSession()
    [error] = session.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(error, Error) and "not RTMP" in error.reason and "'G'" in error.reason
    assert session.closed


def test_encrypted_rtmp_is_named() -> None:
    [error] = RtmpSession().feed(b"\x06" + b"\0" * 1536)
    assert "RTMPE" in error.reason


def test_garbage_after_the_handshake() -> None:
    session, client = RtmpSession(), Publisher()
    handshake(session, client)
    events = session.feed(b"\x43" + b"\xff" * 40)  # type-1 header on an unknown chunk stream
    assert isinstance(events[-1], Error)


def test_command_before_connect() -> None:
    session, client = RtmpSession(), Publisher()
    handshake(session, client)
    [error] = session.feed(client.command("createStream", None))
    assert "before connect" in error.reason


def test_publish_on_a_stream_that_was_not_created() -> None:
    session, client = connected()
    [error] = session.feed(client.command("publish", None, "cam", "live", stream_id=7))
    assert "not free" in error.reason


def test_unknown_commands_get_an_error_answer() -> None:
    session, client = connected()
    client.receive(session.data_to_send())
    assert session.feed(client.command("frobnicate", None)) == []
    [answer] = commands(client.receive(session.data_to_send()))
    assert answer[0] == "_error" and answer[3]["code"] == "NetConnection.Call.Failed"


def test_ping_request_gets_a_response() -> None:
    session, client = connected()
    client.receive(session.data_to_send())
    session.feed(client.writer.user_control(UserControl.PING_REQUEST, 12345))
    [pong] = client.receive(session.data_to_send())
    assert pong.payload == struct.pack(">HI", UserControl.PING_RESPONSE, 12345)


def test_acknowledgements_follow_the_peer_window() -> None:
    session, client = publishing()
    session.feed(client.writer.window_ack_size(1000))  # acks what came so far (> 1000 bytes)
    client.receive(session.data_to_send())
    session.feed(client.video(0, AVC_KEYFRAME + b"x" * 1200))
    acks = [m for m in client.receive(session.data_to_send()) if m.type_id == MessageType.ACK]
    assert len(acks) == 1
    assert struct.unpack(">I", acks[0].payload)[0] == session._bytes_in


def test_odd_chunk_size_and_extended_timestamps_from_the_client() -> None:
    session, client = publishing()
    writer = client.writer
    data = writer.set_chunk_size(333) + client.video(0x1234567, AVC_KEYFRAME + b"z" * 1000)
    [tag] = session.feed(data)
    assert tag.timestamp == 0x1234567 and tag.data == AVC_KEYFRAME + b"z" * 1000


def test_amf3_command_with_amf0_body() -> None:
    session, client = RtmpSession(), Publisher()
    handshake(session, client)
    payload = b"\0" + amf0.encode("connect", 1.0, {"app": "live", "tcUrl": "rtmp://h/live"})
    events = session.feed(client.writer.write(3, MessageType.COMMAND_AMF3, payload))
    assert isinstance(events[0], Connect)


def test_message_size_limit_ends_the_session() -> None:
    session, client = RtmpSession(max_message_size=1000), Publisher()
    handshake(session, client)
    [error] = session.feed(client.writer.write(3, MessageType.COMMAND_AMF0, b"\x05" * 2000))
    assert "exceeds" in error.reason


def test_aggregate_messages_are_split_into_tags() -> None:
    def sub(tag_type: int, stamp: int, body: bytes) -> bytes:
        return (
            bytes((tag_type,))
            + len(body).to_bytes(3, "big")
            + stamp.to_bytes(3, "big")
            + b"\0\0\0\0"
            + body
            + (11 + len(body)).to_bytes(4, "big")
        )

    aggregate = sub(9, 500, AVC_KEYFRAME) + sub(8, 520, AAC_RAW)
    inner = split_aggregate(Message(MessageType.AGGREGATE, aggregate, 1000, 1, 6))
    assert [(m.type_id, m.timestamp, m.payload) for m in inner] == [
        (9, 1000, AVC_KEYFRAME),
        (8, 1020, AAC_RAW),
    ]
    session, client = publishing()
    events = session.feed(
        client.writer.write(6, MessageType.AGGREGATE, aggregate, timestamp=1000, stream_id=1)
    )
    assert [type(e) for e in events] == [VideoTag, AudioTag]


def test_accept_without_a_pending_publish_is_a_programming_error() -> None:
    session, _ = connected()
    with pytest.raises(RuntimeError):
        session.accept_publish()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
def test_arbitrary_bytes_after_the_handshake_never_raise(pieces: list[bytes]) -> None:
    session, client = publishing()
    for piece in pieces:
        events = session.feed(piece)
        assert all(isinstance(e, Event.__args__) for e in events)  # type: ignore[attr-defined]
        session.data_to_send()
    assert session.buffered <= session.max_message_size + 16
