"""Starting analysis processes from the stream server and the CLI, and where results live.

The server never analyses in its own process: :func:`run_analysis` (a file or a VOD entry,
to the end) and :class:`LiveAnalyzer` (a live stream, fed as it is transcoded) start
``python -m verge.stream.analysis``, which nices itself and its ffmpeg. The live feed is
the transcoder's own fragmented-MP4 bytes of one video rendition and the audio, written to
pipes without ever blocking: if the analysis falls too far behind it is stopped, never waited
for, so packaging is not delayed.

Layout: every run writes a directory named by its run id (``RUN``, hex milliseconds), so its
thumbnails can be cached as immutable::

    VOD   DATA_DIR/vod/NAME/analysis/RUN/{analysis.json, chapters.vtt, c1.jpg, t1.jpg, ...}
    live  DATA_DIR/analysis/APP/NAME/RUN/...

and is served at ``/vod/NAME/analysis`` (the JSON), ``/vod/NAME/analysis/RUN/FILE``.

A live run's times are the stream's media time (the analysis ffmpeg keeps the input's
timestamps: ``-copyts``), which the packager maps to the wall clock for PROGRAM-DATE-TIME:
PDT = anchor + media time, the anchor fixed per discontinuity when the frame reached the
ingest. The served live result carries that anchor as ``started_at`` (the wall clock of its
time 0), so a player seeks to a scene by PROGRAM-DATE-TIME: :class:`RunAnchor` takes it from
the packager when the analyzer is given one (exact), else measures it. The analysis process
cannot know it; :meth:`LiveAnalyzer.current`, in the server, serves a copy of the result
with it (``RUN/served/analysis.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verge.files import write_atomic
from verge.stream.analysis.report import on_wall_clock
from verge.stream.analysis.runner import RESULT
from verge.stream.package.mp4 import Box, BoxReader, InitInfo, Mp4Error, parse_init, parse_moof

if TYPE_CHECKING:
    from verge.stream.package.cmaf import MediaSegment
    from verge.stream.package.live import LiveRendition, LiveStream

log = logging.getLogger("verge.stream.analysis")

RUN_RE = re.compile(r"[0-9a-f]{6,16}")
FILE_RE = re.compile(r"(?:[ct]\d{1,9}\.jpg|chapters\.vtt|analysis\.json)")
PARTIAL = ".partial-"
ANALYSIS_DIR = "analysis"
DETAIL_PREFERRED_HEIGHT = 360  # analyse the smallest rendition at least this tall
MAX_BACKLOG = 16 << 20  # bytes a live analysis may lag behind before it is stopped
CLOSE_WAIT = 10.0  # seconds an ended live analysis gets to write its final result
SERVED = "served"  # RUN/served/analysis.json: a live result with its started_at
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".vtt": "text/vtt; charset=utf-8",
    ".json": "application/json",
}

Progress = Callable[[float], None]


class AnalysisError(Exception):
    """The analysis could not run or failed (the message says why)."""


def new_run_id() -> str:
    return f"{int(time.time() * 1000):x}"


def latest_run(root: Path) -> Path | None:
    """The newest complete run directory under ``root`` (None: not analysed yet)."""
    try:
        runs = [p for p in root.iterdir() if RUN_RE.fullmatch(p.name) and (p / RESULT).is_file()]
    except OSError:
        return None
    return max(runs, key=lambda p: int(p.name, 16), default=None)


def analysis_file(root: Path, run: str, file: str) -> Path | None:
    """A file of a run, if the names are well-formed (no path tricks)."""
    if not RUN_RE.fullmatch(run) or not FILE_RE.fullmatch(file):
        return None
    return root / run / file


def content_type(file: str) -> str:
    return CONTENT_TYPES.get(Path(file).suffix, "application/octet-stream")


def _command(
    ffmpeg: str,
    out: Path,
    base_url: str,
    video: Sequence[str] | None,
    audio: Sequence[str] | None,
    *,
    duration: float = 0.0,
    live: bool = False,
    detector: str = "auto",
    interval: float | None = None,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "verge.stream.analysis",
        "--ffmpeg",
        ffmpeg,
        "--out",
        str(out),
        "--base-url",
        base_url,
        "--duration",
        str(duration),
        "--detector",
        detector,
    ]
    if video:
        command += ["--video", json.dumps(list(video))]
    if audio:
        command += ["--audio", json.dumps(list(audio))]
    if interval is not None:
        command += ["--interval", str(interval)]
    return [*command, "--live"] if live else command


async def run_analysis(
    ffmpeg: str,
    root: Path,
    base_url: str,
    video: Sequence[str] | None,
    audio: Sequence[str] | None,
    *,
    duration: float = 0.0,
    cwd: Path | None = None,
    progress: Progress | None = None,
    detector: str = "auto",
    interval: float | None = None,
) -> dict[str, Any]:
    """Analyse to the end in a niced process; the run lands in ``root/RUN`` (older runs are
    removed once it is complete). ``base_url`` is where ``root`` is served. The result."""
    run = new_run_id()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    command = _command(
        ffmpeg,
        staging.resolve(),
        f"{base_url}/{run}",
        video,
        audio,
        duration=duration,
        detector=detector,
        interval=interval,
    )
    try:
        await _run_process(command, cwd, progress)
        os.rename(staging, root / run)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, staging, True))
        raise
    for old in root.iterdir():
        if old.name != run and RUN_RE.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    return json.loads((root / run / RESULT).read_text(encoding="utf-8"))


async def _run_process(command: Sequence[str], cwd: Path | None, progress: Progress | None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    errors = asyncio.ensure_future(proc.stderr.read())
    try:
        async for line in proc.stdout:
            word, _, value = line.decode(errors="replace").partition(" ")
            if word == "progress" and progress is not None:
                with contextlib.suppress(ValueError):
                    progress(float(value))
        code = await proc.wait()
        detail = (await errors).decode(errors="replace").strip()
    except BaseException:
        _kill_group(proc)
        await proc.wait()
        errors.cancel()
        raise
    if code != 0:
        raise AnalysisError(f"analysis failed (exit {code}): {detail[-500:] or 'no message'}")
    if progress is not None:
        progress(1.0)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """The analysis process and its ffmpeg (it leads its own session: one signal for both)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- VOD entries ------------------------------------------------------------------------------


def entry_inputs(entry: Path, meta: Mapping[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """ffmpeg input arguments (relative to ``entry``) for an entry's analysis: the smallest
    video rendition at least 360 lines tall (else the tallest), and the audio rendition; each
    one CMAF track read as init + segments (the ``concat:`` protocol). An entry with more than
    one init (a discontinuity) is read from its progressive MP4 instead."""
    renditions = list(meta.get("renditions", []))
    videos = [r for r in renditions if r.get("kind") == "video"]
    audio = next((r for r in renditions if r.get("kind") == "audio"), None)
    tall = [r for r in videos if (r.get("height") or 0) >= DETAIL_PREFERRED_HEIGHT]
    if tall:
        video = min(tall, key=lambda r: r.get("height") or 0)
    else:
        video = max(videos, key=lambda r: r.get("height") or 0, default=None)
    video_args = _track_input(entry, video["name"]) if video else None
    audio_args = _track_input(entry, audio["name"]) if audio else None
    download = meta.get("download") or {}
    if (video and video_args is None) or (audio and audio_args is None):
        if not download.get("file"):
            raise AnalysisError("the entry has discontinuities and no progressive MP4")
        whole = ["-i", str(download["file"])]
        return (whole if video else None), (whole if audio else None)
    return video_args, audio_args


def _track_input(entry: Path, rendition: str) -> list[str] | None:
    directory = entry / rendition
    inits = sorted(directory.glob("init*.mp4"))
    if len(inits) != 1:
        return None
    segments = sorted(directory.glob("seg*.m4s"), key=lambda p: int(p.stem[3:] or 0))
    files = [inits[0], *segments]
    return ["-i", "concat:" + "|".join(f"{rendition}/{p.name}" for p in files)]


async def analyze_entry(
    ffmpeg: str,
    entry: Path,
    meta: Mapping[str, Any],
    *,
    progress: Progress | None = None,
    detector: str = "auto",
) -> dict[str, Any]:
    """(Re-)analyse VOD entry ``entry`` (its directory); served at /vod/NAME/analysis."""
    video, audio = entry_inputs(entry, meta)
    if video is None and audio is None:
        raise AnalysisError("the entry has neither video nor audio")
    return await run_analysis(
        ffmpeg,
        entry / ANALYSIS_DIR,
        f"/vod/{entry.name}/{ANALYSIS_DIR}",
        video,
        audio,
        duration=float(meta.get("duration") or 0.0),
        cwd=entry,
        progress=progress,
        detector=detector,
    )


# --- live streams -----------------------------------------------------------------------------


class FragmentEnds:
    """The media time (seconds) at which each fragment of a fragmented-MP4 byte stream ends,
    as its bytes come (any chunking). Timing is the primary track's: the video, else the first
    track. Unreadable bytes end the measuring (the packager reports them)."""

    def __init__(self) -> None:
        self._reader: BoxReader | None = BoxReader()
        self._init: InitInfo | None = None

    def feed(self, data: bytes) -> list[float]:
        if self._reader is None:
            return []
        try:
            return [
                end for box in self._reader.feed(data) if (end := self._on_box(box)) is not None
            ]
        except Mp4Error:
            self._reader = None
            return []

    def _on_box(self, box: Box) -> float | None:
        if box.type == "moov":
            self._init = parse_init(box.data)
            return None
        if box.type != "moof" or self._init is None or not self._init.tracks:
            return None
        track = next((t for t in self._init.tracks if t.is_video), self._init.tracks[0])
        traf = parse_moof(box.data, self._init).traf(track.track_id)
        if traf is None or not traf.sample_count or not track.timescale:
            return None
        return (traf.base_decode_time + traf.duration) / track.timescale


class RunAnchor:
    """``started_at`` of one live run: the wall clock (Unix seconds) of its time 0.

    A run's times are the stream's media time; PROGRAM-DATE-TIME maps that to the wall clock
    as ``anchor + media time`` per discontinuity (anchored when the frame reached the ingest).
    Two sources, the better first:

    * the packager (:meth:`from_segments`): PDT minus media start of the watched rendition's
      first segment made after the run began (so in the run's discontinuity). That is the
      playlists' own mapping: exact up to the millisecond PDT is written with.
    * measured (:meth:`measure`), when the analyzer has no packager: a fragment reaches the
      analyzer once the transcoder wrote it, so ``arrival - media end`` of each fragment is
      t=0 on the wall clock plus that fragment's delay (encoding, pipes); the least over the
      run is kept. Against the packager's anchor, on loopback: -30 to +5 ms on an idle machine
      (within a frame); 60 to 110 ms early on a loaded one (2 cores, load 10-14). The
      packager's anchor is one frame's arrival at the ingest (the first keyframe's), this is
      the least delay over the run: they differ by how late that frame came, which load makes
      worse.
    """

    def __init__(self, after_msn: int = -1) -> None:
        self.after_msn = after_msn  # the watched rendition's newest segment when the run began
        self.packaged: float | None = None
        self.measured: float | None = None
        self._fragments = FragmentEnds()

    @classmethod
    def starting(cls, rendition: LiveRendition | None) -> RunAnchor:
        """The anchor of a run that starts now, on the packager's ``rendition`` (if any)."""
        segments = rendition.segments if rendition is not None else ()
        return cls(segments[-1].msn if segments else -1)

    def from_segments(self, segments: Iterable[MediaSegment]) -> float | None:
        """Fix the anchor from the packager's segments of the watched rendition, once one of
        the run's is there."""
        if self.packaged is None:
            first = next((s for s in segments if s.msn > self.after_msn), None)
            if first is not None:
                self.packaged = first.pdt - first.start / first.timescale
        return self.packaged

    def measure(self, data: bytes, now: float) -> None:
        """Bytes of the watched rendition, arrived at ``now``."""
        for end in self._fragments.feed(data):
            if self.measured is None or now - end < self.measured:
                self.measured = now - end

    @property
    def started_at(self) -> float | None:
        return self.packaged if self.packaged is not None else self.measured


class LiveAnalyzer:
    """The analysis of one live stream (``APP/NAME``), fed the transcoder's output.

    :meth:`plan` names the renditions to watch (the transcoder's tracks); :meth:`write` takes
    every output chunk and forwards those of the watched renditions; :meth:`restart` (the
    transcoder restarted: a new init, a new timeline) ends the run, and the next bytes start a
    new one. All three are synchronous and never block.

    ``packager`` (the stream's :class:`~verge.stream.package.live.LiveStream`) gives each run
    the playlists' own wall-clock anchor; without it the anchor is measured (see
    :class:`RunAnchor`). ``anchors`` holds every run's, by run id.
    """

    def __init__(
        self,
        ffmpeg: str,
        root: Path,
        base_url: str,
        *,
        detector: str = "auto",
        interval: float | None = None,
        packager: LiveStream | None = None,
    ) -> None:
        self.ffmpeg = ffmpeg
        self.root = root
        self.base_url = base_url
        self.detector = detector
        self.interval = interval
        self.packager = packager
        self.video: str | None = None
        self.audio: str | None = None
        self.run: _LiveRun | None = None
        self.stopped = False
        self.anchors: dict[str, RunAnchor] = {}
        self._served: dict[str, tuple[int, int, float]] = {}  # run -> what its copy was made of
        self._closing: set[asyncio.Task] = set()
        shutil.rmtree(root, ignore_errors=True)  # an earlier stream of this name

    @property
    def timed(self) -> str | None:
        """The rendition whose media time the run's times are (its primary track's)."""
        return self.video or self.audio

    def plan(self, tracks: Sequence[Any]) -> None:
        """The transcoder's tracks (``name``, ``kind``, ``height``): pick what to watch."""
        videos = [t for t in tracks if t.kind == "video"]
        tall = [t for t in videos if (t.height or 0) >= DETAIL_PREFERRED_HEIGHT]
        pick = (
            min(tall, key=lambda t: t.height or 0)
            if tall
            else max(videos, key=lambda t: t.height or 0, default=None)
        )
        video = pick.name if pick else None
        audio = next((t.name for t in tracks if t.kind == "audio"), None)
        if (video, audio) != (self.video, self.audio):
            self.restart()
        self.video, self.audio = video, audio

    def write(self, rendition: str, data: bytes) -> None:
        if self.stopped or rendition not in (self.video, self.audio):
            return
        if self.run is None:
            self.run = self._start_run()
        if rendition == self.timed and self.packager is None:
            self.run.anchor.measure(data, time.time())
        if not self.run.write(rendition, data):
            log.warning(
                "live analysis %s fell %d MB behind; stopped", self.base_url, MAX_BACKLOG >> 20
            )
            self.stopped = True
            self.restart()

    def _start_run(self) -> _LiveRun:
        anchor = RunAnchor.starting(self._timed_rendition())
        run = _LiveRun(self, anchor)
        self.anchors[run.run_id] = anchor
        return run

    def _timed_rendition(self) -> LiveRendition | None:
        if self.packager is None or self.timed is None:
            return None
        return self.packager.renditions.get(self.timed)

    def restart(self) -> None:
        run = self.run
        if run is None:
            return
        self.started_at(run.run_id)  # fixed while the packager still has the run's segments
        self.run = None
        task = asyncio.get_running_loop().create_task(run.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def started_at(self, run_id: str) -> float | None:
        """The wall clock of a run's time 0, once known (see :class:`RunAnchor`)."""
        anchor = self.anchors.get(run_id)
        if anchor is None:
            return None
        rendition = self._timed_rendition()
        if self.run is not None and self.run.anchor is anchor and rendition is not None:
            anchor.from_segments(rendition.segments)
        return anchor.started_at

    def current(self) -> Path | None:
        """The directory of the newest run with a result: its served copy, with ``started_at``,
        once the run's anchor is known (else the analysis process's own)."""
        run = latest_run(self.root)
        started_at = self.started_at(run.name) if run is not None else None
        if run is None or started_at is None:
            return run
        try:
            return self._served_copy(run, started_at)
        except (OSError, ValueError) as exc:  # the result is being replaced, or unreadable
            log.debug("live analysis %s: result not served with its anchor: %r", run, exc)
            return run

    def _served_copy(self, run: Path, started_at: float) -> Path:
        """``RUN/served/analysis.json``: the run's result and ``started_at``, remade when either
        changed (the analysis process rewrites its result every few seconds)."""
        stat = (run / RESULT).stat()
        made_of = (stat.st_mtime_ns, stat.st_size, round(started_at, 3))
        served = run / SERVED
        if self._served.get(run.name) != made_of or not (served / RESULT).is_file():
            data = on_wall_clock(json.loads((run / RESULT).read_bytes()), started_at)
            served.mkdir(exist_ok=True)
            write_atomic(served / RESULT, json.dumps(data).encode(), mode=0o644, durable=False)
            self._served[run.name] = made_of
        return served

    async def close(self) -> None:
        """The stream ended: let the run finish its result (bounded), then stop."""
        self.restart()
        self.stopped = True
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _LiveRun:
    """One analysis process and its two input pipes (video, audio)."""

    def __init__(self, owner: LiveAnalyzer, anchor: RunAnchor) -> None:
        self.owner = owner
        self.anchor = anchor
        self.run_id = new_run_id()
        self.out = owner.root / self.run_id
        self.pipes: dict[str, _Pipe] = {}
        read_ends = []
        video_args = audio_args = None
        for rendition in filter(None, (owner.video, owner.audio)):
            read, write = os.pipe()
            read_ends.append(read)
            self.pipes[rendition] = _Pipe(write)
            args = ["-f", "mp4", "-i", f"pipe:{read}"]
            if rendition == owner.video:
                video_args = args
            else:
                audio_args = args
        command = _command(
            owner.ffmpeg,
            self.out.resolve(),
            f"{owner.base_url}/{self.run_id}",
            video_args,
            audio_args,
            live=True,
            detector=owner.detector,
            interval=owner.interval,
        )
        self.task = asyncio.get_running_loop().create_task(self._run(command, read_ends))

    async def _run(self, command: list[str], read_ends: list[int]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                pass_fds=read_ends,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            for fd in read_ends:
                os.close(fd)
        for pipe in self.pipes.values():
            await pipe.connect()
        self.proc = proc
        err = (await proc.stderr.read()).decode(errors="replace").strip()
        code = await proc.wait()
        if code != 0:
            log.warning("live analysis %s: exit %s: %s", self.out, code, err[-300:])

    def write(self, rendition: str, data: bytes) -> bool:
        pipe = self.pipes.get(rendition)
        return pipe is None or pipe.write(data)

    async def close(self) -> None:
        for pipe in self.pipes.values():
            pipe.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), CLOSE_WAIT)
        except TimeoutError:
            proc = getattr(self, "proc", None)
            if proc is not None:
                _kill_group(proc)
            await asyncio.gather(self.task, return_exceptions=True)
        except Exception as exc:  # a failed analysis never takes the stream down
            log.warning("live analysis %s failed: %r", self.out, exc)


class _Pipe:
    """The write end of a pipe: bytes are buffered until it is connected, and never block."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False

    async def connect(self) -> None:
        if self.closed:
            os.close(self.fd)
            return
        loop = asyncio.get_running_loop()
        file = os.fdopen(self.fd, "wb", buffering=0)
        self.transport, _ = await loop.connect_write_pipe(asyncio.Protocol, file)
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()
        if self.closed:
            self.transport.close()

    def write(self, data: bytes) -> bool:
        """False if the reader is too far behind (the data is dropped)."""
        if self.closed:
            return True
        transport = self.transport
        backlog = transport.get_write_buffer_size() if transport else self.pending_size
        if backlog > MAX_BACKLOG:
            return False
        if transport is None:
            self.pending.append(data)
            self.pending_size += len(data)
        elif not transport.is_closing():
            transport.write(data)
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
