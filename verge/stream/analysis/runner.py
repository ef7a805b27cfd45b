"""The analysis ffmpeg and the detector, run together in one (niced) analysis process.

One ffmpeg decodes the video once and fans it out (``-filter_complex``):

* scaled down to a thumbnail width -> ``scdet`` (cuts) -> ``blackdetect`` -> split into the
  cut frames (``c%d.jpg``, the scene thumbnails) and one frame per ``interval`` (``t%d.jpg``);
* keyframes only (``pict_type`` I), at most one per ``detect_every`` seconds, letterboxed to
  640x360 ``bgr24`` on stdout for the face/person detector;
* the audio through ``silencedetect``.

Every finding is a stderr line (see :mod:`.report`); ``showinfo`` names each written frame's
time. Cuts and black are frame-accurate because every frame is decoded (at the source's size;
the filters work on the small copy); the detector, the costly part, only sees keyframes.

This module runs inside the analysis process (``python -m verge.stream.analysis``), never in
the stream server: the model's Python work would otherwise hold the server's GIL. The process
lowers its own priority first (``os.nice``), and ffmpeg inherits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verge.files import write_atomic
from verge.stream.analysis.detect import UNAVAILABLE, Detector
from verge.stream.analysis.report import (
    Findings,
    chapters_vtt,
    detection_events,
    result,
    scenes,
)

RESULT, CHAPTERS = "analysis.json", "chapters.vtt"
DETECT_SIZE = (640, 360)
FRAME_BYTES = DETECT_SIZE[0] * DETECT_SIZE[1] * 3
SAVE_EVERY = 2.0  # seconds between rewrites of a live result

Progress = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class AnalysisOptions:
    """Thresholds and rates; the defaults suit talk, sport and film alike."""

    interval: float = 10.0  # a thumbnail at least this often (seconds)
    scene_threshold: float = 10.0  # scdet's threshold, 0..100
    black_min: float = 0.2  # seconds of black to report
    black_pixel: float = 0.10  # luma below this (0..1) is black
    silence_min: float = 0.5  # seconds of silence to report
    silence_noise: str = "-50dB"
    thumb_width: int = 256
    detect_every: float = 1.0  # the detector looks at one keyframe per this many seconds
    thumb_quality: int = 5  # JPEG qscale (2 best .. 31)


def filter_graph(options: AnalysisOptions, *, video: bool, audio: bool, detect: bool) -> str:
    """The -filter_complex of the analysis (inputs: 0 = video, last = audio)."""
    chains = []
    if video:
        source = "[0:v]split=2[full][keys];[full]" if detect else "[0:v]"
        chains.append(
            f"{source}scale={options.thumb_width}:-2,"
            f"scdet=threshold={options.scene_threshold},"
            f"blackdetect=d={options.black_min}:pix_th={options.black_pixel},split[s][p]"
        )
        chains.append("[s]metadata=mode=select:key=lavfi.scd.time,showinfo@cut[cut]")
        chains.append(
            f"[p]select='isnan(prev_selected_t)+gte(t-prev_selected_t\\,"
            f"{options.interval})',showinfo@tick[tick]"
        )
        if detect:
            width, height = DETECT_SIZE
            chains.append(
                f"[keys]select='eq(pict_type\\,I)*(isnan(prev_selected_t)+"
                f"gte(t-prev_selected_t\\,{options.detect_every}))',"
                f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
                f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2,showinfo@key[det]"
            )
    if audio:
        index = 1 if video else 0
        chains.append(
            f"[{index}:a]silencedetect=n={options.silence_noise}:d={options.silence_min}[aout]"
        )
    return ";".join(chains)


def analysis_command(
    ffmpeg: str,
    video: Sequence[str] | None,
    audio: Sequence[str] | None,
    out: Path,
    options: AnalysisOptions,
    *,
    detect: bool,
    live: bool = False,
) -> list[str]:
    """The ffmpeg command. ``video`` / ``audio`` are input arguments (``["-i", PATH]``; the
    same file may be both); ``live`` keeps the input's timestamps (the stream's timeline)."""
    command = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info"]
    if live:
        command.append("-copyts")
    for inputs in (video, audio):
        if inputs:
            command += inputs
    graph = filter_graph(options, video=bool(video), audio=bool(audio), detect=detect)
    command += ["-filter_complex", graph]
    if video:
        jpeg = ["-fps_mode", "passthrough", "-q:v", str(options.thumb_quality)]
        command += ["-map", "[cut]", *jpeg, str(out / "c%d.jpg")]
        command += ["-map", "[tick]", *jpeg, str(out / "t%d.jpg")]
        if detect:
            command += [
                "-map",
                "[det]",
                "-fps_mode",
                "passthrough",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "bgr24",
                "pipe:1",
            ]
    if audio:
        command += ["-map", "[aout]", "-f", "null", "-"]
    return command


class Analysis:
    """One analysis run: ffmpeg's findings, the detector's hits, the result on disk."""

    def __init__(
        self,
        out: Path,
        base_url: str,
        options: AnalysisOptions,
        detector: Detector | None,
        *,
        duration: float = 0.0,
        live: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.out = out
        self.base_url = base_url
        self.options = options
        self.detector = detector
        self.duration = duration
        self.live = live
        self.progress = progress
        self.findings = Findings()
        self.hits: list[tuple[float, str, float]] = []
        self.key_times: asyncio.Queue[float] = asyncio.Queue()
        self.cpu_detect = 0.0
        self.started = time.time()
        self._saved = 0.0

    async def run(self, command: Sequence[str]) -> dict[str, Any]:
        """Run ffmpeg to its end (a live input ends when the stream does); the final result."""
        detect = self.detector is not None and "pipe:1" in command
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=_passed_fds(command),
            stdout=asyncio.subprocess.PIPE if detect else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        tail: list[str] = []
        readers = [self._log(proc.stderr, tail)]
        if detect:
            readers.append(self._frames(proc.stdout))
        try:
            await asyncio.gather(*readers)
            code = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if code != 0 and not self.live:
            raise RuntimeError(f"analysis ffmpeg failed (exit {code}): {' / '.join(tail[-4:])}")
        return self.save(final=True)

    async def _log(self, stream: asyncio.StreamReader, tail: list[str]) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.findings.feed(line)
            if line.startswith("[showinfo@key"):
                key = _key_time(line)
                if key is not None:
                    self.key_times.put_nowait(key)
            elif "rror" in line:
                tail[:] = [*tail[-7:], line[:300]]
            self._tick()

    async def _frames(self, stream: asyncio.StreamReader) -> None:
        import numpy

        while True:
            try:
                data = await stream.readexactly(FRAME_BYTES)
            except asyncio.IncompleteReadError:
                return
            moment = await self.key_times.get()
            frame = numpy.frombuffer(data, numpy.uint8).reshape(DETECT_SIZE[1], DETECT_SIZE[0], 3)
            started = time.process_time()
            hits = self.detector.detect(frame)
            self.cpu_detect += time.process_time() - started
            self.hits += [(moment, kind, score) for kind, score in hits]
            self._tick()

    def _tick(self) -> None:
        if self.progress is not None and self.duration:
            self.progress(min(1.0, self.findings.last_time / self.duration))
        if self.live and time.monotonic() - self._saved >= SAVE_EVERY:
            self.save(final=False)

    def save(self, *, final: bool) -> dict[str, Any]:
        """Write the result and the chapters (atomically: readers never see half a file)."""
        self._saved = time.monotonic()
        duration = self.duration if not self.live else self.findings.last_time
        if final:
            self.findings.finish(duration or self.findings.last_time)
        duration = max(duration, self.findings.last_time)
        detections = detection_events(self.hits, self.options.detect_every)
        data = result(
            self.findings,
            duration=duration,
            base_url=self.base_url,
            detector=self.detector.name if self.detector else UNAVAILABLE,
            interval=self.options.interval,
            detections=detections,
            extra={
                "state": "done" if final else "running",
                "live": self.live,
                "started": round(self.started, 3),
                "updated": round(time.time(), 3),
                "cpu_detect_seconds": round(self.cpu_detect, 3),
            },
        )
        vtt = chapters_vtt(scenes(self.findings), duration)
        write_atomic(self.out / CHAPTERS, vtt.encode(), mode=0o644, durable=False)
        write_atomic(self.out / RESULT, json.dumps(data).encode(), mode=0o644, durable=final)
        return data


def _key_time(line: str) -> float | None:
    at = line.find("pts_time:")
    if at < 0:
        return None
    try:
        return float(line[at + 9 :].split()[0])
    except (ValueError, IndexError):
        return None


def _passed_fds(command: Sequence[str]) -> tuple[int, ...]:
    """Inputs named ``pipe:N`` (N > 2): descriptors the analysis process got to hand on."""
    fds = []
    for arg in command:
        if arg.startswith("pipe:") and arg[5:].isdigit() and int(arg[5:]) > 2:
            fds.append(int(arg[5:]))
    return tuple(fds)
