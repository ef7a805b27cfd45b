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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from verge.stream.analysis.runner import RESULT

log = logging.getLogger("verge.stream.analysis")

RUN_RE = re.compile(r"[0-9a-f]{6,16}")
FILE_RE = re.compile(r"(?:[ct]\d{1,9}\.jpg|chapters\.vtt|analysis\.json)")
PARTIAL = ".partial-"
ANALYSIS_DIR = "analysis"
DETAIL_PREFERRED_HEIGHT = 360  # analyse the smallest rendition at least this tall
MAX_BACKLOG = 16 << 20  # bytes a live analysis may lag behind before it is stopped
CLOSE_WAIT = 10.0  # seconds an ended live analysis gets to write its final result
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


class LiveAnalyzer:
    """The analysis of one live stream (``APP/NAME``), fed the transcoder's output.

    :meth:`plan` names the renditions to watch (the transcoder's tracks); :meth:`write` takes
    every output chunk and forwards those of the watched renditions; :meth:`restart` (the
    transcoder restarted: a new init, a new timeline) ends the run, and the next bytes start a
    new one. All three are synchronous and never block.
    """

    def __init__(
        self,
        ffmpeg: str,
        root: Path,
        base_url: str,
        *,
        detector: str = "auto",
        interval: float | None = None,
    ) -> None:
        self.ffmpeg = ffmpeg
        self.root = root
        self.base_url = base_url
        self.detector = detector
        self.interval = interval
        self.video: str | None = None
        self.audio: str | None = None
        self.run: _LiveRun | None = None
        self.stopped = False
        self._closing: set[asyncio.Task] = set()
        shutil.rmtree(root, ignore_errors=True)  # an earlier stream of this name

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
            self.run = _LiveRun(self)
        if not self.run.write(rendition, data):
            log.warning(
                "live analysis %s fell %d MB behind; stopped", self.base_url, MAX_BACKLOG >> 20
            )
            self.stopped = True
            self.restart()

    def restart(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            task = asyncio.get_running_loop().create_task(run.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def current(self) -> Path | None:
        """The directory of the newest run with a result."""
        return latest_run(self.root)

    async def close(self) -> None:
        """The stream ended: let the run finish its result (bounded), then stop."""
        self.restart()
        self.stopped = True
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _LiveRun:
    """One analysis process and its two input pipes (video, audio)."""

    def __init__(self, owner: LiveAnalyzer) -> None:
        self.owner = owner
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
