"""WebRTC (WHEP) viewers per core of the stream server: its CPU as viewers join one live stream.

Why: WebRTC playback is not served by the edges' caches: every viewer is a peer connection
of the stream server, whose per-packet RTP packetising and SRTP encryption run in Python
(aiortc). So the capacity figure for real-time playback is "viewers per core" of the stream
server, and it needs a script that measures it the same way every time (the README's ~2 % of
a core per viewer of a 2 Mbps 720p30 stream was measured ad hoc).

How: ``verge stream`` runs as a child process with the config of ``bench/latency_bench.py``
(its :class:`Platform`, without the edge: WHEP goes straight to the stream server; the
WebRTC viewer limits raised to the largest step if the defaults are below it; the ladder is
``source`` only unless ``--ladder`` says otherwise, so no transcoder's CPU blurs the slope).
ffmpeg publishes that bench's 720p30 x264 ``-tune zerolatency`` (~2.5 Mbps, no B-frames:
passed through) + AAC stream over RTMP. Viewers are aiortc peer connections doing WHEP
(``POST /live/NAME/whep``, recvonly video + audio) in separate processes (this script, with
``--viewer-process``; at most ``--viewers-per-process`` each), so that their own work is not
counted. They act as a browser does towards the server, cheaply: they do not decode (aiortc's
decoder is replaced by one that hands the depacketised frame on as is, so each viewer counts
the frames it received at the cost of RTP/SRTP only), and their REMB feedback is throttled to
one per 200 ms as libwebrtc's (aiortc's own sends one per packet while it sees "overuse":
~90 RTCP packets/s per viewer, which the server would pay for). At each step (``--steps``) viewers are
added up to the step's count; once every viewer has received video and audio frames, the
stream server's CPU (utime + stime of its whole process tree, from /proc) is measured over
``--seconds``. Reported: CPU % of one core per step, the per-viewer slope (least squares over
the steps with viewers; step 0 is the base: the ingest, packaging and, once a viewer came,
the Opus transcoder), viewers per core (100 / slope), and per step the video frames/s
received per viewer (min and median; a viewer falling behind shows here). The viewers'
process CPU and the 1-minute load average are reported too: the machine has 2 cores, and a
busy one makes the figures noisier (but the CPU seconds are the server's own).

Run, from the repository root (about 2 minutes with the defaults)::

    .venv/bin/python bench/webrtc_viewers.py
    .venv/bin/python bench/webrtc_viewers.py --steps 0,5,10,20,40 --seconds 10

Writes bench/results/webrtc_viewers.json (``--json``). Needs ffmpeg and aiortc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from latency_bench import FPS, STREAM, Platform, wait_live
from servers import cpu_seconds, process_tree

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "webrtc_viewers.json"
CLIENT_ADDRESS = "127.0.0.3"  # aioice never gathers on 127.0.0.1; all of 127/8 is lo
DEFAULT_MAX_VIEWERS_PER_STREAM = 50  # verge.config.stream.WebRtcSettings
READY_FRAMES = 5  # video frames a viewer must have received to count as receiving
JOIN_TIMEOUT = 60.0
REMB_INTERVAL_MS = 200  # libwebrtc's RembThrottler: at most one REMB per 200 ms


# --- the viewers' process -------------------------------------------------------------------


class PassThroughDecoder:
    """Stands in for aiortc's decoders: the received (depacketised) frame, not decoded."""

    def decode(self, encoded_frame: object) -> list[object]:
        return [encoded_frame]


def browser_like_receivers() -> None:
    """aiortc's receivers, changed in two ways: no decoding (:class:`PassThroughDecoder`) and
    at most one REMB per ``REMB_INTERVAL_MS`` (:func:`throttled_remb`)."""
    import aiortc.rtcrtpreceiver

    aiortc.rtcrtpreceiver.get_decoder = lambda codec: PassThroughDecoder()
    aiortc.rtcrtpreceiver.RemoteBitrateEstimator = throttled_remb()


def throttled_remb() -> type:
    """aiortc's receiver-side bandwidth estimator, its REMB feedback throttled as libwebrtc's
    ``RembThrottler`` does. aiortc's own sends a REMB with every packet while its overuse
    detector says "overusing" (measured: ~90 RTCP packets/s per viewer on this loaded
    machine), which no browser does and which the server would pay for (SRTCP + parsing)."""
    from aiortc.rate import RemoteBitrateEstimator

    class ThrottledRemoteBitrateEstimator(RemoteBitrateEstimator):
        last_remb_ms: int | None = None

        def add(self, arrival_time_ms: int, *args, **kwargs):
            remb = super().add(arrival_time_ms, *args, **kwargs)
            if remb is None or (
                self.last_remb_ms is not None
                and arrival_time_ms - self.last_remb_ms < REMB_INTERVAL_MS
            ):
                return None
            self.last_remb_ms = arrival_time_ms
            return remb

    return ThrottledRemoteBitrateEstimator


class Viewer:
    """An aiortc WHEP client (as tests/stream/test_whep.py's): recvonly video and audio,
    frames counted as they arrive."""

    def __init__(self) -> None:
        from aiortc import RTCPeerConnection

        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.frames = {"video": 0, "audio": 0}
        self.tasks: list[asyncio.Task] = []
        self.pc.on("track", lambda track: self.tasks.append(asyncio.create_task(self._read(track))))

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames[track.kind] += 1

    async def watch(self, client, url: str) -> None:
        from aiortc import RTCSessionDescription

        from verge.compat.aioice import gather_on

        with gather_on([CLIENT_ADDRESS]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await client.post(
            url,
            content=self.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        )
        if response.status_code != 201:
            raise RuntimeError(f"WHEP offer: {response.status_code} {response.text}")
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

    @property
    def receiving(self) -> bool:
        return self.frames["video"] >= READY_FRAMES and self.frames["audio"] > 0

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


async def serve_viewers(url: str) -> None:
    """Viewer process: a line "N" on stdin grows the viewers to N and answers "ready" once all
    receive; "stats" answers the frame counts per viewer and this process's CPU seconds."""
    import httpx

    browser_like_receivers()
    viewers: list[Viewer] = []
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(timeout=15) as client:
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            if line == "stats":
                frames = [v.frames for v in viewers]
                reply = {"frames": frames, "cpu": sum(os.times()[:2])}
            else:
                while len(viewers) < int(line):
                    viewer = Viewer()
                    viewers.append(viewer)
                    await viewer.watch(client, url)
                async with asyncio.timeout(JOIN_TIMEOUT):
                    while not all(v.receiving for v in viewers):
                        await asyncio.sleep(0.1)
                reply = {"ready": len(viewers)}
            print(json.dumps(reply), flush=True)
    await asyncio.gather(*(v.close() for v in viewers))


class ViewerProcess:
    """The parent's handle on one viewer process (line-based requests on its stdin)."""

    def __init__(self, url: str):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--viewer-process", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"a viewer process exited ({self.proc.wait()})")
        return json.loads(answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ViewerPool:
    """Viewers spread over processes, at most ``per_process`` each: one Python event loop
    receiving 20 viewers' packets fell behind (~15 frames/s each) on this machine."""

    def __init__(self, url: str, most: int, per_process: int):
        count = max(1, -(-most // per_process))
        self.processes = [ViewerProcess(url) for _ in range(count)]

    def grow(self, viewers: int) -> None:
        """Grow to `viewers` in all (spread evenly); return once every one is receiving."""
        share, extra = divmod(viewers, len(self.processes))
        for index, process in enumerate(self.processes):
            process.send(str(share + (index < extra)))
        for process in self.processes:
            process.reply()

    def stats(self) -> dict:
        """Frame counts per viewer, and the viewer processes' CPU seconds."""
        for process in self.processes:
            process.send("stats")
        replies = [process.reply() for process in self.processes]
        return {
            "frames": [f for reply in replies for f in reply["frames"]],
            "cpu": sum(reply["cpu"] for reply in replies),
        }

    def close(self) -> None:
        for process in self.processes:
            process.close()


# --- the stream server --------------------------------------------------------------------


class StreamPlatform(Platform):
    """latency_bench's Platform without the edge, its WebRTC viewer limits set."""

    def __init__(self, workdir: Path, ladder: str | None, max_viewers: int):
        self.max_viewers = max_viewers
        super().__init__(workdir, {}, ladder)

    def _config(self, stream_settings: dict[str, float], ladder: str | None) -> str:
        text = super()._config(stream_settings, ladder)
        if self.max_viewers <= DEFAULT_MAX_VIEWERS_PER_STREAM:
            return text
        limits = f"max_viewers_per_stream: {self.max_viewers}, max_viewers: {self.max_viewers}"
        return text.replace("candidates: [127.0.0.1]}", f"candidates: [127.0.0.1], {limits}}}")

    def start(self) -> None:
        self.start_stream()  # (no edge: WHEP goes to the stream server)

    @property
    def server_pid(self) -> int:
        return self.children[0].proc.pid


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Step:
    viewers: int
    seconds: float
    server_cpu_percent: float  # of one core
    viewers_cpu_percent: float  # the viewer process's, for reference
    video_fps_min: float | None
    video_fps_median: float | None
    audio_fps_min: float | None
    load_average: float


def measure_step(platform: StreamPlatform, viewers: ViewerPool, count: int, seconds: float):
    viewers.grow(count)
    root = platform.server_pid
    before_stats, wall_before = viewers.stats(), time.monotonic()
    cpu_before = cpu_seconds(process_tree(root))
    time.sleep(seconds)
    cpu_after = cpu_seconds(process_tree(root))
    after_stats, wall_after = viewers.stats(), time.monotonic()
    elapsed = wall_after - wall_before
    pairs = list(zip(before_stats["frames"], after_stats["frames"], strict=True))
    video = [(b["video"] - a["video"]) / elapsed for a, b in pairs]
    audio = [(b["audio"] - a["audio"]) / elapsed for a, b in pairs]
    return Step(
        viewers=count,
        seconds=round(elapsed, 2),
        server_cpu_percent=round(100 * (cpu_after - cpu_before) / elapsed, 1),
        viewers_cpu_percent=round(100 * (after_stats["cpu"] - before_stats["cpu"]) / elapsed, 1),
        video_fps_min=round(min(video), 1) if video else None,
        video_fps_median=round(statistics.median(video), 1) if video else None,
        audio_fps_min=round(min(audio), 1) if audio else None,
        load_average=round(os.getloadavg()[0], 2),
    )


def slope(steps: list[Step]) -> float | None:
    """Least-squares CPU % per viewer over the steps with viewers (step 0 excluded)."""
    points = [(s.viewers, s.server_cpu_percent) for s in steps if s.viewers > 0]
    if len({x for x, _ in points}) < 2:
        return None
    return statistics.linear_regression(*zip(*points, strict=True)).slope


def run(args: argparse.Namespace) -> dict:
    steps_wanted = sorted(int(n) for n in args.steps.split(","))
    results: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="verge-webrtc-viewers-") as tmp:
        platform = StreamPlatform(Path(tmp), args.ladder, max(steps_wanted))
        viewers = None
        try:
            platform.start()
            budget = len(steps_wanted) * (args.seconds + JOIN_TIMEOUT) + 60
            publisher = platform.publish(budget)
            wait_live(f"{platform.origin_url}/live/{STREAM}.m3u8", publisher)
            url = f"{platform.origin_url}/live/{STREAM}/whep"
            viewers = ViewerPool(url, max(steps_wanted), args.viewers_per_process)
            for count in steps_wanted:
                step = measure_step(platform, viewers, count, args.seconds)
                results.append(step)
                print(describe(step), flush=True)
        finally:
            if viewers is not None:
                viewers.close()
            platform.stop()
    per_viewer = slope(results)
    return {
        "stream": f"720p{FPS} x264 zerolatency ~2.5 Mbps + AAC 96k, passed through; audio as Opus",
        "ladder": args.ladder,
        "cores": os.cpu_count(),
        "viewer_processes": -(-max(steps_wanted) // args.viewers_per_process) or 1,
        "steps": [asdict(s) for s in results],
        "cpu_percent_per_viewer": round(per_viewer, 2) if per_viewer else None,
        "viewers_per_core": round(100 / per_viewer, 1) if per_viewer and per_viewer > 0 else None,
    }


def describe(step: Step) -> str:
    def fps(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return (
        f"{step.viewers:>7} {step.server_cpu_percent:>10.1f} {step.viewers_cpu_percent:>11.1f}"
        f" {fps(step.video_fps_min):>9} {fps(step.video_fps_median):>10}"
        f" {fps(step.audio_fps_min):>9} {step.load_average:>6.2f}"
    )


HEADER = (
    "viewers server%CPU viewers%CPU video-min video-med audio-min  load\n"
    "                               (frames/s per viewer)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="0,5,10,20", help="viewer counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per step")
    parser.add_argument("--ladder", default="[{name: source}]", help="the app's ladder (YAML)")
    parser.add_argument("--viewers-per-process", type=int, default=10, help="client side")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--viewer-process", metavar="WHEP_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.viewer_process:
        asyncio.run(serve_viewers(args.viewer_process))
        return
    print(HEADER, flush=True)
    report = run(args)
    print(
        f"per viewer: {report['cpu_percent_per_viewer']} % of a core;"
        f" viewers per core: {report['viewers_per_core']}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
