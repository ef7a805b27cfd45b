"""The server side of an RTMP publishing session, sans-I/O: bytes in, events and bytes out.

One :class:`RtmpSession` per TCP connection. The I/O layer calls :meth:`RtmpSession.feed` with
what it reads, acts on the returned events, and sends :meth:`RtmpSession.data_to_send`.
It answers the command sequence that FFmpeg and OBS (librtmp) use to publish::

    connect            -> Window Ack Size, Set Peer Bandwidth, Set Chunk Size,
                          _result (NetConnection.Connect.Success)
    releaseStream      -> _result
    FCPublish          -> onFCPublish + _result
    createStream       -> _result (the new message stream id)
    publish NAME?QUERY -> a Publish event; the I/O layer decides (stream key, name in use) and
                          calls accept_publish() -> Stream Begin + onStatus NetStream.Publish.Start
                          or reject_publish(reason)  -> onStatus error, then the session closes
    @setDataFrame onMetaData -> Metadata;  audio/video messages -> AudioTag / VideoTag
    FCUnpublish / deleteStream / closeStream -> Unpublish

While a publish decision is pending the session parses nothing further (the decision may
need a network round trip to the control plane); accept/reject return the events of the
input that waited. Only H.264 video (FLV codec id 7) and AAC audio (sound format 10) are
accepted: any other codec ends the session with an Error naming it, because the packagers
downstream could not use it anyway.

Event order guarantees: an :class:`Unpublish` for every accepted publish comes before the
final :class:`Error` or :class:`Closed`; after either, the session ignores input.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl

from verge.stream.rtmp import amf0
from verge.stream.rtmp.chunk import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ChunkError,
    ChunkReader,
    ChunkWriter,
    Message,
    MessageType,
    PeerBandwidthLimit,
    UserControl,
)
from verge.stream.rtmp.handshake import HandshakeError, ServerHandshake

# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Connect:
    """The client connected to an application (``rtmp://host/APP``)."""

    app: str
    tc_url: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Publish:
    """The client wants to publish ``name``; answer with accept_publish() or reject_publish()."""

    app: str
    name: str
    key: str | None
    query: dict[str, str]
    stream_id: int
    publish_type: str = "live"


@dataclass(frozen=True, slots=True)
class Metadata:
    """onMetaData of a published stream (width, height, framerate, codec ids, ...)."""

    name: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class VideoTag:
    """One H.264 video message; ``data`` is the FLV VIDEODATA body as received.

    ``timestamp`` is the decode time in ms, ``composition_time`` the PTS offset. ``is_keyframe``
    is the FLV frame type, so it is also set on sequence headers and end-of-sequence tags.
    """

    name: str
    timestamp: int
    data: bytes
    codec_id: int
    is_keyframe: bool
    is_sequence_header: bool
    composition_time: int = 0

    @classmethod
    def from_h264(cls, name: str, timestamp: int, body: bytes) -> VideoTag:
        """The tag of an H.264 VIDEODATA body (codec id 7, at least 5 bytes: the caller
        checks): frame type, AVC packet type and the signed 24-bit composition time."""
        return cls(name, timestamp, body, H264, body[0] >> 4 == KEYFRAME, body[1] == 0,
                   int.from_bytes(body[2:5], "big", signed=True))

    @property
    def avc_packet_type(self) -> int:
        """0: sequence header (AVCDecoderConfigurationRecord), 1: NAL units, 2: end of sequence."""
        return self.data[1]

    @property
    def is_end_of_sequence(self) -> bool:
        return self.data[1] == 2


@dataclass(frozen=True, slots=True)
class AudioTag:
    """One AAC audio message; ``data`` is the FLV AUDIODATA body as received."""

    name: str
    timestamp: int
    data: bytes
    sound_format: int
    is_sequence_header: bool


@dataclass(frozen=True, slots=True)
class Unpublish:
    """A publish that was accepted has ended (by the client, an error or the connection)."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over (publish refused, or the connection was lost); close after flushing."""

    reason: str


@dataclass(frozen=True, slots=True)
class Error:
    """The peer broke the protocol or sent something we do not accept; close after flushing."""

    reason: str


Event = Connect | Publish | Metadata | VideoTag | AudioTag | Unpublish | Closed | Error

# ---------------------------------------------------------------------------- constants

H264 = 7
AAC = 10
VIDEO_CODECS = {
    1: "JPEG",
    2: "Sorenson H.263",
    3: "Screen video",
    4: "On2 VP6",
    5: "On2 VP6 with alpha",
    6: "Screen video v2",
    7: "H.264",
    12: "HEVC",
    13: "AV1",
}
AUDIO_FORMATS = {
    0: "Linear PCM",
    1: "ADPCM",
    2: "MP3",
    3: "Linear PCM little-endian",
    4: "Nellymoser 16 kHz",
    5: "Nellymoser 8 kHz",
    6: "Nellymoser",
    7: "G.711 A-law",
    8: "G.711 mu-law",
    9: "enhanced RTMP audio",
    10: "AAC",
    11: "Speex",
    13: "Opus",
    14: "MP3 8 kHz",
    15: "device-specific",
}
KEYFRAME = 1
VIDEO_COMMAND_FRAME = 5
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
STATUS_CSID = 5
COMMAND_CSID = 3
MAX_STREAMS = 8
FMS_VERSION = "FMS/3,0,1,123"


class _State(Enum):
    HANDSHAKE = "handshake"
    AWAIT_CONNECT = "await connect"
    CONNECTED = "connected"
    CLOSED = "closed"


class _ProtocolError(Exception):
    pass


@dataclass(slots=True)
class _Stream:
    """A message stream made by createStream; ``name`` is set while it publishes."""

    name: str | None = None


# ---------------------------------------------------------------------------- the session


class RtmpSession:
    """Server side of one RTMP connection. See the module docstring for the sequence."""

    def __init__(
        self,
        *,
        apps: Collection[str] | None = None,
        chunk_size: int = 4096,
        window_ack_size: int = 2_500_000,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        handshake: ServerHandshake | None = None,
    ) -> None:
        self.apps = None if apps is None else frozenset(apps)
        self.app = ""
        self.chunk_size = chunk_size
        self.window_ack_size = window_ack_size
        self.max_message_size = max_message_size
        self.dropped_messages = 0
        self._state = _State.HANDSHAKE
        self._handshake = handshake or ServerHandshake()
        self._reader = ChunkReader(max_message_size=max_message_size)
        self._writer = ChunkWriter()
        self._out = bytearray()
        self._held: deque[Message] = deque()
        self._held_bytes = 0
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1
        self._pending: Publish | None = None
        self._bytes_in = 0
        self._peer_window = 0
        self._last_ack = 0

    # -- public interface

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def publishing(self) -> list[str]:
        """Names this session currently publishes."""
        return [s.name for s in self._streams.values() if s.name is not None]

    @property
    def awaiting_decision(self) -> Publish | None:
        return self._pending

    @property
    def buffered(self) -> int:
        """Input bytes held by the session (unparsed, partial or waiting messages)."""
        return self._reader.buffered + self._held_bytes

    def data_to_send(self) -> bytes:
        """Bytes the I/O layer must write to the peer (and forget)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def feed(self, data: bytes) -> list[Event]:
        """Consume bytes from the peer; return the events they complete."""
        if self.closed:
            return []
        self._bytes_in += len(data)
        events: list[Event] = []
        try:
            if self._state is _State.HANDSHAKE:
                self._out += self._handshake.feed(data)
                if not self._handshake.complete:
                    return events
                self._state = _State.AWAIT_CONNECT
                data = self._handshake.take_leftover()
            for message in self._reader.feed(data):
                self._held.append(message)
                self._held_bytes += len(message.payload)
            self._process(events)
            if self._held_bytes > self.max_message_size:  # only a pending decision holds any
                raise _ProtocolError("too much data sent while the publish decision was pending")
            self._maybe_ack()
        except (HandshakeError, ChunkError, amf0.AmfError, _ProtocolError) as exc:
            events += self._fail(str(exc))
        return events

    def accept_publish(self) -> list[Event]:
        """Let the pending publish start; return the events of the input that waited."""
        if self.closed:
            return []
        publish = self._take_pending()
        self._streams[publish.stream_id].name = publish.name
        self._out += self._writer.user_control(UserControl.STREAM_BEGIN, publish.stream_id)
        self._status(
            publish.stream_id,
            "status",
            "NetStream.Publish.Start",
            f"{publish.name} is now published.",
            details=publish.name,
        )
        return self.feed(b"")

    def reject_publish(self, reason: str, code: str = "NetStream.Publish.BadName") -> list[Event]:
        """Refuse the pending publish with an onStatus error; the session then closes."""
        if self.closed:
            return []
        publish = self._take_pending()
        self._status(publish.stream_id, "error", code, reason, details=publish.name)
        return self._close(f"publish of {publish.app}/{publish.name} refused: {reason}")

    def connection_lost(self, reason: str = "connection closed") -> list[Event]:
        """The transport is gone (EOF, reset, timeout): end every publish, then Closed."""
        if self.closed:
            return []
        return self._close(reason)

    # -- lifecycle helpers

    def _take_pending(self) -> Publish:
        if self._pending is None:
            raise RuntimeError("no publish is waiting for a decision")
        pending, self._pending = self._pending, None
        return pending

    def _end_publishes(self, reason: str) -> list[Event]:
        events: list[Event] = []
        for stream in self._streams.values():
            if stream.name is not None:
                events.append(Unpublish(stream.name, reason))
                stream.name = None
        return events

    def _close(self, reason: str) -> list[Event]:
        return [*self._shut_down(reason), Closed(reason)]

    def _fail(self, reason: str) -> list[Event]:
        return [*self._shut_down(reason), Error(reason)]

    def _shut_down(self, reason: str) -> list[Event]:
        self._state = _State.CLOSED
        self._pending = None
        self._held.clear()
        self._held_bytes = 0
        return self._end_publishes(reason)

    def _maybe_ack(self) -> None:
        if self._peer_window and self._bytes_in - self._last_ack >= self._peer_window:
            self._last_ack = self._bytes_in
            self._out += self._writer.ack(self._bytes_in)

    # -- message dispatch

    def _process(self, events: list[Event]) -> None:
        while self._held and self._pending is None and not self.closed:
            message = self._held.popleft()
            self._held_bytes -= len(message.payload)
            self._dispatch(message, events)

    def _dispatch(self, message: Message, events: list[Event]) -> None:
        kind = message.type_id
        if kind == MessageType.VIDEO:
            self._on_video(message, events)
        elif kind == MessageType.AUDIO:
            self._on_audio(message, events)
        elif kind in (MessageType.COMMAND_AMF0, MessageType.COMMAND_AMF3):
            self._on_command(_amf0_values(message), message.stream_id, events)
        elif kind in (MessageType.DATA_AMF0, MessageType.DATA_AMF3):
            self._on_data(_amf0_values(message), message.stream_id, events)
        elif kind == MessageType.AGGREGATE:
            for inner in split_aggregate(message):
                self._dispatch(inner, events)
        elif kind == MessageType.USER_CONTROL:
            self._on_user_control(message.payload)
        elif kind == MessageType.WINDOW_ACK_SIZE and len(message.payload) >= 4:
            self._peer_window = struct.unpack_from(">I", message.payload)[0]
        # Ack and Set Peer Bandwidth need no action from a server that sends so little.

    def _on_user_control(self, payload: bytes) -> None:
        if len(payload) >= 6 and struct.unpack_from(">H", payload)[0] == UserControl.PING_REQUEST:
            stamp = struct.unpack_from(">I", payload, 2)[0]
            self._out += self._writer.user_control(UserControl.PING_RESPONSE, stamp)

    # -- commands

    def _on_command(self, values: list[Any], stream_id: int, events: list[Event]) -> None:
        if len(values) < 2 or not isinstance(values[0], str) or not isinstance(values[1], float):
            raise _ProtocolError("malformed command message")
        name, txn = values[0], values[1]
        command_object = values[2] if len(values) > 2 else None
        args = values[3:]
        if self._state is _State.AWAIT_CONNECT:
            if name != "connect":
                raise _ProtocolError(f"command {name!r} before connect")
            self._on_connect(txn, command_object, events)
            return
        handler = _COMMANDS.get(name)
        if handler is not None:
            handler(self, txn, args, stream_id, events)
        elif name in ("_result", "_error", "onStatus", "_checkbw", "getStreamLength"):
            return  # answers to calls we never make, or checks that need no answer
        elif txn > 0:
            self._command(
                COMMAND_CSID,
                0,
                "_error",
                txn,
                None,
                _info("error", "NetConnection.Call.Failed", f"unsupported: {name}"),
            )

    def _on_connect(self, txn: float, command_object: Any, events: list[Event]) -> None:
        if not isinstance(command_object, dict):
            raise _ProtocolError("connect without a command object")
        app = str(command_object.get("app", "")).split("?", 1)[0].strip("/")
        tc_url = str(command_object.get("tcUrl", ""))
        if not NAME_PATTERN.fullmatch(app) or (self.apps is not None and app not in self.apps):
            self._command(
                COMMAND_CSID,
                0,
                "_error",
                txn,
                None,
                _info("error", "NetConnection.Connect.Rejected", f"unknown application {app!r}"),
            )
            raise _ProtocolError(f"connect to unknown application {app!r}")
        self.app = app
        self._state = _State.CONNECTED
        w = self._writer
        self._out += w.window_ack_size(self.window_ack_size)
        self._out += w.set_peer_bandwidth(self.window_ack_size, PeerBandwidthLimit.DYNAMIC)
        self._out += w.set_chunk_size(self.chunk_size)
        encoding = command_object.get("objectEncoding", 0.0)
        self._command(
            COMMAND_CSID,
            0,
            "_result",
            txn,
            {"fmsVer": FMS_VERSION, "capabilities": 31.0, "mode": 1.0},
            {
                **_info("status", "NetConnection.Connect.Success", "Connection succeeded."),
                "objectEncoding": encoding if isinstance(encoding, float) else 0.0,
            },
        )
        events.append(Connect(app, tc_url, dict(command_object)))

    def _cmd_release_stream(
        self, txn: float, args: list, stream_id: int, events: list[Event]
    ) -> None:
        self._command(COMMAND_CSID, 0, "_result", txn, None, amf0.UNDEFINED)

    def _cmd_fc_publish(self, txn: float, args: list, stream_id: int, events: list[Event]) -> None:
        name = str(args[0]) if args else ""
        self._command(
            COMMAND_CSID,
            0,
            "onFCPublish",
            0.0,
            None,
            _info("status", "NetStream.Publish.Start", name),
        )
        self._command(COMMAND_CSID, 0, "_result", txn, None, amf0.UNDEFINED)

    def _cmd_create_stream(
        self, txn: float, args: list, stream_id: int, events: list[Event]
    ) -> None:
        if len(self._streams) >= MAX_STREAMS:
            raise _ProtocolError(f"more than {MAX_STREAMS} streams on one connection")
        new_id = self._next_stream_id
        self._next_stream_id += 1
        self._streams[new_id] = _Stream()
        self._command(COMMAND_CSID, 0, "_result", txn, None, float(new_id))

    def _cmd_publish(self, txn: float, args: list, stream_id: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.name is not None:
            raise _ProtocolError(f"publish on stream {stream_id}, which is not free")
        raw = args[0] if args and isinstance(args[0], str) else ""
        publish_type = args[1] if len(args) > 1 and isinstance(args[1], str) else "live"
        name, _, query_text = raw.strip().partition("?")
        query = dict(parse_qsl(query_text, keep_blank_values=True))
        publish = Publish(self.app, name, query.get("key"), query, stream_id, publish_type)
        self._pending = publish
        if not NAME_PATTERN.fullmatch(name):
            events.extend(self.reject_publish(f"invalid stream name {name!r}"))
            return
        events.append(publish)

    def _cmd_fc_unpublish(
        self, txn: float, args: list, stream_id: int, events: list[Event]
    ) -> None:
        name = str(args[0]).partition("?")[0] if args else ""
        for stream in self._streams.values():
            if stream.name is not None and stream.name == name:
                events.append(Unpublish(stream.name, "unpublished by the client"))
                stream.name = None
        if txn > 0:
            self._command(COMMAND_CSID, 0, "_result", txn, None, amf0.UNDEFINED)

    def _cmd_delete_stream(
        self, txn: float, args: list, stream_id: int, events: list[Event]
    ) -> None:
        if args and isinstance(args[0], float):
            self._stop_stream(int(args[0]), events, delete=True)

    def _cmd_close_stream(
        self, txn: float, args: list, stream_id: int, events: list[Event]
    ) -> None:
        self._stop_stream(stream_id, events, delete=False)

    def _stop_stream(self, stream_id: int, events: list[Event], *, delete: bool) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.name is not None:
            events.append(Unpublish(stream.name, "unpublished by the client"))
            stream.name = None
        if delete:
            del self._streams[stream_id]

    def _command(self, csid: int, stream_id: int, *values: Any) -> None:
        payload = amf0.encode(*values)
        self._out += self._writer.write(
            csid, MessageType.COMMAND_AMF0, payload, stream_id=stream_id
        )

    def _status(
        self, stream_id: int, level: str, code: str, description: str, **extra: Any
    ) -> None:
        self._command(
            STATUS_CSID,
            stream_id,
            "onStatus",
            0.0,
            None,
            {**_info(level, code, description), **extra},
        )

    def _unsupported(self, message: Message, reason: str) -> _ProtocolError:
        """Tell the client why (FFmpeg prints "Server error: ..."), then end the session."""
        self._status(message.stream_id, "error", "NetStream.Failed", reason)
        return _ProtocolError(reason)

    # -- data and media

    def _on_data(self, values: list[Any], stream_id: int, events: list[Event]) -> None:
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        stream = self._streams.get(stream_id)
        if stream is None or stream.name is None:
            self.dropped_messages += 1
            return
        if len(values) >= 2 and values[0] == "onMetaData" and isinstance(values[1], dict):
            events.append(Metadata(stream.name, dict(values[1])))

    def _publishing_name(self, message: Message) -> str | None:
        stream = self._streams.get(message.stream_id)
        if stream is None or stream.name is None or not message.payload:
            self.dropped_messages += 1
            return None
        return stream.name

    def _on_video(self, message: Message, events: list[Event]) -> None:
        name = self._publishing_name(message)
        if name is None:
            return
        payload = message.payload
        first = payload[0]
        if first & 0x80:  # enhanced RTMP: a FourCC instead of the 4-bit codec id
            fourcc = payload[1:5].decode("latin-1")
            raise self._unsupported(
                message,
                f"unsupported video codec {fourcc!r} (enhanced "
                "RTMP); only H.264 (FLV codec id 7) is accepted",
            )
        frame_type, codec_id = first >> 4, first & 0x0F
        if frame_type == VIDEO_COMMAND_FRAME:
            return
        if codec_id != H264:
            label = VIDEO_CODECS.get(codec_id, "unknown")
            raise self._unsupported(
                message,
                f"unsupported video codec {label} (FLV codec id "
                f"{codec_id}); only H.264 (codec id 7) is accepted",
            )
        if len(payload) < 5:
            raise _ProtocolError("truncated H.264 video message")
        events.append(VideoTag.from_h264(name, message.timestamp, payload))

    def _on_audio(self, message: Message, events: list[Event]) -> None:
        name = self._publishing_name(message)
        if name is None:
            return
        payload = message.payload
        sound_format = payload[0] >> 4
        if sound_format != AAC:
            label = AUDIO_FORMATS.get(sound_format, "unknown")
            if sound_format == 9 and len(payload) >= 5:
                label += " " + repr(payload[1:5].decode("latin-1"))
            raise self._unsupported(
                message,
                f"unsupported audio codec {label} (FLV sound "
                f"format {sound_format}); only AAC (sound format 10) is "
                "accepted",
            )
        if len(payload) < 2:
            raise _ProtocolError("truncated AAC audio message")
        events.append(AudioTag(name, message.timestamp, payload, sound_format, payload[1] == 0))


_COMMANDS = {
    "releaseStream": RtmpSession._cmd_release_stream,
    "FCPublish": RtmpSession._cmd_fc_publish,
    "createStream": RtmpSession._cmd_create_stream,
    "publish": RtmpSession._cmd_publish,
    "FCUnpublish": RtmpSession._cmd_fc_unpublish,
    "deleteStream": RtmpSession._cmd_delete_stream,
    "closeStream": RtmpSession._cmd_close_stream,
}


def _info(level: str, code: str, description: str) -> dict[str, Any]:
    return {"level": level, "code": code, "description": description}


def _amf0_values(message: Message) -> list[Any]:
    payload = message.payload
    if (
        message.type_id in (MessageType.COMMAND_AMF3, MessageType.DATA_AMF3)
        and payload[:1] == b"\0"
    ):
        payload = payload[1:]  # AMF3 messages whose values are AMF0 (what Flash clients send)
    return amf0.decode(payload)


def split_aggregate(message: Message) -> list[Message]:
    """The FLV tags inside an Aggregate message, with timestamps rebased on the message's."""
    data = message.payload
    inner: list[Message] = []
    offset = 0
    base: int | None = None
    while offset + 11 <= len(data):
        tag_type = data[offset]
        size = int.from_bytes(data[offset + 1 : offset + 4], "big")
        stamp = int.from_bytes(data[offset + 4 : offset + 7], "big") | (data[offset + 7] << 24)
        end = offset + 11 + size
        if end > len(data):
            raise _ProtocolError("aggregate message: sub-message runs past the end")
        base = stamp if base is None else base
        timestamp = (message.timestamp + stamp - base) & 0xFFFFFFFF
        inner.append(
            Message(
                tag_type, bytes(data[offset + 11 : end]), timestamp, message.stream_id, message.csid
            )
        )
        offset = end + 4  # back pointer (previous tag size)
    return [
        m
        for m in inner
        if m.type_id in (MessageType.AUDIO, MessageType.VIDEO, MessageType.DATA_AMF0)
    ]
