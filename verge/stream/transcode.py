"""ABR transcoding: two supervised ffmpeg processes per live stream, FLV in, fragmented MP4 out.

Why a process and not a library: ffmpeg (Debian's 5.1, or any build named by ``VERGE_FFMPEG``)
already does H.264/AAC decoding, scaling and x264 encoding well; our job is to feed it, read it
and keep it alive. The packager (``verge.stream.package``) parses what comes out.

Data flow for one stream::

    ingest tags --write_video/write_audio/feed--+-> bounded queue --stdin (FLV)--> ffmpeg (copy)
                                                +-> bounded queue --stdin (FLV)--> ffmpeg (encode)
    each ffmpeg --pipe:N (one fd per track, fragmented MP4)--> on_output(name, kind, bytes)

Why two: x264 on a busy machine falls behind, and one process copying and encoding holds the
copied source back with it (ingest-to-part-listed went from ~0.2 s to 0.5-1.8 s with the
default ladder). The copy process (source video copy, audio) and the encode process (the
lower rungs, see :func:`group_of`) read the same input from separate queues, so a slow
encoder delays, drops or restarts only its own renditions.

Outputs: one video track per rendition (``source`` is a stream copy when the input is H.264)
and one shared audio track named ``audio`` (a copy when the input is AAC, which is all the
RTMP ingest accepts; otherwise AAC at the ladder's highest ``audio_bitrate``). Every output is a
separate fragmented MP4 written to its own pipe with :data:`FMP4_FLAGS`, so each byte stream is
one CMAF track: an init segment (ftyp+moov) then moof+mdat fragments, cut at every keyframe of
video and every 200 ms or, given the LL-HLS part target, just under it (:func:`fragment_for`):
each fragment is then one part, complete (and listed) when ffmpeg writes it, so the packager
never waits for a second fragment to fill a part. Encoding adds no delay of its own either:
x264 ``-tune zerolatency`` (no B-frames, no lookahead, sliced threads instead of frame threads)
and ``-flags low_delay`` on the decoder (no frame threads). Encoded rungs get a keyframe every
second (``-g`` = 1 s of frames, ``keyint_min`` equal, no scene cuts, plus a time-based forced
keyframe), so segment boundaries line up across renditions. Rungs taller than the source are
skipped: never upscale; so are rungs of the source's own height when the ladder keeps the
source (the same size twice).

What the stream carries is decided before ffmpeg starts, from the first tags: onMetaData names
the codecs it has (``videocodecid``/``audiocodecid``); the job then waits for the sequence
header of each declared track (AVC/AAC). Without such metadata it waits for both sequence
headers, or for :attr:`TranscodeJob.decide_window` seconds of media, and goes with what it has
seen. Audio-only input gives audio-only output; video-only input gives no audio output.

WebRTC (``on_flv``): a source with B-frames cannot be passed through to browsers' WebRTC, so
the encoding process also writes its top rung (:func:`rtc_track`) as FLV to one more pipe: the
``tee`` muxer on that rung's output (one encode, two muxers; :func:`tee_target` escapes the
options, ``+global_header`` because tee cannot tell the encoder), FLV tags flushed per frame and
parsed as they come. Measured: no CPU difference worth the name (see verge.stream.webrtc).

Supervision (per process): if ffmpeg exits while the stream is live, it is restarted (at
most ``max_restarts`` times in a row, with exponential backoff; a process that ran
``stable_after`` seconds resets the count). The new process gets the FLV prefix again (header,
metadata, sequence headers) and media from the next video keyframe; ``on_restart`` tells the
packager there is a discontinuity on that process's renditions (new init segments follow).
Output time does not restart: the new process starts at the stream time of its first input
tag (``-output_ts_offset``, with ``frag_discont`` so the first fragment's decode time says so;
it starts once that tag is there), so both processes stay on one timeline whichever restarts. A
changed sequence header (the publisher switched resolution or audio format) ends the running
processes after the tags before it and starts new ones with a new plan: same notice,
``attempt`` 0. ffmpeg's stderr is kept as its last lines only and logged when it fails.

Back-pressure: tags wait in a queue (one per process) bounded by media time (``max_lag``) and
bytes; if its ffmpeg falls further behind, the queue is dropped and input is skipped until the
next video keyframe (logged), so memory never grows without bound. :meth:`TranscodeJob.close`
sends EOF, lets ffmpeg flush its last fragments, and kills it after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from verge.stream import flv
from verge.stream.rtmp import amf0

log = logging.getLogger("verge.stream.transcode")

#: The share of the LL-HLS part target a fragment is cut at: ffmpeg ends a fragment at the first
#: frame at least this far from its start, so a fragment is this plus up to one frame; 0.9 keeps
#: 25/30/50/60 fps video and 44.1/48 kHz AAC fragments within the part target.
FRAGMENT_SHARE = 0.9


def fmp4_flags(fragment: float = 0.2) -> tuple[str, ...]:
    """Muxer options for every output: fragmented MP4 (CMAF track), fragments cut ``fragment``
    seconds apart and at video keyframes, each written the moment it is complete. The packager
    relies on these."""
    return (
        "-f",
        "mp4",
        "-movflags",
        "+empty_moov+default_base_moof+frag_keyframe+separate_moof+skip_trailer+cmaf",
        "-frag_duration",
        str(round(fragment * 1_000_000)),
        "-flush_packets",
        "1",
    )


def fragment_for(part_target: float) -> float:
    """The fragment duration that makes each fragment one LL-HLS part of at most ``part_target``
    (a part is complete, and listed, the moment ffmpeg writes its fragment)."""
    return part_target * FRAGMENT_SHARE


#: ~200 ms fragments (VOD packaging and the default).
FMP4_FLAGS: tuple[str, ...] = fmp4_flags()

#: Input options: read FLV from stdin and start after the first packets. (``-fflags nobuffer``
#: is left out on purpose: it discards the packets read while probing, i.e. the first frames.)
INPUT_FLAGS: tuple[str, ...] = (
    "-probesize",
    "32",
    "-analyzeduration",
    "0",
    "-flags",
    "low_delay",
    "-f",
    "flv",
)

FFMPEG_ENV = "VERGE_FFMPEG"
AUDIO_TRACK = "audio"
VIDEO = "video"
AUDIO = "audio"
COPY = "copy"
ENCODE = "encode"
GROUPS = (COPY, ENCODE)
_AVC = 7
_AAC = 10
_DEFAULT_FPS = 30.0
_STDERR_LINES = 40
_STDERR_LINE_MAX = 400


class FfmpegNotFound(RuntimeError):
    """The ffmpeg binary is not installed or not where the configuration says."""


# The ladder.


@dataclass(frozen=True, slots=True)
class Rendition:
    """One rung of the ABR ladder; ``height=None`` is the source itself (copied if H.264).

    Bitrates are in bits per second. ``maxrate``/``bufsize`` default to 1.07x and 1.5x the
    video bitrate (VBV for steady segment sizes); ``fps`` caps the frame rate if set.
    """

    name: str
    height: int | None
    video_bitrate: int | None = None
    audio_bitrate: int = 128_000
    maxrate: int | None = None
    bufsize: int | None = None
    fps: float | None = None
    preset: str = "veryfast"

    def __post_init__(self) -> None:
        if self.height is not None and (self.height <= 0 or self.height % 2):
            raise ValueError(f"rendition {self.name!r}: height must be positive and even")
        if self.height is not None and not self.video_bitrate:
            raise ValueError(f"rendition {self.name!r}: an encoded rung needs video_bitrate")
        if self.name == AUDIO_TRACK:
            raise ValueError(f"rendition name {AUDIO_TRACK!r} is reserved for the audio track")

    @property
    def is_source(self) -> bool:
        return self.height is None

    @property
    def effective_maxrate(self) -> int | None:
        if self.video_bitrate is None:
            return self.maxrate
        return self.maxrate or int(self.video_bitrate * 1.07)

    @property
    def effective_bufsize(self) -> int | None:
        if self.video_bitrate is None:
            return self.bufsize
        return self.bufsize or int(self.video_bitrate * 1.5)


SAME_HEIGHT_TOLERANCE = 8
"""Pixels: a rung this close to the source's height is the source again (not encoded)."""

PRESETS: dict[str, Rendition] = {
    "source": Rendition("source", None),
    "1080p": Rendition("1080p", 1080, 5_000_000, 128_000),
    "720p": Rendition("720p", 720, 2_800_000, 128_000),
    "480p": Rendition("480p", 480, 1_400_000, 96_000),
    "360p": Rendition("360p", 360, 800_000, 96_000),
    "240p": Rendition("240p", 240, 400_000, 64_000),
}
DEFAULT_LADDER: tuple[Rendition, ...] = tuple(
    PRESETS[name] for name in ("source", "720p", "480p", "360p")
)


def ladder_from_config(items: Iterable[str | Mapping[str, Any] | Rendition]) -> list[Rendition]:
    """A ladder from config entries: a preset name (``"720p"``), a mapping of Rendition fields
    (``{"name": "540p", "height": 540, "video_bitrate": 2000000}``; a preset ``name`` fills in
    the fields not given), or a Rendition."""
    ladder: list[Rendition] = []
    for item in items:
        if isinstance(item, Rendition):
            ladder.append(item)
        elif isinstance(item, str):
            if item not in PRESETS:
                raise ValueError(f"unknown rendition {item!r}; presets: {', '.join(PRESETS)}")
            ladder.append(PRESETS[item])
        else:
            fields = dict(item)
            base = PRESETS.get(str(fields.get("name")))
            ladder.append(replace(base, **fields) if base else Rendition(**fields))
    names = [rendition.name for rendition in ladder]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate rendition names in {names}")
    if not ladder:
        raise ValueError("the ladder is empty")
    return ladder


# What the input carries, and what we make of it.


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the stream carries, from onMetaData and the sequence headers."""

    has_video: bool
    has_audio: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    video_codec: int | None = None  # FLV CodecID, 7 = AVC
    audio_codec: int | None = None  # FLV SoundFormat, 10 = AAC
    video_bitrate: int | None = None  # bit/s, from metadata
    audio_bitrate: int | None = None


@dataclass(frozen=True, slots=True)
class OutputTrack:
    """One ffmpeg output = one CMAF track. ``bandwidth`` is nominal (bit/s), for playlists."""

    name: str
    kind: str  # "video" | "audio"
    copy: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    bitrate: int | None = None
    rendition: Rendition | None = None


@dataclass(frozen=True, slots=True)
class Variant:
    """A playable variant for the multivariant playlist: one video track plus the audio."""

    name: str
    width: int | None
    height: int | None
    fps: float | None
    bandwidth: int
    video: str | None
    audio: str | None


def plan_outputs(ladder: Iterable[Rendition], source: SourceInfo) -> list[OutputTrack]:
    """The tracks to produce: video rungs below the source's height (and the source), then the
    shared audio."""
    ladder = list(ladder)
    tracks: list[OutputTrack] = []
    if source.has_video:
        tracks.extend(_video_track(rendition, source) for rendition in _fitting(ladder, source))
    if source.has_audio:
        tracks.append(_audio_track(ladder, source))
    return tracks


def variants(tracks: Iterable[OutputTrack]) -> list[Variant]:
    """Variants for the multivariant playlist: each video track with the audio, or audio alone."""
    tracks = list(tracks)
    audio = next((track for track in tracks if track.kind == AUDIO), None)
    audio_rate = (audio.bitrate or 128_000) if audio else 0
    videos = [track for track in tracks if track.kind == VIDEO]
    if not videos and audio:
        return [Variant(audio.name, None, None, None, audio_rate, None, audio.name)]
    return [
        Variant(
            track.name,
            track.width,
            track.height,
            track.fps,
            (track.bitrate or 0) + audio_rate,
            track.name,
            audio.name if audio else None,
        )
        for track in videos
    ]


def group_of(track: OutputTrack) -> str:
    """Which process makes a track: :data:`COPY` for stream copies and the audio (cheap, never
    held up by x264), :data:`ENCODE` for video that has to be encoded."""
    return COPY if track.kind == AUDIO or track.copy else ENCODE


def _fitting(ladder: list[Rendition], source: SourceInfo) -> list[Rendition]:
    """The rungs worth making: none taller than the source (no upscaling) and, when the ladder
    has the source itself, none of the source's own height (a 720p rung for a 720p source is
    the same picture again, encoded worse)."""
    if source.height is None:
        return ladder  # unknown size: keep them all rather than guess
    has_source = any(r.is_source for r in ladder)
    return [
        r
        for r in ladder
        if r.height is None
        or (r.height <= source.height and not (has_source and _same_height(r.height, source)))
    ]


def _same_height(height: int, source: SourceInfo) -> bool:
    """Within a few pixels of the source's height (1080 vs 1088 coded, 720 vs 718 cropped)."""
    return source.height is not None and abs(source.height - height) <= SAME_HEIGHT_TOLERANCE


def _video_track(rendition: Rendition, source: SourceInfo) -> OutputTrack:
    fps = _capped_fps(rendition.fps, source.fps)
    if rendition.is_source:
        copy = source.video_codec == _AVC and rendition.fps is None
        bitrate = rendition.video_bitrate or source.video_bitrate or _guess_bitrate(source, fps)
        return OutputTrack(
            rendition.name, VIDEO, copy, source.width, source.height, fps, bitrate, rendition
        )
    height = rendition.height
    width = None
    if source.width and source.height:
        width = 2 * round(source.width * height / source.height / 2)  # what scale=-2:H gives
    bitrate = rendition.effective_maxrate or rendition.video_bitrate
    return OutputTrack(rendition.name, VIDEO, False, width, height, fps, bitrate, rendition)


def _audio_track(ladder: list[Rendition], source: SourceInfo) -> OutputTrack:
    copy = source.audio_codec == _AAC
    bitrate = (source.audio_bitrate or 128_000) if copy else max(r.audio_bitrate for r in ladder)
    return OutputTrack(AUDIO_TRACK, AUDIO, copy, bitrate=bitrate)


def _capped_fps(cap: float | None, source_fps: float | None) -> float | None:
    if cap and source_fps:
        return min(cap, source_fps)
    return cap or source_fps


def _guess_bitrate(source: SourceInfo, fps: float | None) -> int:
    pixels = (source.width or 1280) * (source.height or 720)
    return int(pixels * (fps or _DEFAULT_FPS) * 0.1)


# The ffmpeg command line.


def resolve_ffmpeg(ffmpeg: str | None = None) -> str:
    """The ffmpeg executable: the argument, else ``$VERGE_FFMPEG``, else ``ffmpeg`` on PATH."""
    wanted = ffmpeg or os.environ.get(FFMPEG_ENV) or "ffmpeg"
    found = shutil.which(wanted)
    if found is None:
        raise FfmpegNotFound(
            f"ffmpeg not found: {wanted!r} is not an executable file or on PATH; "
            f"install ffmpeg (Debian: apt-get install ffmpeg) or set {FFMPEG_ENV}"
        )
    return found


def ffmpeg_command(
    ffmpeg: str,
    tracks: list[OutputTrack],
    fds: list[int],
    fragment: float | None = None,
    offset: float = 0.0,
    flv_fd: int | None = None,
) -> list[str]:
    """The full command line; output ``i`` goes to file descriptor ``fds[i]``, in fragments of
    ``fragment`` seconds (:data:`FMP4_FLAGS` without). Output time starts at ``offset`` seconds
    (a restarted process continues the stream's timeline) instead of 0. With ``flv_fd``, the
    :func:`rtc_track` of ``tracks`` is also written as FLV to that descriptor (one encode, two
    muxers: :func:`tee_target`)."""
    command = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "warning"]
    command += [*INPUT_FLAGS, "-i", "pipe:0"]
    muxer = list(FMP4_FLAGS if fragment is None else fmp4_flags(fragment))
    if offset > 0:  # frag_discont: the first fragment's decode time is the offset, not 0
        flags = muxer.index("-movflags") + 1
        muxer[flags] += "+frag_discont"
    timeline = ["-output_ts_offset", f"{offset:.3f}"] if offset > 0 else []
    teed = rtc_track(tracks) if flv_fd is not None else None
    for track, fd in zip(tracks, fds, strict=True):
        command += _output_args(track)
        if track is teed and flv_fd is not None:
            command += ["-flags:v", "+global_header", *timeline]  # tee cannot tell the encoder
            command += ["-f", "tee", tee_target(muxer, f"pipe:{fd}", f"pipe:{flv_fd}")]
        else:
            command += [*muxer, *timeline, f"pipe:{fd}"]
    return command


def rtc_track(tracks: Iterable[OutputTrack]) -> OutputTrack | None:
    """The rendition WebRTC viewers of a stream with B-frames get: the tallest encoded video
    rung (x264 ``-tune zerolatency``: no B-frames), or None if nothing is encoded."""
    encoded = [t for t in tracks if t.kind == VIDEO and group_of(t) == ENCODE]
    return max(encoded, key=lambda t: t.height or 0, default=None)


#: Muxer options of the FLV copy: no onMetaData, no seeking back to patch the header (a pipe),
#: each frame's tag written the moment it is muxed.
FLV_SLAVE = {"f": "flv", "flvflags": "no_duration_filesize+no_metadata", "flush_packets": "1"}


def tee_target(fmp4_muxer: list[str], fmp4: str, flv_target: str) -> str:
    """The ``tee`` muxer's output naming an fMP4 output (the ``-f mp4 -movflags ...`` muxer
    arguments given) and an FLV one. Two levels of escaping: tee splits outputs at ``|``
    (``av_get_token``), then each ``[key=value:...]`` list at ``:``/``=``/``]``; a backslash
    before any character is taken literally at both levels, so values are escaped twice."""
    options = dict(zip(fmp4_muxer[::2], fmp4_muxer[1::2], strict=True))
    fmp4_options = {key.lstrip("-"): value for key, value in options.items()}
    fmp4_options["f"] = fmp4_options.pop("f", "mp4")
    return "|".join(
        _escape(_slave(slave_options, target), "|")
        for slave_options, target in ((fmp4_options, fmp4), (FLV_SLAVE, flv_target))
    )


def _slave(options: Mapping[str, str], target: str) -> str:
    pairs = ":".join(f"{_escape(k, '=:]')}={_escape(v, '=:]')}" for k, v in options.items())
    return f"[{pairs}]{target}"  # the target is taken as it is (after the outer level)


def _escape(text: str, special: str) -> str:
    """A backslash before backslashes, quotes and ``special`` (``av_get_token`` unescaping)."""
    return "".join(f"\\{c}" if c in f"\\'{special}" else c for c in text)


def _output_args(track: OutputTrack) -> list[str]:
    if track.kind == AUDIO:
        codec = ["-c:a", "copy"] if track.copy else ["-c:a", "aac", "-b:a", str(track.bitrate)]
        return ["-map", "0:a:0", *codec]
    if track.copy:
        return ["-map", "0:v:0", "-c:v", "copy"]
    return ["-map", "0:v:0", *_encode_args(track)]


def _encode_args(track: OutputTrack) -> list[str]:
    rendition = track.rendition
    assert rendition is not None
    filters = [f"scale=-2:{track.height}"] if track.height and not rendition.is_source else []
    if rendition.fps:
        filters.append(f"fps={rendition.fps:g}")
    gop = max(1, round(track.fps or _DEFAULT_FPS))
    args = ["-vf", ",".join(filters)] if filters else []
    args += ["-c:v", "libx264", "-preset", rendition.preset, "-tune", "zerolatency"]
    args += ["-pix_fmt", "yuv420p", "-b:v", str(rendition.video_bitrate or track.bitrate)]
    if rendition.effective_maxrate:
        args += ["-maxrate", str(rendition.effective_maxrate)]
        args += ["-bufsize", str(rendition.effective_bufsize)]
    args += ["-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0"]
    args += ["-force_key_frames", "expr:gte(t,n_forced*1)"]
    return args


# FLV in.


def flv_prefix(
    metadata: Mapping[str, Any] | None,
    video_seq_header: bytes | None,
    audio_seq_header: bytes | None,
    *,
    audio: bool | None = None,
    video: bool | None = None,
) -> bytes:
    """What a (re)started ffmpeg reads first: FLV header, onMetaData, AVC/AAC sequence headers.

    The sequence headers are FLV tag bodies as the ingest delivers them. ``audio``/``video``
    set the header flags (default: whether that sequence header is given).
    """
    has_video = video_seq_header is not None if video is None else video
    has_audio = audio_seq_header is not None if audio is None else audio
    data = flv.file_header(audio=has_audio, video=has_video)
    if metadata:
        data += flv.metadata_tag(_filtered_metadata(metadata, has_video, has_audio))
    if has_video and video_seq_header is not None:
        data += flv.video_tag(0, video_seq_header)
    if has_audio and audio_seq_header is not None:
        data += flv.audio_tag(0, audio_seq_header)
    return data


def _filtered_metadata(metadata: Mapping[str, Any], video: bool, audio: bool) -> dict[str, Any]:
    """Without the keys of a track we are not sending, so ffmpeg does not wait for it."""
    video_keys = {"videocodecid", "width", "height", "framerate", "videodatarate"}

    def keep(key: str) -> bool:
        if key in video_keys or key.startswith("video"):
            return video
        if key.startswith(("audio", "stereo")):
            return audio
        return True

    return {key: value for key, value in metadata.items() if keep(key)}


@dataclass(frozen=True, slots=True)
class _Tag:
    tag_type: int
    timestamp: int
    body: bytes

    @property
    def is_video_keyframe(self) -> bool:
        return (
            self.tag_type == flv.VIDEO
            and len(self.body) > 0
            and self.body[0] >> 4 == 1
            and not self.is_sequence_header
        )

    @property
    def is_sequence_header(self) -> bool:
        if len(self.body) < 2:
            return False
        if self.tag_type == flv.VIDEO:
            return self.body[0] & 0x0F == _AVC and self.body[1] == 0
        if self.tag_type == flv.AUDIO:
            return self.body[0] >> 4 == _AAC and self.body[1] == 0
        return False


@dataclass(frozen=True, slots=True)
class _Barrier:
    """In the queue where the input format changed: the process reading up to here ends, the
    next one starts with these sequence headers."""

    timestamp: int
    reason: str
    video_seq: bytes | None
    audio_seq: bytes | None
    body: bytes = b""


class FlvSplitter:
    """Incremental FLV parser: bytes in, complete tags out (holds at most one partial tag)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header_done = False

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buffer += data
        tags: list[tuple[int, int, bytes]] = []
        if not self._header_done and not self._skip_header():
            return tags
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= flv.TAG_HEADER_SIZE:
            size = int.from_bytes(buffer[offset + 1 : offset + 4], "big")
            end = offset + flv.TAG_HEADER_SIZE + size + 4
            if len(buffer) < end:
                break
            stamp = int.from_bytes(buffer[offset + 4 : offset + 7], "big")
            stamp |= buffer[offset + 7] << 24
            body = bytes(buffer[offset + flv.TAG_HEADER_SIZE : end - 4])
            tags.append((buffer[offset] & 0x1F, stamp, body))
            offset = end
        del buffer[:offset]
        return tags

    def _skip_header(self) -> bool:
        if len(self._buffer) < 3:
            return False
        if self._buffer[:3] != b"FLV":
            raise flv.FlvError("not an FLV stream")
        if len(self._buffer) < flv.HEADER_SIZE:
            return False
        skip = int.from_bytes(self._buffer[5:9], "big") + 4
        if len(self._buffer) < skip:
            return False
        del self._buffer[:skip]
        self._header_done = True
        return True


# H.264 SPS: the coded size, when onMetaData does not say.


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def bit(self) -> int:
        byte = self.data[self.position >> 3]  # IndexError on truncated input
        value = (byte >> (7 - (self.position & 7))) & 1
        self.position += 1
        return value

    def bits(self, count: int) -> int:
        value = 0
        for _ in range(count):
            value = (value << 1) | self.bit()
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad exp-Golomb code")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        value = self.ue()
        return (value + 1) // 2 if value & 1 else -(value // 2)


_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def avc_dimensions(sequence_header: bytes) -> tuple[int, int] | None:
    """(width, height) from an FLV AVC sequence header's first SPS, or None if unreadable."""
    try:
        record = sequence_header[5:]  # frame/codec byte, packet type, composition time
        if record[5] & 0x1F == 0:
            return None
        length = int.from_bytes(record[6:8], "big")
        nal = record[8 : 8 + length]
        return _sps_dimensions(_unescape(nal[1:]))
    except (IndexError, ValueError):
        return None


def _unescape(rbsp: bytes) -> bytes:
    return rbsp.replace(b"\x00\x00\x03", b"\x00\x00")


def _sps_dimensions(sps: bytes) -> tuple[int, int]:
    bits = _Bits(sps)
    profile = bits.bits(8)
    bits.bits(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    chroma_format = 1
    if profile in _HIGH_PROFILES:
        chroma_format = bits.ue()
        if chroma_format == 3:
            bits.bit()  # separate_colour_plane_flag
        bits.ue(), bits.ue()  # bit depths
        bits.bit()  # qpprime_y_zero_transform_bypass_flag
        if bits.bit():  # seq_scaling_matrix_present_flag
            for index in range(8 if chroma_format != 3 else 12):
                if bits.bit():
                    _skip_scaling_list(bits, 16 if index < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.bit()
        bits.se(), bits.se()
        for _ in range(bits.ue()):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.bit()  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_units = bits.ue() + 1
    frame_mbs_only = bits.bit()
    if not frame_mbs_only:
        bits.bit()  # mb_adaptive_frame_field_flag
    bits.bit()  # direct_8x8_inference_flag
    crop = (bits.ue(), bits.ue(), bits.ue(), bits.ue()) if bits.bit() else (0, 0, 0, 0)
    unit_x = 1 if chroma_format in (0, 3) else 2
    unit_y = (2 - frame_mbs_only) * (2 if chroma_format == 1 else 1)
    width = width_mbs * 16 - unit_x * (crop[0] + crop[1])
    height = (2 - frame_mbs_only) * height_units * 16 - unit_y * (crop[2] + crop[3])
    return width, height


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = next_scale = 8
    for _ in range(size):
        if next_scale:
            next_scale = (last + bits.se() + 256) % 256
        last = next_scale or last


# The job.


@dataclass(frozen=True, slots=True)
class Discontinuity:
    """ffmpeg was restarted: new init segments follow, output time restarts near 0.

    ``input_timestamp`` is the FLV timestamp (ms) of the first tag the new process gets. Output
    time goes on where it was (roughly: the stream time of that tag), so the stream keeps one
    timeline. Only ``renditions`` restart: the copy and the encoding processes of a stream
    restart independently.
    """

    attempt: int
    reason: str
    input_timestamp: int | None = None
    renditions: tuple[str, ...] = ()
    """The renditions (track names) the restarted process makes; the others go on."""


OnOutput = Callable[[str, str, bytes], None]
OnFlvTag = Callable[[int, int, bytes], None]
"""(tag type, timestamp in ms, body) of one FLV tag."""


@dataclass(slots=True)
class _Origin:
    """The FLV timestamp (ms) of a stream's output time 0, shared by its processes."""

    timestamp: int | None = None


@dataclass(slots=True)
class _Stats:
    processes: int = 0
    restarts: int = 0
    dropped_tags: int = 0
    drops: int = 0
    bytes_in: int = 0
    bytes_out: dict[str, int] = field(default_factory=dict)


class _ProcessJob:
    """One supervised ffmpeg process making one group's tracks (:data:`COPY`: the stream copies
    and the audio; :data:`ENCODE`: the encoded rungs), restarted if it dies. Every group gets
    all the input and decides the same plan from it; it makes only its own share of the plan
    and idles while that share is empty (until a change of input format plans again).
    """

    decide_window = 1.0

    def __init__(
        self,
        ladder: list[Rendition],
        *,
        ffmpeg: str,
        on_output: OnOutput,
        on_plan: Callable[[list[OutputTrack]], None],
        on_restart: Callable[[Discontinuity], None] | None,
        name: str,
        group: str,
        origin: _Origin,
        max_lag: float = 3.0,
        max_queue_bytes: int = 16 * 1024 * 1024,
        max_restarts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        stable_after: float = 30.0,
        close_timeout: float = 5.0,
        part_target: float | None = None,
        on_flv: OnFlvTag | None = None,
    ) -> None:
        self.ladder = ladder
        self.on_flv = on_flv
        self.fragment = fragment_for(part_target) if part_target else None
        self.ffmpeg = ffmpeg
        self.name = name
        self.group = group
        self.origin = origin
        self.on_output = on_output
        self.on_plan = on_plan
        self.on_restart = on_restart
        self.max_lag_ms = int(max_lag * 1000)
        self.max_queue_bytes = max_queue_bytes
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.close_timeout = close_timeout
        self.source: SourceInfo | None = None
        self.plan: list[OutputTrack] = []  # the whole stream's tracks
        self.tracks: list[OutputTrack] = []  # this group's share of the plan
        self.plans = 0  # how many plans were made (one more after each change of input format)
        self.outcome: tuple[bool, str] | None = None
        self.stats = _Stats()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_LINES)
        self._metadata: dict[str, Any] | None = None
        self._video_seq: bytes | None = None
        self._audio_seq: bytes | None = None
        self._seen: dict[int, int] = {}  # tag type -> FLV codec id of the first tag
        self._first_ts: int | None = None
        self._queue: deque[_Tag | _Barrier] = deque()
        self._prefix_seq: tuple[bytes | None, bytes | None] = (None, None)  # for the next process
        self._queued_bytes = 0
        self._need_keyframe = False
        self._wakeup = asyncio.Event()
        self._decided = asyncio.Event()
        self._closing = False
        self._done = False
        self._process: asyncio.subprocess.Process | None = None
        self._splitter: FlvSplitter | None = None
        self._pending_restart: Discontinuity | None = None
        self._reconfigure: str | None = None  # why the running process must make way
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    # Input (synchronous; from the ingest sink).

    @property
    def pid(self) -> int | None:
        """The running ffmpeg's process id, if one is running."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    async def close(self) -> None:
        """End the stream: EOF to ffmpeg, wait for its last fragments, kill it after a timeout."""
        self._closing = True
        self._wakeup.set()
        if not self._decided.is_set():
            ready = (self._ready(flv.VIDEO), self._ready(flv.AUDIO))
            if any(ready):
                self._decide(*ready)
            self._decided.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)

    def _accept(self, tag: _Tag) -> None:
        if self._closing or self._done:
            return
        self.stats.bytes_in += len(tag.body)
        if tag.tag_type == flv.SCRIPT:
            self._note_metadata(tag)
        elif tag.tag_type in (flv.VIDEO, flv.AUDIO) and tag.body:
            if self._note_media(tag):
                return
        else:
            return
        if not self._decided.is_set():
            self._enqueue(tag)
            self._maybe_decide(tag)
        elif self._wanted(tag):
            self._enqueue(tag)

    def _note_metadata(self, tag: _Tag) -> None:
        with contextlib.suppress(Exception):
            values = amf0.decode(tag.body)
            for value in values:
                if isinstance(value, Mapping):
                    self._metadata = dict(value)

    def _note_media(self, tag: _Tag) -> bool:
        """Records codecs and sequence headers; True if the tag changes the input format."""
        codec = tag.body[0] & 0x0F if tag.tag_type == flv.VIDEO else tag.body[0] >> 4
        self._seen.setdefault(tag.tag_type, codec)
        if self._first_ts is None:
            self._first_ts = tag.timestamp
        if not tag.is_sequence_header:
            return False
        video = tag.tag_type == flv.VIDEO
        old = self._video_seq if video else self._audio_seq
        if video:
            self._video_seq = tag.body
        else:
            self._audio_seq = tag.body
        if old is None or old == tag.body or not self._decided.is_set():
            return False
        self._input_changed(
            f"{'video' if video else 'audio'} sequence header changed", tag.timestamp
        )
        return True

    def _input_changed(self, why: str, timestamp: int) -> None:
        """New codec parameters (say a new resolution): a stream copy cannot follow and the
        ladder may differ, so the running ffmpeg gets EOF after the tags queued so far, and a
        new one starts at the next keyframe with the new sequence headers and plan."""
        log.info("transcode %s: %s; ffmpeg will restart with the new parameters", self.name, why)
        self._queue.append(_Barrier(timestamp, why, self._video_seq, self._audio_seq))
        self._need_keyframe = True
        self._wakeup.set()

    def _wanted(self, tag: _Tag) -> bool:
        """After the decision: only declared tracks, and nothing until a keyframe when needed."""
        source = self.source
        if source is None:
            return False
        if not self.tracks:
            return True  # drained by _idle, which looks for a change of input format
        if tag.tag_type == flv.VIDEO and not source.has_video:
            return False
        if tag.tag_type == flv.AUDIO and not source.has_audio:
            return False
        if self._need_keyframe and source.has_video:
            if not tag.is_video_keyframe:
                self.stats.dropped_tags += 1
                return False
            self._need_keyframe = False
        return True

    def _enqueue(self, tag: _Tag) -> None:
        if self._queue and self._over_limit(tag):
            self._drop_queue("ffmpeg is falling behind")
            if not self._wanted(tag):
                return
        self._queue.append(tag)
        self._queued_bytes += len(tag.body)
        self._wakeup.set()

    def _over_limit(self, tag: _Tag) -> bool:
        lag = tag.timestamp - self._queue[0].timestamp
        return lag > self.max_lag_ms or self._queued_bytes + len(tag.body) > self.max_queue_bytes

    def _drop_queue(self, why: str) -> None:
        barriers = [item for item in self._queue if isinstance(item, _Barrier)]
        self.stats.drops += 1
        self.stats.dropped_tags += len(self._queue)
        log.warning(
            "transcode %s: %s; dropped %d queued tags (%d bytes), skipping to the next keyframe",
            self.name,
            why,
            len(self._queue),
            self._queued_bytes,
        )
        self._queue.clear()
        self._queued_bytes = 0
        self._need_keyframe = True
        if barriers:  # the format change still has to happen
            self._queue.append(barriers[-1])

    # Deciding what the stream carries.

    def _maybe_decide(self, tag: _Tag) -> None:
        declared = self._declared()
        wants = declared if declared is not None else (True, True)
        ready = (self._ready(flv.VIDEO), self._ready(flv.AUDIO))
        all_ready = all(ready[i] for i in range(2) if wants[i]) and any(ready)
        window = tag.timestamp - (self._first_ts or 0) >= self.decide_window * 1000
        if all_ready or window:
            self._decide(ready[0], ready[1])

    def _declared(self) -> tuple[bool, bool] | None:
        metadata = self._metadata or {}
        video = "videocodecid" in metadata
        audio = "audiocodecid" in metadata
        return (video, audio) if video or audio else None

    def _ready(self, tag_type: int) -> bool:
        codec = self._seen.get(tag_type)
        if codec is None:
            return False
        has_seq_header = codec == (_AVC if tag_type == flv.VIDEO else _AAC)
        sequence = self._video_seq if tag_type == flv.VIDEO else self._audio_seq
        return sequence is not None or not has_seq_header

    def _decide(self, video: bool, audio: bool) -> None:
        self.source = self._source_info(video, audio)
        self._set_plan(plan_outputs(self.ladder, self.source))
        self._prefix_seq = (self._video_seq, self._audio_seq)
        self._trim_queue()
        self._decided.set()
        self._announce_plan()

    def _set_plan(self, plan: list[OutputTrack]) -> None:
        self.plan = plan
        self.tracks = [track for track in plan if group_of(track) == self.group]
        self.plans += 1

    def _announce_plan(self) -> None:
        self._log_plan()
        self.on_plan(list(self.tracks))

    def _log_plan(self) -> None:
        outputs = ", ".join(
            f"{t.name}({'copy' if t.copy else t.height or t.bitrate})" for t in self.tracks
        )
        log.info(
            "transcode %s (%s): input %s; outputs %s",
            self.name,
            self.group,
            self.source,
            outputs or "none",
        )

    def _source_info(self, video: bool, audio: bool) -> SourceInfo:
        metadata = self._metadata or {}
        video_seq = self._prefix_seq[0] if self._decided.is_set() else self._video_seq
        coded = avc_dimensions(video_seq) if video and video_seq else None
        width, height = coded or (_number(metadata.get("width")), _number(metadata.get("height")))
        fps = metadata.get("framerate") or metadata.get("videoframerate")
        return SourceInfo(
            has_video=video,
            has_audio=audio,
            width=int(width) if width else None,
            height=int(height) if height else None,
            fps=float(fps) if isinstance(fps, int | float) and fps > 0 else None,
            video_codec=self._seen.get(flv.VIDEO) if video else None,
            audio_codec=self._seen.get(flv.AUDIO) if audio else None,
            video_bitrate=_kbps(metadata.get("videodatarate")),
            audio_bitrate=_kbps(metadata.get("audiodatarate")),
        )

    def _trim_queue(self) -> None:
        """Keep the declared tracks' media tags, starting at the first video keyframe."""
        tags = [t for t in self._queue if t.tag_type != flv.SCRIPT and not t.is_sequence_header]
        self._queue.clear()
        self._queued_bytes = 0
        self._need_keyframe = True
        for tag in tags:
            if self._wanted(tag):
                self._queue.append(tag)
                self._queued_bytes += len(tag.body)

    # Running ffmpeg.

    async def _supervise(self) -> None:
        ok, reason = True, "closed"
        try:
            ok, reason = await self._run()
        except Exception as exc:  # a bug must end this stream's job, not the server
            log.exception("transcode %s: internal error", self.name)
            ok, reason = False, f"internal error: {exc!r}"
        finally:
            self._done = True
            self._queue.clear()
            await self._kill()
            self.outcome = (ok, reason)

    async def _run(self) -> tuple[bool, str]:
        await self._decided.wait()
        if not self.plan:
            return (self._closing, "no audio or video in the stream")
        failures = 0
        while True:
            if self._reconfigure is not None:
                self._replan()
            started = time.monotonic()
            reason = await self._run_process() if self.tracks else await self._idle()
            if self._reconfigure is not None and (self._queue or not self._closing):
                self._pending_restart = Discontinuity(0, self._reconfigure)
                continue  # the input format changed: on with a new process and plan
            if self._closing:
                return True, "closed"
            if time.monotonic() - started >= self.stable_after:
                failures = 0
            failures += 1
            self._log_failure(reason)
            if failures > self.max_restarts:
                return False, f"ffmpeg failed {failures} times in a row, last: {reason}"
            await self._restart_pause(failures)
            if self._closing:
                return True, "closed"
            self._restart(failures, reason)

    async def _idle(self) -> str:
        """Nothing to make (say no rung below the source's height): take the input as a pump
        would, without a process, until the end or a change of input format."""
        while not self._closing:
            while self._queue:
                item = self._queue.popleft()
                self._queued_bytes -= len(item.body)
                if isinstance(item, _Barrier):
                    self._prefix_seq = (item.video_seq, item.audio_seq)
                    self._reconfigure = item.reason
                    return "idle"
            self._wakeup.clear()
            await self._wakeup.wait()
        return "idle"

    async def _restart_pause(self, failures: int) -> None:
        delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                while not self._closing:
                    self._wakeup.clear()
                    await self._wakeup.wait()

    def _replan(self) -> None:
        source = self.source
        assert source is not None
        self._reconfigure = None
        self.source = self._source_info(source.has_video, source.has_audio)
        self._set_plan(plan_outputs(self.ladder, self.source))
        self._announce_plan()

    def _restart(self, attempt: int, reason: str) -> None:
        self.stats.restarts += 1
        barriers = [item for item in self._queue if isinstance(item, _Barrier)]
        if barriers:  # a format change was queued: plan again for the new format
            self._reconfigure = barriers[-1].reason
        self._prefix_seq = (self._video_seq, self._audio_seq)
        self._queue.clear()
        self._queued_bytes = 0
        self._need_keyframe = True
        self._pending_restart = Discontinuity(attempt, reason)

    def _log_failure(self, reason: str) -> None:
        tail = "\n".join(self.stderr_tail) or "(no output)"
        log.warning("transcode %s: ffmpeg %s; its last stderr lines:\n%s", self.name, reason, tail)

    async def _run_process(self) -> str:
        offset = await self._timeline_offset()
        if offset is None:
            return "stopped before its first input"
        teed = self.on_flv is not None and rtc_track(self.tracks) is not None
        pipes = [os.pipe() for _ in range(len(self.tracks) + teed)]
        writes = [w for _, w in pipes]
        command = ffmpeg_command(
            self.ffmpeg,
            self.tracks,
            writes[: len(self.tracks)],
            self.fragment,
            offset,
            flv_fd=writes[-1] if teed else None,
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=[w for _, w in pipes],
                start_new_session=True,
            )
        except OSError as exc:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            return f"could not start: {exc}"
        finally:
            for _, w in pipes:
                with contextlib.suppress(OSError):
                    os.close(w)
        self._process = process
        self.stats.processes += 1
        self.stderr_tail.clear()
        return await self._attend(process, [r for r, _ in pipes])

    async def _timeline_offset(self) -> float | None:
        """Where the next process's output time starts (seconds): 0 for the stream's first
        process, else the stream time of its first input tag, so every process of the stream
        (copy or encode, first or restarted) writes on one timeline. Waits for that tag; None
        if the process is to stop before it comes."""
        while not self._queue:
            if self._stopping:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._queue[0].timestamp
        if self.origin.timestamp is None:
            self.origin.timestamp = first
        return max(0, first - self.origin.timestamp) / 1000

    async def _attend(self, process: asyncio.subprocess.Process, read_fds: list[int]) -> str:
        readers = await self._open_readers(read_fds)
        tasks = [
            asyncio.create_task(self._pump(process)),
            asyncio.create_task(self._read_stderr(process)),
        ]
        try:
            code = await self._wait_exit(process)
            await asyncio.gather(*(reader.closed for reader in readers))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for reader in readers:
                reader.close()
            if process.returncode is None:  # cancelled: never leave ffmpeg behind
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            self._process = None
        return f"exited with status {code}"

    async def _wait_exit(self, process: asyncio.subprocess.Process) -> int:
        waiter = asyncio.create_task(process.wait())
        try:
            while not waiter.done():
                stopping = asyncio.create_task(self._until_stopping())
                await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not waiter.done() and self._stopping:
                    await self._finish(process, waiter)
            return waiter.result()
        finally:
            waiter.cancel()

    @property
    def _stopping(self) -> bool:
        """The running process should end: the job is closing, or the input changed."""
        return self._closing or self._reconfigure is not None

    async def _until_stopping(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _finish(self, process: asyncio.subprocess.Process, waiter: asyncio.Task) -> None:
        """Stopping: the pump ends stdin (after the queue if closing); give ffmpeg time to
        flush, then kill it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.close_timeout):
                await asyncio.shield(waiter)
                return
        log.warning("transcode %s: ffmpeg did not exit in time; killing it", self.name)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await waiter

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        """Writes the FLV prefix, then queued tags, to ffmpeg's stdin; EOF when closing."""
        stdin = process.stdin
        assert stdin is not None
        source = self.source
        assert source is not None
        metadata = self._metadata
        video_seq, audio_seq = self._prefix_seq
        prefix = flv_prefix(
            metadata, video_seq, audio_seq, audio=source.has_audio, video=source.has_video
        )
        try:
            stdin.write(prefix)
            while True:
                while not self._queue:
                    if self._closing:
                        stdin.write_eof()
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                tag = self._queue.popleft()
                if isinstance(tag, _Barrier):
                    self._prefix_seq = (tag.video_seq, tag.audio_seq)
                    self._reconfigure = tag.reason
                    self._wakeup.set()
                    stdin.write_eof()
                    return
                self._queued_bytes -= len(tag.body)
                if tag.is_sequence_header:
                    continue  # the same as in the prefix (a changed one is a barrier)
                self._announce_restart(tag)
                stdin.write(flv.tag(tag.tag_type, tag.timestamp, tag.body))
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return  # ffmpeg is gone; _attend sees the exit

    def _announce_restart(self, first: _Tag) -> None:
        """Tells the packager about a restart just before the new process gets its first tag
        (ffmpeg writes nothing before that), so the notice precedes the new init segments."""
        restart, self._pending_restart = self._pending_restart, None
        if restart is not None and self.on_restart is not None:
            names = tuple(track.name for track in self.tracks)
            self.on_restart(replace(restart, input_timestamp=first.timestamp, renditions=names))

    async def _read_stderr(self, process: asyncio.subprocess.Process) -> None:
        stderr = process.stderr
        assert stderr is not None
        partial = b""
        while chunk := await stderr.read(4096):
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()[-_STDERR_LINE_MAX:]
            for line in lines:
                text = line[:_STDERR_LINE_MAX].decode(errors="replace").rstrip()
                if text:
                    self.stderr_tail.append(text)
                    log.debug("transcode %s ffmpeg: %s", self.name, text)
        if partial:
            self.stderr_tail.append(partial.decode(errors="replace"))

    async def _open_readers(self, read_fds: list[int]) -> list[_OutputReader]:
        """One reader per output pipe; data goes to on_output as soon as it arrives."""
        loop = asyncio.get_running_loop()
        pipes = [os.fdopen(fd, "rb", buffering=0) for fd in read_fds]
        readers: list[_OutputReader] = []
        kinds: list[type[_OutputReader]] = [_OutputReader] * len(self.tracks)
        if len(pipes) > len(self.tracks):  # the FLV copy of the rtc_track, last
            kinds.append(_FlvTagReader)
        tracks = [*self.tracks, rtc_track(self.tracks)]
        try:
            for kind, track, pipe in zip(kinds, tracks, pipes, strict=False):
                reader = kind(self, track, loop.create_future())
                await loop.connect_read_pipe(lambda reader=reader: reader, pipe)
                readers.append(reader)
        except BaseException:
            for reader in readers:
                reader.close()
            for pipe in pipes[len(readers) :]:
                pipe.close()
            raise
        return readers

    def _deliver_flv(self, tags: list[tuple[int, int, bytes]]) -> None:
        for tag_type, timestamp, body in tags:
            try:
                self.on_flv(tag_type, timestamp, body)
            except Exception:
                log.exception("transcode %s: on_flv failed", self.name)

    def _deliver(self, track: OutputTrack, data: bytes) -> None:
        self.stats.bytes_out[track.name] = self.stats.bytes_out.get(track.name, 0) + len(data)
        try:
            self.on_output(track.name, track.kind, data)
        except Exception:
            log.exception("transcode %s: on_output(%s) failed", self.name, track.name)

    async def _kill(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(Exception):
            await process.wait()


class TranscodeJob:
    """Transcodes one live stream with two supervised ffmpeg processes: one copies (the source
    video and the audio), one encodes the lower rungs; each is restarted if it dies.

    Both get every input tag through their own bounded queue, so an encoder that falls behind
    holds up neither the copies nor the ingest: its queue is dropped (to the next keyframe) when
    it lags by ``max_lag``, and if it dies only its renditions restart.

    Feed it from the ingest with :meth:`write_metadata`, :meth:`write_video`,
    :meth:`write_audio` (FLV tag bodies) or :meth:`write_media` (ingest tags), or an FLV byte
    stream with :meth:`feed`; all are synchronous and never block. Must be used inside a running
    event loop. Callbacks (all synchronous, called on the loop):

    - ``on_output(track_name, kind, data)``: fragmented MP4 bytes of one track, in order
    - ``on_plan(tracks)``: when the job has decided what to produce (again after a change of
      input format, e.g. a new resolution); all the stream's tracks, in ladder order
    - ``on_restart(Discontinuity)``: before a new process's output begins (``attempt`` >= 1
      after ffmpeg died, 0 after a change of input format); ``renditions`` are the ones that
      restart, the others go on
    - ``on_exit(ok, reason)``: once, when the job is over (closed, or a process gave up)
    - ``on_flv(tag_type, timestamp, body)``: if given, the FLV tags of the :func:`rtc_track`
      (the top encoded rung, for WebRTC), one per frame as the encoder makes it; each encoding
      process's tags begin with the AVC sequence header, timestamps on the stream's timeline

    ``part_target`` (the LL-HLS part target, seconds) sets the fragment duration: one fragment
    per part (:func:`fragment_for`); without it, :data:`FMP4_FLAGS`. The other options
    (``max_lag``, ``max_restarts``, ...) apply to each process.
    """

    def __init__(
        self,
        ladder: Iterable[Rendition] = DEFAULT_LADDER,
        *,
        ffmpeg: str | None = None,
        on_output: OnOutput,
        on_plan: Callable[[list[OutputTrack]], None] | None = None,
        on_restart: Callable[[Discontinuity], None] | None = None,
        on_exit: Callable[[bool, str], None] | None = None,
        on_flv: OnFlvTag | None = None,
        name: str = "stream",
        **options: Any,
    ) -> None:
        self.ladder = list(ladder)
        if not self.ladder:
            raise ValueError("the ladder is empty")
        ffmpeg = resolve_ffmpeg(ffmpeg)
        self.name = name
        self.on_plan = on_plan
        self.on_exit = on_exit
        self.tracks: list[OutputTrack] = []
        self._plans = 0
        self._splitter: FlvSplitter | None = None
        origin = _Origin()
        self.groups = {
            group: _ProcessJob(
                self.ladder,
                ffmpeg=ffmpeg,
                on_output=on_output,
                on_plan=lambda _tracks, group=group: self._planned(group),
                on_restart=on_restart,
                name=name,
                group=group,
                origin=origin,
                on_flv=on_flv if group == ENCODE else None,
                **options,
            )
            for group in GROUPS
        }
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    @property
    def pid(self) -> int | None:
        """The copying ffmpeg's process id (it makes the source rendition), if it runs."""
        return self.groups[COPY].pid

    @property
    def pids(self) -> dict[str, int | None]:
        """Each group's running ffmpeg process id (None: not running, or nothing to make)."""
        return {group: job.pid for group, job in self.groups.items()}

    @property
    def source(self) -> SourceInfo | None:
        return self.groups[COPY].source

    @property
    def variants(self) -> list[Variant]:
        return variants(self.tracks)

    @property
    def stats(self) -> _Stats:
        """Both processes' counters added up (``bytes_in`` counts the input once)."""
        total = _Stats(bytes_in=self.groups[COPY].stats.bytes_in)
        for job in self.groups.values():
            total.processes += job.stats.processes
            total.restarts += job.stats.restarts
            total.dropped_tags += job.stats.dropped_tags
            total.drops += job.stats.drops
            total.bytes_out.update(job.stats.bytes_out)
        return total

    @property
    def stderr_tail(self) -> list[str]:
        """The last stderr lines of each process (the copying one first)."""
        return [line for job in self.groups.values() for line in job.stderr_tail]

    # Input (synchronous; from the ingest sink): every tag to every process's queue.

    def feed(self, data: bytes) -> None:
        """An FLV byte stream (header first), in chunks of any size; FlvError if it is not."""
        if self._splitter is None:
            self._splitter = FlvSplitter()
        for tag_type, timestamp, body in self._splitter.feed(data):
            self._accept(_Tag(tag_type, timestamp, body))

    def write_metadata(self, metadata: Mapping[str, Any]) -> None:
        self._accept(_Tag(flv.SCRIPT, 0, amf0.encode("onMetaData", amf0.EcmaArray(metadata))))

    def write_video(self, timestamp: int, body: bytes) -> None:
        self._accept(_Tag(flv.VIDEO, timestamp, body))

    def write_audio(self, timestamp: int, body: bytes) -> None:
        self._accept(_Tag(flv.AUDIO, timestamp, body))

    def write_media(self, tag: Any) -> None:
        """A :class:`VideoTag` or :class:`AudioTag` from the RTMP session."""
        kind = flv.VIDEO if hasattr(tag, "codec_id") else flv.AUDIO
        self._accept(_Tag(kind, tag.timestamp, tag.data))

    def _accept(self, tag: _Tag) -> None:
        for job in self.groups.values():
            job._accept(tag)

    # The two processes as one job.

    def _planned(self, group: str) -> None:
        """The first group to make a new plan announces the whole stream's tracks."""
        planner = self.groups[group]
        if planner.plans > self._plans:
            self._plans = planner.plans
            self.tracks = list(planner.plan)
            if self.on_plan is not None:
                self.on_plan(list(self.tracks))

    async def close(self) -> None:
        """End the stream: EOF to both processes, wait for their last fragments (each is
        killed after a timeout)."""
        await asyncio.gather(*(job.close() for job in self.groups.values()))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)

    async def wait(self) -> None:
        """Until the job is over (closed, or a process gave up)."""
        await asyncio.shield(self._task)

    async def _supervise(self) -> None:
        """One process giving up ends the other too: a stream without its source (or without
        its ladder) is not what the application asked for."""
        pending = {job._task for job in self.groups.values()}
        try:
            while pending:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if pending and any(not ok for ok, _ in self._outcomes()):
                    await asyncio.gather(*(job.close() for job in self.groups.values()))
        finally:
            failed = [reason for ok, reason in self._outcomes() if not ok]
            if self.on_exit is not None:
                self.on_exit(not failed, failed[0] if failed else "closed")

    def _outcomes(self) -> list[tuple[bool, str]]:
        return [job.outcome for job in self.groups.values() if job.outcome is not None]


class _OutputReader(asyncio.Protocol):
    """Reads one output pipe and hands every chunk straight to the job (no extra buffering)."""

    def __init__(self, job: _ProcessJob, track: OutputTrack, closed: asyncio.Future) -> None:
        self.job = job
        self.track = track
        self.closed = closed
        self.transport: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.job._deliver(self.track, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _FlvTagReader(_OutputReader):
    """Reads the FLV copy of the rtc_track: each complete tag goes to ``on_flv`` as it comes
    (ffmpeg flushes one tag per frame)."""

    def __init__(self, job: _ProcessJob, track: OutputTrack, closed: asyncio.Future) -> None:
        super().__init__(job, track, closed)
        self.splitter = FlvSplitter()

    def data_received(self, data: bytes) -> None:
        try:
            tags = self.splitter.feed(data)
        except flv.FlvError as exc:
            log.error("transcode %s: the FLV output is not FLV (%s)", self.job.name, exc)
            self.close()
            return
        self.job._deliver_flv(tags)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _kbps(value: Any) -> int | None:
    number = _number(value)
    return int(number * 1000) if number and math.isfinite(number) else None
