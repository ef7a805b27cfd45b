"""Live packaging state: the DVR window of one rendition, and a stream of renditions.

Pure state, no I/O and no waiting: the server feeds transcoder bytes (:meth:`LiveRendition.feed`)
and, around these objects, awaits an asyncio condition that it notifies after each feed. The
queries are the ones an LL-HLS origin needs: does part (msn, i) exist, is a blocking playlist
request (``_HLS_msn``/``_HLS_part``) ready or out of range (400), the bytes of an init /
segment / part by name, and the playlists and the MPD rendered from the current window.

Segments leave the playlist when the window (``window`` seconds, never less than three target
durations) is full, but their bytes stay fetchable for another window: a player that loaded an
older playlist can still fetch what it lists (RFC 8216bis 6.2.2).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from verge.stream.package import dash, hls
from verge.stream.package.cmaf import (
    Event,
    InitSegment,
    MediaPart,
    MediaSegment,
    Naming,
    Part,
    SegmentEnd,
    Segmenter,
)
from verge.stream.package.mp4 import DescribedTracks, TrackInfo


class BlockingRequestError(ValueError):
    """A bad ``_HLS_msn``/``_HLS_part`` query: answer 400 Bad Request."""


def parse_blocking_query(msn: str | None, part: str | None) -> tuple[int | None, int | None]:
    """Validate the raw query values: decimal integers, and ``_HLS_part`` only with ``_HLS_msn``."""
    if msn is None:
        if part is not None:
            raise BlockingRequestError("_HLS_part without _HLS_msn")
        return None, None
    return _decimal(msn, "_HLS_msn"), (None if part is None else _decimal(part, "_HLS_part"))


def _decimal(text: str, name: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BlockingRequestError(f"{name} must be a decimal integer")
    return int(text)


@dataclass
class Timeline:
    """Wall-clock anchors per discontinuity, shared by the renditions of one stream.

    The first rendition to deliver a part of a period fixes when (wall clock) its media time was
    shown; every rendition maps its decode times through the same anchor, so audio and video keep
    their relative timing in PROGRAM-DATE-TIME and in the DASH timeline.
    """

    anchors: dict[int, dash.PeriodAnchor] = field(default_factory=dict)
    arrival: Callable[[float], float | None] | None = None
    """When (wall clock) the input frame at an output media time reached the ingest, if known.
    A period is anchored there rather than at when its first part left the transcoder, so
    PROGRAM-DATE-TIME does not hide the transcoder's start-up and delay: a player's ``now -
    PDT`` is glass-to-glass minus only the publisher's own capture, encoding and upload."""

    def wall(self, disc: int, media_seconds: float, now: float) -> float:
        anchor = self.anchors.get(disc)
        if anchor is None:
            arrived = self.arrival(media_seconds) if self.arrival is not None else None
            wall = now if arrived is None else min(arrived, now)
            anchor = self.anchors[disc] = dash.PeriodAnchor(disc, wall, media_seconds)
        return anchor.wall + (media_seconds - anchor.media)

    @property
    def start(self) -> float | None:
        """availabilityStartTime: the wall clock of the first period's anchor."""
        return min((a.wall for a in self.anchors.values()), default=None)


class LiveRendition(DescribedTracks):
    """The window of one rendition: segments with their parts, its init segments, its state."""

    def __init__(
        self,
        name: str = "",
        *,
        part_target: float = 0.2,
        segment_target: float = 1.0,
        part_hold_back: float | None = None,
        window: float = 30.0,
        naming: Naming | None = None,
        bandwidth_hint: int = 0,
        timeline: Timeline | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.part_target = part_target
        self.segment_target = segment_target
        self.part_hold_back = part_hold_back  # None: the playlist's default (hls.py)
        self.window = window
        self.naming = naming or Naming()
        self.bandwidth_hint = bandwidth_hint
        self.timeline = timeline or Timeline()
        self.segmenter = Segmenter(part_target, segment_target)
        self.segments: deque[MediaSegment] = deque()
        self.retired: deque[MediaSegment] = deque()
        self.inits: dict[int, InitSegment] = {}
        self.ended = False
        self._clock = clock
        self._init: InitSegment | None = None
        self._parts_by_seq: dict[int, tuple[MediaSegment, MediaPart]] = {}
        self._segment_data: dict[int, bytes] = {}  # complete segments, joined once
        self._max_target = max(1, math.ceil(segment_target - 1e-9))
        self._bytes = 0
        self._seconds = 0.0
        self._peak = 0
        self._samples = 0

    # --- input --------------------------------------------------------------------------------

    def feed(self, data: bytes, now: float | None = None) -> list[Event]:
        """Segment transcoder output and add the events; returns them (for logs and metrics)."""
        events = self.segmenter.feed(data)
        for event in events:
            self.add(event, now)
        return events

    def add(self, event: Event, now: float | None = None) -> None:
        if self.ended:
            return
        if isinstance(event, InitSegment):
            self._init = event
            self.inits[event.discontinuity] = event
        elif isinstance(event, Part):
            self._add_part(event, self._clock() if now is None else now)
        elif isinstance(event, SegmentEnd):
            self._end_segment(event)

    def restart(self, now: float | None = None) -> None:
        """The transcoder restarted: the next init and parts follow a discontinuity."""
        for event in self.segmenter.restart():
            self.add(event, now)

    def end(self, now: float | None = None) -> None:
        """The stream is over: close the open segment; playlists get EXT-X-ENDLIST."""
        for event in self.segmenter.flush():
            self.add(event, now)
        if self.segments and not self.segments[-1].complete:
            self._complete(self.segments[-1])  # events came from outside, without the last end
        self.ended = True

    def _add_part(self, part: Part, now: float) -> None:
        assert self._init is not None
        seg = self.segments[-1] if self.segments else None
        if seg is None or seg.msn != part.msn:
            seg = self._open_segment(part, now)
        media = MediaPart(part.seq, part.index, part.duration, part.independent, part.data)
        seg.parts.append(media)
        seg.duration_ts += part.duration_ts
        seg.sample_count += part.sample_count
        self._parts_by_seq[part.seq] = (seg, media)

    def _open_segment(self, part: Part, now: float) -> MediaSegment:
        assert self._init is not None
        start_s = part.start / part.timescale
        wall = self.timeline.wall(part.discontinuity, start_s, now - part.duration)
        seg = MediaSegment(
            part.msn, part.discontinuity, self._init, part.start, part.timescale, wall
        )
        self.segments.append(seg)
        return seg

    def _end_segment(self, end: SegmentEnd) -> None:
        seg = next((s for s in reversed(self.segments) if s.msn == end.msn), None)
        if seg is not None:
            seg.duration_ts = end.duration_ts
            self._complete(seg)

    def _complete(self, seg: MediaSegment) -> None:
        seg.complete = True
        self._segment_data[seg.msn] = seg.data
        size = seg.size
        self._bytes += size
        self._seconds += seg.duration
        self._samples += seg.sample_count
        if seg.duration > 0:
            self._peak = max(self._peak, round(size * 8 / seg.duration))
        self._max_target = max(self._max_target, math.floor(seg.duration + 0.5))
        self._trim()

    def _trim(self) -> None:
        keep = max(self.window, 3 * self._max_target)
        while len(self.segments) > 1 and self._listed_seconds() - self.segments[0].duration >= keep:
            self.retired.append(self.segments.popleft())
        while self.retired and sum(s.duration for s in self.retired) > keep:
            old = self.retired.popleft()
            self._segment_data.pop(old.msn, None)
            for p in old.parts:
                self._parts_by_seq.pop(p.seq, None)
            if not any(
                s.discontinuity == old.discontinuity for s in (*self.retired, *self.segments)
            ):
                self.inits.pop(old.discontinuity, None)

    def _listed_seconds(self) -> float:
        return sum(s.duration for s in self.segments if s.complete)

    # --- state queries ------------------------------------------------------------------------

    @property
    def init(self) -> InitSegment | None:
        return self._init

    @property
    def tracks(self) -> tuple[TrackInfo, ...]:
        return self._init.info.tracks if self._init else ()

    @property
    def ready(self) -> bool:
        """Something to play: an init and at least one part."""
        return self._init is not None and bool(self.segments)

    @property
    def target_duration(self) -> int:
        """EXT-X-TARGETDURATION; never decreases during the stream."""
        return self._max_target

    def last_msn_part(self) -> tuple[int, int] | None:
        """(msn, part index) of the newest part, or None before the first."""
        if not self.segments or not self.segments[-1].parts:
            return None
        seg = self.segments[-1]
        return seg.msn, seg.parts[-1].index

    def has_part(self, msn: int, part: int) -> bool:
        seg = self._segment(msn)
        return seg is not None and any(p.index == part for p in seg.parts)

    def next_part(self) -> hls.PreloadHint | None:
        """The part that comes next (the preload hint). Its msn is a guess at a segment edge."""
        if self.ended or not self.segments:
            return None
        seg = self.segments[-1]
        seq = seg.parts[-1].seq + 1 if seg.parts else 0
        if seg.complete:
            return hls.PreloadHint(seg.msn + 1, 0, seq)
        return hls.PreloadHint(seg.msn, len(seg.parts), seq)

    def check_blocking(self, msn: int | None, part: int | None) -> None:
        """Raise :class:`BlockingRequestError` (→ 400) for a request too far ahead of the edge."""
        if msn is None:
            return
        last = self.last_msn_part()
        last_msn, last_part = last if last else (-1, -1)
        if msn > last_msn + 2:
            raise BlockingRequestError(f"_HLS_msn={msn} is more than two past {last_msn}")
        if part is not None and msn >= last_msn:
            limit = 3 / self.part_target if self.part_target < 1 else 3
            ahead = part - last_part if msn == last_msn else part + 1
            if ahead > limit:
                raise BlockingRequestError(f"_HLS_part={part} is beyond the advance part limit")

    def blocking_ready(self, msn: int | None, part: int | None) -> bool:
        """Whether a playlist request with ``_HLS_msn``/``_HLS_part`` can be answered now.

        Without ``_HLS_part`` it waits for segment ``msn`` to be complete; with it, for part
        ``part`` of segment ``msn`` or any later part. An ended stream answers at once.
        """
        if msn is None or self.ended:
            return True
        if part is None:
            return any(s.msn >= msn and s.complete for s in reversed(self.segments))
        last = self.last_msn_part()
        return last is not None and last >= (msn, part)

    # --- bytes --------------------------------------------------------------------------------

    def init_bytes(self, disc: int | None = None) -> bytes | None:
        init = self._init if disc is None else self.inits.get(disc)
        return init.data if init else None

    def segment_bytes(self, msn: int) -> bytes | None:
        return self._segment_data.get(msn)

    def part_bytes(self, msn: int, index: int) -> bytes | None:
        seg = self._segment(msn)
        part = next((p for p in seg.parts if p.index == index), None) if seg else None
        return part.data if part else None

    def part_bytes_by_seq(self, seq: int) -> bytes | None:
        found = self._parts_by_seq.get(seq)
        return found[1].data if found else None

    def resolve(self, name: str) -> bytes | None:
        """Bytes for a resource name of this rendition (init, segment or part), if available."""
        parsed = self.naming.parse(name)
        if parsed is None:
            return None
        kind, f = parsed
        if kind == "init":
            return self.init_bytes(f.get("disc", 0))
        if kind == "segment":
            return self.segment_bytes(f["msn"])
        if "seq" in f:
            return self.part_bytes_by_seq(f["seq"])
        return self.part_bytes(f["msn"], f["part"])

    def msn_of(self, name: str) -> int | None:
        """The Media Sequence Number of the segment a segment or part name belongs to (the
        AES-128 IV of both); None for other names and parts not (or no longer) there."""
        parsed = self.naming.parse(name)
        if parsed is None or parsed[0] == "init":
            return None
        f = parsed[1]
        if "msn" in f:
            return f["msn"]
        found = self._parts_by_seq.get(f["seq"])
        return found[0].msn if found else None

    def pending(self, name: str) -> bool:
        """A name not available yet that the stream will produce soon: worth blocking on.

        The preload-hinted part and the segment in progress (and its successor).
        """
        if self.ended or self.resolve(name) is not None:
            return False
        parsed = self.naming.parse(name)
        hint = self.next_part()
        if parsed is None or hint is None:
            return False
        kind, f = parsed
        if kind == "part":
            if "seq" in f:
                return f["seq"] == hint.seq
            return (f["msn"], f["part"]) == (hint.msn, hint.index) or (f["msn"], f["part"]) == (
                hint.msn + 1,
                0,
            )
        if kind == "segment":
            return hint.msn <= f["msn"] <= hint.msn + 1
        return False

    def _segment(self, msn: int) -> MediaSegment | None:
        for seg in (*self.segments, *self.retired):
            if seg.msn == msn:
                return seg
        return None

    # --- descriptions -------------------------------------------------------------------------

    @property
    def bandwidth(self) -> int:
        """Peak segment bitrate seen (BANDWIDTH), else the hint, else the codecs' nominal rate."""
        return self._peak or self.bandwidth_hint or sum(t.avg_bitrate for t in self.tracks)

    @property
    def average_bandwidth(self) -> int:
        return round(self._bytes * 8 / self._seconds) if self._seconds else 0

    @property
    def frame_rate(self) -> float | None:
        if self.video is None or not self._seconds or not self._samples:
            return None
        return self._samples / self._seconds

    def report(self, uri: str) -> hls.RenditionReport | None:
        last = self.last_msn_part()
        return hls.RenditionReport(uri, last[0], last[1]) if last else None

    def playlist(
        self,
        ll: bool = True,
        reports: tuple[hls.RenditionReport, ...] = (),
        encryption: hls.Encryption | None = None,
    ) -> str:
        return hls.media_playlist(
            list(self.segments),
            naming=self.naming,
            target=self.target_duration,
            part_target=self.part_target if ll else None,
            part_hold_back=self.part_hold_back,
            ended=self.ended,
            preload=self.next_part() if ll else None,
            reports=reports,
            encryption=encryption,
        )


@dataclass(frozen=True, slots=True)
class StreamNaming:
    """Where each rendition lives relative to the multivariant playlist and the MPD."""

    playlist: str = "{rendition}/index.m3u8"
    directory: str = "{rendition}/"
    report: str = "../{rendition}/index.m3u8"  # relative to a sibling's media playlist
    audio_group: str = "audio"


class LiveStream:
    """The renditions of one live stream: multivariant playlist, reports, the MPD."""

    def __init__(
        self,
        *,
        part_target: float = 0.2,
        segment_target: float = 1.0,
        part_hold_back: float | None = None,
        window: float = 30.0,
        naming: Naming | None = None,
        stream_naming: StreamNaming | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.part_target = part_target
        self.segment_target = segment_target
        self.part_hold_back = part_hold_back
        self.window = window
        self.naming = naming or Naming()
        self.stream_naming = stream_naming or StreamNaming()
        self.timeline = Timeline()
        self.renditions: dict[str, LiveRendition] = {}
        self._clock = clock

    def add_rendition(self, name: str, bandwidth_hint: int = 0) -> LiveRendition:
        if name in self.renditions:
            raise ValueError(f"rendition {name!r} exists")
        rendition = LiveRendition(
            name,
            part_target=self.part_target,
            segment_target=self.segment_target,
            part_hold_back=self.part_hold_back,
            window=self.window,
            naming=self.naming,
            bandwidth_hint=bandwidth_hint,
            timeline=self.timeline,
            clock=self._clock,
        )
        self.renditions[name] = rendition
        return rendition

    @property
    def ready(self) -> bool:
        return bool(self.renditions) and all(r.ready for r in self.renditions.values())

    @property
    def ended(self) -> bool:
        return bool(self.renditions) and all(r.ended for r in self.renditions.values())

    def end(self, now: float | None = None) -> None:
        for rendition in self.renditions.values():
            rendition.end(now)

    def restart(self, now: float | None = None) -> None:
        for rendition in self.renditions.values():
            rendition.restart(now)

    def media_playlist(
        self, name: str, ll: bool = True, encryption: hls.Encryption | None = None
    ) -> str:
        """A rendition's playlist; LL-HLS ones carry reports of the siblings."""
        reports = tuple(
            report
            for other, r in self.renditions.items()
            if other != name
            and (report := r.report(self.stream_naming.report.format(rendition=other))) is not None
        )
        return self.renditions[name].playlist(
            ll=ll, reports=reports if ll else (), encryption=encryption
        )

    def multivariant(self) -> str:
        ready = [r for r in self.renditions.values() if r.init is not None]
        videos = [r for r in ready if r.video is not None]
        separate_audio = [r for r in ready if r.video is None and r.audio is not None]
        if not videos:
            return hls.multivariant_playlist([self._variant(r) for r in separate_audio])
        group = self.stream_naming.audio_group if separate_audio else None
        audio_media = [
            hls.AudioMedia(
                uri=self._playlist_uri(r),
                group=self.stream_naming.audio_group,
                name=r.name,
                default=i == 0,
                channels=r.audio.channels if r.audio else 0,
            )
            for i, r in enumerate(separate_audio)
        ]
        extra = separate_audio[0] if separate_audio else None
        variants = [self._variant(r, extra, group) for r in videos]
        return hls.multivariant_playlist(variants, audio_media)

    def _variant(
        self, r: LiveRendition, audio: LiveRendition | None = None, group: str | None = None
    ) -> hls.Variant:
        codecs = r.codecs + (f",{audio.codecs}" if audio and r.audio is None else "")
        add = audio if audio and r.audio is None else None
        video = r.video
        return hls.Variant(
            uri=self._playlist_uri(r),
            bandwidth=r.bandwidth + (add.bandwidth if add else 0),
            average_bandwidth=r.average_bandwidth + (add.average_bandwidth if add else 0)
            if r.average_bandwidth
            else 0,
            codecs=codecs,
            resolution=(video.width, video.height) if video and video.width else None,
            frame_rate=r.frame_rate,
            audio_group=group if add else None,
        )

    def _playlist_uri(self, r: LiveRendition) -> str:
        return self.stream_naming.playlist.format(rendition=r.name)

    def mpd(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        reps = [self._representation(r) for r in self.renditions.values() if r.init is not None]
        start = self.timeline.start
        periods = sorted(self.timeline.anchors.values(), key=lambda a: a.id)
        return dash.mpd(
            reps,
            periods,
            dynamic=not self.ended,
            now=now,
            availability_start=start if start is not None else now,
            window=self.window,
            segment_target=self.segment_target,
            duration=self._presentation_duration(start),
        )

    def _presentation_duration(self, start: float | None) -> float:
        ends = [
            s.pdt + s.duration - start
            for r in self.renditions.values()
            for s in r.segments
            if s.complete and start is not None
        ]
        return max(ends, default=0.0)

    def _representation(self, r: LiveRendition) -> dash.Representation:
        video, audio = r.video, r.audio
        return dash.Representation(
            id=r.name,
            content_type="video" if video else "audio",
            codecs=r.codecs,
            bandwidth=r.bandwidth,
            segments=[s for s in r.segments if s.complete],
            naming=r.naming,
            prefix=self.stream_naming.directory.format(rendition=r.name),
            width=video.width if video else 0,
            height=video.height if video else 0,
            frame_rate=r.frame_rate,
            sample_rate=audio.sample_rate if audio and not video else 0,
            channels=audio.channels if audio and not video else 0,
        )
