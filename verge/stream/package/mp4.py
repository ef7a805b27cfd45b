"""ISO-BMFF (fragmented MP4) reading: just enough to package ffmpeg's CMAF output.

The packager never rewrites media; it cuts the byte stream at box boundaries and reads the few
fields that playlists and manifests need. :class:`BoxReader` turns arbitrary chunks of a pipe
into complete top-level boxes (with a size bound, so a corrupt stream cannot make us buffer
gigabytes). :func:`parse_init` reads the tracks of an init segment (``moov``): id, handler,
timescale, the RFC 6381 codec string (``avc1.PPCCLL``, ``hvc1...``, ``mp4a.40.2``), picture
size, sample rate, channels and the ``trex`` defaults. :func:`parse_moof` reads a fragment
header: sequence number and, per track, the base media decode time, sample count, duration
and whether the first sample is a sync sample.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

DEFAULT_MAX_BOX = 64 * 1024 * 1024
_NON_SYNC = 0x00010000

_u8 = struct.Struct(">B")
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")
_u64 = struct.Struct(">Q")


class Mp4Error(ValueError):
    """The bytes are not the fragmented MP4 we expect."""


@dataclass(frozen=True, slots=True)
class Box:
    """One complete top-level box: its four-character type and all its bytes (header too)."""

    type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TrackInfo:
    track_id: int
    handler: str  # "vide", "soun", ...
    timescale: int
    codec: str  # RFC 6381 string for CODECS / codecs=
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0
    avg_bitrate: int = 0  # from esds / btrt, 0 when unknown
    default_sample_duration: int = 0  # trex
    default_sample_flags: int = 0  # trex

    @property
    def is_video(self) -> bool:
        return self.handler == "vide"

    @property
    def is_audio(self) -> bool:
        return self.handler == "soun"


class DescribedTracks:
    """The playlist-facing description of a rendition's ``tracks`` (live or on demand)."""

    tracks: tuple[TrackInfo, ...]

    @property
    def video(self) -> TrackInfo | None:
        return next((t for t in self.tracks if t.is_video), None)

    @property
    def audio(self) -> TrackInfo | None:
        return next((t for t in self.tracks if t.is_audio), None)

    @property
    def codecs(self) -> str:
        """HLS CODECS / DASH codecs: the video and audio tracks' codec strings."""
        return ",".join(t.codec for t in self.tracks if t.is_video or t.is_audio)


@dataclass(frozen=True, slots=True)
class InitInfo:
    tracks: tuple[TrackInfo, ...]

    def track(self, track_id: int) -> TrackInfo | None:
        return next((t for t in self.tracks if t.track_id == track_id), None)


@dataclass(frozen=True, slots=True)
class TrafInfo:
    track_id: int
    base_decode_time: int
    sample_count: int
    duration: int  # in the track's timescale
    first_sync: bool


@dataclass(frozen=True, slots=True)
class MoofInfo:
    sequence: int
    trafs: tuple[TrafInfo, ...] = field(default_factory=tuple)

    def traf(self, track_id: int) -> TrafInfo | None:
        return next((t for t in self.trafs if t.track_id == track_id), None)


class BoxReader:
    """Incremental top-level box splitter: ``feed(bytes) -> [Box]``, any chunking."""

    def __init__(self, max_box_size: int = DEFAULT_MAX_BOX) -> None:
        self.max_box_size = max_box_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        """Drop a partial box (the producer restarted)."""
        self._buf.clear()

    def feed(self, data: bytes) -> list[Box]:
        self._buf += data
        boxes: list[Box] = []
        pos = 0
        while True:
            size = self._box_size(pos)
            if size is None or len(self._buf) - pos < size:
                break
            boxes.append(
                Box(
                    bytes(self._buf[pos + 4 : pos + 8]).decode("latin-1"),
                    bytes(self._buf[pos : pos + size]),
                )
            )
            pos += size
        del self._buf[:pos]
        return boxes

    def _box_size(self, pos: int) -> int | None:
        avail = len(self._buf) - pos
        if avail < 8:
            return None
        size = _u32.unpack_from(self._buf, pos)[0]
        header = 8
        if size == 1:
            if avail < 16:
                return None
            size = _u64.unpack_from(self._buf, pos + 8)[0]
            header = 16
        elif size == 0:
            raise Mp4Error("box extends to end of file: not a fragmented stream")
        if size < header:
            raise Mp4Error(f"box size {size} smaller than its header")
        if size > self.max_box_size:
            raise Mp4Error(f"box of {size} bytes exceeds the {self.max_box_size}-byte bound")
        return size


def iter_boxes(
    data: bytes, start: int = 0, end: int | None = None
) -> Iterator[tuple[str, int, int]]:
    """Child boxes in ``data[start:end]`` as (type, payload_start, box_end)."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size = _u32.unpack_from(data, pos)[0]
        header = 8
        if size == 1:
            size = _u64.unpack_from(data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise Mp4Error("truncated or corrupt box")
        yield data[pos + 4 : pos + 8].decode("latin-1"), pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: str) -> tuple[int, int] | None:
    for t, s, e in iter_boxes(data, start, end):
        if t == kind:
            return s, e
    return None


def _path(data: bytes, start: int, end: int, *kinds: str) -> tuple[int, int] | None:
    span: tuple[int, int] | None = (start, end)
    for kind in kinds:
        if span is None:
            return None
        span = _child(data, span[0], span[1], kind)
    return span


# --- init segment -----------------------------------------------------------------------------


def parse_init(data: bytes) -> InitInfo:
    """Tracks of an init segment (``ftyp`` + ``moov``) or of a bare ``moov`` box."""
    try:
        return _parse_init(data)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise Mp4Error(f"corrupt init segment: {exc}") from exc


def _parse_init(data: bytes) -> InitInfo:
    moov = _child(data, 0, len(data), "moov")
    if moov is None:
        raise Mp4Error("no moov box in init segment")
    trex = _trex_defaults(data, *moov)
    tracks = [_parse_trak(data, s, e, trex) for t, s, e in iter_boxes(data, *moov) if t == "trak"]
    return InitInfo(tuple(tracks))


def _trex_defaults(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    mvex = _child(data, start, end, "mvex")
    out: dict[int, tuple[int, int]] = {}
    if mvex is None:
        return out
    for t, s, _e in iter_boxes(data, *mvex):
        if t == "trex":
            track_id, _desc, duration, _size, flags = struct.unpack_from(">5I", data, s + 4)
            out[track_id] = (duration, flags)
    return out


def _parse_trak(data: bytes, start: int, end: int, trex: dict[int, tuple[int, int]]) -> TrackInfo:
    tkhd = _child(data, start, end, "tkhd")
    mdhd = _path(data, start, end, "mdia", "mdhd")
    hdlr = _path(data, start, end, "mdia", "hdlr")
    stsd = _path(data, start, end, "mdia", "minf", "stbl", "stsd")
    if tkhd is None or mdhd is None or hdlr is None or stsd is None:
        raise Mp4Error("trak without tkhd/mdhd/hdlr/stsd")
    version = data[tkhd[0]]
    track_id = _u32.unpack_from(data, tkhd[0] + (20 if version == 1 else 12))[0]
    version = data[mdhd[0]]
    timescale = _u32.unpack_from(data, mdhd[0] + (20 if version == 1 else 12))[0]
    handler = data[hdlr[0] + 8 : hdlr[0] + 12].decode("latin-1")
    duration, flags = trex.get(track_id, (0, 0))
    entry = _first_sample_entry(data, *stsd)
    fields = _sample_entry_fields(data, *entry) if entry else {"codec": "unknown"}
    return TrackInfo(
        track_id=track_id,
        handler=handler,
        timescale=timescale,
        default_sample_duration=duration,
        default_sample_flags=flags,
        **fields,
    )


def _first_sample_entry(data: bytes, start: int, end: int) -> tuple[str, int, int] | None:
    return next(iter_boxes(data, start + 8, end), None)  # skip FullBox header + entry_count


_VISUAL = {"avc1", "avc3", "hvc1", "hev1", "av01", "vp09", "encv"}
_AUDIO = {"mp4a", "ac-3", "ec-3", "Opus", "fLaC", "enca"}


def _sample_entry_fields(data: bytes, kind: str, start: int, end: int) -> dict:
    if kind in _VISUAL:
        width, height = _u16.unpack_from(data, start + 24)[0], _u16.unpack_from(data, start + 26)[0]
        children = dict((t, (s, e)) for t, s, e in iter_boxes(data, start + 78, end))
        return {
            "codec": _video_codec(data, kind, children),
            "width": width,
            "height": height,
            "avg_bitrate": _btrt(data, children),
        }
    if kind in _AUDIO:
        version = _u16.unpack_from(data, start + 8)[0]
        channels = _u16.unpack_from(data, start + 16)[0]
        sample_rate = _u32.unpack_from(data, start + 24)[0] >> 16
        skip = {1: 16, 2: 36}.get(version, 0)
        children = dict((t, (s, e)) for t, s, e in iter_boxes(data, start + 28 + skip, end))
        codec, bitrate, asc_channels = kind, _btrt(data, children), 0
        if kind == "mp4a" and "esds" in children:
            codec, avg, asc_channels = _parse_esds(data, *children["esds"])
            bitrate = bitrate or avg
        return {
            "codec": codec,
            "sample_rate": sample_rate,
            "channels": asc_channels or channels,
            "avg_bitrate": bitrate,
        }
    return {"codec": kind}


def _btrt(data: bytes, children: dict[str, tuple[int, int]]) -> int:
    if "btrt" not in children:
        return 0
    return _u32.unpack_from(data, children["btrt"][0] + 8)[0]


def _video_codec(data: bytes, kind: str, children: dict[str, tuple[int, int]]) -> str:
    if kind in ("avc1", "avc3") and "avcC" in children:
        s = children["avcC"][0]
        return f"{kind}.{data[s + 1]:02X}{data[s + 2]:02X}{data[s + 3]:02X}"
    if kind in ("hvc1", "hev1") and "hvcC" in children:
        return _hevc_codec(data, kind, children["hvcC"][0])
    return kind


def _hevc_codec(data: bytes, kind: str, s: int) -> str:
    """ISO/IEC 14496-15 Annex E: hvc1.<space><profile>.<compat>.<tier><level>.<constraints>."""
    b = data[s + 1]
    space = "" if b >> 6 == 0 else "ABC"[(b >> 6) - 1]
    tier = "H" if b & 0x20 else "L"
    profile = b & 0x1F
    compat = _u32.unpack_from(data, s + 2)[0]
    compat_rev = int(f"{compat:032b}"[::-1], 2)
    constraints = list(data[s + 6 : s + 12])
    level = data[s + 12]
    while constraints and constraints[-1] == 0:
        constraints.pop()
    parts = [kind, f"{space}{profile}", f"{compat_rev:X}", f"{tier}{level}"]
    parts += [f"{c:X}" for c in constraints]
    return ".".join(parts)


def _descriptor(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, payload_start, payload_end) of an MPEG-4 descriptor at ``pos``."""
    tag = data[pos]
    size, pos = 0, pos + 1
    for _ in range(4):
        b = data[pos]
        pos += 1
        size = (size << 7) | (b & 0x7F)
        if not b & 0x80:
            break
    return tag, pos, pos + size


def _parse_esds(data: bytes, start: int, end: int) -> tuple[str, int, int]:
    """(codec string, avg bitrate, channels) from an esds box payload."""
    tag, s, e = _descriptor(data, start + 4)
    if tag != 0x03:
        return "mp4a", 0, 0
    flags = data[s + 2]
    pos = s + 3 + (2 if flags & 0x80 else 0)
    if flags & 0x40:
        pos += 1 + data[pos]
    pos += 2 if flags & 0x20 else 0
    tag, s, e = _descriptor(data, pos)
    if tag != 0x04:
        return "mp4a", 0, 0
    oti = data[s]
    avg = _u32.unpack_from(data, s + 9)[0]
    if oti != 0x40:
        return f"mp4a.{oti:02X}", avg, 0
    tag, ds, de = _descriptor(data, s + 13) if s + 13 < e else (0, 0, 0)
    if tag != 0x05 or de - ds < 2:
        return "mp4a.40.2", avg, 0
    bits = int.from_bytes(data[ds : min(de, ds + 5)], "big")
    nbits = 8 * (min(de, ds + 5) - ds)
    aot = bits >> (nbits - 5)
    consumed = 5
    if aot == 31:
        aot = 32 + ((bits >> (nbits - 11)) & 0x3F)
        consumed = 11
    freq_index = (bits >> (nbits - consumed - 4)) & 0xF
    consumed += 4 + (24 if freq_index == 15 else 0)
    channels = (bits >> (nbits - consumed - 4)) & 0xF if nbits >= consumed + 4 else 0
    return f"mp4a.40.{aot}", avg, channels


# --- fragments --------------------------------------------------------------------------------


def parse_moof(data: bytes, init: InitInfo | None = None) -> MoofInfo:
    """Sequence number and per-track timing of a ``moof`` box (its bytes, header included)."""
    try:
        return _parse_moof(data, init)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise Mp4Error(f"corrupt moof: {exc}") from exc


def _parse_moof(data: bytes, init: InitInfo | None) -> MoofInfo:
    moof = _child(data, 0, len(data), "moof")
    if moof is None:
        raise Mp4Error("not a moof box")
    sequence = 0
    trafs: list[TrafInfo] = []
    for t, s, e in iter_boxes(data, *moof):
        if t == "mfhd":
            sequence = _u32.unpack_from(data, s + 4)[0]
        elif t == "traf":
            trafs.append(_parse_traf(data, s, e, init))
    return MoofInfo(sequence, tuple(trafs))


def _parse_traf(data: bytes, start: int, end: int, init: InitInfo | None) -> TrafInfo:
    tfhd = _child(data, start, end, "tfhd")
    if tfhd is None:
        raise Mp4Error("traf without tfhd")
    track_id, default_duration, default_flags = _parse_tfhd(data, tfhd[0])
    track = init.track(track_id) if init else None
    if default_duration is None:
        default_duration = track.default_sample_duration if track else 0
    if default_flags is None:
        default_flags = track.default_sample_flags if track else 0
    base = 0
    count = duration = 0
    first_flags: int | None = None
    for t, s, _e in iter_boxes(data, start, end):
        if t == "tfdt":
            base = (_u64 if data[s] == 1 else _u32).unpack_from(data, s + 4)[0]
        elif t == "trun":
            n, d, f = _parse_trun(data, s, default_duration, default_flags)
            if first_flags is None and n:
                first_flags = f
            count += n
            duration += d
    first_sync = not ((default_flags if first_flags is None else first_flags) & _NON_SYNC)
    return TrafInfo(track_id, base, count, duration, first_sync)


def _parse_tfhd(data: bytes, s: int) -> tuple[int, int | None, int | None]:
    flags = _u32.unpack_from(data, s)[0] & 0xFFFFFF
    track_id = _u32.unpack_from(data, s + 4)[0]
    pos = s + 8
    if flags & 0x1:
        pos += 8
    if flags & 0x2:
        pos += 4
    duration = flags_value = None
    if flags & 0x8:
        duration = _u32.unpack_from(data, pos)[0]
        pos += 4
    if flags & 0x10:
        pos += 4
    if flags & 0x20:
        flags_value = _u32.unpack_from(data, pos)[0]
    return track_id, duration, flags_value


def _parse_trun(
    data: bytes, s: int, default_duration: int, default_flags: int
) -> tuple[int, int, int]:
    """(sample_count, total duration, first sample's flags)."""
    flags = _u32.unpack_from(data, s)[0] & 0xFFFFFF
    count = _u32.unpack_from(data, s + 4)[0]
    pos = s + 8 + (4 if flags & 0x1 else 0)
    first_flags: int | None = None
    if flags & 0x4:
        first_flags = _u32.unpack_from(data, pos)[0]
        pos += 4
    fields = [bit for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit]
    stride = 4 * len(fields)
    if not fields:
        return (
            count,
            count * default_duration,
            default_flags if first_flags is None else first_flags,
        )
    total = 0
    for i in range(count):
        off = pos + i * stride
        values = dict(zip(fields, struct.unpack_from(f">{len(fields)}I", data, off), strict=True))
        total += values.get(0x100, default_duration)
        if i == 0 and first_flags is None:
            first_flags = values.get(0x400, default_flags)
    if first_flags is None:
        first_flags = default_flags
    return count, total, first_flags
