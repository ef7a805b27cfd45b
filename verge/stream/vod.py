"""On-demand video: a library of packaged files under ``DATA_DIR/vod/``, and its HTTP side.

Why its own module: VOD is the live packager's output made once and kept. A file (``verge vod
add``, the upload API) or a finished live stream (:meth:`VodLibrary.record`) becomes an entry::

    DATA_DIR/vod/NAME/meta.json        duration, renditions, created (written last)
    DATA_DIR/vod/NAME/master.m3u8      multivariant playlist   -> /vod/NAME.m3u8
    DATA_DIR/vod/NAME/manifest.mpd     static DASH MPD         -> /vod/NAME.mpd
    DATA_DIR/vod/NAME/download.mp4     progressive MP4, faststart, Range -> /vod/NAME.mp4
    DATA_DIR/vod/NAME/REND/index.m3u8  classic HLS with ENDLIST -> /vod/NAME/REND/index.m3u8
    DATA_DIR/vod/NAME/REND/init0.mp4, seg0.m4s, ...  CMAF init + ~4 s segments

Packaging reuses the live pieces: the ladder planning and fragmented-MP4 flags of
:mod:`verge.stream.transcode` (one ffmpeg, one fMP4 file per track: each video rung, the shared
audio), the :class:`~verge.stream.package.cmaf.Segmenter` to cut segments, and the HLS/DASH
renderers. The progressive MP4 is a remux (no second encode) of the top rendition and the audio.

Atomic: an entry is built in a ``.partial-PID-...`` directory and renamed into place when
complete; failure or cancellation removes it, and partial directories left by a dead process
(``kill -9``) are swept when a library opens. Names are write-once, so segments can be
immutable in caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from verge.config import StreamSettings
from verge.files import write_atomic
from verge.http.ranges import Unsatisfiable, content_range, if_range_ok, parse_range
from verge.procs import pid_alive
from verge.stream.analysis import (
    AnalysisError,
    analysis_file,
    analyze_entry,
    content_type,
    latest_run,
)
from verge.stream.analysis.runner import RESULT
from verge.stream.package import dash, hls
from verge.stream.package.cmaf import (
    Event,
    InitSegment,
    MediaSegment,
    Naming,
    Part,
    SegmentEnd,
    Segmenter,
)
from verge.stream.package.mp4 import DescribedTracks, TrackInfo
from verge.stream.transcode import (
    AUDIO,
    FMP4_FLAGS,
    FfmpegNotFound,
    OutputTrack,
    Rendition,
    SourceInfo,
    _output_args,
    ladder_from_config,
    plan_outputs,
    resolve_ffmpeg,
)
from verge.stream.web import serve_web

log = logging.getLogger("verge.stream.vod")

VOD_DIR = "vod"
SEGMENT_TARGET = 4.0  # seconds; VOD segments have no parts
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
META, MASTER, MANIFEST, DOWNLOAD, PLAYLIST = (
    "meta.json",
    "master.m3u8",
    "manifest.mpd",
    "download.mp4",
    "index.m3u8",
)
NAMING = Naming(init="init{disc}.mp4", segment="seg{msn}.m4s")
PARTIAL = ".partial-"
UPLOAD = ".upload-"
WORK = ".work"
IMMUTABLE = "public, max-age=31536000, immutable"
ANALYSIS_DIR = "analysis"
ANALYSIS_CACHE = "public, max-age=300"  # a re-analysis shows within minutes
PLAYER = "_player"  # /vod/_player/FILE: the player page's assets (never an entry name)
PLAYLIST_CACHE = "public, max-age=3600"
DOWNLOAD_CACHE = "public, max-age=86400"
NO_STORE = "no-store"
CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".mpd": "application/dash+xml",
    ".mp4": "video/mp4",
    ".m4s": "video/iso.segment",
}
PROBE_ENV = "VERGE_FFPROBE"
READ_CHUNK = 1 << 20
TRANSCODE_SHARE = 0.9  # of the progress bar; remux and segmenting take the rest

Progress = Callable[[float], None]
#: What :meth:`VodLibrary.record` takes per rendition: init segment, segments, their durations.
RecordedRendition = tuple[bytes, Sequence[bytes], Sequence[float]]


class VodError(Exception):
    """Packaging or a request failed; ``status`` is the HTTP answer for API callers."""

    status = 400


class VodExists(VodError):
    status = 409


class VodTooLarge(VodError):
    status = 413


def check_name(name: str) -> str:
    """A VOD name is a slug: letters, digits, '-' and '_' (no dots: /vod/NAME.m3u8 stays clear)."""
    if not NAME_RE.fullmatch(name):
        raise VodError(f"bad VOD name {name!r}: use letters, digits, '-' and '_' (max 64)")
    return name


# --- the source -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What ffprobe says about an input file."""

    duration: float
    source: SourceInfo
    video_index: int | None
    audio_index: int | None


def resolve_ffprobe(ffmpeg: str) -> str:
    """ffprobe: ``$VERGE_FFPROBE``, else next to ffmpeg, else on PATH."""
    candidates = [os.environ.get(PROBE_ENV), str(Path(ffmpeg).with_name("ffprobe")), "ffprobe"]
    for candidate in filter(None, candidates):
        found = shutil.which(candidate)
        if found:
            return found
    raise FfmpegNotFound(f"ffprobe not found (install ffmpeg, or set {PROBE_ENV})")


async def probe_media(ffprobe: str, path: Path) -> MediaInfo:
    command = [ffprobe, "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise VodError(f"cannot read {path.name}: {err.decode(errors='replace').strip()[-300:]}")
    return media_info(json.loads(out or b"{}"))


def media_info(probe: Mapping[str, Any]) -> MediaInfo:
    """MediaInfo from ffprobe's JSON (``-show_format -show_streams``)."""
    streams = probe.get("streams", [])
    video = next(
        (
            s
            for s in streams
            if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
        ),
        None,
    )
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None and audio is None:
        raise VodError("the file has neither video nor audio")
    duration = _number(probe.get("format", {}).get("duration"))
    if not duration:
        duration = max((_number(s.get("duration")) or 0.0 for s in streams), default=0.0)
    source = SourceInfo(
        has_video=video is not None,
        has_audio=audio is not None,
        width=int(video["width"]) if video and video.get("width") else None,
        height=int(video["height"]) if video and video.get("height") else None,
        fps=_rate(video.get("avg_frame_rate") or video.get("r_frame_rate")) if video else None,
        video_codec=7 if video and video.get("codec_name") == "h264" else None,
        audio_codec=10 if audio and audio.get("codec_name") == "aac" else None,
        video_bitrate=int(_number(video.get("bit_rate")) or 0) or None if video else None,
        audio_bitrate=int(_number(audio.get("bit_rate")) or 0) or None if audio else None,
    )
    return MediaInfo(
        duration or 0.0,
        source,
        int(video["index"]) if video else None,
        int(audio["index"]) if audio else None,
    )


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _rate(text: str | None) -> float | None:
    num, _, den = (text or "").partition("/")
    try:
        rate = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return rate if 0 < rate < 1000 else None


# --- recordings -------------------------------------------------------------------------------


def recording_from_live(stream: Any) -> dict[str, RecordedRendition]:
    """What a live stream (a :class:`~verge.stream.package.live.LiveStream`) still holds, per
    rendition, in the form :meth:`VodLibrary.record` takes.

    The segments in memory (the DVR window and the retired ones still fetchable) of the latest
    discontinuity: older ones have left the window, and a reconnect starts a new recording.
    Renditions start at the segment nearest a common start (their windows trim differently).
    """
    kept: dict[str, list[MediaSegment]] = {}
    for name, rendition in stream.renditions.items():
        held = [s for s in (*rendition.retired, *rendition.segments) if s.complete and s.parts]
        if held:
            kept[name] = [s for s in held if s.discontinuity == held[-1].discontinuity]
    if not kept:
        return {}
    common = max(segments[0].start / segments[0].timescale for segments in kept.values())
    recording: dict[str, RecordedRendition] = {}
    for name, segments in kept.items():  # each window lost a different amount: align the starts
        while len(segments) > 1 and _off(segments[1], common) <= _off(segments[0], common):
            segments = segments[1:]
        recording[name] = (
            segments[-1].init.data,
            [s.data for s in segments],
            [s.duration for s in segments],
        )
    return recording


def _off(segment: MediaSegment, seconds: float) -> float:
    return abs(segment.start / segment.timescale - seconds)


def recording_name(stream: str, when: float | None = None) -> str:
    """A VOD name for a recording of ``APP/NAME``: ``APP-NAME-YYYYmmdd-HHMMSS`` (UTC), a slug."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if when is None else when))
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stream).strip("-_")[: 64 - len(stamp) - 1]
    return f"{slug or 'stream'}-{stamp}"


# --- ffmpeg -----------------------------------------------------------------------------------


def transcode_command(
    ffmpeg: str, source: Path, media: MediaInfo, tracks: Sequence[OutputTrack], work: Path
) -> list[str]:
    """One ffmpeg: the input to one fragmented MP4 file per track, progress on stdout."""
    command = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error"]
    command += ["-progress", "pipe:1", "-y", "-i", str(source)]
    for track in tracks:
        command += _vod_output_args(track, media)
        command += [*FMP4_FLAGS, str(work / f"{track.name}.mp4")]
    return command


def _vod_output_args(track: OutputTrack, media: MediaInfo) -> list[str]:
    """The live transcoder's arguments, without its latency tuning, mapping the probed streams."""
    args = _output_args(track)
    if "-tune" in args:  # zerolatency costs quality (no B-frames, no lookahead) for nothing here
        at = args.index("-tune")
        del args[at : at + 2]
    index = media.audio_index if track.kind == AUDIO else media.video_index
    at = args.index("-map") + 1
    args[at] = f"0:{index}"
    return args


def remux_command(ffmpeg: str, video: Path | None, audio: Path | None, out: Path) -> list[str]:
    """The progressive download: the top video and the audio, copied, moov first."""
    command = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y"]
    inputs = [path for path in (video, audio) if path is not None]
    for path in inputs:
        command += ["-i", str(path)]
    for i, _ in enumerate(inputs):
        command += ["-map", f"{i}:0"]
    return [*command, "-c", "copy", "-movflags", "+faststart", "-f", "mp4", str(out)]


async def run_ffmpeg(
    command: Sequence[str], duration: float = 0.0, progress: Progress | None = None
) -> None:
    """Run ffmpeg to the end; ``-progress pipe:1`` lines move ``progress`` (out_time/duration).

    Cancellation kills the process. A non-zero exit raises :class:`VodError` with its last
    error lines.
    """
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    errors: deque[str] = deque(maxlen=8)
    stderr = asyncio.ensure_future(_collect(proc.stderr, errors))
    try:
        if progress is not None:
            progress(0.0)
        async for line in proc.stdout:
            done = _progress_line(line, duration)
            if done is not None and progress is not None:
                progress(done)
        code = await proc.wait()
        await stderr
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        stderr.cancel()
        raise
    if code != 0:
        detail = " / ".join(errors) or "no message"
        raise VodError(f"ffmpeg failed (exit {code}): {detail}")


async def _collect(stream: asyncio.StreamReader, lines: deque[str]) -> None:
    async for line in stream:
        text = line.decode(errors="replace").strip()
        if text:
            lines.append(text[:300])


def _progress_line(line: bytes, duration: float) -> float | None:
    key, _, value = line.decode(errors="replace").strip().partition("=")
    if key == "progress" and value == "end":
        return 1.0
    if key != "out_time_us" or not duration or not value.lstrip("-").isdigit():
        return None
    return min(1.0, max(0.0, int(value) / 1e6 / duration))


# --- segments on disk -------------------------------------------------------------------------


@dataclass
class PackagedTrack(DescribedTracks):
    """One CMAF track written to ``directory``: its inits and (complete) segments."""

    name: str
    directory: Path
    inits: dict[int, InitSegment] = field(default_factory=dict)
    segments: list[MediaSegment] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def tracks(self) -> tuple[TrackInfo, ...]:
        last = self.inits[max(self.inits)] if self.inits else None
        return last.info.tracks if last else ()

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.segments)

    @property
    def bandwidth(self) -> int:
        """Peak segment bitrate (BANDWIDTH)."""
        peaks = (
            size * 8 / s.duration
            for s, size in zip(self.segments, self.sizes, strict=True)
            if s.duration
        )
        return round(max(peaks, default=0.0))

    @property
    def average_bandwidth(self) -> int:
        return round(sum(self.sizes) * 8 / self.duration) if self.duration else 0

    @property
    def frame_rate(self) -> float | None:
        samples = sum(s.sample_count for s in self.segments)
        return samples / self.duration if self.video and self.duration and samples else None

    def describe(self) -> dict[str, Any]:
        video = self.video
        return {
            "name": self.name,
            "kind": "video" if video else "audio",
            "codecs": self.codecs,
            "width": video.width if video else None,
            "height": video.height if video else None,
            "bandwidth": self.bandwidth,
            "average_bandwidth": self.average_bandwidth,
            "duration": round(self.duration, 3),
            "segments": len(self.segments),
        }


class TrackWriter:
    """Segmenter events of one track -> ``initN.mp4`` and ``segN.m4s`` files, segment metadata.

    Segment bytes go to disk as the parts come: memory holds one part, never the file.
    """

    def __init__(self, name: str, directory: Path, created: float) -> None:
        self.track = PackagedTrack(name, directory)
        self.created = created
        self._init: InitSegment | None = None
        self._open: tuple[MediaSegment, Any] | None = None
        self._size = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, event: Event) -> None:
        if isinstance(event, InitSegment):
            self._init = self.track.inits[event.discontinuity] = event
            (self.track.directory / NAMING.init_uri(event.discontinuity)).write_bytes(event.data)
        elif isinstance(event, Part):
            self._add_part(event)
        elif isinstance(event, SegmentEnd):
            self._close(event.duration_ts)

    def _add_part(self, part: Part) -> None:
        if self._open is not None and self._open[0].msn != part.msn:
            self._close(None)
        if self._open is None:
            assert self._init is not None
            pdt = self.created + part.start / part.timescale
            segment = MediaSegment(
                part.msn, part.discontinuity, self._init, part.start, part.timescale, pdt
            )
            path = self.track.directory / NAMING.segment_uri(part.msn)
            self._open, self._size = (segment, path.open("wb")), 0
        segment, file = self._open
        file.write(part.data)
        self._size += len(part.data)
        segment.duration_ts += part.duration_ts
        segment.sample_count += part.sample_count

    def _close(self, duration_ts: int | None) -> None:
        if self._open is None:
            return
        segment, file = self._open
        file.close()
        self._open = None
        if duration_ts is not None:
            segment.duration_ts = duration_ts
        segment.complete = True
        self.track.segments.append(segment)
        self.track.sizes.append(self._size)

    def finish(self) -> PackagedTrack:
        self._close(None)
        return self.track


def segment_file(source: Path, name: str, directory: Path, created: float) -> PackagedTrack:
    """Cut one fragmented-MP4 track file into VOD segments (blocking: run it in a thread)."""
    segmenter = Segmenter(SEGMENT_TARGET, SEGMENT_TARGET)
    writer = TrackWriter(name, directory, created)
    with source.open("rb") as file:
        while chunk := file.read(READ_CHUNK):
            for event in segmenter.feed(chunk):
                writer.add(event)
    for event in segmenter.flush():
        writer.add(event)
    track = writer.finish()
    if not track.segments:
        raise VodError(f"track {name}: no media came out")
    return track


# --- documents --------------------------------------------------------------------------------


def media_playlist(track: PackagedTrack) -> str:
    text = hls.media_playlist(
        track.segments,
        naming=NAMING,
        target=hls.target_duration(track.segments, SEGMENT_TARGET),
        part_target=None,
        ended=True,
    )
    return text.replace(
        "#EXT-X-TARGETDURATION", "#EXT-X-PLAYLIST-TYPE:VOD\n#EXT-X-TARGETDURATION", 1
    )


def multivariant(name: str, tracks: Sequence[PackagedTrack]) -> str:
    """Video renditions with the separate audio as an EXT-X-MEDIA group (as the live one)."""
    videos = [t for t in tracks if t.video]
    audios = [t for t in tracks if not t.video and t.audio]
    if not videos:
        return hls.multivariant_playlist([_variant(name, t) for t in audios])
    media = [
        hls.AudioMedia(
            uri=_uri(name, t),
            group="audio",
            name=t.name,
            default=i == 0,
            channels=t.audio.channels if t.audio else 0,
        )
        for i, t in enumerate(audios)
    ]
    extra = audios[0] if audios else None
    return hls.multivariant_playlist([_variant(name, t, extra) for t in videos], media)


def _variant(name: str, track: PackagedTrack, audio: PackagedTrack | None = None) -> hls.Variant:
    add = audio if audio is not None and track.audio is None else None
    video = track.video
    return hls.Variant(
        uri=_uri(name, track),
        bandwidth=track.bandwidth + (add.bandwidth if add else 0),
        average_bandwidth=track.average_bandwidth + (add.average_bandwidth if add else 0),
        codecs=track.codecs + (f",{add.codecs}" if add else ""),
        resolution=(video.width, video.height) if video and video.width else None,
        frame_rate=track.frame_rate,
        audio_group="audio" if add else None,
    )


def _uri(name: str, track: PackagedTrack) -> str:
    return f"{name}/{track.name}/{PLAYLIST}"  # relative to /vod/NAME.m3u8


def manifest(name: str, tracks: Sequence[PackagedTrack], created: float) -> str:
    """A static MPD over the same segments; a period per discontinuity (one, normally)."""
    reps = [_representation(name, t) for t in tracks]
    periods, wall = [], 0.0
    first = tracks[0]
    for disc in sorted({s.discontinuity for t in tracks for s in t.segments}):
        starts = [
            s.start / s.timescale for t in tracks for s in t.segments if s.discontinuity == disc
        ]
        periods.append(dash.PeriodAnchor(disc, wall, min(starts)))
        wall += sum(s.duration for s in first.segments if s.discontinuity == disc)
    return dash.mpd(
        reps,
        periods,
        dynamic=False,
        now=created,
        availability_start=0.0,
        window=0.0,
        segment_target=SEGMENT_TARGET,
        duration=max(t.duration for t in tracks),
    )


def _representation(name: str, track: PackagedTrack) -> dash.Representation:
    video, audio = track.video, track.audio
    return dash.Representation(
        id=track.name,
        content_type="video" if video else "audio",
        codecs=track.codecs,
        bandwidth=track.bandwidth,
        segments=track.segments,
        naming=NAMING,
        prefix=f"{name}/{track.name}/",
        width=video.width if video else 0,
        height=video.height if video else 0,
        frame_rate=track.frame_rate,
        sample_rate=audio.sample_rate if audio and not video else 0,
        channels=audio.channels if audio and not video else 0,
    )


# --- the library ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VodEntry:
    """A finished library entry (its ``meta.json``)."""

    name: str
    path: Path
    meta: Mapping[str, Any]

    @property
    def duration(self) -> float:
        return float(self.meta.get("duration", 0.0))

    @property
    def created(self) -> float:
        return float(self.meta.get("created", 0.0))

    @property
    def renditions(self) -> list[Mapping[str, Any]]:
        return list(self.meta.get("renditions", []))

    @classmethod
    def load(cls, path: Path) -> VodEntry | None:
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cls(path.name, path, meta)


@dataclass
class VodJob:
    """A packaging job started by an upload: what ``GET /vod/NAME/status`` reports."""

    name: str
    state: str = "queued"  # queued | packaging | ready | failed
    progress: float = 0.0
    error: str | None = None
    task: asyncio.Task | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "progress": round(self.progress, 4),
            "error": self.error,
        }


class VodLibrary:
    """The entries under ``settings.data_dir``/vod: packaging, recording, serving, uploads."""

    def __init__(
        self, settings: StreamSettings, *, ffmpeg: str | None = None, auto_analyze: bool = False
    ) -> None:
        self.settings = settings
        self.root = Path(settings.data_dir) / VOD_DIR
        self.jobs: dict[str, VodJob] = {}
        self.analyses: dict[str, asyncio.Task] = {}
        self.auto_analyze = auto_analyze  # analyse uploads and recordings once they are ready
        self._ffmpeg = ffmpeg
        self._slots: asyncio.Semaphore | None = None
        self._analysis_slots: asyncio.Semaphore | None = None
        self.sweep()

    # --- the entries --------------------------------------------------------------------------

    def get(self, name: str) -> VodEntry | None:
        if not NAME_RE.fullmatch(name):
            return None
        return VodEntry.load(self.root / name)

    def entries(self) -> list[VodEntry]:
        if not self.root.is_dir():
            return []
        found = (VodEntry.load(p) for p in sorted(self.root.iterdir()) if NAME_RE.fullmatch(p.name))
        return [entry for entry in found if entry is not None]

    def sweep(self) -> None:
        """Remove partial entries and uploads whose process is gone (it was killed)."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if not path.name.startswith((PARTIAL, UPLOAD)):
                continue
            pid = path.name.split("-")[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                _remove(path)

    def ladder(self, app: str | None = None) -> list[Rendition]:
        """The ABR ladder of a stream application (the first one by default)."""
        apps = self.settings.apps
        spec = next((a for a in apps if a.name == app), None) if app else apps[0]
        if spec is None:
            raise VodError(f"no stream application {app!r}; have {', '.join(a.name for a in apps)}")
        return ladder_from_config(r.model_dump() for r in spec.ladder)

    # --- making entries -----------------------------------------------------------------------

    async def package_file(
        self,
        input_path: str | Path,
        name: str,
        ladder: Iterable[Rendition] | None = None,
        progress: Progress | None = None,
        *,
        source_name: str | None = None,
    ) -> VodEntry:
        """Transcode a file to the ladder and add it as entry ``name`` (see the module doc).

        ``progress`` gets 0.0 when ffmpeg starts, then fractions up to 1.0 at the end.
        """
        source = Path(input_path)
        self._check_new(name)
        if not source.is_file():
            raise VodError(f"{source}: no such file")
        ffmpeg = resolve_ffmpeg(self._ffmpeg)
        media = await probe_media(resolve_ffprobe(ffmpeg), source)
        tracks = plan_outputs(list(ladder) if ladder is not None else self.ladder(), media.source)
        async with self._staging(name) as staging:
            work = staging / WORK
            work.mkdir()
            command = transcode_command(ffmpeg, source, media, tracks, work)
            share = _scaled(progress, 0.0, TRANSCODE_SHARE)
            await run_ffmpeg(command, media.duration, share)
            files = {track.name: work / f"{track.name}.mp4" for track in tracks}
            info = {
                "origin": "file",
                "source": source_name or source.name,
                "source_duration": media.duration,
            }
            meta = await self._assemble(staging, name, files, ffmpeg, info, progress)
        return VodEntry(name, self.root / name, meta)

    async def record(
        self, name: str, renditions: Mapping[str, RecordedRendition], *, origin: str = "live"
    ) -> VodEntry:
        """An entry from already-packaged CMAF (a live stream's window), without re-encoding.

        ``renditions`` maps a rendition name to (init segment, segments, their durations); each
        is one CMAF track (video, audio, or both muxed). The segments are cut again to the VOD
        target (the media decides the timing; ``durations`` are not needed). The progressive
        MP4 is made when ffmpeg is available.
        """
        self._check_new(name)
        if not renditions:
            raise VodError("nothing to record")
        for rendition in renditions:
            if not NAME_RE.fullmatch(rendition):
                raise VodError(f"bad rendition name {rendition!r}")
        try:
            ffmpeg: str | None = resolve_ffmpeg(self._ffmpeg)
        except FfmpegNotFound:
            ffmpeg = None
        async with self._staging(name) as staging:
            work = staging / WORK
            work.mkdir()
            files = {}
            for rendition, (init, segments, _durations) in renditions.items():
                files[rendition] = work / f"{rendition}.mp4"
                await asyncio.to_thread(_write_track, files[rendition], init, segments)
            meta = await self._assemble(staging, name, files, ffmpeg, {"origin": origin}, None)
        return VodEntry(name, self.root / name, meta)

    def _check_new(self, name: str) -> None:
        check_name(name)
        if (self.root / name).exists():
            raise VodExists(f"VOD {name!r} exists")

    @contextlib.asynccontextmanager
    async def _staging(self, name: str) -> AsyncIterator[Path]:
        """A private directory that becomes entry ``name`` on success and vanishes otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}-{name}"
        staging.mkdir()
        try:
            yield staging
            _remove(staging / WORK)
            try:
                os.rename(staging, self.root / name)
            except OSError as exc:
                raise VodExists(f"VOD {name!r} exists") from exc
        except BaseException:
            await asyncio.shield(asyncio.to_thread(_remove, staging))
            raise

    async def _assemble(
        self,
        staging: Path,
        name: str,
        files: Mapping[str, Path],
        ffmpeg: str | None,
        info: Mapping[str, Any],
        progress: Progress | None,
    ) -> dict[str, Any]:
        """Track files -> progressive MP4, segments, playlists, MPD, and meta.json last."""
        created = time.time()
        tracks = []
        for track_name, path in files.items():
            track_dir = staging / track_name
            tracks.append(
                await asyncio.to_thread(segment_file, path, track_name, track_dir, created)
            )
        if progress is not None:
            progress(TRANSCODE_SHARE + (1 - TRANSCODE_SHARE) / 2)
        download = await self._download(staging, tracks, files, ffmpeg, info.get("origin"))
        meta = {
            "name": name,
            "created": created,
            "duration": round(max(t.duration for t in tracks), 3),
            "renditions": [t.describe() for t in tracks],
            "download": download,
            **info,
        }
        await asyncio.to_thread(_write_documents, staging, name, tracks, meta)
        if progress is not None:
            progress(1.0)
        return meta

    async def _download(
        self,
        staging: Path,
        tracks: Sequence[PackagedTrack],
        files: Mapping[str, Path],
        ffmpeg: str | None,
        origin: str | None,
    ) -> dict[str, Any] | None:
        """The progressive MP4 from the tallest video track and the first audio-only one."""
        videos = [t for t in tracks if t.video]
        top = max(videos, key=lambda t: t.video.height if t.video else 0, default=None)
        audio = (
            None
            if top is not None and top.audio
            else next((t for t in tracks if t.audio and not t.video), None)
        )
        if ffmpeg is None:
            return None
        out = staging / DOWNLOAD
        command = remux_command(
            ffmpeg,
            files[top.name] if top else None,
            files[audio.name] if audio else None,
            out,
        )
        try:
            await run_ffmpeg(command)
        except VodError:
            if origin == "file":
                raise
            log.warning("vod: no progressive MP4 for a recording", exc_info=True)
            out.unlink(missing_ok=True)
            return None
        return {
            "file": DOWNLOAD,
            "size": out.stat().st_size,
            "rendition": top.name if top else None,
        }

    # --- analysis (verge.stream.analysis: scenes, thumbnails, black, silence, faces) -----------

    async def analyze(
        self, name: str, progress: Progress | None = None, *, detector: str = "auto"
    ) -> dict[str, Any]:
        """(Re-)analyse entry ``name`` in a niced process; the result (also served at
        /vod/NAME/analysis). ``progress`` as for packaging."""
        entry = self.get(name)
        if entry is None:
            raise VodError(f"no VOD entry {name!r}")
        ffmpeg = resolve_ffmpeg(self._ffmpeg)
        try:
            return await analyze_entry(
                ffmpeg, entry.path, entry.meta, progress=progress, detector=detector
            )
        except AnalysisError as exc:
            raise VodError(str(exc)) from exc

    def analyze_later(self, name: str) -> asyncio.Task:
        """Analyse ``name`` in the background (one analysis at a time); the task."""
        running = self.analyses.get(name)
        if running is not None and not running.done():
            return running
        task = self.analyses[name] = asyncio.get_running_loop().create_task(
            self._analyze_queued(name)
        )
        return task

    async def _analyze_queued(self, name: str) -> None:
        if self._analysis_slots is None:
            self._analysis_slots = asyncio.Semaphore(1)
        try:
            async with self._analysis_slots:
                await self.analyze(name)
            log.info("vod %s: analysed", name)
        except (VodError, FfmpegNotFound, OSError) as exc:  # the entry plays without it
            log.warning("vod %s: analysis failed: %s", name, exc)

    async def _analysis(self, request, writer, parts: Sequence[str]) -> None:
        """/vod/NAME/analysis (the JSON) and /vod/NAME/analysis/RUN/FILE (thumbnails, VTT)."""
        entry = self.get(parts[0])
        root = entry.path / ANALYSIS_DIR if entry is not None else None
        if root is not None and len(parts) == 2:
            run = latest_run(root)
            if run is not None:
                await send_file(request, writer, run / RESULT, "application/json", ANALYSIS_CACHE)
                return
            task = self.analyses.get(parts[0])
            state = "running" if task is not None and not task.done() else "none"
            await _send_json(writer, 404, {"error": "not analysed (yet)", "state": state})
            return
        path = analysis_file(root, parts[2], parts[3]) if root and len(parts) == 4 else None
        if path is None:
            await _not_found(writer)
            return
        cache = IMMUTABLE if path.suffix == ".jpg" else ANALYSIS_CACHE
        await send_file(request, writer, path, content_type(path.name), cache)

    # --- uploads ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the packaging jobs and analyses (their partial output is removed)."""
        tasks = [job.task for job in self.jobs.values() if job.task and not job.task.done()]
        tasks += [task for task in self.analyses.values() if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start_job(self, name: str, upload: Path, ladder: Sequence[Rendition]) -> VodJob:
        """Package an uploaded file in the background, one job at a time; deletes the upload."""
        job = self.jobs[name] = VodJob(name)
        job.task = asyncio.get_running_loop().create_task(self._run_job(job, upload, ladder))
        return job

    async def _run_job(self, job: VodJob, upload: Path, ladder: Sequence[Rendition]) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(1)
        try:
            async with self._slots:
                job.state = "packaging"
                await self.package_file(
                    upload, job.name, ladder, _job_progress(job), source_name="upload"
                )
            job.state, job.progress = "ready", 1.0
            log.info("vod %s: ready", job.name)
            if self.auto_analyze:
                self.analyze_later(job.name)
        except asyncio.CancelledError:
            job.state, job.error = "failed", "cancelled"
            raise
        except Exception as exc:  # the status API reports it; the server carries on
            job.state, job.error = "failed", str(exc)
            log.warning("vod %s: packaging failed: %s", job.name, exc)
        finally:
            upload.unlink(missing_ok=True)

    # --- HTTP ---------------------------------------------------------------------------------

    async def handle(self, request, writer) -> None:
        """Requests under /vod/ (see the module doc); POST /vod/NAME is the upload API."""
        rest = request.path[len("/vod/") :]
        parts = rest.split("/")
        method = request.method
        if method == "POST" and len(parts) == 1:
            await self._upload(request, writer, parts[0])
        elif method not in ("GET", "HEAD"):
            await _send(writer, 405, b"method not allowed\n", "text/plain", NO_STORE)
        elif rest == "":
            await _send_json(writer, 200, [dict(e.meta) for e in self.entries()])
        elif parts[0] == PLAYER or (len(parts) == 1 and NAME_RE.fullmatch(parts[0])):
            # the player page (/vod/NAME) and its assets, as for live streams
            if not await serve_web(request, writer, request.path, apps={"vod"}, chat=None):
                await _not_found(writer)
        elif len(parts) >= 2 and parts[1] == ANALYSIS_DIR:
            await self._analysis(request, writer, parts)
        elif len(parts) == 1:
            await self._document(request, writer, parts[0])
        elif len(parts) == 2 and parts[1] == "status":
            await self._status(writer, parts[0])
        elif len(parts) == 3:
            await self._rendition_file(request, writer, *parts)
        else:
            await _not_found(writer)

    async def _document(self, request, writer, file: str) -> None:
        name, dot, ext = file.partition(".")
        entry = self.get(name)
        target = {"m3u8": MASTER, "mpd": MANIFEST, "mp4": DOWNLOAD}.get(ext) if dot else None
        if entry is None or target is None:
            await _not_found(writer)
            return
        cache = DOWNLOAD_CACHE if ext == "mp4" else PLAYLIST_CACHE
        await send_file(
            request, writer, entry.path / target, _content_type(target), cache, ranges=ext == "mp4"
        )

    async def _rendition_file(self, request, writer, name: str, rendition: str, file: str) -> None:
        entry = self.get(name)
        if entry is None or not NAME_RE.fullmatch(rendition) or not FILE_RE.fullmatch(file):
            await _not_found(writer)
            return
        cache = PLAYLIST_CACHE if file == PLAYLIST else IMMUTABLE
        await send_file(request, writer, entry.path / rendition / file, _content_type(file), cache)

    async def _status(self, writer, name: str) -> None:
        job = self.jobs.get(name)
        if job is None and self.get(name) is not None:
            job = VodJob(name, "ready", 1.0)
        if job is None:
            await _not_found(writer)
        else:
            await _send_json(writer, 200, job.as_json())

    async def _upload(self, request, writer, name: str) -> None:
        token = self.settings.upload_token
        if token is None:
            await _send_json(
                writer, 403, {"error": "uploads are disabled (set stream.upload_token)"}
            )
            return
        if not _bearer_ok(request.header("authorization"), token):
            await _send_json(
                writer,
                401,
                {"error": "a valid bearer token is required"},
                [("WWW-Authenticate", 'Bearer realm="verge-vod"')],
            )
            return
        try:
            self._check_new(name)
            if name in self.jobs and self.jobs[name].state in ("queued", "packaging"):
                raise VodExists(f"VOD {name!r} is being packaged")
            ladder = self.ladder(_query_value(request.query, "app"))
            upload = await self._receive(request, name)
        except VodError as exc:
            await _send_json(writer, exc.status, {"error": str(exc)})
            return
        job = self.start_job(name, upload, ladder)
        body = {**job.as_json(), "status": f"/vod/{name}/status"}
        await _send_json(writer, 202, body, [("Location", f"/vod/{name}/status")])

    async def _receive(self, request, name: str) -> Path:
        """The request body streamed to a file under the library, within max_upload_bytes."""
        limit = self.settings.max_upload_bytes
        length = request.header("content-length")
        if request.body is None:
            raise VodError("send the video file as the request body")
        if length and length.strip().isdigit() and int(length) > limit:
            raise _too_large(limit)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{UPLOAD}{os.getpid()}-{secrets.token_hex(4)}-{name}"
        received = 0
        try:
            with path.open("wb") as file:
                async for chunk in request.body:
                    received += len(chunk)
                    if received > limit:
                        raise _too_large(limit)
                    file.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if received == 0:
            path.unlink(missing_ok=True)
            raise VodError("the upload is empty")
        return path


# --- helpers ----------------------------------------------------------------------------------


def _write_track(path: Path, init: bytes, segments: Sequence[bytes]) -> None:
    with path.open("wb") as file:
        file.write(init)
        for segment in segments:
            file.write(segment)


def _write_documents(staging: Path, name: str, tracks: Sequence[PackagedTrack], meta: dict) -> None:
    for track in tracks:
        (track.directory / PLAYLIST).write_text(media_playlist(track), encoding="utf-8")
    (staging / MASTER).write_text(multivariant(name, tracks), encoding="utf-8")
    (staging / MANIFEST).write_text(manifest(name, tracks, meta["created"]), encoding="utf-8")
    write_atomic(staging / META, json.dumps(meta, indent=2).encode(), mode=0o644)


def _scaled(progress: Progress | None, low: float, high: float) -> Progress | None:
    if progress is None:
        return None
    return lambda done: progress(low + (high - low) * done)


def _job_progress(job: VodJob) -> Progress:
    def update(done: float) -> None:
        job.progress = done

    return update


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _too_large(limit: int) -> VodError:
    return VodTooLarge(f"the upload is larger than max_upload_bytes ({limit})")


def _bearer_ok(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _query_value(query: str, key: str) -> str | None:
    values = parse_qs(query).get(key)
    return values[0] if values else None


def _content_type(file: str) -> str:
    return CONTENT_TYPES.get(Path(file).suffix, "application/octet-stream")


def _cors() -> tuple[str, str]:
    return ("Access-Control-Allow-Origin", "*")


async def _send(
    writer, status: int, body: bytes, content_type: str, cache: str, extra: Sequence = ()
) -> None:
    headers = [("Content-Type", content_type), ("Cache-Control", cache), _cors(), *extra]
    writer.start(status, headers, content_length=len(body))
    await writer.write(body)


async def _send_json(writer, status: int, data: Any, extra: Sequence = ()) -> None:
    body = (json.dumps(data) + "\n").encode()
    await _send(writer, status, body, "application/json", NO_STORE, extra)


async def _not_found(writer) -> None:
    await _send(writer, 404, b"no such video\n", "text/plain", NO_STORE)


async def send_file(
    request, writer, path: Path, content_type: str, cache: str, *, ranges: bool = False
) -> None:
    """A file in pieces (never whole in memory); with ``ranges``: ETag, 304, 206 and 416."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        await _not_found(writer)
        return
    try:
        stat = os.fstat(fd)
        size = stat.st_size
        headers = [("Content-Type", content_type), ("Cache-Control", cache), _cors()]
        start, end, status = 0, size - 1, 200
        if ranges:
            etag = f'"{stat.st_ino:x}-{size:x}-{stat.st_mtime_ns:x}"'
            modified = formatdate(stat.st_mtime, usegmt=True)
            headers += [("Accept-Ranges", "bytes"), ("ETag", etag), ("Last-Modified", modified)]
            if _etag_matches(request.header("if-none-match"), etag):
                writer.start(304, headers)
                return
            if if_range_ok(request.header("if-range"), etag, modified):
                try:
                    selected = parse_range(request.header("range"), size)
                except Unsatisfiable as exc:
                    extra = [("Content-Range", exc.content_range)]
                    await _send(writer, 416, b"", "text/plain", NO_STORE, extra)
                    return
                if selected is not None:
                    (start, end), status = selected, 206
                    headers.append(("Content-Range", content_range(start, end, size)))
        writer.start(status, headers, content_length=end - start + 1)
        await writer.sendfile(fd, start, end - start + 1)
    finally:
        os.close(fd)


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags
