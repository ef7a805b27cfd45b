import struct

import pytest

from tests.stream.package import media
from verge.stream.package.mp4 import BoxReader, Mp4Error, iter_boxes, parse_init, parse_moof

pytestmark = media.needs_ffmpeg


def box(kind: str, payload: bytes = b"") -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind.encode()) + payload


def full(kind: str, version: int, flags: int, payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags) + payload)


def top_level(data: bytes) -> list:
    return BoxReader().feed(data)


def test_random_chunks_give_the_same_boxes():
    video, _ = media.separate()
    reader = BoxReader()
    boxes = [b for piece in media.chunks(video) for b in reader.feed(piece)]
    assert [b.data for b in boxes] == [b.data for b in top_level(video)]
    assert b"".join(b.data for b in boxes) == video and reader.buffered == 0
    assert [b.type for b in boxes[:4]] == ["ftyp", "moov", "moof", "mdat"]


def test_large_size_and_bad_sizes():
    payload = b"x" * 10
    large = struct.pack(">I4sQ", 1, b"mdat", 16 + len(payload)) + payload
    reader = BoxReader()
    assert reader.feed(large[:12]) == []
    [got] = reader.feed(large[12:])
    assert got.type == "mdat" and got.data == large
    with pytest.raises(Mp4Error, match="end of file"):
        BoxReader().feed(struct.pack(">I4s", 0, b"mdat"))
    with pytest.raises(Mp4Error, match="smaller"):
        BoxReader().feed(struct.pack(">I4s", 4, b"mdat"))
    with pytest.raises(Mp4Error, match="bound"):
        BoxReader(max_box_size=1000).feed(struct.pack(">I4s", 5000, b"mdat"))


def test_parse_init_of_ffmpeg_streams():
    video, audio = media.separate()
    [v] = parse_init(video[:4096]).tracks
    assert (v.handler, v.width, v.height, v.track_id) == ("vide", 320, 240, 1)
    assert v.codec.startswith("avc1.") and len(v.codec) == 11 and v.timescale > 0
    [a] = parse_init(audio[:4096]).tracks
    assert (a.handler, a.codec, a.sample_rate, a.channels) == ("soun", "mp4a.40.2", 48000, 2)
    assert a.timescale == 48000 and a.avg_bitrate > 0
    tracks = parse_init(media.muxed()[:8192]).tracks
    assert [t.handler for t in tracks] == ["vide", "soun"]


def test_parse_moof_timing_is_contiguous():
    video, _ = media.separate()
    boxes = top_level(video)
    init = parse_init(boxes[0].data + boxes[1].data)
    moofs = [parse_moof(b.data, init) for b in boxes if b.type == "moof"]
    assert [m.sequence for m in moofs] == list(range(1, len(moofs) + 1))
    trafs = [m.trafs[0] for m in moofs]
    for before, after in zip(trafs, trafs[1:], strict=False):
        assert before.base_decode_time + before.duration == after.base_decode_time
    assert sum(t.sample_count for t in trafs) == 150  # 6 s at 25 fps
    syncs = [t.base_decode_time / init.tracks[0].timescale for t in trafs if t.first_sync]
    assert syncs == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def _moof(
    tfhd_flags: int, tfhd_fields: bytes, trun_flags: int, trun_fields: bytes, count: int
) -> bytes:
    tfhd = full("tfhd", 0, tfhd_flags, struct.pack(">I", 7) + tfhd_fields)
    tfdt = full("tfdt", 1, 0, struct.pack(">Q", 2**40))
    trun = full("trun", 0, trun_flags, struct.pack(">I", count) + trun_fields)
    return box("moof", full("mfhd", 0, 0, struct.pack(">I", 42)) + box("traf", tfhd + tfdt + trun))


def test_moof_defaults_and_first_sample_flags():
    non_sync = 0x00010000
    # tfhd default duration 100 and non-sync default flags; trun first_sample_flags says sync
    data = _moof(0x08 | 0x20, struct.pack(">II", 100, non_sync), 0x04, struct.pack(">I", 0), 3)
    info = parse_moof(data)
    assert info.sequence == 42
    [traf] = info.trafs
    assert (traf.track_id, traf.base_decode_time, traf.sample_count) == (7, 2**40, 3)
    assert traf.duration == 300 and traf.first_sync
    # per-sample durations and flags in the trun
    fields = struct.pack(">IIII", 10, non_sync, 20, 0)
    traf = parse_moof(_moof(0, b"", 0x100 | 0x400, fields, 2)).trafs[0]
    assert traf.duration == 30 and not traf.first_sync


def test_hevc_codec_string():
    from verge.stream.package.mp4 import _hevc_codec

    hvcc = bytes([1, 0x01]) + struct.pack(">I", 0x60000000) + bytes([0xB0, 0, 0, 0, 0, 0, 93])
    assert _hevc_codec(hvcc, "hvc1", 0) == "hvc1.1.6.L93.B0"


def test_iter_boxes_rejects_truncation():
    with pytest.raises(Mp4Error):
        list(iter_boxes(box("moov", b"abc")[:-1]))
    assert [t for t, _, _ in iter_boxes(box("free") + box("skip", b"xy"))] == ["free", "skip"]


def test_corrupt_boxes_raise_mp4_error():
    truncated_trun = box(
        "moof", box("traf", full("tfhd", 0, 0, struct.pack(">I", 1)) + full("trun", 0, 0x100, b""))
    )
    with pytest.raises(Mp4Error):
        parse_moof(truncated_trun)
    with pytest.raises(Mp4Error):
        parse_init(box("moov", box("trak", box("tkhd", b"\x00"))))
