"""Video analysis (verge.stream.analysis): the pure parser and renderers on captured ffmpeg
lines, then the real thing on a video generated at test time (ffmpeg lavfi; never committed):

    0.00-2.24 s  testsrc2            cut at 2.24 (frame 56)
    2.24-4.24 s  the astronaut photo  (skimage.data.astronaut(): a face), cut at 4.24
    4.24-5.24 s  black               cut at 5.24
    5.24-7.00 s  SMPTE bars
    audio: a tone, silent from 3.0 to 4.5 s

Cut times must be right to one frame (25 fps), the black stretch too, and the detector must
see a face within the photo's span. Then the same through a VOD entry and its endpoints, and
a live stream with ``analysis: true``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests import browser
from tests.conftest import EdgeProcess
from tests.stream.package import media
from tests.stream.package.media import AUDIO, VIDEO
from verge.config import Rendition, StreamApp, StreamSettings
from verge.stream.analysis import analysis_file, latest_run, run_analysis
from verge.stream.analysis.detect import load_detector
from verge.stream.analysis.report import (
    Findings,
    chapters_vtt,
    detection_events,
    on_wall_clock,
    result,
    scenes,
    vtt_time,
)
from verge.stream.analysis.runner import RESULT, AnalysisOptions, analysis_command, filter_graph
from verge.stream.analysis.service import FragmentEnds, LiveAnalyzer, RunAnchor, entry_inputs
from verge.stream.package.hls import format_pdt
from verge.stream.package.live import LiveStream
from verge.stream.package.mp4 import BoxReader, parse_init, parse_moof
from verge.stream.server import StreamServer
from verge.stream.vod import VodLibrary

FRAME = 1 / 25
CUTS = (2.24, 4.24, 5.24)
BLACK = (4.24, 5.24)
SILENCE = (3.0, 4.5)
FACE = (2.24, 4.24)
DURATION = 7.0
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg missing")

LOG = """\
[scdet @ 0x55] lavfi.scd.score: 34.145, lavfi.scd.time: 2.24
[showinfo@cut @ 0x56] n:   0 pts:  28672 pts_time:2.24    pos: 1 fmt:yuvj420p s:256x144
[showinfo@tick @ 0x57] n:   0 pts:      0 pts_time:0       pos: 351 fmt:yuvj420p
[showinfo@tick @ 0x57] color_range:pc color_space:unknown
[silencedetect @ 0x58] silence_start: 3.00193
[showinfo@key @ 0x59] n:   1 pts:  38400 pts_time:3       pos: 9 fmt:bgr24
[scdet @ 0x55] lavfi.scd.score: 21.805, lavfi.scd.time: 4.24
[showinfo@cut @ 0x56] n:   1 pts:  54272 pts_time:4.24    pos: 2 fmt:yuvj420p
[silencedetect @ 0x58] silence_end: 4.49932 | silence_duration: 1.49739
[blackdetect @ 0x5a] black_start:4.24 black_end:5.24 black_duration:1
[showinfo@tick @ 0x57] n:   1 pts:  128000 pts_time:10      pos: 9 fmt:yuvj420p
[silencedetect @ 0x58] silence_start: 6.5
"""


# ---- pure: the parser and the renderers -----------------------------------------------------


def test_findings_from_captured_lines():
    findings = Findings().feed_all(LOG.splitlines())
    assert findings.cuts == [(2.24, 34.145), (4.24, 21.805)]
    assert [(e.kind, e.start, e.end) for e in findings.events] == [
        ("silent", 3.00193, 4.49932),
        ("black", 4.24, 5.24),
    ]
    assert [(t.time, t.file) for t in findings.cut_thumbs] == [(2.24, "c1.jpg"), (4.24, "c2.jpg")]
    assert [(t.time, t.file) for t in findings.tick_thumbs] == [(0.0, "t1.jpg"), (10.0, "t2.jpg")]
    assert findings.last_time == 10.0
    findings.finish(12.0)  # a silence still open at the end lasts to it
    assert findings.events[-1].as_json() == {
        "kind": "silent",
        "start": 6.5,
        "end": 12.0,
        "confidence": 1.0,
    }


def test_result_shape_and_urls():
    findings = Findings().feed_all(LOG.splitlines())
    findings.finish(12.0)
    face = detection_events([(3.0, "face", 0.8)], step=1.0)
    data = result(
        findings,
        duration=12.0,
        detector="x",
        interval=10.0,
        base_url="/vod/a/analysis/abc123",
        detections=face,
        extra={"state": "done"},
    )
    assert data["scenes"] == [
        {"time": 2.24, "score": 0.341, "thumbnail": "/vod/a/analysis/abc123/c1.jpg"},
        {"time": 4.24, "score": 0.218, "thumbnail": "/vod/a/analysis/abc123/c2.jpg"},
    ]
    assert [e["kind"] for e in data["events"]] == ["face", "silent", "black", "silent"]
    assert data["events"][0] == {"kind": "face", "start": 2.5, "end": 3.5, "confidence": 0.8}
    assert data["thumbnails"][1] == {"time": 10.0, "url": "/vod/a/analysis/abc123/t2.jpg"}
    assert data["chapters"] == "/vod/a/analysis/abc123/chapters.vtt"
    assert data["detector"] == "x" and data["state"] == "done" and data["duration"] == 12.0
    json.dumps(data)


def test_a_cut_without_its_frame_has_no_thumbnail():
    findings = Findings().feed_all(["[scdet @ 0x1] lavfi.scd.score: 50.0, lavfi.scd.time: 1.5"])
    assert scenes(findings) == [{"time": 1.5, "score": 0.5, "thumbnail": None}]


def test_detections_merge_into_events():
    hits = [(1.0, "face", 0.5), (2.0, "face", 0.9), (3.0, "person", 0.7), (6.0, "face", 0.6)]
    events = [e.as_json() for e in detection_events(hits, step=1.0)]
    assert events == [
        {"kind": "face", "start": 0.5, "end": 2.5, "confidence": 0.9},
        {"kind": "face", "start": 5.5, "end": 6.5, "confidence": 0.6},
        {"kind": "person", "start": 2.5, "end": 3.5, "confidence": 0.7},
    ]
    assert detection_events([(0.2, "face", 0.5)], step=1.0)[0].start == 0.0
    assert detection_events([], step=1.0) == []


def test_chapters_vtt():
    assert vtt_time(3725.5) == "01:02:05.500"
    assert vtt_time(0.0404) == "00:00:00.040"
    text = chapters_vtt([{"time": 2.24}, {"time": 4.24}], 7.0)
    assert text.splitlines()[:8] == [
        "WEBVTT",
        "",
        "1",
        "00:00:00.000 --> 00:00:02.240",
        "Scene 1",
        "",
        "2",
        "00:00:02.240 --> 00:00:04.240",
    ]
    assert "00:00:04.240 --> 00:00:07.000\nScene 3" in text
    assert chapters_vtt([], 0.0).count("-->") == 1


def test_command_without_audio_or_detector():
    options = AnalysisOptions()
    graph = filter_graph(options, video=True, audio=False, detect=False)
    assert "scdet=threshold=10.0" in graph and "silencedetect" not in graph
    assert "[keys]" not in graph
    command = analysis_command(
        "ffmpeg", ["-i", "v.mp4"], None, Path("/o"), options, detect=False, live=True
    )
    assert "-copyts" in command and "pipe:1" not in command and "/o/c%d.jpg" in command
    audio_only = analysis_command("ffmpeg", None, ["-i", "a.mp4"], Path("/o"), options, detect=True)
    assert "[0:a]silencedetect=n=-50dB:d=0.5[aout]" in audio_only
    assert not any(arg.endswith(".jpg") for arg in audio_only)


def test_entry_inputs_pick_a_rendition_and_the_audio(tmp_path):
    for rendition, segments in (("720p", 2), ("360p", 3), ("audio", 3)):
        (tmp_path / rendition).mkdir()
        for name in ["init0.mp4", *(f"seg{i}.m4s" for i in range(segments))]:
            (tmp_path / rendition / name).write_bytes(b"x")
    (tmp_path / "360p" / "seg10.m4s").write_bytes(b"x")
    meta = {
        "renditions": [
            {"name": "720p", "kind": "video", "height": 720},
            {"name": "360p", "kind": "video", "height": 360},
            {"name": "audio", "kind": "audio", "height": None},
        ],
        "download": {"file": "download.mp4"},
    }
    video, audio = entry_inputs(tmp_path, meta)
    assert video == [
        "-i",
        "concat:360p/init0.mp4|360p/seg0.m4s|360p/seg1.m4s|360p/seg2.m4s|360p/seg10.m4s",
    ]
    assert audio[1].startswith("concat:audio/init0.mp4|audio/seg0.m4s")
    (tmp_path / "360p" / "init1.mp4").write_bytes(b"x")  # a discontinuity: the whole file
    assert entry_inputs(tmp_path, meta) == (["-i", "download.mp4"], ["-i", "download.mp4"])


def test_analysis_files_refuse_path_tricks(tmp_path):
    assert analysis_file(tmp_path, "1a2b3c4d", "c1.jpg") == tmp_path / "1a2b3c4d" / "c1.jpg"
    assert analysis_file(tmp_path, "1a2b3c4d", "chapters.vtt") is not None
    for run, file in (
        ("..", "c1.jpg"),
        ("1a2b3c4d", "../x.jpg"),
        ("1a2b3c4d", "meta.json"),
        ("zz", "c1.jpg"),
    ):
        assert analysis_file(tmp_path, run, file) is None
    assert latest_run(tmp_path / "missing") is None


def test_no_detector_package_means_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "cv2", None)
    assert load_detector() is None
    assert load_detector("none") is None


# ---- live: the wall-clock anchor of a run (started_at) -----------------------------------------

T0 = 1_700_000_000.0  # the wall clock of media time 0 in these tests


def fragments(data: bytes) -> tuple[bytes, list[tuple[bytes, float]]]:
    """A video-only fMP4 stream's init and its moof+mdat pairs, each with the media time (s)
    at which it ends."""
    boxes = BoxReader().feed(data)
    init = b"".join(b.data for b in boxes if b.type in ("ftyp", "moov"))
    info = parse_init(init)
    track = info.tracks[0]
    pairs, moof = [], None
    for box in boxes:
        if box.type == "moof":
            moof = box.data
        elif box.type == "mdat" and moof is not None:
            traf = parse_moof(moof, info).traf(track.track_id)
            pairs.append(
                (moof + box.data, (traf.base_decode_time + traf.duration) / track.timescale)
            )
    return init, pairs


def play_live(rendition, init: bytes, pairs, ingest_delay: float, output_delay: float) -> None:
    """Feed the packager as the server does: each fragment once the transcoder wrote it."""
    rendition.feed(init, T0 + ingest_delay)
    for data, end in pairs:
        rendition.feed(data, T0 + end + output_delay)


@needs_ffmpeg
def test_live_anchor_is_the_playlists_program_date_time():
    """With the packager, started_at + media time is PROGRAM-DATE-TIME, per discontinuity."""
    video, _ = media.separate(seconds=4)
    init, pairs = fragments(video)
    stream = LiveStream(part_target=0.2, segment_target=1.0)
    stream.timeline.arrival = lambda media_seconds: T0 + 0.01 + media_seconds  # the ingest
    rendition = stream.add_rendition("v")
    first = RunAnchor.starting(rendition)
    assert first.from_segments(rendition.segments) is None  # nothing packaged yet
    play_live(rendition, init, pairs, 0.0, 0.3)
    started_at = first.from_segments(rendition.segments)
    assert started_at == pytest.approx(T0 + 0.01, abs=1e-6)  # the ingest, not the output
    for segment in rendition.segments:
        assert segment.pdt == pytest.approx(started_at + segment.start / segment.timescale)

    # the publisher came back (a new transcoder, media time from 0): a new run, a new anchor
    stream.restart()
    second = RunAnchor.starting(rendition)
    stream.timeline.arrival = lambda media_seconds: T0 + 100.0 + media_seconds
    assert second.from_segments(rendition.segments) is None  # only the old run's segments
    play_live(rendition, init, pairs, 100.0, 100.3)
    assert second.from_segments(rendition.segments) == pytest.approx(T0 + 100.0, abs=1e-6)
    assert first.from_segments(rendition.segments) == started_at  # fixed once found
    # what a player reads: each discontinuity's PROGRAM-DATE-TIME is its run's anchor + start
    playlist = stream.media_playlist("v")
    dates = [line.split(":", 1)[1] for line in playlist.splitlines() if "DATE-TIME" in line]
    firsts = [s for s in rendition.segments if s.msn in (0, second.after_msn + 1)]
    expected = [
        format_pdt(anchor + s.start / s.timescale)
        for anchor, s in zip((started_at, second.started_at), firsts, strict=True)
    ]
    assert dates == expected


@needs_ffmpeg
def test_live_anchor_measured_without_a_packager():
    """Each fragment arrives once written: arrival - media end, the least of them."""
    video, _ = media.separate(seconds=3)
    init, pairs = fragments(video)
    anchor = RunAnchor()
    anchor.measure(init, T0)
    assert anchor.started_at is None
    delays = [0.09, 0.03, 0.05, 0.02, 0.04] * len(pairs)
    for (data, end), delay in zip(pairs, delays, strict=False):
        for piece in media.chunks(data, seed=len(data)):  # as a pipe delivers it
            anchor.measure(piece, T0 + end + delay)
    assert anchor.started_at == pytest.approx(T0 + 0.02, abs=1e-6)
    broken = FragmentEnds()
    assert broken.feed(b"\x00\x00\x00\x04moov") == [] and broken.feed(init) == []  # stops


def test_live_result_is_served_with_its_anchor(tmp_path):
    analyzer = LiveAnalyzer("ffmpeg", tmp_path / "a", "/live/cam/analysis")
    run = tmp_path / "a" / "18c0a1b2c3d"
    run.mkdir(parents=True)
    findings = Findings().feed_all(LOG.splitlines())
    own = result(findings, duration=12.0, detector="x", interval=10.0, base_url="/x")
    (run / RESULT).write_text(json.dumps(own))
    assert analyzer.current() == run  # no anchor for this run: its own result
    anchor = analyzer.anchors[run.name] = RunAnchor()
    anchor.measured = T0 + 0.0123456
    served = json.loads((analyzer.current() / RESULT).read_text())
    assert served == {**own, "started_at": round(T0 + 0.012, 3)}
    assert served == on_wall_clock(own, T0 + 0.0123456)
    (run / RESULT).write_text(json.dumps({**own, "duration": 14.0}))  # the analysis went on
    assert json.loads((analyzer.current() / RESULT).read_text())["duration"] == 14.0
    anchor.measured = T0 - 0.5  # a better measurement
    assert json.loads((analyzer.current() / RESULT).read_text())["started_at"] == T0 - 0.5
    assert analysis_file(tmp_path / "a", run.name, "served") is None  # not a URL


# ---- the real thing: a generated video -------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The video of the module doc (H.264 + AAC, keyframe every second), made once."""
    skimage_data = pytest.importorskip("skimage.data")
    imageio = pytest.importorskip("imageio.v3")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg missing")
    work = tmp_path_factory.mktemp("clip")
    face = work / "face.png"
    imageio.imwrite(face, skimage_data.astronaut())
    out = work / "clip.mp4"
    size = "640x360"
    video = (
        f"[1:v]scale={size.replace('x', ':')}:force_original_aspect_ratio=decrease,"
        f"pad={size.replace('x', ':')}:(ow-iw)/2:0,setsar=1,format=yuv420p[face];"
        "[0:v]format=yuv420p[a];[2:v]format=yuv420p[b];[3:v]format=yuv420p[c];"
        "[a][face][b][c]concat=n=4:v=1:a=0[v]"
    )
    tone = (
        f"aevalsrc='if(between(t,{SILENCE[0]},{SILENCE[1]}),0,0.5*sin(2*PI*440*t))'"
        f":s=44100:d={DURATION}"
    )
    sources = [
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration={CUTS[0]}",
        "-loop", "1", "-framerate", "25", "-t", str(FACE[1] - FACE[0]), "-i", str(face),
        "-f", "lavfi", "-i", f"color=black:size={size}:rate=25:duration={BLACK[1] - BLACK[0]}",
        "-f", "lavfi", "-i", f"smptebars=size={size}:rate=25:duration={DURATION - CUTS[2]}",
        "-f", "lavfi", "-i", tone,
    ]  # fmt: skip
    mapping = ["-filter_complex", video, "-map", "[v]", "-map", "4:a"]
    command = ["ffmpeg", "-v", "error", "-y", *sources, *mapping, *VIDEO, *AUDIO, str(out)]
    subprocess.run(command, check=True, timeout=120)
    return out


async def analyse(clip: Path, out: Path, **options) -> dict:
    """The clip's analysis (video and audio from the one file) into ``out``."""
    inputs = ["-i", str(clip)]
    return await run_analysis(
        "ffmpeg", out, "/vod/clip/analysis", inputs, inputs, duration=DURATION, **options
    )


def near(value: float, expected: float, tolerance: float = FRAME + 0.001) -> bool:
    return abs(value - expected) <= tolerance


def check_timeline(data: dict, *, face: bool = True) -> None:
    assert len(data["scenes"]) == len(CUTS), data["scenes"]
    for scene, cut in zip(data["scenes"], CUTS, strict=True):
        assert near(scene["time"], cut), (scene, cut)
        assert scene["thumbnail"].endswith(".jpg")
    black = [e for e in data["events"] if e["kind"] == "black"]
    assert len(black) == 1
    assert near(black[0]["start"], BLACK[0]) and near(black[0]["end"], BLACK[1])
    silent = [e for e in data["events"] if e["kind"] == "silent"]
    assert len(silent) == 1
    assert near(silent[0]["start"], SILENCE[0], 0.1) and near(silent[0]["end"], SILENCE[1], 0.1)
    faces = [e for e in data["events"] if e["kind"] == "face"]
    if face:
        assert len(faces) == 1, data["events"]
        # seen on keyframes (one a second) inside the photo's span, spread half a second
        assert FACE[0] - 1 <= faces[0]["start"] <= faces[0]["end"] <= FACE[1] + 1, faces
        assert faces[0]["start"] < FACE[1] and faces[0]["end"] > FACE[0]
        assert 0.4 <= faces[0]["confidence"] <= 1
    else:
        assert faces == []


@needs_ffmpeg
@pytest.mark.timeout(120)
async def test_the_clip_gives_cuts_black_silence_and_a_face(clip, tmp_path):
    pytest.importorskip("nudenet")
    seen: list[float] = []
    data = await analyse(clip, tmp_path / "out", progress=seen.append, interval=2.0)
    assert data["detector"] == "nudenet-yolov8n" and data["state"] == "done"
    check_timeline(data)
    assert [t["time"] for t in data["thumbnails"]] == [0.0, 2.0, 4.0, 6.0]
    run = latest_run(tmp_path / "out")
    assert data["chapters"] == f"/vod/clip/analysis/{run.name}/chapters.vtt"
    for item in [*data["scenes"], *data["thumbnails"]]:
        file = run / (item.get("thumbnail") or item["url"]).rsplit("/", 1)[1]
        assert file.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    vtt = (run / "chapters.vtt").read_text()
    assert vtt.startswith("WEBVTT") and vtt.count("-->") == 4
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [run.name]  # no partial left


@needs_ffmpeg
@pytest.mark.timeout(120)
async def test_without_a_detector_the_rest_still_works(clip, tmp_path):
    data = await analyse(clip, tmp_path / "out", detector="none")
    assert data["detector"] == "unavailable"
    check_timeline(data, face=False)


# ---- VOD entries: the library, the endpoints, the player page ---------------------------------

LADDER = [Rendition(name="360p", height=360, video_bitrate=600_000, audio_bitrate=64_000)]


@pytest.fixture(scope="module")
def vod_data(clip, tmp_path_factory) -> Path:
    """A data dir whose library holds entry "clip", analysed (made once for the module)."""
    data = tmp_path_factory.mktemp("vod")

    async def make() -> None:
        library = VodLibrary(StreamSettings(data_dir=str(data)))
        await library.package_file(clip, "clip", _ladder())
        await library.analyze("clip")

    asyncio.run(make())
    return data


def _ladder():
    from verge.stream.transcode import ladder_from_config

    return ladder_from_config(r.model_dump() for r in LADDER)


@pytest.fixture
async def vod_server(vod_data):
    server = StreamServer(StreamSettings(data_dir=str(vod_data)), transcode=False)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    yield server
    await server.close()


@needs_ffmpeg
@pytest.mark.timeout(180)
async def test_vod_entry_analysis_endpoints(vod_server):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{vod_server.http_port}") as http:
        answer = await http.get("/vod/clip/analysis")
        assert answer.status_code == 200, answer.text
        assert answer.headers["cache-control"] == "public, max-age=300"
        assert answer.headers["content-type"] == "application/json"
        data = answer.json()
        check_timeline(data, face=data["detector"] != "unavailable")
        thumb = await http.get(data["scenes"][0]["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert "immutable" in thumb.headers["cache-control"]
        vtt = await http.get(data["chapters"])
        assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT")
        assert vtt.headers["content-type"].startswith("text/vtt")
        run = data["chapters"].split("/")[-2]
        for bad in (
            f"/vod/clip/analysis/{run}/meta.json",
            f"/vod/clip/analysis/{run}",
            "/vod/clip/analysis/zz/c1.jpg",
            "/vod/nope/analysis",
        ):
            assert (await http.get(bad)).status_code == 404, bad
        page = await http.get("/vod/clip")
        assert page.status_code == 200 and '<ol id="chapters"' in page.text
        assert (await http.get("/vod/_player/player.js")).status_code == 200
        assert (await http.get("/vod/clip.m3u8")).status_code == 200  # unchanged


@needs_ffmpeg
@pytest.mark.timeout(180)
async def test_vod_not_analysed_yet_says_so(vod_data, tmp_path):
    ignore = shutil.ignore_patterns("analysis")
    shutil.copytree(vod_data / "vod" / "clip", tmp_path / "vod" / "raw", ignore=ignore)
    server = StreamServer(StreamSettings(data_dir=str(tmp_path)), transcode=False)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http:
            answer = await http.get("/vod/raw/analysis")
            assert answer.status_code == 404 and answer.json()["state"] == "none"
            assert answer.headers["cache-control"] == "no-store"
    finally:
        await server.close()


# ---- live: an app with analysis: true ---------------------------------------------------------


async def publish_clip(server: StreamServer, clip: Path, name: str):
    """The clip, looped and paced like a camera, published over RTMP."""
    publish = [
        "-re", "-stream_loop", "-1", "-i", str(clip), "-t", "30", "-c:v", "libx264", "-preset",
        "ultrafast", "-tune", "zerolatency", "-g", "25", "-c:a", "aac", "-f", "flv",
    ]  # fmt: skip
    url = f"rtmp://127.0.0.1:{server.rtmp.port}/live/{name}"
    return await asyncio.create_subprocess_exec(
        "ffmpeg", "-v", "error", *publish, url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@needs_ffmpeg
@pytest.mark.timeout(120)
async def test_live_stream_analysis(clip, tmp_path):
    app = StreamApp(name="live", ladder=LADDER, analysis=True, record=False)
    server = StreamServer(StreamSettings(apps=[app], data_dir=str(tmp_path), grace=0.5))
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    publisher = await publish_clip(server, clip, "cam")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http:
            data = await _until_analysed(http, "/live/cam/analysis")
            answer = await http.get("/live/cam/analysis")
            assert answer.headers["cache-control"] == "public, max-age=2"
            assert data["live"] is True and data["state"] == "running"
            # the run's t=0 on the wall clock: the playlists' PROGRAM-DATE-TIME anchor, to
            # within the measured anchor's accuracy (see RunAnchor: a frame on an idle machine,
            # up to 0.11 s seen on a loaded one)
            anchor = server.channels["live/cam"].packager.timeline.anchors[0]
            assert abs(data["started_at"] - (anchor.wall - anchor.media)) < 0.25, data
            kinds = {e["kind"] for e in data["events"]}
            assert "black" in kinds, data
            thumb = await http.get(data["scenes"][0]["thumbnail"])
            assert thumb.status_code == 200 and "immutable" in thumb.headers["cache-control"]
            assert (await http.get(data["chapters"])).text.startswith("WEBVTT")
            other = await http.get("/live/other/analysis")  # polled by players: cacheable
            assert (
                other.status_code == 404 and other.headers["cache-control"] == "public, max-age=60"
            )
    finally:
        publisher.kill()
        await publisher.wait()
        await server.close()


async def _until_analysed(http: httpx.AsyncClient, url: str, timeout: float = 60.0) -> dict:
    """The live result once it has three cuts and a black stretch (the clip's first pass)."""
    async with asyncio.timeout(timeout):
        while True:
            answer = await http.get(url)
            if answer.status_code == 200:
                data = answer.json()
                if len(data["scenes"]) >= 3 and any(e["kind"] == "black" for e in data["events"]):
                    return data
            await asyncio.sleep(0.5)


# ---- the player page: chapters and the scrubbing preview, in headless Chromium ----------------

HLSJS = Path(__file__).parents[2] / "verge" / "stream" / "web" / "vendor" / "hls.min.js"


def chromium_ready() -> str | None:
    if (reason := browser.missing()) is not None:
        return reason
    return None if HLSJS.is_file() else "hls.js not vendored: bash scripts/vendor-web.sh"


def show_chapters(url: str) -> None:
    """The browser part (blocking Selenium calls; run in a thread)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    with browser.headless_chromium(("--window-size=1200,900", "--mute-audio")) as driver:
        driver.get(url)

        def chapters() -> list[str]:
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chapters li")]

        browser.wait_for(driver, lambda: len(chapters()) == 4, "four chapters", 30)
        assert chapters()[1] == "Scene 2 · 0:02" and chapters()[3] == "Scene 4 · 0:05"
        assert driver.find_element(By.ID, "chapters-box").is_displayed()
        cues = (
            "const t = [...document.getElementById('video').textTracks]"
            ".find(t => t.kind === 'chapters');"
            "return t && t.cues ? [...t.cues].map(c => [c.startTime, c.text]) : null"
        )
        browser.wait_for(driver, lambda: driver.execute_script(cues), "the WebVTT chapters", 15)
        assert [round(start, 2) for start, _ in driver.execute_script(cues)] == [0, *CUTS]
        scrub = driver.find_element(By.ID, "scrub")
        ActionChains(driver).move_to_element_with_offset(
            scrub, scrub.size["width"] // 4, 0
        ).perform()  # the middle of the bar is past 2.24 s: the face scene's thumbnail
        preview = driver.find_element(By.ID, "scrub-preview")
        browser.wait_for(driver, preview.is_displayed, "the scrubbing preview")
        thumb = driver.find_element(By.ID, "scrub-thumb").get_attribute("src")
        assert thumb.endswith(".jpg") and "/vod/clip/analysis/" in thumb
        assert driver.execute_script("return document.getElementById('scrub-thumb').naturalWidth")
        driver.find_elements(By.CSS_SELECTOR, "#chapters button")[2].click()
        browser.wait_for(
            driver,
            lambda: (
                abs(
                    driver.execute_script("return document.getElementById('video').currentTime")
                    - CUTS[1]
                )
                < 0.5
            ),
            "the video to seek to chapter 3",
            20,
        )


@pytest.mark.timeout(180)
@pytest.mark.skipif(chromium_ready() is not None, reason=str(chromium_ready()))
async def test_player_shows_chapters_and_thumbnails_through_an_edge(vod_server, tmp_path):
    origin = f"http://127.0.0.1:{vod_server.http_port}"
    edge = await asyncio.to_thread(lambda: EdgeProcess(tmp_path, origin_url=origin).start())
    try:
        await asyncio.to_thread(show_chapters, f"{edge.url}/vod/clip")
    finally:
        await asyncio.to_thread(edge.stop)


# ---- `verge vod analyze NAME` -----------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.timeout(120)
def test_cli_vod_analyze_reruns_an_entry(vod_data, tmp_path):
    from typer.testing import CliRunner

    from verge.cli.vod import vod_app

    shutil.copytree(vod_data / "vod", tmp_path / "vod")
    before = latest_run(tmp_path / "vod" / "clip" / "analysis")
    ran = CliRunner().invoke(vod_app, ["analyze", "clip", "--data-dir", str(tmp_path)])
    assert ran.exit_code == 0, ran.output
    assert "clip: 3 scene cuts" in ran.output and "1 black" in ran.output
    after = latest_run(tmp_path / "vod" / "clip" / "analysis")
    assert after.name != before.name and not before.exists()  # the new run replaced the old
    missing = CliRunner().invoke(vod_app, ["analyze", "nope", "--data-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "no VOD entry 'nope'" in missing.output
