"""What ffmpeg's detection filters print, turned into the analysis result and its WebVTT.

Pure (no I/O, no ffmpeg), so every rule here is unit-tested on captured log lines. ffmpeg
prints one line per finding on stderr, prefixed by the filter instance (``[scdet @ 0x..]``):

    lavfi.scd.score: 34.145, lavfi.scd.time: 2.24                 scdet: a cut at 2.24 s
    black_start:4.24 black_end:5.24 black_duration:1              blackdetect
    silence_start: 3.00193  /  silence_end: 4.49 | silence_duration: 1.49   silencedetect
    n:   0 pts:  25600 pts_time:2.24 ...                           showinfo@cut / showinfo@tick

:class:`Findings` collects them (feed it lines as they come: it works on a live log), and
:func:`result` / :func:`chapters_vtt` render what the endpoints serve; :func:`on_wall_clock`
adds a live result's anchor (``started_at``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CUT_RE = re.compile(
    r"\[scdet[^\]]*\].*lavfi\.scd\.score:\s*(?P<score>[\d.]+),\s*"
    r"lavfi\.scd\.time:\s*(?P<time>-?[\d.]+)"
)
BLACK_RE = re.compile(
    r"\[blackdetect[^\]]*\].*black_start:\s*(?P<start>-?[\d.]+)\s+"
    r"black_end:\s*(?P<end>-?[\d.]+)"
)
SILENCE_START_RE = re.compile(r"\[silencedetect[^\]]*\].*silence_start:\s*(?P<start>-?[\d.]+)")
SILENCE_END_RE = re.compile(r"\[silencedetect[^\]]*\].*silence_end:\s*(?P<end>-?[\d.]+)")
SHOWINFO_RE = re.compile(
    r"\[showinfo@(?P<kind>\w+)[^\]]*\]\s+n:\s*(?P<n>\d+)\s.*?"
    r"pts_time:\s*(?P<time>-?[\d.]+)"
)
SCDET_FULL = 100.0  # scdet scores run 0..100; the confidence of a cut is score / 100
MERGE_GAP = 1.5  # seconds: detections on keyframes this close are one event
KINDS = ("black", "silent", "face", "person")


@dataclass(frozen=True, slots=True)
class Event:
    """A stretch of the video: black, silent, a face or a person on screen."""

    kind: str
    start: float
    end: float
    confidence: float

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "confidence": round(self.confidence, 3),
        }


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A JPEG written by ffmpeg: ``file`` in the output directory, showing ``time``."""

    time: float
    file: str


@dataclass
class Findings:
    """Everything found so far, fed line by line (see the module doc)."""

    cuts: list[tuple[float, float]] = field(default_factory=list)  # (time, score)
    events: list[Event] = field(default_factory=list)
    cut_thumbs: list[Thumbnail] = field(default_factory=list)
    tick_thumbs: list[Thumbnail] = field(default_factory=list)
    last_time: float = 0.0  # the latest media time seen (progress)
    _silence_start: float | None = None

    def feed(self, line: str) -> None:
        """One stderr line of the analysis ffmpeg."""
        if match := SHOWINFO_RE.search(line):
            self._thumbnail(match["kind"], int(match["n"]), float(match["time"]))
        elif match := CUT_RE.search(line):
            self.cuts.append((float(match["time"]), float(match["score"])))
            self._seen(float(match["time"]))
        elif match := BLACK_RE.search(line):
            self.events.append(Event("black", float(match["start"]), float(match["end"]), 1.0))
        elif match := SILENCE_START_RE.search(line):
            self._silence_start = max(0.0, float(match["start"]))
        elif (match := SILENCE_END_RE.search(line)) and self._silence_start is not None:
            self.events.append(Event("silent", self._silence_start, float(match["end"]), 1.0))
            self._silence_start = None

    def feed_all(self, lines: Iterable[str]) -> Findings:
        for line in lines:
            self.feed(line)
        return self

    def finish(self, duration: float) -> None:
        """The input ended: a silence still open lasts to the end."""
        if self._silence_start is not None and duration > self._silence_start:
            self.events.append(Event("silent", self._silence_start, duration, 1.0))
        self._silence_start = None

    def _thumbnail(self, kind: str, n: int, time: float) -> None:
        self._seen(time)
        if kind not in ("cut", "tick"):  # "key": a frame for the detector, not a file
            return
        target = self.cut_thumbs if kind == "cut" else self.tick_thumbs
        prefix = "c" if kind == "cut" else "t"
        target.append(Thumbnail(time, f"{prefix}{n + 1}.jpg"))  # ffmpeg's %d counts from 1

    def _seen(self, time: float) -> None:
        self.last_time = max(self.last_time, time)


def detection_events(
    hits: Sequence[tuple[float, str, float]], step: float, gap: float = MERGE_GAP
) -> list[Event]:
    """Per-keyframe detections ``(time, kind, confidence)`` -> events. Hits of one kind no more
    than ``gap`` apart are one event; the detector looked every ``step`` seconds, so an event
    reaches half a step beyond its first and last hits (the best guess of where it began and
    ended). Its confidence is the best hit's."""
    events: list[Event] = []
    for kind in sorted({kind for _, kind, _ in hits}):
        times = sorted((t, c) for t, k, c in hits if k == kind)
        start, end, best = times[0][0], times[0][0], times[0][1]
        for time, confidence in times[1:]:
            if time - end > gap:
                events.append(_spread(kind, start, end, best, step))
                start, best = time, confidence
            end, best = time, max(best, confidence)
        events.append(_spread(kind, start, end, best, step))
    return events


def _spread(kind: str, first: float, last: float, confidence: float, step: float) -> Event:
    return Event(kind, max(0.0, first - step / 2), last + step / 2, confidence)


def scenes(findings: Findings, min_score: float = 0.0) -> list[dict[str, Any]]:
    """One entry per cut: its time and the thumbnail taken there (the nearest cut frame)."""
    out = []
    for time, score in findings.cuts:
        if score < min_score:
            continue
        thumb = _nearest(findings.cut_thumbs, time)
        out.append(
            {
                "time": round(time, 3),
                "score": round(score / SCDET_FULL, 3),
                "thumbnail": thumb.file if thumb else None,
            }
        )
    return out


def _nearest(thumbs: Sequence[Thumbnail], time: float, within: float = 0.05) -> Thumbnail | None:
    best = min(thumbs, key=lambda t: abs(t.time - time), default=None)
    return best if best is not None and abs(best.time - time) <= within else None


def result(
    findings: Findings,
    *,
    duration: float,
    detector: str,
    interval: float,
    base_url: str,
    detections: Sequence[Event] = (),
    extra: dict | None = None,
) -> dict[str, Any]:
    """The JSON of /live|vod/NAME/analysis. File names become URLs under ``base_url``
    (``/vod/NAME/analysis``); times are seconds from the start of the video (of a live run:
    the stream's media time, which the server puts on the wall clock: :func:`on_wall_clock`)."""

    def url(file: str | None) -> str | None:
        return f"{base_url}/{file}" if file else None

    events = sorted([*findings.events, *detections], key=lambda e: (e.start, e.kind))
    return {
        "duration": round(duration, 3),
        "detector": detector,
        "interval": interval,
        "scenes": [{**s, "thumbnail": url(s["thumbnail"])} for s in scenes(findings)],
        "events": [e.as_json() for e in events],
        "thumbnails": [
            {"time": round(t.time, 3), "url": url(t.file)} for t in findings.tick_thumbs
        ],
        "chapters": url("chapters.vtt"),
        **(extra or {}),
    }


def on_wall_clock(data: dict[str, Any], started_at: float) -> dict[str, Any]:
    """A live result with ``started_at``: the wall clock (Unix seconds, to the millisecond, as
    PROGRAM-DATE-TIME) of its time 0, so a scene at ``time`` was live at ``started_at + time``
    and a player finds it in its playlist by PROGRAM-DATE-TIME. (``started`` is another thing:
    when the analysis process started.)"""
    return {**data, "started_at": round(started_at, 3)}


def chapters_vtt(scene_list: Sequence[dict[str, Any]], duration: float) -> str:
    """A WebVTT chapters track: one cue per scene (from the start, then from each cut)."""
    starts = [0.0] + [s["time"] for s in scene_list if s["time"] > 0.0]
    lines = ["WEBVTT", ""]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else max(duration, start + 0.001)
        lines += [f"{i + 1}", f"{vtt_time(start)} --> {vtt_time(end)}", f"Scene {i + 1}", ""]
    return "\n".join(lines)


def vtt_time(seconds: float) -> str:
    """WebVTT timestamp: HH:MM:SS.mmm."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"
