"""DASH MPD rendering over the same CMAF segments the HLS playlists list.

Pure: representations (codec, bandwidth, the window of completed segments) in, MPD XML out.
Each Representation carries its own ``SegmentTemplate`` (``$Number$`` media names from the
rendition's :class:`Naming`, the init of that period) with a ``SegmentTimeline`` built from the
real segment durations, so renditions never need identical cadence. A discontinuity (the
publisher reconnected) is a new Period whose start is the wall-clock offset from
``availabilityStartTime``; ``presentationTimeOffset`` maps the decode times of that period onto
it. Live streams render ``type="dynamic"``; ended or on-demand ones ``type="static"`` with a
``mediaPresentationDuration``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from verge.stream.package.cmaf import MediaSegment, Naming

NS = "urn:mpeg:dash:schema:mpd:2011"
LIVE_PROFILE = "urn:mpeg:dash:profile:isoff-live:2011"
UTC_DIRECT = "urn:mpeg:dash:utc:direct:2014"


@dataclass(frozen=True, slots=True)
class PeriodAnchor:
    """Where a period starts: its wall-clock time and the media time (seconds) shown then."""

    id: int
    wall: float
    media: float


@dataclass(frozen=True, slots=True)
class Representation:
    id: str
    content_type: str  # "video" or "audio" (a muxed rendition counts as video)
    codecs: str
    bandwidth: int
    segments: Sequence[MediaSegment]  # completed segments in the window, oldest first
    naming: Naming = field(default_factory=Naming)
    prefix: str = ""  # path from the MPD to this rendition's files, e.g. "720p/"
    width: int = 0
    height: int = 0
    frame_rate: float | None = None
    sample_rate: int = 0
    channels: int = 0


def mpd(
    representations: Sequence[Representation],
    periods: Sequence[PeriodAnchor],
    *,
    dynamic: bool,
    now: float,
    availability_start: float,
    window: float,
    segment_target: float,
    duration: float | None = None,
) -> str:
    """The MPD. ``periods`` oldest first; one without segments in the window is left out."""
    root = ET.Element(
        "MPD",
        {
            "xmlns": NS,
            "profiles": LIVE_PROFILE,
            "type": "dynamic" if dynamic else "static",
            "minBufferTime": _duration(max(segment_target, 1.0)),
        },
    )
    if dynamic:
        root.set("availabilityStartTime", _datetime(availability_start))
        root.set("publishTime", _datetime(now))
        root.set("minimumUpdatePeriod", _duration(segment_target))
        root.set("timeShiftBufferDepth", _duration(window))
        root.set("suggestedPresentationDelay", _duration(3 * segment_target))
    else:
        root.set("mediaPresentationDuration", _duration(duration or 0.0))
    for period in periods:
        _add_period(root, period, representations, availability_start)
    if dynamic:
        ET.SubElement(root, "UTCTiming", {"schemeIdUri": UTC_DIRECT, "value": _datetime(now)})
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _add_period(
    root: ET.Element, period: PeriodAnchor, reps: Sequence[Representation], ast: float
) -> None:
    members = [
        (r, [s for s in r.segments if s.complete and s.discontinuity == period.id]) for r in reps
    ]
    members = [(r, segs) for r, segs in members if segs]
    if not members:
        return
    el = ET.SubElement(
        root, "Period", {"id": str(period.id), "start": _duration(max(0.0, period.wall - ast))}
    )
    for kind in ("video", "audio"):
        chosen = [(r, segs) for r, segs in members if r.content_type == kind]
        if chosen:
            _add_adaptation_set(el, kind, chosen, period)


def _add_adaptation_set(
    period_el: ET.Element,
    kind: str,
    members: list[tuple[Representation, list[MediaSegment]]],
    period: PeriodAnchor,
) -> None:
    attrs = {
        "contentType": kind,
        "mimeType": f"{kind}/mp4",
        "segmentAlignment": "true",
        "startWithSAP": "1",
    }
    aset = ET.SubElement(period_el, "AdaptationSet", attrs)
    for rep, segs in members:
        rep_el = ET.SubElement(aset, "Representation", _rep_attrs(rep))
        if rep.channels:
            ET.SubElement(
                rep_el,
                "AudioChannelConfiguration",
                {
                    "schemeIdUri": "urn:mpeg:dash:23003:3:audio_channel_configuration:2011",
                    "value": str(rep.channels),
                },
            )
        _add_template(rep_el, rep, segs, period)


def _rep_attrs(rep: Representation) -> dict[str, str]:
    attrs = {"id": rep.id, "bandwidth": str(max(1, rep.bandwidth)), "codecs": rep.codecs}
    if rep.width and rep.height:
        attrs["width"], attrs["height"] = str(rep.width), str(rep.height)
    if rep.frame_rate:
        attrs["frameRate"] = _frame_rate(rep.frame_rate)
    if rep.sample_rate:
        attrs["audioSamplingRate"] = str(rep.sample_rate)
    return attrs


def _add_template(
    rep_el: ET.Element, rep: Representation, segs: list[MediaSegment], period: PeriodAnchor
) -> None:
    timescale = segs[0].timescale
    template = ET.SubElement(
        rep_el,
        "SegmentTemplate",
        {
            "timescale": str(timescale),
            "presentationTimeOffset": str(round(period.media * timescale)),
            "startNumber": str(segs[0].msn),
            "initialization": rep.prefix + rep.naming.init_uri(period.id),
            "media": rep.prefix + rep.naming.segment_template(),
        },
    )
    timeline = ET.SubElement(template, "SegmentTimeline")
    for t, d, r in timeline_runs(segs):
        attrs = {"t": str(t), "d": str(d)} if t is not None else {"d": str(d)}
        if r:
            attrs["r"] = str(r)
        ET.SubElement(timeline, "S", attrs)


def timeline_runs(segs: Sequence[MediaSegment]) -> list[tuple[int | None, int, int]]:
    """SegmentTimeline ``S`` entries (t or None when contiguous, d, r) for consecutive msns."""
    runs: list[list] = []
    expected: int | None = None
    for seg in segs:
        contiguous = expected == seg.start
        if runs and contiguous and runs[-1][1] == seg.duration_ts:
            runs[-1][2] += 1
        else:
            runs.append([None if contiguous else seg.start, seg.duration_ts, 0])
        expected = seg.start + seg.duration_ts
    return [(t, d, r) for t, d, r in runs]


def _frame_rate(rate: float) -> str:
    for den in (1, 1001):
        num = rate * den
        if abs(num - round(num)) < 0.01 * den:
            return str(round(num)) if den == 1 else f"{round(num)}/{den}"
    return f"{round(rate * 1000)}/1000"


def _duration(seconds: float) -> str:
    text = f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".")
    return f"PT{text or '0'}S"


def _datetime(seconds: float) -> str:
    when = datetime.fromtimestamp(seconds, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
