"""FLV: file header and tags, the container of RTMP media and of HTTP-FLV playback.

RTMP audio/video messages already are FLV tag bodies, so writing FLV is framing only: a 9-byte
header, then per tag an 11-byte header (type, size, 24+8-bit timestamp, stream id 0), the body
and the "previous tag size" back pointer. The onMetaData script tag is AMF0
(``"onMetaData"``, ECMA array). :func:`read_tags` parses it back (tests, and HTTP-FLV checks).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from verge.stream.rtmp import amf0

AUDIO = 8
VIDEO = 9
SCRIPT = 18
HEADER_SIZE = 9
TAG_HEADER_SIZE = 11
_FLAG_AUDIO = 0x04
_FLAG_VIDEO = 0x01
_u32 = struct.Struct(">I")


class FlvError(ValueError):
    """The bytes are not a valid FLV stream."""


@dataclass(frozen=True, slots=True)
class FlvTag:
    tag_type: int
    timestamp: int
    body: bytes


def file_header(*, audio: bool = True, video: bool = True) -> bytes:
    """The FLV header plus PreviousTagSize0 — what a file or an HTTP-FLV response starts with."""
    flags = (_FLAG_AUDIO if audio else 0) | (_FLAG_VIDEO if video else 0)
    return b"FLV\x01" + bytes((flags,)) + _u32.pack(HEADER_SIZE) + _u32.pack(0)


def tag(tag_type: int, timestamp: int, body: bytes) -> bytes:
    """One tag with its trailing previous-tag-size; ``timestamp`` in milliseconds (32 bits)."""
    if len(body) > 0xFFFFFF:
        raise ValueError(f"FLV tag body of {len(body)} bytes exceeds 16 MiB")
    timestamp &= 0xFFFFFFFF
    header = (
        bytes((tag_type,))
        + len(body).to_bytes(3, "big")
        + (timestamp & 0xFFFFFF).to_bytes(3, "big")
        + bytes((timestamp >> 24,))
        + b"\x00\x00\x00"
    )
    return header + body + _u32.pack(TAG_HEADER_SIZE + len(body))


def video_tag(timestamp: int, body: bytes) -> bytes:
    return tag(VIDEO, timestamp, body)


def audio_tag(timestamp: int, body: bytes) -> bytes:
    return tag(AUDIO, timestamp, body)


def script_tag(name: str, value: Any, timestamp: int = 0) -> bytes:
    return tag(SCRIPT, timestamp, amf0.encode(name, value))


def metadata_tag(metadata: dict[str, Any]) -> bytes:
    """onMetaData as FFmpeg writes it: the properties in an ECMA array."""
    return script_tag("onMetaData", amf0.EcmaArray(metadata))


class FlvWriter:
    """Writes an FLV stream to a binary file object (a file, or a buffer for HTTP-FLV)."""

    def __init__(self, target: BinaryIO, *, audio: bool = True, video: bool = True) -> None:
        self.target = target
        self.bytes_written = 0
        self._write(file_header(audio=audio, video=video))

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        self._write(metadata_tag(metadata))

    def write_video(self, timestamp: int, body: bytes) -> None:
        self._write(video_tag(timestamp, body))

    def write_audio(self, timestamp: int, body: bytes) -> None:
        self._write(audio_tag(timestamp, body))

    def _write(self, data: bytes) -> None:
        self.target.write(data)
        self.bytes_written += len(data)


def read_tags(data: bytes) -> Iterator[FlvTag]:
    """Parse an FLV byte string: header check, then every complete tag."""
    if len(data) < HEADER_SIZE + 4 or data[:3] != b"FLV":
        raise FlvError("not an FLV stream")
    offset = _u32.unpack_from(data, 5)[0] + 4
    while offset + TAG_HEADER_SIZE <= len(data):
        tag_type = data[offset] & 0x1F
        size = int.from_bytes(data[offset + 1 : offset + 4], "big")
        stamp = int.from_bytes(data[offset + 4 : offset + 7], "big") | (data[offset + 7] << 24)
        end = offset + TAG_HEADER_SIZE + size
        if end + 4 > len(data):
            raise FlvError(f"truncated tag at offset {offset}")
        if _u32.unpack_from(data, end)[0] != TAG_HEADER_SIZE + size:
            raise FlvError(f"previous tag size mismatch after the tag at offset {offset}")
        yield FlvTag(tag_type, stamp, data[offset + TAG_HEADER_SIZE : end])
        offset = end + 4
