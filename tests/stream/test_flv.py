"""FLV framing: header, tag layout, timestamps above 24 bits, onMetaData, parsing back."""

from __future__ import annotations

import io

import pytest

from verge.stream import flv
from verge.stream.rtmp import amf0


def test_file_header_bytes() -> None:
    assert flv.file_header() == b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00"
    assert flv.file_header(audio=False)[4] == 0x01
    assert flv.file_header(video=False)[4] == 0x04


def test_tag_layout_and_previous_tag_size() -> None:
    data = flv.video_tag(0x12345678, b"body")
    assert data[0] == flv.VIDEO
    assert data[1:4] == b"\x00\x00\x04"
    assert data[4:7] == b"\x34\x56\x78" and data[7] == 0x12  # lower 24 bits, then the upper 8
    assert data[8:11] == b"\0\0\0" and data[11:15] == b"body"
    assert data[15:] == (11 + 4).to_bytes(4, "big")


def test_metadata_tag_is_on_meta_data_with_an_ecma_array() -> None:
    [tag] = list(flv.read_tags(flv.file_header() + flv.metadata_tag({"width": 320.0})))
    assert tag.tag_type == flv.SCRIPT
    name, value = amf0.decode(tag.body)
    assert name == "onMetaData" and isinstance(value, amf0.EcmaArray) and value == {"width": 320.0}


def test_writer_round_trip() -> None:
    buffer = io.BytesIO()
    writer = flv.FlvWriter(buffer)
    writer.write_metadata({"duration": 0.0})
    writer.write_video(0, b"\x17\x00seq")
    writer.write_audio(0, b"\xaf\x00\x12\x10")
    writer.write_video(0x01000000, b"\x27\x01late")
    assert writer.bytes_written == len(buffer.getvalue())
    tags = list(flv.read_tags(buffer.getvalue()))
    assert [(t.tag_type, t.timestamp) for t in tags] == [
        (flv.SCRIPT, 0),
        (flv.VIDEO, 0),
        (flv.AUDIO, 0),
        (flv.VIDEO, 0x01000000),
    ]
    assert tags[3].body == b"\x27\x01late"


def test_body_size_limit() -> None:
    with pytest.raises(ValueError):
        flv.tag(flv.VIDEO, 0, b"\0" * (1 << 24))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"NOPE" + b"\0" * 20, "not an FLV"),
        (flv.file_header() + flv.video_tag(0, b"abc")[:-2], "truncated"),
        (flv.file_header() + flv.video_tag(0, b"abc")[:-1] + b"\x09", "mismatch"),
    ],
)
def test_read_tags_rejects_bad_input(data: bytes, message: str) -> None:
    with pytest.raises(flv.FlvError, match=message):
        list(flv.read_tags(data))
