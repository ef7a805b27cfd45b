"""`make bench-stream`: live streaming latency, viewer fan-out and CPU, Verge beside nginx-rtmp.

Why it is built this way: the claim to test is "lower latency than nginx-rtmp, with a CDN in
front", so both servers get the same input with the same pacing, are watched the way their
players watch them, and are measured by one rule, in one run, contenders alternating round by
round (medians over rounds). Servers are pinned to CPU 0, this script (publisher and viewers)
to CPU 1.

Input: ffmpeg encodes a lavfi test source once (testsrc2 1280x720 at 30 fps, x264 veryfast,
zerolatency: no B-frames, a keyframe every second, 2.5 Mb/s; AAC 128 kb/s) into an FLV file
(cached under /tmp). This script then publishes its tags over RTMP itself, each tag sent at
start + its FLV timestamp, so the send time of every video frame is known exactly (recorded
after the write; on loopback that is when it reaches the ingest).

1. Ingest → playlist latency, per listed unit:
   * Verge: ``verge stream`` (ladder ``source`` only: a passthrough) behind ``verge edge
     --workers 1``; one LL-HLS client follows ``/live/NAME/source/index.m3u8`` through the
     edge with blocking reloads (``_HLS_msn``/``_HLS_part`` of the next part, as hls.js does);
     the unit is the part (PART-TARGET 0.5 s).
   * nginx-rtmp (Debian libnginx-mod-rtmp): ``hls_fragment`` = Verge's segment target (2 s);
     its playlist, read straight from nginx (no edge: this favours nginx), is polled every
     50 ms, as it has no blocking reload; the unit is the segment.
   The rule, the same for both: the media start of a listed part/segment is the sum of the
   durations listed before it since media sequence 0 (EXTINF of complete segments, DURATION of
   the parts before it in its segment); it is mapped to the video frame with the nearest FLV
   timestamp (the FLV, and both servers' output, start at media time 0). Latency = when the
   playlist first listing it was received − when that frame (the unit's *first* frame) was
   sent. Units listed in the first playlist a client got, starting in the first 4 s of media,
   or ending less than 1 s before the last frame sent (closed by the end of the stream rather
   than by later media) are left out. Per round p50/p95; medians over
   rounds. "Estimated glass-to-glass" = p95 + the player's hold-back (Verge: the playlist's
   PART-HOLD-BACK; classic HLS: 3 target durations, as hls.js and Apple's HOLD-BACK do) — an
   upper estimate without capture, encode and decode time; the measured source is
   pre-encoded.
2. LL-HLS viewers on one edge: N simulated viewers (raw asyncio HTTP/1.1 keep-alive, one
   connection each) follow the live edge with blocking playlist reloads and fetch every new
   part. The edge reaches the stream server through a counting TCP proxy (a subprocess of
   this script), which counts upstream requests by target; after all viewers joined, a
   window of ``--viewer-seconds`` is counted: upstream requests per new part (part files,
   blocking playlists), the viewers' listing and part-fetched latency (rule of 1.), errors.
3. CPU per passthrough stream: N = 1 and 4 streams published at once, no viewers; the
   server's CPU seconds (utime + stime of its process tree, ffmpeg children included, from
   /proc) over a steady window, per stream-second. nginx-rtmp (remuxing to
   MPEG-TS) is measured the same way for comparison.

    .venv/bin/python bench/stream_bench.py [--rounds 3] [--duration 35] [--viewers 500]
        [--viewer-seconds 20] [--cpu-streams 1,4] [--cpu-seconds 20] [--only verge|nginx]
        [--skip latency,viewers,cpu] [--quick]

nginx, libnginx-mod-rtmp, ffmpeg and taskset are installed with apt-get when missing.
Results are printed and written to bench/results/stream.json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from servers import Server, ServerError, free_port, port_open, spawn, start_verge, wait_until
from tools import (
    BUSY_LOAD,
    ToolError,
    add_sbin_to_path,
    apt_install,
    missing_packages,
    tool_version,
)

from verge.stream import flv
from verge.stream.rtmp import amf0
from verge.stream.rtmp.chunk import ChunkReader, ChunkWriter, MessageType
from verge.stream.rtmp.handshake import PACKET_SIZE, client_c0c1, client_c2

BENCH_DIR = Path(__file__).resolve().parent
NGINX_RTMP_DIR = BENCH_DIR / "nginx-rtmp"
RESULTS_PATH = BENCH_DIR / "results" / "stream.json"
SOURCE_CACHE = Path(tempfile.gettempdir()) / "verge-stream-bench"
TOOLS = {"nginx": "nginx", "ffmpeg": "ffmpeg", "taskset": "util-linux"}
RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
VERGE_READY_RE = re.compile(
    r"verge stream ready: rtmp rtmp://[^:]+:(\d+)/\S+ http http://[^:]+:(\d+)"
)
READY_TIMEOUT_S = 30.0

PART_TARGET_S = 0.5
SEGMENT_TARGET_S = 2.0
FPS = 30
SOURCE_SECONDS_MIN = 75
WARMUP_MEDIA_S = 4.0  # units starting earlier are not measured (stream start-up)
TAIL_S = 4.0  # watching goes on this long after the publisher stopped
END_MARGIN_S = 1.0  # units ending closer than this to the last frame sent are not measured
POLL_S = 0.05  # nginx-rtmp playlist poll interval
REQUEST_TIMEOUT_S = 10.0
NEAREST_FRAME_MS = 40.0  # a listed media start must map to a frame this close
CLASSIC_HOLD_BACK_SEGMENTS = 3
LATENCY_TARGET_P95_S = 1.0
GLASS_TARGET_S = 2.0
CPU_WARMUP_S = 6.0
CPU_IDLE_S = 3.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CONTENDERS = {"verge": "Verge (LL-HLS part, via edge)", "nginx": "nginx-rtmp (HLS segment)"}

console = Console(width=None if sys.stdout.isatty() else 120)
clock = time.monotonic


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy numbers; the message says why."""


# --- playlists (pure) ----------------------------------------------------------------------------

_ATTR_RE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


@dataclass(frozen=True)
class PlaylistPart:
    index: int
    duration: float
    uri: str
    independent: bool = False


@dataclass
class PlaylistSegment:
    msn: int
    duration: float | None  # None: in progress (listed as parts only)
    uri: str | None
    parts: list[PlaylistPart] = field(default_factory=list)


@dataclass
class Playlist:
    media_sequence: int = 0
    target_duration: float = 0.0
    part_target: float | None = None
    part_hold_back: float | None = None
    hold_back: float | None = None
    segments: list[PlaylistSegment] = field(default_factory=list)
    preload_hint: str | None = None
    ended: bool = False

    def last_part(self) -> tuple[int, int] | None:
        """(msn, index) of the newest listed part."""
        for seg in reversed(self.segments):
            if seg.parts:
                return seg.msn, seg.parts[-1].index
        return None


def attributes(text: str) -> dict[str, str]:
    """An attribute list (``KEY=VALUE,KEY="quoted"``) as a dict, quotes removed."""
    return {key: value.strip('"') for key, value in _ATTR_RE.findall(text)}


def parse_playlist(text: str) -> Playlist:
    """A media playlist: classic HLS or LL-HLS (parts, server control, preload hint)."""
    playlist = Playlist()
    parts: list[PlaylistPart] = []
    extinf: float | None = None
    for raw in text.splitlines():
        line = raw.strip()
        tag, _, value = line.partition(":")
        if tag == "#EXT-X-MEDIA-SEQUENCE":
            playlist.media_sequence = int(value)
        elif tag == "#EXT-X-TARGETDURATION":
            playlist.target_duration = float(value)
        elif tag == "#EXT-X-PART-INF":
            playlist.part_target = float(attributes(value)["PART-TARGET"])
        elif tag == "#EXT-X-SERVER-CONTROL":
            attrs = attributes(value)
            playlist.part_hold_back = _float_or_none(attrs.get("PART-HOLD-BACK"))
            playlist.hold_back = _float_or_none(attrs.get("HOLD-BACK"))
        elif tag == "#EXT-X-PART":
            attrs = attributes(value)
            independent = attrs.get("INDEPENDENT") == "YES"
            parts.append(
                PlaylistPart(len(parts), float(attrs["DURATION"]), attrs["URI"], independent)
            )
        elif tag == "#EXTINF":
            extinf = float(value.split(",")[0])
        elif tag == "#EXT-X-PRELOAD-HINT":
            playlist.preload_hint = attributes(value).get("URI")
        elif tag == "#EXT-X-ENDLIST":
            playlist.ended = True
        elif line and not line.startswith("#"):
            msn = playlist.media_sequence + len(playlist.segments)
            playlist.segments.append(PlaylistSegment(msn, extinf, line, parts))
            parts, extinf = [], None
    if parts:
        msn = playlist.media_sequence + len(playlist.segments)
        playlist.segments.append(PlaylistSegment(msn, None, None, parts))
    return playlist


def _float_or_none(value: str | None) -> float | None:
    return None if value is None else float(value)


def next_blocking_target(playlist: Playlist) -> tuple[int, int]:
    """The (_HLS_msn, _HLS_part) of the part after the newest one, as an LL-HLS client asks."""
    last = playlist.last_part()
    if last is None:
        return playlist.media_sequence + len(playlist.segments), 0
    msn, index = last
    current = next(seg for seg in playlist.segments if seg.msn == msn)
    if current.duration is not None:  # that segment is complete: the next part opens the next
        return msn + 1, 0
    return msn, index + 1


# --- mapping listed units to media time (pure) -------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A part (index >= 0) or a whole segment (index -1) the first time a client saw it."""

    msn: int
    index: int
    uri: str
    media_start: float | None  # seconds since media time 0; None when it cannot be known
    duration: float
    listed_at: float


class MediaTimeline:
    """Media start of each segment, from the durations listed so far since media sequence 0.

    One instance can be shared by many clients of the same playlist: what one has seen fills
    in the starts for the others.
    """

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}
        self.durations: dict[int, float] = {}

    def learn(self, playlist: Playlist) -> None:
        for seg in playlist.segments:
            if seg.duration is not None:
                self.durations[seg.msn] = seg.duration
            if seg.msn in self.starts:
                continue
            if seg.msn == 0:
                self.starts[0] = 0.0
            elif seg.msn - 1 in self.starts and seg.msn - 1 in self.durations:
                self.starts[seg.msn] = self.starts[seg.msn - 1] + self.durations[seg.msn - 1]


class ListingTracker:
    """Which units of a playlist are new to one client, with their media start."""

    def __init__(self, unit: str, timeline: MediaTimeline | None = None) -> None:
        if unit not in ("part", "segment"):
            raise ValueError(f"unit must be part or segment, not {unit!r}")
        self.unit = unit
        self.timeline = timeline or MediaTimeline()
        self.seen: set[tuple[int, int]] = set()

    def update(self, playlist: Playlist, now: float) -> list[Listing]:
        """The units listed for the first time; ``now`` is when the playlist arrived."""
        self.timeline.learn(playlist)
        fresh = []
        for seg in playlist.segments:
            for listing in self._units(seg, now):
                key = (listing.msn, listing.index)
                if key not in self.seen:
                    self.seen.add(key)
                    fresh.append(listing)
        return fresh

    def _units(self, seg: PlaylistSegment, now: float) -> Iterable[Listing]:
        start = self.timeline.starts.get(seg.msn)
        if self.unit == "segment":
            if seg.duration is not None and seg.uri is not None:
                yield Listing(seg.msn, -1, seg.uri, start, seg.duration, now)
            return
        offset = 0.0
        for part in seg.parts:
            media = None if start is None else start + offset
            yield Listing(seg.msn, part.index, part.uri, media, part.duration, now)
            offset += part.duration


class SendLog:
    """When each video frame (by FLV timestamp, ms) was sent to the ingest."""

    def __init__(self) -> None:
        self.stamps_ms: list[int] = []
        self.sent_at: list[float] = []

    def add(self, timestamp_ms: int, at: float) -> None:
        self.stamps_ms.append(timestamp_ms)
        self.sent_at.append(at)

    def send_time(self, media_s: float) -> float | None:
        """Send time of the frame nearest to ``media_s``; None if none is close enough."""
        if not self.stamps_ms:
            return None
        wanted = media_s * 1000.0
        i = bisect.bisect_left(self.stamps_ms, wanted)
        near = [j for j in (i - 1, i) if 0 <= j < len(self.stamps_ms)]
        best = min(near, key=lambda j: abs(self.stamps_ms[j] - wanted))
        if abs(self.stamps_ms[best] - wanted) > NEAREST_FRAME_MS:
            return None
        return self.sent_at[best]

    @property
    def last_media_s(self) -> float:
        return self.stamps_ms[-1] / 1000.0 if self.stamps_ms else 0.0


def latencies(
    listings: Iterable[Listing], sends: SendLog, *, warmup_s: float = WARMUP_MEDIA_S
) -> list[float]:
    """Seconds from each unit's first frame being sent to its listing (the rule in the doc)."""
    published = sends.last_media_s
    values = []
    for listing in listings:
        if listing.media_start is None or listing.media_start < warmup_s:
            continue
        if listing.media_start + listing.duration > published - END_MARGIN_S:
            continue  # may only be closed by the end of the stream
        sent = sends.send_time(listing.media_start)
        if sent is not None:
            values.append(listing.listed_at - sent)
    return values


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (as the other benches), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def glass_to_glass(p95_s: float | None, hold_back_s: float | None) -> float | None:
    """Upper estimate: a frame waits p95 to be listed, then the player stays hold-back behind."""
    if p95_s is None or hold_back_s is None:
        return None
    return p95_s + hold_back_s


# --- request counting and CPU (pure) -------------------------------------------------------------


class RequestCounter:
    """Request targets in a client-to-server HTTP/1.1 byte stream of body-less requests."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        targets = []
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            words = head.split(b"\r\n", 1)[0].split()
            if len(words) >= 2:
                targets.append(words[1].decode("latin-1"))
        return targets


def target_kind(target: str) -> str:
    """blocking-playlist, playlist, part, segment, init or other."""
    path, _, query = target.partition("?")
    if path.endswith(".m3u8"):
        return "blocking-playlist" if "_HLS_msn=" in query else "playlist"
    name = path.rsplit("/", 1)[-1]
    for kind in ("part", "seg", "init"):
        if name.startswith(kind):
            return "segment" if kind == "seg" else kind
    return "other"


def stat_cpu(stat_text: str) -> tuple[int, int]:
    """(parent pid, utime + stime + cutime + cstime in clock ticks) from /proc/PID/stat."""
    fields = stat_text.rpartition(")")[2].split()
    return int(fields[1]), sum(int(v) for v in fields[11:15])


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and all its live descendants (reaped ones via cutime/cstime).

    By parentage, not session: Verge starts each ffmpeg in a session of its own.
    """
    parents: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parents[int(entry)], used[int(entry)] = stat_cpu(
                Path(f"/proc/{entry}/stat").read_text()
            )
        except (OSError, ValueError, IndexError):
            continue
    return sum(used[pid] for pid in descendants(root, parents) if pid in used) / CLOCK_TICKS


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """``root`` and every process below it, given each pid's parent."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


# --- a minimal HTTP/1.1 keep-alive client ---------------------------------------------------------


class HttpConnection:
    """One keep-alive connection, one GET at a time; reconnects once on a stale connection."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[int, bytes]:
        for attempt in range(2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            try:
                return await self._exchange(target)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, target: str) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        status, headers = parse_response_head(head)
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        else:
            body = await self._reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        body = bytearray()
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # no trailers expected
                return bytes(body)
            body += await self._reader.readexactly(size + 2)
            del body[-2:]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


# --- RTMP publishing with known send times ------------------------------------------------------


def is_video_frame(tag: flv.FlvTag) -> bool:
    """An AVC picture (not the sequence header)."""
    return tag.tag_type == flv.VIDEO and len(tag.body) > 1 and tag.body[1] == 1


class RtmpPublisher:
    """Publishes FLV tags to an RTMP server (as FFmpeg does), paced by their timestamps."""

    CHUNK_SIZE = 4096

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.out = ChunkWriter()
        self.incoming = ChunkReader()
        self.txn = 0
        self.stream_id = 1
        self._drain_task: asyncio.Task | None = None

    @classmethod
    async def open(cls, port: int, app: str, name: str) -> RtmpPublisher:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        publisher = cls(reader, writer)
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            await publisher._start(app, name)
        return publisher

    async def _start(self, app: str, name: str) -> None:
        self.writer.write(client_c0c1())
        s0s1s2 = await self.reader.readexactly(1 + 2 * PACKET_SIZE)
        self.writer.write(client_c2(s0s1s2))
        tc_url = f"rtmp://127.0.0.1/{app}"
        connect = {"app": app, "type": "nonprivate", "flashVer": "FMLE/3.0", "tcUrl": tc_url}
        self.writer.write(
            self.out.set_chunk_size(self.CHUNK_SIZE) + self._command("connect", connect)
        )
        await self._answer(self.txn)
        self.writer.write(
            self._command("releaseStream", None, name)
            + self._command("FCPublish", None, name)
            + self._command("createStream", None)
        )
        created = await self._answer(self.txn)
        self.stream_id = int(created[3]) if len(created) > 3 else 1
        self.writer.write(
            self._command("publish", None, name, "live", stream_id=self.stream_id, csid=8)
        )
        code = await self._status()
        if code != "NetStream.Publish.Start":
            raise BenchError(f"publishing {app}/{name} refused: {code}")
        self._drain_task = asyncio.get_running_loop().create_task(self._discard_incoming())

    def _command(self, name: str, *args: object, stream_id: int = 0, csid: int = 3) -> bytes:
        self.txn += 1
        payload = amf0.encode(name, float(self.txn), *args)
        return self.out.write(csid, MessageType.COMMAND_AMF0, payload, stream_id=stream_id)

    async def _commands(self) -> list[list]:
        data = await self.reader.read(65536)
        if not data:
            raise BenchError("the RTMP server closed the connection while publishing started")
        messages = self.incoming.feed(data)
        return [amf0.decode(m.payload) for m in messages if m.type_id == MessageType.COMMAND_AMF0]

    async def _answer(self, txn: int) -> list:
        while True:
            for values in await self._commands():
                if values[0] in ("_result", "_error") and int(values[1]) == txn:
                    if values[0] == "_error":
                        raise BenchError(f"RTMP command refused: {values}")
                    return values

    async def _status(self) -> str:
        while True:
            for values in await self._commands():
                if values[0] == "onStatus":
                    return str(values[3].get("code"))

    async def _discard_incoming(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await self.reader.read(65536):
                pass

    def encode(self, tag: flv.FlvTag) -> bytes:
        sid = self.stream_id
        if tag.tag_type == flv.VIDEO:
            return self.out.write(
                6, MessageType.VIDEO, tag.body, timestamp=tag.timestamp, stream_id=sid
            )
        if tag.tag_type == flv.AUDIO:
            return self.out.write(
                4, MessageType.AUDIO, tag.body, timestamp=tag.timestamp, stream_id=sid
            )
        payload = amf0.encode("@setDataFrame") + tag.body
        return self.out.write(
            5, MessageType.DATA_AMF0, payload, timestamp=tag.timestamp, stream_id=sid
        )

    async def play(self, tags: list[flv.FlvTag], start: float, sends: SendLog) -> None:
        """Send each tag at ``start`` + its timestamp; log when each video frame went out."""
        for tag in tags:
            delay = start + tag.timestamp / 1000.0 - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self.writer.write(self.encode(tag))
            await self.writer.drain()
            if is_video_frame(tag):
                sends.add(tag.timestamp, clock())

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            self.writer.write(
                self._command("FCUnpublish", None, "")
                + self._command("deleteStream", None, float(self.stream_id))
            )
            await self.writer.drain()
        self.writer.close()
        if self._drain_task is not None:
            self._drain_task.cancel()


def tags_until(tags: list[flv.FlvTag], media_s: float) -> list[flv.FlvTag]:
    """The tags of the first ``media_s`` seconds (metadata and sequence headers included)."""
    limit = media_s * 1000
    return [t for t in tags if t.timestamp <= limit]


# --- the source ------------------------------------------------------------------------------------


def source_flv(seconds: int) -> Path:
    """The test FLV (encoded once, cached): H.264 720p30 + AAC, no B-frames, GOP 1 s."""
    SOURCE_CACHE.mkdir(parents=True, exist_ok=True)
    path = SOURCE_CACHE / f"testsrc2-720p30-{seconds}s.flv"
    if path.exists():
        return path
    console.print(f"encoding {seconds} s of test source into {path} (once)")
    partial = path.with_suffix(".tmp")
    command = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate={FPS}",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-t", str(seconds),
        "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
        "-g", str(FPS), "-keyint_min", str(FPS), "-sc_threshold", "0",
        "-b:v", "2500k", "-maxrate", "2500k", "-bufsize", "2500k",
        "-c:a", "aac", "-b:a", "128k", "-ac", "2",
        "-f", "flv", str(partial),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    partial.rename(path)
    return path


# --- servers -----------------------------------------------------------------------------------------


@dataclass
class StreamServers:
    """What a run starts: Verge (stream server, counting proxy, edge) and nginx-rtmp."""

    verge_stream: Server | None = None
    verge_rtmp: int = 0
    verge_http: int = 0
    proxy: Server | None = None
    edge: Server | None = None
    nginx: Server | None = None
    nginx_rtmp: int = 0
    nginx_http: int = 0

    def all(self) -> list[Server]:
        return [s for s in (self.edge, self.proxy, self.verge_stream, self.nginx) if s is not None]

    def check_alive(self) -> None:
        for server in self.all():
            if not server.alive():
                raise ServerError(f"{server.name} exited:\n{server.log_tail()}")


VERGE_CONFIG = """\
stream:
  part_target: {part_target}
  segment_target: {segment_target}
  dvr_window: 600
  grace: 2
  data_dir: {data_dir}
  apps:
    - name: live
      record: false
      ladder: [{{name: source}}]
"""


def start_verge_stream(workdir: Path, verge_bin: str, cpus: str | None) -> tuple[Server, int, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "verge.yaml"
    config.write_text(
        VERGE_CONFIG.format(
            part_target=PART_TARGET_S, segment_target=SEGMENT_TARGET_S, data_dir=workdir / "data"
        )
    )
    argv = [
        verge_bin,
        "stream",
        "--rtmp",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--config",
        str(config),
    ]
    server = spawn("verge stream", argv, workdir / "stream.log", 0, cpus)
    found: list[re.Match] = []

    def ready() -> bool:
        match = VERGE_READY_RE.search(server.log_tail(200))
        if match:
            found.append(match)
        return bool(match)

    wait_until(server, ready, READY_TIMEOUT_S)
    rtmp, http = int(found[0][1]), int(found[0][2])
    server.port = http
    return server, rtmp, http


def start_count_proxy(workdir: Path, upstream: int, cpus: str | None) -> Server:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--count-proxy", f"{port}:{upstream}"]
    server = spawn("counting proxy", argv, workdir / "proxy.log", port, cpus)
    wait_until(server, port_open(port), READY_TIMEOUT_S)
    return server


def start_nginx_rtmp(workdir: Path, cpus: str | None) -> tuple[Server, int, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "hls").mkdir()
    rtmp, http = free_port(), free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        (NGINX_RTMP_DIR / "nginx.conf.template")
        .read_text()
        .format(
            user="user root root;\n" if os.geteuid() == 0 else "",
            workdir=workdir,
            rtmp_port=rtmp,
            http_port=http,
            fragment=f"{SEGMENT_TARGET_S:g}",
            playlist_length=600,
        )
    )
    argv = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log")]
    server = spawn("nginx-rtmp", argv, workdir / "stdout.log", http, cpus)
    server.log_path = workdir / "error.log"
    wait_until(server, port_open(http), READY_TIMEOUT_S)
    wait_until(server, port_open(rtmp), READY_TIMEOUT_S)
    return server, rtmp, http


def start_servers(opts: argparse.Namespace, workdir: Path, cpus: str | None) -> StreamServers:
    servers = StreamServers()
    if opts.only != "nginx":
        servers.verge_stream, servers.verge_rtmp, servers.verge_http = start_verge_stream(
            workdir / "verge-stream", opts.verge_bin, cpus
        )
        servers.proxy = start_count_proxy(workdir, servers.verge_http, cpus)
        servers.edge = start_verge(
            "verge edge", workdir / "edge", opts.verge_bin, servers.proxy.port,
            workers=1, cpus=cpus, admin_token="bench",
        )  # fmt: skip
    if opts.only != "verge" and {"latency", "cpu"} - opts.skip:
        servers.nginx, servers.nginx_rtmp, servers.nginx_http = start_nginx_rtmp(
            workdir / "nginx-rtmp", cpus
        )
    return servers


# --- the counting proxy (runs as a subprocess: --count-proxy LISTEN:UPSTREAM) -----------------------


async def run_count_proxy(listen: int, upstream: int) -> None:
    """Forward TCP to the upstream, counting request targets; /__bench/counts|reset answered here."""
    counts: Counter[str] = Counter()

    async def pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: RequestCounter | None
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if counter is not None:
                    counts.update(counter.feed(data))
                dst.write(data)
                await dst.drain()
        dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)
        if first.startswith(b"GET /__bench/"):
            if first.startswith(b"GET /__bench/reset"):
                counts.clear()
            body = json.dumps(counts).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            )
            writer.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            writer.close()
            return
        counter = RequestCounter()
        counts.update(counter.feed(first))
        up_writer.write(first)
        await asyncio.gather(pump(reader, up_writer, counter), pump(up_reader, writer, None))

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=1024)
    async with server:
        await server.serve_forever()


async def proxy_counts(port: int, reset: bool = False) -> Counter[str]:
    connection = HttpConnection(port)
    try:
        status, body = await connection.get("/__bench/reset" if reset else "/__bench/counts")
    finally:
        connection.close()
    if status != 200:
        raise BenchError(f"counting proxy answered {status}")
    return Counter(json.loads(body))


# --- 1. latency ------------------------------------------------------------------------------------


@dataclass
class Watch:
    """What one watching client saw: new units with their listing times, and the hold-back."""

    listings: list[Listing] = field(default_factory=list)
    hold_back: float | None = None
    unit_target: float | None = None
    errors: int = 0


async def fetch_playlist(connection: HttpConnection, target: str) -> tuple[int, Playlist | None]:
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        status, body = await connection.get(target)
    return status, (parse_playlist(body.decode()) if status == 200 else None)


async def first_playlist(connection: HttpConnection, url: str, stop_at: float) -> Playlist | None:
    """Poll until the playlist exists (404 before the stream starts)."""
    while clock() < stop_at:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            _status, playlist = await fetch_playlist(connection, url)
            if playlist is not None and playlist.segments:
                return playlist
        await asyncio.sleep(POLL_S)
    return None


async def watch_ll_hls(port: int, url: str, stop_at: float, tracker: ListingTracker) -> Watch:
    """Follow an LL-HLS playlist with blocking reloads; record when each part is first listed."""
    watch = Watch()
    connection = HttpConnection(port)
    try:
        playlist = await first_playlist(connection, url, stop_at)
        if playlist is None:
            return watch
        tracker.update(playlist, clock())  # already listed when we came: not measured
        watch.hold_back, watch.unit_target = playlist.part_hold_back, playlist.part_target
        while clock() < stop_at and not playlist.ended:
            msn, part = next_blocking_target(playlist)
            try:
                _status, fresh = await fetch_playlist(
                    connection, f"{url}?_HLS_msn={msn}&_HLS_part={part}"
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                _status, fresh = 0, None
            if fresh is None:
                watch.errors += 1
                await asyncio.sleep(POLL_S)
                _status, fresh = await fetch_playlist(connection, url)
                if fresh is None:
                    continue
            watch.listings += tracker.update(fresh, clock())
            playlist = fresh
    finally:
        connection.close()
    return watch


async def watch_polling(port: int, url: str, stop_at: float, tracker: ListingTracker) -> Watch:
    """Poll a classic HLS playlist every POLL_S; record when each segment is first listed."""
    watch = Watch()
    connection = HttpConnection(port)
    try:
        playlist = await first_playlist(connection, url, stop_at)
        if playlist is None:
            return watch
        tracker.update(playlist, clock())
        watch.unit_target = playlist.target_duration
        watch.hold_back = CLASSIC_HOLD_BACK_SEGMENTS * playlist.target_duration
        tick = clock()
        while clock() < stop_at and not playlist.ended:
            tick += POLL_S
            await asyncio.sleep(max(0.0, tick - clock()))
            try:
                _status, fresh = await fetch_playlist(connection, url)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                _status, fresh = 0, None
            if fresh is None:
                watch.errors += 1
                continue
            watch.listings += tracker.update(fresh, clock())
            watch.hold_back = CLASSIC_HOLD_BACK_SEGMENTS * fresh.target_duration
            playlist = fresh
    finally:
        connection.close()
    return watch


@dataclass
class LatencyRound:
    contender: str
    round: int
    samples: int
    p50_s: float | None
    p95_s: float | None
    max_s: float | None
    hold_back_s: float | None
    unit_target_s: float | None
    errors: int
    send_lag_max_s: float  # the publisher's worst lateness against its schedule


async def latency_round(
    key: str, servers: StreamServers, tags: list[flv.FlvTag], number: int, media_s: float
) -> LatencyRound:
    name = f"lat{number}{key}"
    if key == "verge":
        port, rtmp, url = servers.edge.port, servers.verge_rtmp, f"/live/{name}/source/index.m3u8"
        watcher: Callable[..., Awaitable[Watch]] = watch_ll_hls
        tracker = ListingTracker("part")
    else:
        port, rtmp, url = servers.nginx_http, servers.nginx_rtmp, f"/hls/{name}.m3u8"
        watcher, tracker = watch_polling, ListingTracker("segment")
    publisher = await RtmpPublisher.open(rtmp, "live", name)
    sends = SendLog()
    start = clock() + 0.2
    stop_at = start + media_s + TAIL_S
    watching = asyncio.create_task(watcher(port, url, stop_at, tracker))
    await publisher.play(tags_until(tags, media_s), start, sends)
    await publisher.close()
    watch = await watching
    values = latencies(watch.listings, sends)
    lag = max(
        (at - (start + ms / 1000)) for ms, at in zip(sends.stamps_ms, sends.sent_at, strict=True)
    )
    return LatencyRound(
        key, number, len(values), percentile(values, 0.5), percentile(values, 0.95),
        max(values, default=None), watch.hold_back, watch.unit_target, watch.errors, lag,
    )  # fmt: skip


async def measure_latency(
    opts: argparse.Namespace, servers: StreamServers, tags: list[flv.FlvTag]
) -> list[LatencyRound]:
    keys = [k for k in CONTENDERS if opts.only in (None, k)]
    media_s = WARMUP_MEDIA_S + opts.duration
    rounds = []
    for number in range(1, opts.rounds + 1):
        order = keys if number % 2 else list(reversed(keys))
        for key in order:
            console.print(
                f"latency round {number}/{opts.rounds}: {CONTENDERS[key]}, {media_s:g} s of media"
            )
            result = await latency_round(key, servers, tags, number, media_s)
            servers.check_alive()
            console.print(
                f"  {result.samples} samples, p50 {_ms(result.p50_s)} ms, p95 {_ms(result.p95_s)} ms"
                f" (publisher max lateness {result.send_lag_max_s * 1000:.1f} ms)"
            )
            rounds.append(result)
            await asyncio.sleep(1.0)
    return rounds


def summarize_latency(rounds: list[LatencyRound]) -> dict:
    summary = {}
    for key in CONTENDERS:
        mine = [r for r in rounds if r.contender == key]
        if not mine:
            continue
        p95 = median(r.p95_s for r in mine)
        hold_back = median(r.hold_back_s for r in mine)
        summary[key] = {
            "p50_s": median(r.p50_s for r in mine),
            "p95_s": p95,
            "max_s": median(r.max_s for r in mine),
            "samples": sum(r.samples for r in mine),
            "unit_target_s": median(r.unit_target_s for r in mine),
            "hold_back_s": hold_back,
            "glass_to_glass_estimate_s": glass_to_glass(p95, hold_back),
            "errors": sum(r.errors for r in mine),
        }
    return summary


# --- 2. many LL-HLS viewers ---------------------------------------------------------------------------


@dataclass
class ViewerStats:
    requests: int = 0
    errors: int = 0
    joined: int = 0
    parts_fetched: int = 0
    bytes: int = 0
    listed: list[tuple[float, Listing]] = field(default_factory=list)  # (listed_at, listing)
    fetched: list[tuple[float, Listing]] = field(default_factory=list)  # (fetched_at, listing)
    error_kinds: Counter[str] = field(default_factory=Counter)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1


async def viewer(
    port: int, url: str, timeline: MediaTimeline, stats: ViewerStats, stop: asyncio.Event
) -> None:
    """One LL-HLS player: blocking reload for the next part, then fetch every new part."""
    connection = HttpConnection(port)
    tracker = ListingTracker("part", timeline)
    base = url.rsplit("/", 1)[0]
    try:
        playlist = await first_playlist(connection, url, clock() + 20)
        if playlist is None:
            stats.error("no playlist")
            return
        stats.joined += 1
        tracker.update(playlist, clock())
        while not stop.is_set() and not playlist.ended:
            msn, part = next_blocking_target(playlist)
            fresh = await _viewer_get_playlist(
                connection, f"{url}?_HLS_msn={msn}&_HLS_part={part}", stats
            )
            if fresh is None:
                await asyncio.sleep(POLL_S)
                fresh = await _viewer_get_playlist(connection, url, stats)
                if fresh is None:
                    continue
            now = clock()
            for listing in tracker.update(fresh, now):
                stats.listed.append((now, listing))
                if await _viewer_get_part(connection, f"{base}/{listing.uri}", stats):
                    stats.fetched.append((clock(), listing))
            playlist = fresh
    finally:
        connection.close()


async def _viewer_get_playlist(
    connection: HttpConnection, target: str, stats: ViewerStats
) -> Playlist | None:
    stats.requests += 1
    try:
        status, playlist = await fetch_playlist(connection, target)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        stats.error(f"playlist {type(exc).__name__}")
        return None
    if playlist is None:
        stats.error(f"playlist {status}")
    return playlist


async def _viewer_get_part(connection: HttpConnection, target: str, stats: ViewerStats) -> bool:
    stats.requests += 1
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            status, body = await connection.get(target)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        stats.error(f"part {type(exc).__name__}")
        return False
    if status != 200:
        stats.error(f"part {status}")
        return False
    stats.parts_fetched += 1
    stats.bytes += len(body)
    return True


async def measure_viewers(
    opts: argparse.Namespace, servers: StreamServers, tags: list[flv.FlvTag]
) -> dict:
    name = "viewers"
    url = f"/live/{name}/source/index.m3u8"
    join_s, settle_s = 2.0, 2.0
    media_s = WARMUP_MEDIA_S + join_s + settle_s + opts.viewer_seconds + 4.0
    publisher = await RtmpPublisher.open(servers.verge_rtmp, "live", name)
    sends = SendLog()
    start = clock() + 0.2
    playing = asyncio.create_task(publisher.play(tags_until(tags, media_s), start, sends))
    timeline, stats, stop = MediaTimeline(), ViewerStats(), asyncio.Event()
    probe = HttpConnection(servers.edge.port)
    ready = await first_playlist(probe, url, clock() + 20)
    probe.close()
    if ready is None:
        raise BenchError("the viewers' stream never got a playlist through the edge")
    console.print(f"starting {opts.viewers} LL-HLS viewers on the edge")
    tasks = []
    for i in range(opts.viewers):
        tasks.append(asyncio.create_task(viewer(servers.edge.port, url, timeline, stats, stop)))
        if i % 10 == 9:
            await asyncio.sleep(join_s * 10 / opts.viewers)
    await asyncio.sleep(settle_s)
    await proxy_counts(servers.proxy.port, reset=True)
    window_start, requests_before = clock(), stats.requests
    edge_cpu_before = tree_cpu_seconds(servers.edge.process.pid)
    stream_cpu_before = tree_cpu_seconds(servers.verge_stream.process.pid)
    own_cpu_before = time.process_time()
    await asyncio.sleep(opts.viewer_seconds)
    counts = await proxy_counts(servers.proxy.port)
    window_end = clock()
    edge_cpu = tree_cpu_seconds(servers.edge.process.pid) - edge_cpu_before
    stream_cpu = tree_cpu_seconds(servers.verge_stream.process.pid) - stream_cpu_before
    own_cpu = time.process_time() - own_cpu_before
    requests_in_window = stats.requests - requests_before
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=5.0)
    for task in pending:
        task.cancel()
    playing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await playing
    await publisher.close()
    return viewer_summary(
        opts,
        stats,
        counts,
        sends,
        window_start,
        window_end,
        requests_in_window,
        edge_cpu,
        stream_cpu,
        own_cpu,
    )


def viewer_summary(
    opts: argparse.Namespace, stats: ViewerStats, counts: Counter[str], sends: SendLog,
    window_start: float, window_end: float, requests: int, edge_cpu: float, stream_cpu: float,
    own_cpu: float,
) -> dict:  # fmt: skip
    window = window_end - window_start
    first_listed: dict[str, float] = {}
    for at, listing in stats.listed:
        first_listed[listing.uri] = min(at, first_listed.get(listing.uri, at))
    new_parts = {uri for uri, at in first_listed.items() if window_start <= at <= window_end}
    by_kind: Counter[str] = Counter()
    for target, count in counts.items():
        by_kind[target_kind(target)] += count
    part_counts = [
        count for target, count in counts.items() if target.rsplit("/", 1)[-1] in new_parts
    ]
    blocking_targets = [t for t in counts if target_kind(t) == "blocking-playlist"]
    listed = [(at, listing) for at, listing in stats.listed if window_start <= at <= window_end]
    fetched = [(at, listing) for at, listing in stats.fetched if window_start <= at <= window_end]
    listed_lat = _viewer_latencies(listed, sends)
    fetched_lat = _viewer_latencies(fetched, sends)
    parts = len(new_parts) or None
    return {
        "viewers": opts.viewers,
        "joined": stats.joined,
        "window_s": window,
        "new_parts": len(new_parts),
        "upstream_requests": dict(by_kind),
        "upstream_per_part": {
            "part": sum(part_counts) / parts if parts else None,
            "blocking_playlist": by_kind["blocking-playlist"] / parts if parts else None,
            "all": sum(by_kind.values()) / parts if parts else None,
        },
        "upstream_per_blocking_target": by_kind["blocking-playlist"] / len(blocking_targets)
        if blocking_targets
        else None,
        "max_upstream_for_one_part": max(part_counts, default=None),
        "viewer_requests_per_s": requests / window if window else None,
        "parts_fetched_per_viewer_per_part": (len(fetched) / (stats.joined * len(new_parts)))
        if stats.joined and new_parts
        else None,
        "listed_p50_s": percentile(listed_lat, 0.5),
        "listed_p95_s": percentile(listed_lat, 0.95),
        "fetched_p50_s": percentile(fetched_lat, 0.5),
        "fetched_p95_s": percentile(fetched_lat, 0.95),
        "errors": stats.errors,
        "error_kinds": dict(stats.error_kinds),
        "edge_cpu_share": edge_cpu / window if window else None,
        "load_generator_cpu_share": own_cpu / window if window else None,
        "stream_server_cpu_share": stream_cpu / window if window else None,
    }


def _viewer_latencies(events: list[tuple[float, Listing]], sends: SendLog) -> list[float]:
    """As :func:`latencies`, with the time of each event (listing or fetch) per viewer."""
    values = []
    for at, listing in events:
        moved = Listing(
            listing.msn, listing.index, listing.uri, listing.media_start, listing.duration, at
        )
        values += latencies([moved], sends)
    return values


# --- 3. CPU per passthrough stream -------------------------------------------------------------------


async def cpu_run(
    key: str, servers: StreamServers, tags: list[flv.FlvTag], streams: int, seconds: float
) -> dict:
    server = servers.verge_stream if key == "verge" else servers.nginx
    rtmp = servers.verge_rtmp if key == "verge" else servers.nginx_rtmp
    root = server.process.pid
    idle_before = tree_cpu_seconds(root)
    await asyncio.sleep(CPU_IDLE_S)
    idle_rate = (tree_cpu_seconds(root) - idle_before) / CPU_IDLE_S
    media_s = CPU_WARMUP_S + seconds + 1.0
    publishers = [
        await RtmpPublisher.open(rtmp, "live", f"cpu{streams}x{i}{key}") for i in range(streams)
    ]
    start = clock() + 0.2
    plays = [
        asyncio.create_task(p.play(tags_until(tags, media_s), start + i * 0.1, SendLog()))
        for i, p in enumerate(publishers)
    ]
    await asyncio.sleep(0.2 + CPU_WARMUP_S)
    before, t0 = tree_cpu_seconds(root), clock()
    await asyncio.sleep(seconds)
    used, wall = tree_cpu_seconds(root) - before, clock() - t0
    await asyncio.gather(*plays)
    for publisher in publishers:
        await publisher.close()
    servers.check_alive()
    per_stream = used / wall / streams
    net = max(0.0, used / wall - idle_rate) / streams
    return {
        "contender": key,
        "streams": streams,
        "seconds": wall,
        "cpu_s_per_stream_s": per_stream,
        "cpu_s_per_stream_s_net_of_idle": net,
        "idle_cpu_share": idle_rate,
    }


async def measure_cpu(
    opts: argparse.Namespace, servers: StreamServers, tags: list[flv.FlvTag]
) -> list[dict]:
    results = []
    keys = [k for k in CONTENDERS if opts.only in (None, k)]
    for streams in opts.cpu_streams:
        for key in keys:
            console.print(
                f"CPU: {streams} passthrough stream(s) into {CONTENDERS[key].split(' (')[0]}"
            )
            result = await cpu_run(key, servers, tags, streams, opts.cpu_seconds)
            console.print(f"  {result['cpu_s_per_stream_s'] * 100:.1f}% of a core per stream")
            results.append(result)
            await asyncio.sleep(3.0)  # let the streams end (Verge's grace period) before the next
    return results


# --- report -------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def report(summary: dict) -> None:
    latency = summary.get("latency")
    if latency:
        report_latency(latency["summary"])
    viewers = summary.get("viewers")
    if viewers:
        report_viewers(viewers)
    cpu = summary.get("cpu")
    if cpu:
        report_cpu(cpu)


def report_latency(rows: dict) -> None:
    table = Table(
        title="Ingest → playlist latency (medians over rounds)",
        caption="from a unit's first frame being sent to the ingest to the playlist listing it\n"
        "glass-to-glass (estimate) = p95 + player hold-back; capture, encode, decode not included",
    )
    for column in (
        "server",
        "unit",
        "p50 ms",
        "p95 ms",
        "max ms",
        "samples",
        "hold-back s",
        "est. glass-to-glass s",
    ):
        table.add_column(column, justify="left" if column in ("server", "unit") else "right")
    for key, row in rows.items():
        unit = "part" if key == "verge" else "segment"
        table.add_row(
            CONTENDERS[key], f"{unit} {_s(row['unit_target_s'])} s", _ms(row["p50_s"]), _ms(row["p95_s"]),
            _ms(row["max_s"]), str(row["samples"]), _s(row["hold_back_s"]), _s(row["glass_to_glass_estimate_s"]),
        )  # fmt: skip
    console.print(table)
    verge = rows.get("verge")
    if verge and verge["p95_s"] is not None:
        ok_p95 = verge["p95_s"] < LATENCY_TARGET_P95_S
        glass = verge["glass_to_glass_estimate_s"]
        ok_glass = glass is not None and glass < GLASS_TARGET_S
        console.print(
            f"targets: p95 < {LATENCY_TARGET_P95_S:g} s: {'ok' if ok_p95 else 'MISSED'}; "
            f"estimated glass-to-glass < {GLASS_TARGET_S:g} s: {'ok' if ok_glass else 'MISSED'}"
        )


def report_viewers(row: dict) -> None:
    table = Table(title=f"{row['viewers']} simulated LL-HLS viewers on one edge (--workers 1)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    per = row["upstream_per_part"]
    lines = [
        ("viewers joined", f"{row['joined']}/{row['viewers']}"),
        ("window", f"{row['window_s']:.1f} s, {row['new_parts']} new parts"),
        ("upstream requests per new part: its file", _ratio(per["part"])),
        ("upstream blocking playlist requests per new part", _ratio(per["blocking_playlist"])),
        (
            "upstream requests per distinct blocking request",
            _ratio(row["upstream_per_blocking_target"]),
        ),
        ("upstream requests of any kind per new part", _ratio(per["all"])),
        ("most upstream requests for one part", str(row["max_upstream_for_one_part"])),
        ("viewer requests/s", _ratio(row["viewer_requests_per_s"], 0)),
        ("parts fetched per viewer per new part", _ratio(row["parts_fetched_per_viewer_per_part"])),
        ("part listed p50 / p95 ms", f"{_ms(row['listed_p50_s'])} / {_ms(row['listed_p95_s'])}"),
        ("part fetched p50 / p95 ms", f"{_ms(row['fetched_p50_s'])} / {_ms(row['fetched_p95_s'])}"),
        ("errors", f"{row['errors']} {row['error_kinds'] or ''}"),
        (
            "CPU: edge / stream server / viewers (this script)",
            f"{_pct(row['edge_cpu_share'])} / {_pct(row['stream_server_cpu_share'])} / "
            f"{_pct(row['load_generator_cpu_share'])} of a core",
        ),
    ]
    for name, value in lines:
        table.add_row(name, value)
    console.print(table)


def report_cpu(rows: list[dict]) -> None:
    table = Table(
        title="CPU per passthrough stream (720p30 2.5 Mb/s + AAC, no viewers)",
        caption="CPU seconds per stream-second of the server's process tree (Verge: with its ffmpeg)",
    )
    for column in ("server", "streams", "% of a core per stream", "net of idle", "idle"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for row in rows:
        table.add_row(
            CONTENDERS[row["contender"]].split(" (")[0], str(row["streams"]), _pct(row["cpu_s_per_stream_s"]),
            _pct(row["cpu_s_per_stream_s_net_of_idle"]), _pct(row["idle_cpu_share"]),
        )  # fmt: skip
    console.print(table)


def _ratio(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


# --- options, tools, main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/stream_bench.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds per contender")
    parser.add_argument(
        "--duration", type=float, default=35.0, help="measured media seconds per round"
    )
    parser.add_argument("--viewers", type=int, default=500, help="simulated LL-HLS viewers")
    parser.add_argument("--viewer-seconds", type=float, default=20.0, help="counted window")
    parser.add_argument("--cpu-streams", default="1,4", help="comma-separated stream counts")
    parser.add_argument("--cpu-seconds", type=float, default=20.0, help="CPU measuring window")
    parser.add_argument("--only", choices=tuple(CONTENDERS), help="one contender only")
    parser.add_argument("--skip", default="", help="comma-separated: latency, viewers, cpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: short runs, 50 viewers")
    parser.add_argument("--verge-bin", default=str(Path(sys.executable).parent / "verge"))
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON results file")
    parser.add_argument("--count-proxy", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.count_proxy:
        return opts
    if opts.quick:
        opts.rounds, opts.duration, opts.viewers = 1, 10.0, 50
        opts.viewer_seconds, opts.cpu_seconds, opts.cpu_streams = 6.0, 5.0, "1,4"
    opts.skip = {s.strip() for s in opts.skip.split(",") if s.strip()}
    if opts.skip - {"latency", "viewers", "cpu"}:
        parser.error("--skip takes latency, viewers, cpu")
    try:
        opts.cpu_streams = [int(n) for n in str(opts.cpu_streams).split(",")]
    except ValueError:
        parser.error("--cpu-streams takes comma-separated integers")
    if opts.rounds < 1 or opts.duration < 5 or opts.viewers < 1 or min(opts.cpu_streams) < 1:
        parser.error("--rounds, --viewers and --cpu-streams must be >= 1, --duration >= 5")
    if opts.only == "nginx":
        opts.skip.add("viewers")
    return opts


def install_missing_tools() -> None:
    """apt-get install nginx, libnginx-mod-rtmp, ffmpeg, util-linux when missing."""
    rtmp = [] if RTMP_MODULE.exists() else ["libnginx-mod-rtmp"]
    apt_install(missing_packages(TOOLS) + rtmp, console.print)
    if not RTMP_MODULE.exists() or any(shutil.which(tool) is None for tool in TOOLS):
        raise ToolError("tools still missing after apt-get")


def cpu_plan() -> tuple[str | None, set[int] | None]:
    """(taskset list for the servers, CPUs for this script): one core each when there are two."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return str(allowed[0]), set(allowed[1:])


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


async def run_all(opts: argparse.Namespace, servers: StreamServers, tags: list[flv.FlvTag]) -> dict:
    results: dict = {}
    if "latency" not in opts.skip:
        rounds = await measure_latency(opts, servers, tags)
        results["latency"] = {
            "summary": summarize_latency(rounds),
            "rounds": [asdict(r) for r in rounds],
        }
    if "viewers" not in opts.skip:
        results["viewers"] = await measure_viewers(opts, servers, tags)
    if "cpu" not in opts.skip:
        results["cpu"] = await measure_cpu(opts, servers, tags)
    return results


def needed_source_seconds(opts: argparse.Namespace) -> int:
    latency = WARMUP_MEDIA_S + opts.duration
    viewers = WARMUP_MEDIA_S + 8.0 + opts.viewer_seconds
    cpu = CPU_WARMUP_S + opts.cpu_seconds + 1.0
    return max(SOURCE_SECONDS_MIN, int(max(latency, viewers, cpu)) + 5)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.count_proxy:
        import uvloop

        listen, upstream = (int(p) for p in opts.count_proxy.split(":"))
        uvloop.run(run_count_proxy(listen, upstream))
        return 0
    add_sbin_to_path()
    raise_fd_limit()
    try:
        install_missing_tools()
        source = source_flv(needed_source_seconds(opts))
    except (BenchError, ToolError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    tags = list(flv.read_tags(source.read_bytes()))
    server_cpus, own_cpus = cpu_plan()
    load = os.getloadavg()[0]
    environment = {
        "cpus": os.cpu_count(),
        "pinned": server_cpus is not None,
        "load_1m": load,
        "nginx": tool_version(["nginx", "-v"]),
        "ffmpeg": tool_version(["ffmpeg", "-version"]),
        "python": sys.version.split()[0],
    }
    console.print(
        f"stream bench: {environment['nginx']} + rtmp module, {environment['ffmpeg']}; "
        f"servers on CPU {server_cpus or 'any'}, publisher and viewers on CPU "
        f"{','.join(map(str, sorted(own_cpus))) if own_cpus else 'any'}"
    )
    if load > BUSY_LOAD:
        console.print(f"[yellow]load average {load:.2f}: other work may skew the numbers[/]")
    workdir = Path(tempfile.mkdtemp(prefix="verge-bench-stream-"))
    servers = StreamServers()
    try:
        servers = start_servers(opts, workdir, server_cpus)
        if own_cpus:
            os.sched_setaffinity(0, own_cpus)
        import uvloop

        results = uvloop.run(run_all(opts, servers, tags))
        summary = {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "environment": {**environment, "load_1m_after": os.getloadavg()[0]},
            "options": {
                "rounds": opts.rounds, "duration_s": opts.duration, "viewers": opts.viewers,
                "viewer_seconds": opts.viewer_seconds, "cpu_streams": opts.cpu_streams,
                "cpu_seconds": opts.cpu_seconds, "part_target_s": PART_TARGET_S,
                "segment_target_s": SEGMENT_TARGET_S, "poll_s": POLL_S, "quick": opts.quick,
            },
            **results,
        }  # fmt: skip
        report(summary)
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"results written to {opts.output}")
        return 0
    except (BenchError, ServerError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    finally:
        for server in servers.all():
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
