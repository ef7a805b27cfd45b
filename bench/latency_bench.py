"""Glass-to-glass latency of live playback, measured in headless Chromium (LL-HLS and WebRTC).

Why: the ingest-to-playlist figure of ``bench/stream_bench.py`` leaves out the encoder, the
player's hold-back and decoding; what a viewer sees is the time between a frame being made and
the same frame on the screen. This bench measures exactly that.

How: the publisher (ffmpeg, lavfi ``testsrc2`` 720p30 + a sine, x264 ``-tune zerolatency``,
paced with ``-re``) paints the wall clock of each frame into the picture as 24 Gray-coded
black/white blocks across the top (``geq`` with ``time(0)``: milliseconds mod 2^24; Gray code so
that a frame painted across a millisecond tick still reads as one of the two values). The
stream server (``verge stream`` with the config below) and one edge (``verge edge --origin``
the stream server, as ``verge up`` puts an edge in front of it) run as child processes. Chromium
opens the player page through the edge (``/live/NAME``, or ``?mode=webrtc``); on every
presented frame (``requestVideoFrameCallback``) the page draws the strip into a canvas, decodes
the stamp and records ``Date.now() - stamp``. Over ``--seconds`` (after ``--warmup``): p50,
p95, max, and stalls (``waiting`` events and presented-frame gaps over 0.5 s, with their total
time). The player's own readouts (hls.js latency and target, "behind wall clock") are sampled
next to it so the readout's honesty can be checked. The 1-minute load average is reported with
every figure: the machine may be busy.

Run (no make needed), from the repository root::

    .venv/bin/python bench/latency_bench.py --mode hls --seconds 30 --sessions 3
    .venv/bin/python bench/latency_bench.py --mode webrtc --seconds 30
    .venv/bin/python bench/latency_bench.py --mode both --part-target 0.2 --segment-target 1 \
        --json bench/results/latency.json

``--part-target`` / ``--segment-target`` / ``--part-hold-back`` go into the stream server's
config file (unset: the config's defaults). Needs ffmpeg, /usr/bin/chromium + chromedriver and
selenium (as the browser tests), and hls.js vendored (scripts/vendor-web.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import browser  # noqa: E402  (the suite's one way to start headless Chromium)

VERGE = [sys.executable, "-m", "verge.cli"]
STREAM = "glass"
FPS = 30
BITS = 24  # stamp = wall-clock milliseconds mod 2**24, Gray-coded
BLOCK = 48  # pixels per bit block in the 1280x720 source (24 blocks: 1152 px wide, 48 tall)
STALL_GAP_MS = 500
PLAYER_FLAGS = (
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-media-suspend",
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)
WINDOW = "1400,900"
"""Chromium's window (``--window``): the page is laid out, composited and painted at this
size in software, on the same two cores as the publisher, the ladder and the servers. The
probe reads the decoded frame, not the painted one, so a smaller window measures the same
stream with less of the apparatus' own load (measured: 800x480 kept the load at ~5 where
1400x900 reached 6-8, and its third session stayed without stalls)."""

# geq: bit k of the Gray code of n = (bit k of n) xor (bit k+1 of n) = their sum mod 2.
_N = f"mod(floor(time(0)*1000),{2**BITS})"
_BIT = f"mod(floor({_N}/pow(2,X))+floor({_N}/pow(2,X+1)),2)"
STAMP_FILTER = (
    f"color=black:s={BITS}x1:r={FPS},format=gray,geq=lum='255*{_BIT}',"
    f"scale={BITS * BLOCK}:{BLOCK}:flags=neighbor[stamp];"
    f"testsrc2=size=1280x720:rate={FPS},format=yuv420p[pic];"
    "[pic][stamp]overlay=0:0:shortest=1"
)

# Picture and sound from one lavfi graph: one input, one clock. (A second lavfi input for the
# sine costs ~250 ms more at the publisher: its FLV muxer waits to interleave the two inputs.)
PUBLISHED = STAMP_FILTER + "[out0];sine=frequency=440:sample_rate=48000[out1]"

# Runs in the page: a frame callback that decodes the stamp of every presented frame.
PAGE_PROBE = f"""
const BITS = {BITS}, FRAC_W = {BITS * BLOCK / 1280}, FRAC_H = {BLOCK / 720};
const video = document.getElementById('video');
const canvas = document.createElement('canvas');
canvas.width = BITS * 8; canvas.height = 8;
const ctx = canvas.getContext('2d', {{willReadFrequently: true}});
const probe = window.__probe = {{samples: [], waits: [], gaps: [], last: 0, bad: 0, readouts: []}};
function decode() {{
  const w = video.videoWidth, h = video.videoHeight;
  if (!w || !h) return null;
  ctx.drawImage(video, 0, 0, w * FRAC_W, h * FRAC_H, 0, 0, canvas.width, canvas.height);
  const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let gray = 0;
  for (let k = 0; k < BITS; k++) {{
    const i = (4 * canvas.width + k * 8 + 4) * 4;
    if (px[i] > 127) gray += 2 ** k;
  }}
  let n = gray;
  for (let s = gray >> 1; s; s >>= 1) n ^= s;
  return n;
}}
function onFrame() {{
  const now = Date.now();
  const stamp = decode();
  if (stamp !== null) {{
    const mod = 2 ** BITS;
    let late = ((now % mod) - stamp + mod) % mod;
    if (late > mod / 2) late -= mod;
    if (late < -50 || late > 60000) probe.bad++;
    else probe.samples.push([now, late]);
  }}
  if (probe.last && now - probe.last > {STALL_GAP_MS}) probe.gaps.push([probe.last, now - probe.last]);
  probe.last = now;
  video.requestVideoFrameCallback(onFrame);
}}
video.requestVideoFrameCallback(onFrame);
video.addEventListener('waiting', () => probe.waits.push(Date.now()));
"""
# hls.js events, for LATENCY_BENCH_DEBUG: why a stall happened
PAGE_EVENTS = """
const probe = window.__probe;
probe.events = [];
const hls = window.verge && window.verge.hls;
if (hls) {
  const ev = window.Hls.Events;
  hls.on(ev.ERROR, (_e, d) => probe.events.push([Date.now(), 'error', d.details, d.fatal]));
  hls.on(ev.LEVEL_SWITCHED, (_e, d) => probe.events.push([Date.now(), 'level', d.level]));
}
"""

READOUT = """
const h = window.verge && window.verge.hls;
return {now: Date.now(),
        latency: document.getElementById('latency').textContent,
        clock: document.getElementById('clock').textContent,
        level: document.getElementById('level').textContent,
        hls_latency: h ? h.latency : null, hls_target: h ? h.targetLatency : null};
"""


@dataclass
class Session:
    mode: str
    seconds: float
    samples: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    stalls: int
    stall_ms: float
    unreadable_frames: int
    load_before: float
    load_after: float
    readout: dict = field(default_factory=dict)
    readout_error_ms: float | None = None  # the page's "behind wall clock" minus measured p50
    ingest_to_playlist_ms: float | None = None  # server: a part's first frame in -> listed (mean)


class Child:
    """A child process in its own group, ready when a marker line appears on its output."""

    def __init__(self, name: str, args: list[str], marker: str, cwd: Path, timeout: float = 60):
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            start_new_session=True,
        )
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if marker and marker in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if marker and (not ready.wait(timeout) or self.proc.poll() is not None):
            self.stop()
            raise RuntimeError(f"{name} did not start:\n" + "".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Platform:
    """Stream server + one edge in front of it (what `verge up` does for streams) + publisher."""

    def __init__(
        self,
        workdir: Path,
        stream_settings: dict[str, float],
        ladder: str | None = None,
    ):
        self.workdir = workdir
        self.key = secrets.token_urlsafe(8)
        self.rtmp_port = self.http_port = 0  # the stream server picks them
        self.children: list[Child] = []
        self.config = workdir / "stream.yaml"
        self.config.write_text(self._config(stream_settings, ladder))
        self.edge_url = ""
        self.origin_url = f"http://127.0.0.1:{self.http_port}"

    def _config(self, stream_settings: dict[str, float], ladder: str | None) -> str:
        lines = [
            "stream:",
            "  apps:",
            "    - name: live",
            f"      keys: {{'*': {self.key}}}",
            "      record: false",
        ]
        if ladder:
            lines.append(f"      ladder: {ladder}")
        lines += [f"  {name}: {value}" for name, value in stream_settings.items()]
        lines.append(f"  data_dir: {self.workdir / 'stream-data'}")
        lines.append("  webrtc: {candidates: [127.0.0.1]}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.start_stream()
        self.start_edge()

    def start_stream(self) -> None:
        """The stream server (its RTMP and HTTP ports: ``rtmp_port``, ``origin_url``)."""
        stream = Child(
            "stream server",
            [
                *VERGE,
                "stream",
                "--rtmp",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--config",
                str(self.config),
            ],
            "verge stream ready",
            self.workdir,
        )
        self.children.append(stream)
        ready = next(line for line in stream.lines if "verge stream ready" in line)
        ports = re.search(r"rtmp://[\d.]+:(\d+)/\S* http http://[\d.]+:(\d+)", ready)
        self.rtmp_port, self.http_port = int(ports.group(1)), int(ports.group(2))
        self.origin_url = f"http://127.0.0.1:{self.http_port}"

    def start_edge(self) -> None:
        """One edge in front of the stream server (``edge_url``)."""
        edge = Child(
            "edge",
            [
                *VERGE,
                "edge",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--admin-token",
                secrets.token_urlsafe(8),
                "--cache-dir",
                str(self.workdir / "cache"),
                "--workers",
                "1",
                "--origin",
                f"http://127.0.0.1:{self.http_port}",
            ],
            "verge edge ready",
            self.workdir,
        )
        self.children.append(edge)
        ready = next(line for line in edge.lines if "verge edge ready" in line)
        self.edge_url = "http://" + re.search(r"http://([\d.]+:\d+)", ready).group(1)

    def publish(self, seconds: float) -> Child:
        args = [
            "ffmpeg",
            "-hide_banner",
            "-v",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            PUBLISHED,
            "-t",
            str(seconds),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            str(FPS),
            "-b:v",
            "2500k",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "96k",
            "-f",
            "flv",
            f"rtmp://127.0.0.1:{self.rtmp_port}/live/{STREAM}?key={self.key}",
        ]
        child = Child("publisher", args, "", self.workdir)
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _number(text: str) -> float | None:
    match = re.match(r"([\d.]+) (ms|s)", text or "")
    if not match:
        return None
    return float(match.group(1)) * (1 if match.group(2) == "ms" else 1000)


def watch(url: str, mode: str, warmup: float, seconds: float, window: str = WINDOW) -> Session:
    """Open the player, wait for frames, measure for `seconds` after `warmup`."""
    load_before = os.getloadavg()[0]
    with browser.headless_chromium((*PLAYER_FLAGS, f"--window-size={window}")) as driver:
        driver.get(url + ("?mode=webrtc" if mode == "webrtc" else ""))
        driver.execute_script(PAGE_PROBE)
        driver.execute_script(PAGE_EVENTS)
        browser.wait_for(
            driver,
            lambda: driver.execute_script("return window.__probe.samples.length > 0"),
            "the first stamped frame",
            60,
            0.2,
        )
        time.sleep(warmup)
        start_ms = driver.execute_script("return Date.now()")
        readouts = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            readouts.append(driver.execute_script(READOUT))
        probe = driver.execute_script("return window.__probe")
    if os.environ.get("LATENCY_BENCH_DEBUG"):
        print(
            json.dumps(
                {
                    "events": probe.get("events"),
                    "gaps": probe["gaps"],
                    "waits": probe["waits"],
                    "start": start_ms,
                }
            ),
            file=sys.stderr,
        )
    lates = [late for now, late in probe["samples"] if now >= start_ms]
    gaps = [gap for at, gap in probe["gaps"] if at + gap >= start_ms]
    waits = [at for at in probe["waits"] if at >= start_ms]
    p50 = percentile(lates, 0.5)
    clocks = [c for r in readouts if (c := _number(r["clock"])) is not None]
    readout = readouts[-1] if readouts else {}
    return Session(
        mode=mode,
        seconds=seconds,
        samples=len(lates),
        p50_ms=p50,
        p95_ms=percentile(lates, 0.95),
        max_ms=max(lates, default=None),
        stalls=max(len(gaps), len(waits)),
        stall_ms=float(sum(gaps)),
        unreadable_frames=probe["bad"],
        load_before=round(load_before, 2),
        load_after=round(os.getloadavg()[0], 2),
        readout=readout,
        readout_error_ms=(statistics.median(clocks) - p50) if clocks and p50 is not None else None,
    )


def wait_live(url: str, publisher: Child, timeout: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end and publisher.proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=10).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError("the stream did not go live:\n" + "".join(publisher.lines[-20:]))


def ingest_to_playlist(origin: str) -> tuple[float, float]:
    """(sum, count) of the stream server's ingest-to-playlist histogram."""
    import httpx

    text = httpx.get(origin + "/metrics", timeout=10).text
    found = dict(
        re.findall(r"^verge_stream_ingest_to_playlist_seconds_(sum|count) (\S+)$", text, re.M)
    )
    return float(found.get("sum", 0)), float(found.get("count", 0))


def mean_since(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    count = after[1] - before[1]
    return round((after[0] - before[0]) / count * 1000, 1) if count else None


def run(args: argparse.Namespace) -> list[Session]:
    modes = ["hls", "webrtc"] if args.mode == "both" else [args.mode]
    sessions: list[Session] = []
    with tempfile.TemporaryDirectory(prefix="verge-latency-") as tmp:
        settings = {name: value for name, value in (
            ("part_target", args.part_target), ("segment_target", args.segment_target),
            ("part_hold_back", args.part_hold_back)) if value is not None}
        platform = Platform(Path(tmp), settings, args.ladder)
        try:
            platform.start()
            total = (
                args.preroll + (args.warmup + args.seconds + 25) * args.sessions * len(modes) + 30
            )
            publisher = platform.publish(total)
            url = f"{platform.edge_url}/live/{STREAM}"
            wait_live(url + ".m3u8", publisher)
            time.sleep(args.preroll)  # viewers join a stream that is already running
            for _ in range(args.sessions):
                for mode in modes:
                    if publisher.proc.poll() is not None:
                        raise RuntimeError("publisher exited:\n" + "".join(publisher.lines))
                    before = ingest_to_playlist(platform.origin_url)
                    session = watch(url, mode, args.warmup, args.seconds, args.window)
                    session.ingest_to_playlist_ms = mean_since(
                        before, ingest_to_playlist(platform.origin_url)
                    )
                    sessions.append(session)
                    print(describe(session), flush=True)
        finally:
            platform.stop()
    return sessions


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _window(text: str) -> str:
    width, _, height = text.partition(",")
    if not (width.isdigit() and height.isdigit() and 100 <= int(width) <= 4000
            and 100 <= int(height) <= 4000):
        raise argparse.ArgumentTypeError("W,H in pixels, 100-4000 each")
    return text


def describe(s: Session) -> str:
    readout = s.readout
    extra = ""
    if readout:
        extra = (
            f"; page: latency {readout.get('latency')}, behind wall clock "
            f"{readout.get('clock')}, {readout.get('level')}"
        )
    return (
        f"{s.mode:6s} p50 {_ms(s.p50_ms)}  p95 {_ms(s.p95_ms)}  max {_ms(s.max_ms)}  "
        f"stalls {s.stalls} ({s.stall_ms:.0f} ms)  frames {s.samples}  "
        f"load {s.load_before:.2f}->{s.load_after:.2f}; "
        f"server ingest->listed {_ms(s.ingest_to_playlist_ms)}{extra}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["hls", "webrtc", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds played before measuring")
    parser.add_argument("--preroll", type=float, default=5.0, help="stream age when the page opens")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--part-target", type=float, default=None)
    parser.add_argument("--segment-target", type=float, default=None)
    parser.add_argument("--part-hold-back", type=float, default=None)
    parser.add_argument("--ladder", default=None, help="YAML flow list, e.g. '[source]'")
    parser.add_argument("--json", type=Path, default=None, help="write the sessions here")
    parser.add_argument("--window", default=WINDOW, type=_window,
                        help="Chromium's window, W,H (see WINDOW)")
    args = parser.parse_args(argv)
    if (reason := browser.missing()) is not None:
        print(f"latency bench: {reason}", file=sys.stderr)
        return 2
    sessions = run(args)
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in sessions], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
