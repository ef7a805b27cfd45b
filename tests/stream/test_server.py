"""`verge stream` end to end: ffmpeg publishes over RTMP, players read through an edge."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import VERGE, EdgeProcess
from verge.config import StreamApp, StreamSettings
from verge.stream.server import StreamServer

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")]

KEY = "s3cret"


@pytest.fixture
async def stream_server():
    settings = StreamSettings(apps=[StreamApp(name="live", keys={"*": KEY})], grace=0.5)
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


async def test_wrong_key_is_refused_and_unknown_streams_are_404(stream_server):
    publisher = await publish(stream_server, "cam", 2, key="wrong")
    _, err = await asyncio.wait_for(publisher.communicate(), 30)
    assert publisher.returncode != 0
    assert "live/cam" not in stream_server.channels
    reader, writer = await asyncio.open_connection("127.0.0.1", stream_server.http_port)
    writer.write(b"GET /live/nobody.flv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 404")
    writer.close()


async def test_stream_ends_after_the_grace_period(stream_server):
    publisher = await publish(stream_server, "short", 1.5)
    await wait_live(stream_server, "live/short")
    await publisher.wait()
    for _ in range(100):
        if not stream_server.channels["live/short"].live:
            break
        await asyncio.sleep(0.05)
    assert not stream_server.channels["live/short"].live


def test_cli_help_names_the_interfaces():
    out = subprocess.run([*VERGE, "stream", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert "--rtmp" in out.stdout and "--http" in out.stdout
