"""`verge stream` end to end: ffmpeg publishes over RTMP, players read through an edge."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import httpx
import pytest

from tests.conftest import VERGE, EdgeProcess
from verge.config import StreamApp, StreamSettings
from verge.stream.server import StreamServer

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")]

KEY = "s3cret"


@pytest.fixture
async def stream_server(tmp_path):
    settings = StreamSettings(apps=[StreamApp(name="live", keys={"*": KEY}, ladder=[
        {"name": "source"}, {"name": "180p", "height": 180, "video_bitrate": 300_000}])],
        grace=0.5, data_dir=str(tmp_path / "data"))
    server = StreamServer(settings)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    yield server
    await server.close()


async def publish(server: StreamServer, name: str, seconds: float, key: str = KEY):
    """A real publisher: ffmpeg's lavfi test source (H.264 + AAC), paced like a camera."""
    return await asyncio.create_subprocess_exec(
        "ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440", "-t", str(seconds), "-c:v", "libx264",
        "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25", "-c:a", "aac", "-f", "flv",
        f"rtmp://127.0.0.1:{server.rtmp.port}/live/{name}?key={key}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def wait_live(server: StreamServer, stream: str) -> None:
    for _ in range(200):
        channel = server.channels.get(stream)
        if channel is not None and channel.fanout.video_header and channel.fanout.gop:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stream} never went live")


async def probe(url: str) -> list[dict]:
    proc = await asyncio.create_subprocess_exec(
        "ffprobe", "-v", "error", "-show_entries", "stream=codec_name,width,height",
        "-of", "json", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)["streams"]


async def test_http_flv_directly_and_through_an_edge(stream_server, tmp_path):
    publisher = await publish(stream_server, "cam", 20)
    edge = None
    try:
        await wait_live(stream_server, "live/cam")
        origin = f"http://127.0.0.1:{stream_server.http_port}"
        direct = await probe(origin + "/live/cam.flv")
        assert {s["codec_name"] for s in direct} == {"h264", "aac"}
        edge = await asyncio.to_thread(lambda: EdgeProcess(tmp_path, origin_url=origin).start())
        via_edge = await probe(edge.url + "/live/cam.flv")
        assert [(s["codec_name"], s.get("width")) for s in via_edge if s["codec_name"] == "h264"] \
            == [("h264", 320)]
    finally:
        publisher.kill()
        await publisher.wait()
        if edge is not None:
            await asyncio.to_thread(edge.stop)


async def test_hls_dash_and_ll_hls_through_an_edge(stream_server, tmp_path):
    publisher = await publish(stream_server, "show", 30)
    edge = None
    try:
        await wait_live(stream_server, "live/show")
        origin = f"http://127.0.0.1:{stream_server.http_port}"
        edge = await asyncio.to_thread(lambda: EdgeProcess(tmp_path, origin_url=origin).start())
        loop = asyncio.get_running_loop()
        started = loop.time()
        hls = await probe(edge.url + "/live/show.m3u8")
        assert loop.time() - started < 10  # the issue asks for within 5 s of publishing + probe
        assert ("h264", 320) in {(s["codec_name"], s.get("width")) for s in hls}
        assert "aac" in {s["codec_name"] for s in hls}
        dash = await probe(edge.url + "/live/show.mpd")
        assert {"h264", "aac"} <= {s["codec_name"] for s in dash}
        async with httpx.AsyncClient(base_url=edge.url, timeout=20) as client:
            await check_ll_hls(client, "/live/show/source/index.m3u8")
        async with httpx.AsyncClient(base_url=origin, timeout=10) as client:
            metrics = (await client.get("/metrics")).text
        assert "verge_stream_live 1.0" in metrics and "verge_stream_publishers 1.0" in metrics
        assert 'verge_stream_ingest_bitrate_bps{stream="live/show"}' in metrics
        count = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("verge_stream_ingest_to_playlist_seconds_count"))
        total = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("verge_stream_ingest_to_playlist_seconds_sum"))
        assert count > 5 and 0 < total / count < 2.0  # parts listed well within a second or two
    finally:
        publisher.kill()
        await publisher.wait()
        if edge is not None:
            await asyncio.to_thread(edge.stop)


def parse_playlist(text: str) -> dict:
    """The LL-HLS facts the spec's rules are about."""
    lines = text.splitlines()
    tag = lambda name: next(line.split(":", 1)[1] for line in lines if line.startswith(name + ":"))  # noqa: E731
    part_target = float(tag("#EXT-X-PART-INF").split("=")[1])
    parts = [float(line.split("DURATION=")[1].split(",")[0]) for line in lines
             if line.startswith("#EXT-X-PART:")]
    msn = int(tag("#EXT-X-MEDIA-SEQUENCE")) + sum(1 for line in lines if line.startswith("#EXTINF"))
    current_parts = 0
    for line in reversed(lines):
        if line.startswith("#EXTINF"):
            break
        current_parts += line.startswith("#EXT-X-PART:")
    return {"part_target": part_target, "parts": parts, "msn": msn,
            "current_parts": current_parts, "control": tag("#EXT-X-SERVER-CONTROL"),
            "hint": any(line.startswith("#EXT-X-PRELOAD-HINT") for line in lines)}


async def check_ll_hls(client, url: str) -> None:
    """Part durations within PART-TARGET, server control, and blocking reload returning as
    soon as the next part exists (not later, not earlier)."""
    playlist = parse_playlist((await client.get(url)).text)
    assert playlist["parts"] and max(playlist["parts"]) <= playlist["part_target"]
    assert "CAN-BLOCK-RELOAD=YES" in playlist["control"]
    hold_back = float(playlist["control"].split("PART-HOLD-BACK=")[1].split(",")[0])
    assert hold_back >= 2 * playlist["part_target"]  # the RFC 8216bis minimum
    assert playlist["hint"]
    msn, part = playlist["msn"], playlist["current_parts"]  # the part after the last listed
    loop = asyncio.get_running_loop()
    started = loop.time()
    blocked = await client.get(url, params={"_HLS_msn": msn, "_HLS_part": part})
    waited = loop.time() - started
    assert blocked.status_code == 200
    assert waited < 3 * playlist["part_target"] + 1.0
    after = parse_playlist(blocked.text)
    assert (after["msn"], after["current_parts"]) >= (msn, part + 1) or after["msn"] > msn
    too_far = await client.get(url, params={"_HLS_msn": msn + 10})
    assert too_far.status_code == 400


async def test_wrong_key_is_refused_and_unknown_streams_are_404(stream_server):
    publisher = await publish(stream_server, "cam", 2, key="wrong")
    _, err = await asyncio.wait_for(publisher.communicate(), 30)
    assert publisher.returncode != 0
    assert "live/cam" not in stream_server.channels
    reader, writer = await asyncio.open_connection("127.0.0.1", stream_server.http_port)
    writer.write(b"GET /live/nobody.flv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 404")
    writer.close()


async def test_stream_ends_after_the_grace_period_and_is_recorded(stream_server):
    publisher = await publish(stream_server, "short", 4)
    await wait_live(stream_server, "live/short")
    await publisher.wait()
    for _ in range(200):
        if stream_server.vod.entries():
            break
        await asyncio.sleep(0.05)
    channel = stream_server.channels["live/short"]
    assert not channel.live and channel.packager.ended
    playlist = channel.packager.media_playlist("source")
    assert playlist.rstrip().endswith("#EXT-X-ENDLIST")
    [entry] = stream_server.vod.entries()
    streams = await probe(f"http://127.0.0.1:{stream_server.http_port}/vod/{entry.name}.m3u8")
    assert {"h264", "aac"} <= {s["codec_name"] for s in streams}


def test_cli_help_names_the_interfaces():
    out = subprocess.run([*VERGE, "stream", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert "--rtmp" in out.stdout and "--http" in out.stdout


async def test_a_publisher_back_within_the_grace_period_continues_after_a_discontinuity(tmp_path):
    settings = StreamSettings(apps=[StreamApp(name="live", keys={"*": KEY},
                                              ladder=[{"name": "source"}])],
                              grace=8, data_dir=str(tmp_path / "data"))
    server = StreamServer(settings)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    try:
        first = await publish(server, "again", 4)
        await wait_live(server, "live/again")
        await first.wait()
        channel = server.channels["live/again"]
        assert channel.ending is not None  # in its grace period
        second = await publish(server, "again", 5)
        source = channel.packager.renditions["source"]
        for _ in range(200):  # the new publisher's media reaches the playlist
            if "#EXT-X-DISCONTINUITY" in source.playlist() and source.init_bytes(1):
                break
            await asyncio.sleep(0.05)
        playlist = channel.packager.media_playlist("source")
        assert "#EXT-X-DISCONTINUITY" in playlist and "#EXT-X-ENDLIST" not in playlist
        assert server.channels["live/again"] is channel and channel.live
        await second.wait()
    finally:
        await server.close()


def test_cli_without_ffmpeg_says_so_and_exits_non_zero():
    out = subprocess.run([*VERGE, "stream", "--rtmp", "127.0.0.1:0", "--http", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "VERGE_FFMPEG": "/nonexistent/ffmpeg"})
    assert out.returncode == 2 and "ffmpeg not found" in out.stderr
    assert "Traceback" not in out.stderr
