"""VOD end to end: `verge vod add` packages a generated file, the stream server serves it,
ffprobe reads HLS, DASH and the progressive MP4; uploads, interruptions and recordings."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import VERGE
from verge.config import MiB, StreamSettings
from verge.stream.package.live import LiveStream
from verge.stream.server import StreamServer
from verge.stream.transcode import FMP4_FLAGS
from verge.stream.vod import VodError, VodLibrary, recording_from_live, recording_name

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
        reason="ffmpeg/ffprobe not installed",
    ),
]

TOKEN = "vod-secret"
FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]


def make_sample(path: Path, seconds: float, size: str = "854x480") -> Path:
    """A lavfi test source, H.264 + AAC in MP4."""
    subprocess.run(
        [*FFMPEG, "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25", "-f", "lavfi",
         "-i", "sine=frequency=440:sample_rate=48000", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)],
        check=True, timeout=30,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample(tmp_path_factory.mktemp("in") / "sample.mp4", 6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, sample: Path) -> Path:
    """A library with entry "clip", made by the CLI."""
    data = tmp_path_factory.mktemp("data")
    done = subprocess.run(
        [*VERGE, "vod", "add", str(sample), "--name", "clip", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "clip: 6.0 s" in done.stdout
    return data


@pytest.fixture
async def server(data_dir: Path):
    settings = StreamSettings(data_dir=str(data_dir), upload_token=TOKEN, max_upload_bytes=4 * MiB)
    server = StreamServer(settings, transcode=False)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    yield server
    await server.close()


def base(server: StreamServer) -> str:
    return f"http://127.0.0.1:{server.http_port}"


async def probe(url: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        "ffprobe", "-v", "error", "-show_entries",
        "stream=codec_name,width,height:format=duration", "-of", "json", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


def ffmpeg_children() -> list[int]:
    """This process's ffmpeg children (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if comm == "ffmpeg" and int(rest.split()[1]) == os.getpid():
            found.append(int(entry.name))
    return found


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_add_makes_an_entry_and_lists_it(data_dir: Path, sample: Path) -> None:
    entry = data_dir / "vod" / "clip"
    meta = json.loads((entry / "meta.json").read_text())
    # 854x480 source: 720p would upscale, 480p is the source's own size; both are left out
    assert [r["name"] for r in meta["renditions"]] == ["source", "360p", "audio"]
    assert {(r["width"], r["height"]) for r in meta["renditions"] if r["kind"] == "video"} == {
        (854, 480),
        (640, 360),
    }
    assert abs(meta["duration"] - 6.0) < 0.2
    assert {"master.m3u8", "manifest.mpd", "download.mp4"} <= {p.name for p in entry.iterdir()}
    assert "#EXT-X-ENDLIST" in (entry / "360p" / "index.m3u8").read_text()
    assert leftovers(data_dir / "vod") == []
    listed = subprocess.run(
        [*VERGE, "vod", "list", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert listed.stdout.startswith("clip\t6.0 s\tsource,360p,audio")
    again = subprocess.run(
        [*VERGE, "vod", "add", str(sample), "--name", "clip", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert again.returncode == 2 and "exists" in again.stderr


# --- serving ----------------------------------------------------------------------------------


async def test_ffprobe_reads_hls_dash_and_mp4(server: StreamServer) -> None:
    hls = await probe(base(server) + "/vod/clip.m3u8")
    videos = [s for s in hls["streams"] if s["codec_name"] == "h264"]
    assert {(s["width"], s["height"]) for s in videos} == {(854, 480), (640, 360)}
    assert any(s["codec_name"] == "aac" for s in hls["streams"])
    dash = await probe(base(server) + "/vod/clip.mpd")
    assert sorted(s["codec_name"] for s in dash["streams"]) == ["aac", "h264", "h264"]
    assert abs(float(dash["format"]["duration"]) - 6.0) < 0.2
    mp4 = await probe(base(server) + "/vod/clip.mp4")
    assert sorted(s["codec_name"] for s in mp4["streams"]) == ["aac", "h264"]
    assert abs(float(mp4["format"]["duration"]) - 6.0) < 0.2


async def test_mp4_ranges_and_cache_headers(server: StreamServer, data_dir: Path) -> None:
    body = (data_dir / "vod" / "clip" / "download.mp4").read_bytes()
    size = len(body)
    async with httpx.AsyncClient(base_url=base(server)) as client:
        full = await client.get("/vod/clip.mp4")
        assert full.status_code == 200 and full.content == body
        assert full.headers["accept-ranges"] == "bytes" and full.headers["etag"]
        assert body[4:8] == b"ftyp" and body.index(b"moov") < body.index(b"mdat")  # faststart
        part = await client.get("/vod/clip.mp4", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == body[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{size}"
        tail = await client.get("/vod/clip.mp4", headers={"Range": "bytes=-50"})
        assert tail.status_code == 206 and tail.content == body[-50:]
        bad = await client.get("/vod/clip.mp4", headers={"Range": f"bytes={size}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
        same = await client.get("/vod/clip.mp4", headers={"If-None-Match": full.headers["etag"]})
        assert same.status_code == 304
        head = await client.head("/vod/clip.mp4")
        assert head.headers["content-length"] == str(size) and head.content == b""
        segment = await client.get("/vod/clip/360p/seg0.m4s")
        assert segment.status_code == 200 and "immutable" in segment.headers["cache-control"]
        playlist = await client.get("/vod/clip/360p/index.m3u8")
        assert playlist.headers["cache-control"] == "public, max-age=3600"
        for missing in (
            "/vod/nope.m3u8",
            "/vod/clip.txt",
            "/vod/clip/source/meta.json",
            "/vod/clip/x/y/z",
            "/vod/nope/status",
        ):
            assert (await client.get(missing)).status_code == 404, missing


# --- the upload API ---------------------------------------------------------------------------


async def test_upload_needs_a_token_then_packages_to_ready(
    server: StreamServer, sample: Path
) -> None:
    data = sample.read_bytes()
    async with httpx.AsyncClient(base_url=base(server)) as client:
        assert (await client.post("/vod/up", content=data)).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.post("/vod/up", content=data, headers=wrong)).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.post("/vod/bad.name", content=data, headers=auth)).status_code == 400
        accepted = await client.post("/vod/up", content=data, headers=auth)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["state"] in ("queued", "packaging")
        assert (await client.post("/vod/up", content=data, headers=auth)).status_code == 409
        await server.vod.jobs["up"].task
        status = (await client.get("/vod/up/status")).json()
        assert status == {"name": "up", "state": "ready", "progress": 1.0, "error": None}
        assert (await client.get("/vod/clip/status")).json()["state"] == "ready"
    hls = await probe(base(server) + "/vod/up.m3u8")
    assert {s["codec_name"] for s in hls["streams"]} == {"h264", "aac"}
    assert leftovers(server.vod.root) == []


async def test_upload_too_large_is_refused(server: StreamServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    writer.write(
        b"POST /vod/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % (5 * MiB)
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert b" 413 " in status
    assert server.vod.get("big") is None and leftovers(server.vod.root) == []


async def test_failed_upload_reports_the_error(server: StreamServer) -> None:
    async with httpx.AsyncClient(base_url=base(server)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        accepted = await client.post("/vod/junk", content=b"not a video" * 100, headers=auth)
        assert accepted.status_code == 202
        await server.vod.jobs["junk"].task
        status = (await client.get("/vod/junk/status")).json()
    assert status["state"] == "failed" and status["error"]
    assert server.vod.get("junk") is None and leftovers(server.vod.root) == []


# --- interrupted packaging --------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample(tmp_path_factory.mktemp("long") / "long.mp4", 30)


async def test_killed_ffmpeg_leaves_no_entry(tmp_path: Path, long_sample: Path) -> None:
    library = VodLibrary(StreamSettings(data_dir=str(tmp_path)))
    killed: list[int] = []

    def on_progress(done: float) -> None:
        if not killed:
            killed.extend(ffmpeg_children())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(VodError, match="ffmpeg failed"):
        await library.package_file(long_sample, "movie", progress=on_progress)
    assert killed
    assert library.get("movie") is None and library.entries() == []
    assert leftovers(library.root) == []


async def test_cancelled_package_leaves_no_entry_and_no_ffmpeg(
    tmp_path: Path, long_sample: Path
) -> None:
    library = VodLibrary(StreamSettings(data_dir=str(tmp_path)))
    started = asyncio.Event()
    task = asyncio.create_task(
        library.package_file(long_sample, "movie", None, lambda _: started.set())
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ffmpeg_children() == []
    assert library.entries() == [] and leftovers(library.root) == []


def test_partial_dirs_of_dead_processes_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "vod"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (root / f".partial-{dead.pid}-abcd-movie" / "source").mkdir(parents=True)
    (root / f".partial-{os.getpid()}-abcd-other").mkdir()  # a live packager's: kept
    VodLibrary(StreamSettings(data_dir=str(tmp_path)))
    assert leftovers(root) == [f".partial-{os.getpid()}-abcd-other"]


# --- recording --------------------------------------------------------------------------------


async def test_record_from_live_cmaf_is_playable(server: StreamServer, tmp_path: Path) -> None:
    video, audio = tmp_path / "v.mp4", tmp_path / "a.mp4"
    subprocess.run(
        [*FFMPEG, "-f", "lavfi", "-t", "10", "-i", "testsrc2=size=320x240:rate=25", "-f", "lavfi",
         "-t", "10", "-i", "sine=frequency=440:sample_rate=48000", "-map", "0:v", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", *FMP4_FLAGS,
         str(video), "-map", "1:a", "-c:a", "aac", *FMP4_FLAGS, str(audio)],
        check=True, timeout=30,
    )  # fmt: skip
    live = LiveStream(part_target=0.5, segment_target=1.0, window=1.0)
    for name, path in (("source", video), ("audio", audio)):
        live.add_rendition(name).feed(path.read_bytes())
    live.end()
    renditions = recording_from_live(live)
    assert set(renditions) == {"source", "audio"}
    held = sum(renditions["source"][2])
    assert 3 < held < 9  # the window (and the retired segments) lost the beginning
    entry = await server.vod.record("rec", renditions)
    assert [r["name"] for r in entry.renditions] == ["source", "audio"]
    assert abs(entry.duration - held) < 0.2
    for url in ("/vod/rec.m3u8", "/vod/rec.mpd", "/vod/rec.mp4"):
        probed = await probe(base(server) + url)
        assert {s["codec_name"] for s in probed["streams"]} == {"h264", "aac"}, url
        assert abs(float(probed["format"]["duration"]) - held) < 0.3, url
    with pytest.raises(VodError, match="exists"):
        await server.vod.record("rec", renditions)


def test_recording_names_are_slugs() -> None:
    name = recording_name("live/my.cam", 0)
    assert name == "live-my-cam-19700101-000000"
    assert VodLibrary  # the library accepts it:
    from verge.stream.vod import check_name

    assert check_name(name) == name
