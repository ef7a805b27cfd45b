"""CMAF segmenter: ffmpeg's fragmented-MP4 byte stream in, init / parts / segment ends out.

Sans-I/O: :meth:`Segmenter.feed` takes whatever the pipe delivered and returns events. One
part is one or more whole ``moof``+``mdat`` fragments, so the same bytes serve as an LL-HLS
partial segment, and a segment is the concatenation of its parts (CMAF chunks → CMAF
segment), served as a classic HLS segment and a DASH ``$Number$`` segment.

Timing comes from the media (``tfdt`` and ``trun`` durations in the primary track's timescale),
never from the wall clock: a segment starts at an independent part (first sample a sync sample)
once the segment grid point (``segment_target`` seconds apart, anchored at the first decode
time) is reached (see :meth:`Segmenter._boundary`). Fragments smaller than ``part_target`` are merged into one part (when ffmpeg
writes a fragment per frame); a fragment larger than ``part_target`` cannot be split and becomes
an over-long part, counted in :attr:`Segmenter.overlong_parts`.

A new init segment in the middle of the stream (the producer restarted) or :meth:`restart`
closes the open segment and flags the next part as a discontinuity; the decode-time anchor is
re-established from the new stream.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from verge.stream.package.mp4 import (
    Box,
    BoxReader,
    InitInfo,
    MoofInfo,
    TrackInfo,
    parse_init,
    parse_moof,
)

_INIT_TYPES = {"ftyp", "moov", "free", "skip", "uuid"}
_PRE_MOOF_TYPES = {"styp", "prft", "emsg", "sidx"}


@dataclass(frozen=True, slots=True)
class InitSegment:
    data: bytes
    info: InitInfo
    discontinuity: int  # discontinuity sequence this init belongs to (0 for the first)


@dataclass(frozen=True, slots=True)
class Part:
    msn: int
    index: int  # part index within its segment
    seq: int  # global part number (0, 1, 2, ...), stable across segments
    duration: float  # seconds
    independent: bool
    data: bytes  # moof+mdat (one or more)
    start: int  # decode time of the first sample, primary track timescale
    duration_ts: int  # primary track timescale
    timescale: int
    sample_count: int  # primary track samples
    discontinuity: int  # discontinuity sequence number
    discontinuity_start: bool = False  # first part after a discontinuity


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    msn: int
    duration: float  # seconds
    start: int  # decode time, primary track timescale
    duration_ts: int
    timescale: int
    part_count: int


Event = InitSegment | Part | SegmentEnd


@dataclass(slots=True)
class _Chunk:
    """moof+mdat pairs being gathered into one part."""

    data: list[bytes] = field(default_factory=list)
    tracks: set[int] = field(default_factory=set)
    start: int | None = None
    duration: int = 0
    samples: int = 0
    independent: bool = False

    def add(self, moof: MoofInfo, data: bytes, primary: int) -> None:
        self.data.append(data)
        for traf in moof.trafs:
            self.tracks.add(traf.track_id)
            if traf.track_id == primary:
                if self.start is None:
                    self.start = traf.base_decode_time
                    self.independent = traf.first_sync
                self.duration += traf.duration
                self.samples += traf.sample_count

    def merge(self, other: _Chunk) -> None:
        if self.start is None:
            self.start, self.independent = other.start, other.independent
        self.data += other.data
        self.tracks |= other.tracks
        self.duration += other.duration
        self.samples += other.samples


class Segmenter:
    """Cuts one rendition's fMP4 stream into CMAF parts and segments."""

    def __init__(
        self, part_target: float, segment_target: float, *, max_box_size: int | None = None
    ) -> None:
        if part_target <= 0 or segment_target < part_target:
            raise ValueError("need 0 < part_target <= segment_target")
        self.part_target = part_target
        self.segment_target = segment_target
        self._reader = BoxReader(max_box_size) if max_box_size else BoxReader()
        self.init: InitSegment | None = None
        self.overlong_parts = 0
        self.max_part_duration = 0.0
        self._init_boxes: list[bytes] = []
        self._pending_pre: list[bytes] = []  # styp/prft before a moof
        self._moof: tuple[MoofInfo, bytes] | None = None
        self._fragment: _Chunk | None = None  # pairs of one ffmpeg flush (muxed separate_moof)
        self._part: _Chunk | None = None  # merged fragments not yet emitted
        self._msn = -1
        self._part_index = 0
        self._seq = 0
        self._seg_start: int | None = None
        self._seg_duration = 0
        self._anchor: int | None = None
        self._disc = 0
        self._disc_pending = False
        self._emitted_any = False

    # --- public -------------------------------------------------------------------------------

    @property
    def primary(self) -> TrackInfo | None:
        """The track whose timeline drives parts: the video track if any, else the first."""
        if self.init is None or not self.init.info.tracks:
            return None
        tracks = self.init.info.tracks
        return next((t for t in tracks if t.is_video), tracks[0])

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for box in self._reader.feed(data):
            self._on_box(box, events)
        return events

    def flush(self) -> list[Event]:
        """End of the stream: emit what is complete and close the open segment."""
        events: list[Event] = []
        self._close_fragment(events)
        self._emit_part(events)
        self._end_segment(events)
        return events

    def restart(self) -> list[Event]:
        """The producer restarted: drop partial bytes, close the segment, expect a new init."""
        events = self.flush()
        self._reader.reset()
        self._moof = None
        self._pending_pre.clear()
        self._init_boxes.clear()
        if self._emitted_any:
            self._disc_pending = True
        return events

    # --- boxes --------------------------------------------------------------------------------

    def _on_box(self, box: Box, events: list[Event]) -> None:
        if box.type in _INIT_TYPES:
            self._on_init_box(box, events)
        elif box.type in _PRE_MOOF_TYPES:
            self._pending_pre.append(box.data)
        elif box.type == "moof":
            self._on_moof(box, events)
        elif box.type == "mdat" and self._moof is not None:
            moof, moof_bytes = self._moof
            self._moof = None
            self._on_pair(moof, b"".join(self._pending_pre) + moof_bytes + box.data, events)
            self._pending_pre.clear()
        # anything else (mfra at the end, stray mdat) carries nothing we serve

    def _on_init_box(self, box: Box, events: list[Event]) -> None:
        starts_init = box.type in ("ftyp", "moov") and not self._init_boxes
        if self.init is not None and not self._init_boxes and not starts_init:
            return  # a free/skip/uuid box between fragments
        if self.init is not None and starts_init:
            events.extend(self.flush())  # a new stream: close what the old one left open
            self._moof = None
            self._disc_pending = self._disc_pending or self._emitted_any
        self._init_boxes.append(box.data)
        if box.type != "moov":
            return
        data = b"".join(self._init_boxes)
        self._init_boxes.clear()
        if self._disc_pending:
            self._disc += 1
            self._anchor = None
        self.init = InitSegment(data, parse_init(data), self._disc)
        events.append(self.init)

    def _on_moof(self, box: Box, events: list[Event]) -> None:
        if self.init is None:
            return  # fragments before any init cannot be played: skip
        self._moof = (parse_moof(box.data, self.init.info), box.data)

    def _on_pair(self, moof: MoofInfo, data: bytes, events: list[Event]) -> None:
        primary = self.primary
        assert primary is not None and self.init is not None
        has_primary = moof.traf(primary.track_id) is not None
        if has_primary and self._fragment and primary.track_id in self._fragment.tracks:
            self._close_fragment(events)
        if self._fragment is None:
            self._fragment = _Chunk()
        self._fragment.add(moof, data, primary.track_id)
        all_tracks = {t.track_id for t in self.init.info.tracks}
        if self._fragment.tracks >= all_tracks:
            self._close_fragment(events)

    # --- parts and segments -------------------------------------------------------------------

    def _close_fragment(self, events: list[Event]) -> None:
        frag, self._fragment = self._fragment, None
        if frag is None or frag.start is None:
            if frag is not None and self._part is not None:
                self._part.merge(frag)  # a fragment without the primary track rides along
            return
        target = self._ts(self.part_target)
        part = self._part
        if part is not None and (frag.independent or part.duration + frag.duration > target):
            self._emit_part(events)
            part = None
        if part is None:
            self._start_part(frag, events)
        else:
            part.merge(frag)
        assert self._part is not None
        if self._part.duration + frag.duration > target:
            self._emit_part(events)  # another fragment like this one would not fit

    def _start_part(self, frag: _Chunk, events: list[Event]) -> None:
        assert frag.start is not None
        if self._anchor is None:
            self._anchor = frag.start
        if self._seg_start is None or (
            frag.independent and frag.start + frag.duration // 2 >= self._boundary()
        ):
            self._end_segment(events)
            self._msn += 1
            self._part_index = 0
            self._seg_start = frag.start
            self._seg_duration = 0
        self._part = frag

    def _boundary(self) -> int:
        """The grid point after the one nearest the open segment's start.

        A keyframe fragment cuts when its middle is past the grid point: segments average the
        target even when fragments do not divide it (AAC's 1024-sample frames).
        """
        assert self._anchor is not None and self._seg_start is not None
        step = self._ts(self.segment_target)
        k = (self._seg_start - self._anchor + step // 2) // step + 1  # grid index after the start
        return self._anchor + k * step

    def _emit_part(self, events: list[Event]) -> None:
        part, self._part = self._part, None
        if part is None or part.start is None:
            return
        timescale = self._timescale()
        duration = part.duration / timescale
        if duration > self.part_target + 1e-9:
            self.overlong_parts += 1
        self.max_part_duration = max(self.max_part_duration, duration)
        events.append(
            Part(
                msn=self._msn,
                index=self._part_index,
                seq=self._seq,
                duration=duration,
                independent=part.independent,
                data=b"".join(part.data),
                start=part.start,
                duration_ts=part.duration,
                timescale=timescale,
                sample_count=part.samples,
                discontinuity=self._disc,
                discontinuity_start=self._disc_pending,
            )
        )
        self._disc_pending = False
        self._emitted_any = True
        self._part_index += 1
        self._seq += 1
        self._seg_duration += part.duration

    def _end_segment(self, events: list[Event]) -> None:
        if self._seg_start is None or self._part_index == 0:
            return
        timescale = self._timescale()
        events.append(
            SegmentEnd(
                msn=self._msn,
                duration=self._seg_duration / timescale,
                start=self._seg_start,
                duration_ts=self._seg_duration,
                timescale=timescale,
                part_count=self._part_index,
            )
        )
        self._seg_start = None
        self._part_index = 0

    def _timescale(self) -> int:
        primary = self.primary
        return primary.timescale if primary else 1

    def _ts(self, seconds: float) -> int:
        return round(seconds * self._timescale())


# --- the packaged model that playlists and manifests render ---------------------------------


@dataclass(slots=True)
class MediaPart:
    seq: int
    index: int
    duration: float
    independent: bool
    data: bytes


@dataclass(slots=True)
class MediaSegment:
    """One segment as packaged so far (``complete`` once its :class:`SegmentEnd` came)."""

    msn: int
    discontinuity: int
    init: InitSegment
    start: int  # decode time in ``timescale`` units
    timescale: int
    pdt: float  # wall-clock time (Unix seconds) of ``start``
    parts: list[MediaPart] = field(default_factory=list)
    duration_ts: int = 0
    sample_count: int = 0
    complete: bool = False

    @property
    def duration(self) -> float:
        return self.duration_ts / self.timescale

    @property
    def size(self) -> int:
        return sum(len(p.data) for p in self.parts)

    @property
    def data(self) -> bytes:
        return b"".join(p.data for p in self.parts)


_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class Naming:
    """Resource names inside one rendition, as ``str.format`` patterns.

    ``init`` may use ``{disc}`` (a new init after each discontinuity: caches never see a changed
    ``init`` under the same name), ``segment`` must use ``{msn}`` (DASH turns it into
    ``$Number$``), ``part`` may use ``{msn}``, ``{part}`` and ``{seq}`` (the global part number;
    the default, so that the preload hint always names the part that will come, even when that
    part turns out to start a new segment).
    """

    init: str = "init{disc}.mp4"
    segment: str = "seg{msn}.m4s"
    part: str = "part{seq}.m4s"

    def init_uri(self, disc: int) -> str:
        return self.init.format(disc=disc)

    def segment_uri(self, msn: int) -> str:
        return self.segment.format(msn=msn)

    def part_uri(self, msn: int, index: int, seq: int) -> str:
        return self.part.format(msn=msn, part=index, seq=seq)

    def segment_template(self) -> str:
        return self.segment.format(msn="$Number$")

    def parse(self, name: str) -> tuple[str, dict[str, int]] | None:
        """("init"|"segment"|"part", fields) for a name these patterns produce, else None."""
        for kind in ("init", "segment", "part"):
            match = _pattern(getattr(self, kind)).fullmatch(name)
            if match:
                return kind, {k: int(v) for k, v in match.groupdict().items()}
        return None


@functools.lru_cache(maxsize=64)
def _pattern(template: str) -> re.Pattern[str]:
    pieces = _FIELD.split(template)
    regex = "".join(
        re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>[0-9]+)" for i, piece in enumerate(pieces)
    )
    return re.compile(regex)
