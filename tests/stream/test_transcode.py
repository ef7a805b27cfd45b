"""The transcoder with the real ffmpeg: FLV made by ffmpeg in, fragmented MP4 out, checked by ffprobe.

Inputs are generated at test time (lavfi test sources). Most tests feed the FLV as fast as
possible; the latency and restart tests feed it at its own pace (real time), like a publisher.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from verge.stream import flv
from verge.stream import transcode as tc
from verge.stream.package.cmaf import Part
from verge.stream.package.live import LiveStream

pytestmark = pytest.mark.timeout(60)
FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin"]
LADDER = tc.ladder_from_config(["source", "720p", "480p", "360p", "240p"])


def _make_flv(path: Path, *args: str) -> bytes:
    subprocess.run([*FFMPEG, *args, "-f", "flv", "-y", str(path)], check=True, timeout=30)
    return path.read_bytes()


@pytest.fixture(scope="module")
def av_flv(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("in") / "av.flv"
    return _make_flv(
        path,
        *("-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"),
        *("-f", "lavfi", "-i", "sine", "-t", "4"),
        *("-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-c:a", "aac"),
    )


@pytest.fixture(scope="module")
def audio_flv(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("in") / "audio.flv"
    return _make_flv(path, "-f", "lavfi", "-i", "sine", "-t", "3", "-c:a", "aac")


@pytest.fixture(scope="module")
def small_av_flv(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("in") / "small.flv"
    return _make_flv(
        path,
        *("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25"),
        *("-f", "lavfi", "-i", "sine", "-t", "2"),
        *("-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-c:a", "aac"),
    )


@pytest.fixture(scope="module")
def video_flv(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("in") / "video.flv"
    return _make_flv(
        path,
        *("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-t", "2"),
        *("-c:v", "libx264", "-preset", "veryfast", "-g", "25"),
    )


# Reading what comes out.


@dataclass
class Track:
    """One output byte stream, split into top-level boxes as it arrives."""

    data: bytearray = field(default_factory=bytearray)
    pending: bytearray = field(default_factory=bytearray)
    boxes: list[tuple[str, float]] = field(default_factory=list)  # (type, arrival time)
    timescale: int = 0
    fragments: list[tuple[int, float]] = field(default_factory=list)  # (tfdt, arrival)
    inits: list[int] = field(default_factory=list)  # where each init segment (ftyp) starts

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        self.data += data
        self.pending += data
        while len(self.pending) >= 8:
            size, kind = struct.unpack(">I4s", self.pending[:8])
            if len(self.pending) < size:
                break
            box = bytes(self.pending[:size])
            del self.pending[:size]
            if kind == b"ftyp":
                self.inits.append(len(self.data) - len(self.pending) - size)
            self.boxes.append((kind.decode(), now))
            if kind == b"moov":
                self.timescale = _mdhd_timescale(box)
            elif kind == b"moof":
                self.fragments.append((_tfdt(box), now))


def _mdhd_timescale(moov: bytes) -> int:
    at = moov.index(b"mdhd")
    offset = at + 16 if moov[at + 4] == 0 else at + 24  # version 0 / 1
    return struct.unpack(">I", moov[offset : offset + 4])[0]


def _tfdt(moof: bytes) -> int:
    at = moof.index(b"tfdt")
    size = 8 if moof[at + 4] == 1 else 4
    return int.from_bytes(moof[at + 8 : at + 8 + size], "big")


@dataclass
class Collector:
    tracks: dict[str, Track] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    plans: list[list[tc.OutputTrack]] = field(default_factory=list)
    restarts: list[tc.Discontinuity] = field(default_factory=list)
    exits: list[tuple[bool, str]] = field(default_factory=list)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def job(self, ladder: list[tc.Rendition] = LADDER, **options: object) -> tc.TranscodeJob:
        return tc.TranscodeJob(
            ladder,
            on_output=self.on_output,
            on_plan=self.plans.append,
            on_restart=self.restarts.append,
            on_exit=self.on_exit,
            **options,  # type: ignore[arg-type]
        )

    def on_output(self, name: str, kind: str, data: bytes) -> None:
        self.kinds[name] = kind
        self.tracks.setdefault(name, Track()).feed(data)

    def on_exit(self, ok: bool, reason: str) -> None:
        self.exits.append((ok, reason))
        self.exited.set()


def _probe(path: Path, *entries: str) -> dict:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-of", "json", *entries, str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return json.loads(result.stdout)


def _save(track: Track, path: Path) -> Path:
    path.write_bytes(track.data)
    return path


async def _feed_paced(job: tc.TranscodeJob, data: bytes, during=None) -> dict[int, float]:
    """Feeds tag by tag at the stream's own pace; returns when each video tag was fed."""
    tags = list(flv.read_tags(data))
    job.feed(data[:13])
    fed: dict[int, float] = {}
    start = time.monotonic()
    for tag in tags:
        delay = start + tag.timestamp / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if during is not None:
            during(tag.timestamp)
        job.feed(flv.tag(tag.tag_type, tag.timestamp, tag.body))
        if tag.tag_type == flv.VIDEO:
            fed.setdefault(tag.timestamp, time.monotonic())
    return fed


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# The ladder and the command line (no process).


def test_plan_never_upscales() -> None:
    source = tc.SourceInfo(True, True, 640, 360, 25.0, video_codec=7, audio_codec=10)
    tracks = tc.plan_outputs(LADDER, source)
    assert [(t.name, t.kind, t.copy) for t in tracks] == [
        ("source", "video", True),
        ("240p", "video", False),  # 720p, 480p would upscale; 360p is the source's own size
        ("audio", "audio", True),
    ]
    assert (tracks[1].width, tracks[1].height) == (426, 240)
    small = tc.SourceInfo(True, False, 320, 240, None, video_codec=7)
    assert [t.name for t in tc.plan_outputs(tc.DEFAULT_LADDER, small)] == ["source"]


@pytest.mark.parametrize(
    ("height", "expected"),
    [
        (720, ["source", "480p", "360p"]),  # not "source" and "720p" of the same size
        (1080, ["source", "720p", "480p", "360p"]),
        (1088, ["source", "720p", "480p", "360p"]),  # 1080p rung: the coded height, 8 px more
        (728, ["source", "480p", "360p"]),  # within a few pixels of 720
        (712, ["source", "480p", "360p"]),  # a 720p rung would upscale
        (740, ["source", "720p", "480p", "360p"]),  # 20 px taller: 720p is a real step down
        (480, ["source", "360p"]),
    ],
)
def test_plan_leaves_out_rungs_of_the_sources_own_height(height: int, expected: list[str]) -> None:
    ladder = tc.ladder_from_config(["source", "1080p", "720p", "480p", "360p"])
    source = tc.SourceInfo(True, True, height * 16 // 9, height, 30.0, video_codec=7)
    assert [t.name for t in tc.plan_outputs(ladder, source)] == [*expected, "audio"]


def test_same_height_rung_is_kept_without_a_source_rung() -> None:
    """A ladder that does not keep the source: its 720p rung is the only 720p there is."""
    source = tc.SourceInfo(True, False, 1280, 720, 30.0, video_codec=7)
    tracks = tc.plan_outputs(tc.ladder_from_config(["720p", "480p"]), source)
    assert [(t.name, t.height) for t in tracks] == [("720p", 720), ("480p", 480)]


def test_plan_for_audio_only_and_other_codecs() -> None:
    assert [
        t.name for t in tc.plan_outputs(LADDER, tc.SourceInfo(False, True, audio_codec=10))
    ] == ["audio"]
    mp3_vp6 = tc.SourceInfo(True, True, 640, 480, 30.0, video_codec=4, audio_codec=2)
    tracks = {t.name: t for t in tc.plan_outputs(LADDER, mp3_vp6)}
    assert not tracks["source"].copy and not tracks["audio"].copy
    assert tracks["audio"].bitrate == 128_000  # the ladder's highest audio bitrate


def test_variants_give_bandwidth_and_resolution() -> None:
    source = tc.SourceInfo(True, True, 1280, 720, 30.0, 7, 10, video_bitrate=3_000_000)
    found = {v.name: v for v in tc.variants(tc.plan_outputs(tc.DEFAULT_LADDER, source))}
    assert list(found) == ["source", "480p", "360p"]  # a 720p rung would be the source again
    audio = 128_000
    assert found["source"].bandwidth == 3_000_000 + audio
    assert found["480p"] == tc.Variant("480p", 854, 480, 30.0, 1_498_000 + audio, "480p", "audio")
    only_audio = tc.variants(tc.plan_outputs(LADDER, tc.SourceInfo(False, True, audio_codec=10)))
    assert only_audio == [tc.Variant("audio", None, None, None, 128_000, None, "audio")]


def test_ladder_from_config() -> None:
    ladder = tc.ladder_from_config(
        [
            "source",
            {"name": "720p", "video_bitrate": 2_000_000},
            {"name": "540p", "height": 540, "video_bitrate": 2_000_000, "fps": 30},
        ]
    )
    assert ladder[1] == tc.Rendition("720p", 720, 2_000_000, 128_000)
    assert ladder[2].fps == 30
    # the shape of verge.config's Rendition (model_dump()): the source has video_bitrate 0
    dumped = {"name": "source", "height": None, "video_bitrate": 0, "audio_bitrate": 128_000}
    [source] = tc.ladder_from_config([dumped])
    tracks = tc.plan_outputs([source], tc.SourceInfo(True, False, 640, 360, 25.0, video_codec=7))
    assert tracks[0].copy and tracks[0].bitrate and tracks[0].bitrate > 0
    with pytest.raises(ValueError, match="unknown rendition"):
        tc.ladder_from_config(["4k"])
    with pytest.raises(ValueError, match="duplicate"):
        tc.ladder_from_config(["360p", "360p"])
    with pytest.raises(ValueError, match="even"):
        tc.Rendition("odd", 361, 1000)


def test_command_line() -> None:
    source = tc.SourceInfo(True, True, 1280, 720, 30.0, video_codec=7, audio_codec=10)
    tracks = tc.plan_outputs(tc.ladder_from_config(["source", "480p"]), source)
    command = tc.ffmpeg_command("/usr/bin/ffmpeg", tracks, [7, 8, 9])
    text = " ".join(command)
    assert "-f flv -i pipe:0" in text
    assert "-map 0:v:0 -c:v copy -f mp4" in text
    assert "-vf scale=-2:480 -c:v libx264 -preset veryfast -tune zerolatency" in text
    assert "-g 30 -keyint_min 30 -sc_threshold 0" in text
    assert "-map 0:a:0 -c:a copy" in text
    assert text.count(" ".join(tc.FMP4_FLAGS)) == 3
    assert command[-1] == "pipe:9"
    assert "-output_ts_offset" not in text and "frag_discont" not in text
    restarted = " ".join(tc.ffmpeg_command("/usr/bin/ffmpeg", tracks, [7, 8, 9], offset=2.5))
    assert restarted.count("+cmaf+frag_discont") == restarted.count("-output_ts_offset 2.500") == 3


def test_flv_prefix_and_splitter(av_flv: bytes) -> None:
    tags = list(flv.read_tags(av_flv))
    splitter = tc.FlvSplitter()
    parsed = []
    for offset in range(0, len(av_flv), 997):  # odd chunk sizes cut through headers and bodies
        parsed += splitter.feed(av_flv[offset : offset + 997])
    assert parsed == [(t.tag_type, t.timestamp, t.body) for t in tags]
    video_seq = next(t.body for t in tags if t.tag_type == flv.VIDEO)
    prefix = tc.flv_prefix({"width": 640.0, "audiocodecid": 10.0}, video_seq, None)
    assert prefix[4] == 0x01  # video only
    assert [t.tag_type for t in flv.read_tags(prefix)] == [flv.SCRIPT, flv.VIDEO]
    assert tc.avc_dimensions(video_seq) == (640, 360)  # SPS with cropping (368 -> 360)


def test_missing_ffmpeg_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(tc.FfmpegNotFound, match="VERGE_FFMPEG"):
        tc.resolve_ffmpeg("/nonexistent/ffmpeg")
    monkeypatch.setenv("VERGE_FFMPEG", "/nonexistent/ffmpeg-env")
    with pytest.raises(tc.FfmpegNotFound, match="ffmpeg-env"):
        tc.resolve_ffmpeg()
    monkeypatch.delenv("VERGE_FFMPEG")
    assert tc.resolve_ffmpeg().endswith("ffmpeg")


async def test_job_with_missing_ffmpeg_raises() -> None:
    with pytest.raises(tc.FfmpegNotFound):
        tc.TranscodeJob(LADDER, ffmpeg="/nonexistent/ffmpeg", on_output=lambda *_: None)


# Real transcoding.


async def test_ladder_output_is_fragmented_mp4(av_flv: bytes, tmp_path: Path) -> None:
    got = Collector()
    job = got.job(max_lag=60.0)
    for offset in range(0, len(av_flv), 4096):
        job.feed(av_flv[offset : offset + 4096])
    while None in job.pids.values():
        await asyncio.sleep(0.01)
    pids = list(job.pids.values())
    await job.close()
    assert got.exits == [(True, "closed")] and all(_gone(pid) for pid in pids)
    assert [t.name for t in got.plans[0]] == ["source", "240p", "audio"]  # 360p: the source's
    assert got.kinds == {"source": "video", "240p": "video", "audio": "audio"}
    expected = {"source": (640, 360), "240p": (426, 240)}
    for name, track in got.tracks.items():
        assert [kind for kind, _ in track.boxes[:3]] == ["ftyp", "moov", "moof"]
        assert {kind for kind, _ in track.boxes[2:]} == {"moof", "mdat"}
        path = _save(track, tmp_path / f"{name}.mp4")
        stream = _probe(path, "-show_streams")["streams"]
        assert len(stream) == 1  # one track per output
        assert float(stream[0]["duration"]) == pytest.approx(4.0, abs=0.1)
        starts = [tfdt / track.timescale for tfdt, _ in track.fragments]
        steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert statistics.median(steps) == pytest.approx(0.2, abs=0.03)
        if name == "audio":
            assert stream[0]["codec_name"] == "aac"
            continue
        assert stream[0]["codec_name"] == "h264"
        assert (stream[0]["width"], stream[0]["height"]) == expected[name]
        packets = _probe(path, "-show_packets", "-select_streams", "v")["packets"]
        keys = [float(p["pts_time"]) for p in packets if "K" in p["flags"]]
        assert len(packets) == 100
        assert [round(b - a, 2) for a, b in zip(keys, keys[1:], strict=False)] == [1.0] * 3


async def test_audio_only_input_gives_audio_only_output(audio_flv: bytes, tmp_path: Path) -> None:
    got = Collector()
    job = got.job(max_lag=60.0)
    job.feed(audio_flv)
    await job.close()
    assert list(got.tracks) == ["audio"] and got.kinds == {"audio": "audio"}
    assert job.source is not None and not job.source.has_video
    streams = _probe(_save(got.tracks["audio"], tmp_path / "a.mp4"), "-show_streams")["streams"]
    assert [s["codec_name"] for s in streams] == ["aac"]
    assert float(streams[0]["duration"]) == pytest.approx(3.0, abs=0.1)


async def test_video_only_input_gives_no_audio(video_flv: bytes, tmp_path: Path) -> None:
    got = Collector()
    job = got.job(max_lag=60.0)
    job.feed(video_flv)
    await job.close()
    assert sorted(got.tracks) == ["source"]  # 320x240: no rung below it, 240p is its own size
    streams = _probe(_save(got.tracks["source"], tmp_path / "v.mp4"), "-show_streams")["streams"]
    assert (streams[0]["width"], streams[0]["height"]) == (320, 240)


async def test_ingest_style_input(av_flv: bytes) -> None:
    """Metadata and tag bodies as the RTMP ingest delivers them (no FLV byte stream)."""
    got = Collector()
    job = got.job(tc.ladder_from_config(["source"]), max_lag=60.0)
    for tag in flv.read_tags(av_flv):
        if tag.tag_type == flv.SCRIPT:
            from verge.stream.rtmp import amf0

            job.write_metadata(dict(amf0.decode(tag.body)[1]))
        elif tag.tag_type == flv.VIDEO:
            job.write_video(tag.timestamp, tag.body)
        else:
            job.write_audio(tag.timestamp, tag.body)
    await job.close()
    assert sorted(got.tracks) == ["audio", "source"]
    assert job.source is not None and (job.source.width, job.source.height) == (640, 360)


async def test_falling_behind_drops_until_a_keyframe(av_flv: bytes, tmp_path: Path) -> None:
    got = Collector()
    job = got.job(tc.ladder_from_config(["source"]), max_lag=2.5)
    job.feed(av_flv)  # 4 s at once: more than 2.5 s of lag
    copy = job.groups[tc.COPY]
    assert copy._queued_bytes <= copy.max_queue_bytes
    await job.close()
    assert job.stats.drops >= 1 and job.stats.dropped_tags > 0
    path = _save(got.tracks["source"], tmp_path / "s.mp4")
    packets = _probe(path, "-show_packets")["packets"]
    assert "K" in packets[0]["flags"]  # what is left starts at a keyframe
    assert 0 < len(packets) < 100


async def test_gives_up_after_bounded_restarts(tmp_path: Path) -> None:
    script = tmp_path / "bad-ffmpeg"
    script.write_text("#!/bin/sh\necho 'boom: no such filter' >&2\nexit 3\n")
    script.chmod(0o755)
    got = Collector()
    job = got.job(ffmpeg=str(script), max_restarts=2, backoff=0.01)
    job.feed(tc.flv_prefix(None, None, bytes.fromhex("af001210")))
    job.write_audio(0, bytes.fromhex("af01") + b"\0" * 10)
    job.write_audio(2000, bytes.fromhex("af01") + b"\0" * 10)  # past the decision window

    async def publish() -> None:  # a restarted process starts at its first input tag
        for timestamp in range(2020, 60_000, 20):
            job.write_audio(timestamp, bytes.fromhex("af01") + b"\0" * 10)
            await asyncio.sleep(0.02)

    publisher = asyncio.create_task(publish())
    async with asyncio.timeout(10):
        await got.exited.wait()
    publisher.cancel()
    [(ok, reason)] = got.exits
    assert not ok and "3 times" in reason and "status 3" in reason
    assert job.stats.processes == 3 and job.stats.restarts == 2  # audio only: no encoder
    assert job.pids == {tc.COPY: None, tc.ENCODE: None}
    # announced when a new process gets its first tag (if it lives that long)
    assert all(r.attempt in (1, 2) and r.renditions == ("audio",) for r in got.restarts)
    assert list(job.stderr_tail) == ["boom: no such filter"]
    await job.close()


async def test_restart_after_ffmpeg_dies_and_latency(av_flv: bytes, tmp_path: Path) -> None:
    """Each process dies once (copy at 2 s, encode at 2.5 s): each restarts with a discontinuity
    on its own renditions only, and output time goes on from where the input is."""
    got = Collector()
    job = got.job(tc.ladder_from_config(["source", "240p"]), backoff=0.05)
    killed: dict[str, int] = {}

    def kill_once(timestamp: int) -> None:
        for group, at in ((tc.COPY, 2000), (tc.ENCODE, 2500)):
            pid = job.pids[group]
            if timestamp >= at and group not in killed and pid is not None:
                killed[group] = pid
                os.kill(pid, signal.SIGKILL)

    fed = await _feed_paced(job, av_flv, during=kill_once)
    await job.close()
    assert len(killed) == 2 and all(_gone(pid) for pid in killed.values())
    assert job.stats.processes == 4
    assert sorted(r.renditions for r in got.restarts) == [("240p",), ("source", "audio")]
    for restart in got.restarts:
        assert restart.attempt == 1 and "status -9" in restart.reason
        assert restart.input_timestamp is not None and restart.input_timestamp % 1000 in (0, 40)
        for name in restart.renditions:
            track = got.tracks[name]
            kinds = [kind for kind, _ in track.boxes]
            assert kinds.count("ftyp") == 2  # a new init segment after the restart
            second = kinds.index("ftyp", 1)
            assert kinds[second : second + 3] == ["ftyp", "moov", "moof"]
            path = tmp_path / f"{name}-after.mp4"
            path.write_bytes(track.data[track.inits[1] :])
            [stream] = _probe(path, "-show_streams")["streams"]
            assert float(stream["duration"]) == pytest.approx(4.0, abs=0.15)  # on to the end
            first = track.fragments[kinds[:second].count("moof")][0] / track.timescale
            assert first == pytest.approx(restart.input_timestamp / 1000, abs=0.1)  # one timeline
            if name != "audio":
                packets = _probe(path, "-show_packets")["packets"]
                assert "K" in packets[0]["flags"]  # from a keyframe on
    # Latency: feeding a fragment's first frame -> that fragment's moof arriving, before the kill.
    report = {}
    for name in ("source", "240p"):
        track = got.tracks[name]
        delays = [
            arrival - fed[round(tfdt * 1000 / track.timescale)]
            for tfdt, arrival in track.fragments[: 2000 // 200 - 1]
            if round(tfdt * 1000 / track.timescale) in fed
        ]
        assert delays
        report[name] = round(statistics.median(delays) * 1000)
        assert statistics.median(delays) < 0.8
    print(f"\nframe in -> fragment out (median, ms; includes the 200 ms fragment): {report}")


async def test_new_sequence_header_replans(
    av_flv: bytes, small_av_flv: bytes, tmp_path: Path
) -> None:
    """A publisher switching to 320x240 mid-stream: new process, new plan, no 240p (its size)."""
    got = Collector()
    job = got.job(max_lag=60.0)
    job.feed(av_flv)
    for tag in flv.read_tags(small_av_flv):
        if tag.tag_type != flv.SCRIPT:
            job.feed(flv.tag(tag.tag_type, tag.timestamp + 4040, tag.body))
    await job.close()
    assert [[t.name for t in plan] for plan in got.plans] == [
        ["source", "240p", "audio"],
        ["source", "audio"],
    ]
    [change] = got.restarts
    assert change.attempt == 0 and "video sequence header changed" in change.reason
    assert change.input_timestamp == 4040 and change.renditions == ("source", "audio")
    assert job.stats.processes == 3  # copying: 2 (one per format); encoding: 1 (then no rung)
    source = got.tracks["source"]
    assert len(source.inits) == 2 and len(got.tracks["240p"].inits) == 1
    before, after = tmp_path / "before.mp4", tmp_path / "after.mp4"
    before.write_bytes(source.data[: source.inits[1]])
    after.write_bytes(source.data[source.inits[1] :])
    [old] = _probe(before, "-show_streams")["streams"]
    [new] = _probe(after, "-show_streams")["streams"]
    assert (old["width"], old["height"], new["width"], new["height"]) == (640, 360, 320, 240)
    assert float(old["duration"]) == pytest.approx(4.0, abs=0.1)
    assert float(new["duration"]) == pytest.approx(4.04 + 2.0, abs=0.1)  # one timeline


@pytest.fixture(scope="module")
def long_av_flv(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("in") / "long.flv"
    return _make_flv(
        path,
        *("-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"),
        *("-f", "lavfi", "-i", "sine", "-t", "6"),
        *("-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-crf", "10", "-c:a", "aac"),
    )  # ~1.7 Mbit/s: the pipe to a stalled encoder holds well under a second of it


@dataclass
class PartCounter:
    """The source and the 240p rung packaged as the stream server does; counts listed parts."""

    packager: LiveStream = field(default_factory=lambda: LiveStream(part_target=0.25))
    listed: dict[str, int] = field(default_factory=dict)
    wanted: Callable[[], bool] = lambda: False
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def on_output(self, name: str, kind: str, data: bytes) -> None:
        rendition = self.packager.renditions.get(name) or self.packager.add_rendition(name)
        parts = sum(isinstance(event, Part) for event in rendition.feed(data))
        self.listed[name] = self.listed.get(name, 0) + parts
        if self.wanted():
            self.reached.set()

    async def until(self, name: str, count: int, also: Callable[[], bool] = lambda: True) -> None:
        """Until ``name`` has ``count`` parts listed and ``also()`` holds (checked on output)."""
        self.wanted = lambda: self.listed.get(name, 0) >= count and also()
        self.reached = asyncio.Event()
        if self.wanted():
            return
        async with asyncio.timeout(15):
            await self.reached.wait()


async def test_source_keeps_flowing_while_the_encoder_is_stalled(long_av_flv: bytes) -> None:
    """SIGSTOP the encoding ffmpeg: the copied source goes on being listed part by part, the
    encoder's queue is dropped (it lags past max_lag), and after SIGCONT the rung goes on."""
    counter = PartCounter()
    job = tc.TranscodeJob(
        tc.ladder_from_config(["source", "240p"]),
        on_output=counter.on_output,
        part_target=0.25,
        max_lag=1.0,
    )
    feeding = asyncio.create_task(_feed_paced(job, long_av_flv))
    await counter.until("240p", 1)  # both processes run and the rung has made a part
    encoder = job.pids[tc.ENCODE]
    assert encoder is not None
    os.kill(encoder, signal.SIGSTOP)
    try:
        rung_at_stop = counter.listed["240p"]
        dropped = lambda: job.groups[tc.ENCODE].stats.drops >= 1  # noqa: E731
        await counter.until("source", counter.listed["source"] + 8, dropped)  # 2 s of parts
        assert counter.listed["240p"] <= rung_at_stop + 1  # one may have been in the pipe
    finally:
        os.kill(encoder, signal.SIGCONT)
    resumed = counter.listed["240p"]
    await counter.until("240p", resumed + 2)  # the same process goes on after the drop
    await feeding
    await job.close()
    assert job.pids == {tc.COPY: None, tc.ENCODE: None} and _gone(encoder)
    assert job.groups[tc.COPY].stats.drops == 0
    assert job.stats.restarts == 0 and job.stats.processes == 2
