"""Test media: ffmpeg's fragmented MP4 output, made once per test run (what transcode.py makes)."""

from __future__ import annotations

import functools
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FRAG_FLAGS = ["-movflags", "+empty_moov+default_base_moof+frag_keyframe"]
VIDEO = [
    "-c:v",
    "libx264",
    "-preset",
    "ultrafast",
    "-g",
    "25",
    "-keyint_min",
    "25",
    "-sc_threshold",
    "0",
]
AUDIO = ["-c:a", "aac", "-ac", "2"]
SOURCES = [
    "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
]  # fmt: skip

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


def _run(args: list[str]) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, timeout=60)


@functools.cache
def _dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="verge-package-"))


@functools.cache
def separate(seconds: float = 6, frag_us: int = 180000) -> tuple[bytes, bytes]:
    """(video-only, audio-only) fMP4 streams from one ffmpeg, as the CMAF ladder would be."""
    out = _dir() / f"sep-{seconds}-{frag_us}"
    frag = [*FRAG_FLAGS, "-frag_duration", str(frag_us), "-f", "mp4"]
    _run(
        [*SOURCES, "-map", "0:v", "-t", str(seconds), *VIDEO, *frag, f"{out}-v.mp4"]
        + ["-map", "1:a", "-t", str(seconds), *AUDIO, *frag, f"{out}-a.mp4"]
    )
    return Path(f"{out}-v.mp4").read_bytes(), Path(f"{out}-a.mp4").read_bytes()


@functools.cache
def muxed(seconds: float = 3, separate_moof: bool = False) -> bytes:
    """Video and audio in one fMP4 stream."""
    out = _dir() / f"mux-{seconds}-{separate_moof}.mp4"
    flags = FRAG_FLAGS[1] + ("+separate_moof" if separate_moof else "")
    _run(
        [*SOURCES, "-t", str(seconds), *VIDEO, *AUDIO, "-movflags", flags]
        + ["-frag_duration", "180000", "-f", "mp4", str(out)]
    )
    return out.read_bytes()


def chunks(data: bytes, seed: int = 1, largest: int = 5000) -> list[bytes]:
    """``data`` in random-sized pieces, as a pipe delivers it."""
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        size = rng.randint(1, largest)
        out.append(data[pos : pos + size])
        pos += size
    return out
