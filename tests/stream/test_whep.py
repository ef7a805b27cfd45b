"""WebRTC playback (WHEP) end to end: ffmpeg publishes over RTMP, aiortc clients watch.

The server gathers its ICE candidates on 127.0.0.2 (``stream.webrtc.candidates``) and the
clients on 127.0.0.3: aioice never gathers on 127.0.0.1, and Linux routes all of 127/8 to lo.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys

import httpx
import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription

from tests.conftest import EdgeProcess
from tests.stream.test_player import browser_ready
from tests.stream.test_server import KEY, publish, wait_live
from verge.compat.aioice import gather_on
from verge.config import StreamApp, StreamSettings, WebRtcSettings
from verge.stream.rtmp.session import VideoTag
from verge.stream.server import StreamServer
from verge.stream.webrtc import WhepError, WhepService, annex_b, avc_config

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
]

CLIENT_ADDRESS = "127.0.0.3"
SDP = {"Content-Type": "application/sdp"}


def make_server(tmp_path, **webrtc) -> StreamServer:
    settings = StreamSettings(
        apps=[StreamApp(name="live", keys={"*": KEY}, ladder=[{"name": "source"}], record=False)],
        grace=0.5,
        data_dir=str(tmp_path / "data"),
        webrtc={"candidates": ["127.0.0.2"], **webrtc},
    )
    return StreamServer(settings)


@pytest.fixture
async def live(tmp_path, request):
    """A stream server with one live stream, live/cam (20 s of testsrc2 + sine)."""
    server = make_server(tmp_path, **getattr(request, "param", {}))
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    publisher = await publish(server, "cam", 20)
    try:
        await wait_live(server, "live/cam")
        yield server
    finally:
        publisher.kill()
        await publisher.wait()
        await server.close()


class Viewer:
    """An aiortc WHEP client: recvonly audio and video, frames counted as they decode."""

    def __init__(self, video_codec: str | None = None) -> None:
        self.pc = RTCPeerConnection()
        video = self.pc.addTransceiver("video", direction="recvonly")
        if video_codec is not None:
            video.setCodecPreferences(
                [
                    c
                    for c in RTCRtpReceiver.getCapabilities("video").codecs
                    if c.mimeType == video_codec
                ]
            )
        self.pc.addTransceiver("audio", direction="recvonly")
        self.frames: dict[str, list] = {"video": [], "audio": []}
        self.got = {"video": asyncio.Event(), "audio": asyncio.Event()}
        self.tasks: list[asyncio.Task] = []
        self.pc.on(
            "track",
            lambda track: self.tasks.append(
                asyncio.get_running_loop().create_task(self._read(track))
            ),
        )

    async def _read(self, track) -> None:
        while True:
            frame = await track.recv()
            self.frames[track.kind].append(frame)
            if len(self.frames[track.kind]) >= 5:
                self.got[track.kind].set()

    async def offer(self) -> str:
        with gather_on([CLIENT_ADDRESS]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def watch(self, client: httpx.AsyncClient, url: str) -> httpx.Response:
        response = await client.post(url, content=await self.offer(), headers=SDP)
        if response.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        return response

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


def http(server: StreamServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=15)


async def until(predicate, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_a_viewer_gets_decodable_h264_and_opus_and_delete_ends_it(live):
    viewer = Viewer()
    async with http(live) as client:
        try:
            answer = await viewer.watch(client, "/live/cam/whep")
            assert answer.status_code == 201, answer.text
            assert answer.headers["content-type"] == "application/sdp"
            location = answer.headers["location"]
            assert location.startswith("/live/cam/whep/")
            assert "H264/90000" in answer.text and "opus/48000" in answer.text
            assert "127.0.0.2" in answer.text and "192." not in answer.text
            assert live.whep.viewers("live/cam") == 1
            async with asyncio.timeout(15):
                await viewer.got["video"].wait()
                await viewer.got["audio"].wait()
            video, audio = viewer.frames["video"][0], viewer.frames["audio"][0]
            assert (video.width, video.height) == (320, 240)  # decoded: H.264 passed through
            assert audio.sample_rate == 48000  # Opus
            metrics = (await client.get("/metrics")).text
            assert 'verge_stream_webrtc_viewers{stream="live/cam"} 1.0' in metrics
            assert (await client.patch(location, content=b"x")).status_code == 405
            assert (await client.delete(location)).status_code == 200
            assert live.whep.viewers() == 0 and not live.whep.feeds["live/cam"].tracks
            assert (await client.delete(location)).status_code == 404
        finally:
            await viewer.close()


async def test_bad_requests_get_clear_statuses(live):
    async with http(live) as client:
        bad = await client.post("/live/cam/whep", content=b"v=0\r\nthis is no SDP", headers=SDP)
        assert bad.status_code == 400 and "bad SDP" in bad.text
        garbage = await client.post("/live/cam/whep", content=b"hello", headers=SDP)
        assert garbage.status_code == 400 and "v=0" in garbage.text
        offer = await Viewer().offer()
        wrong_type = await client.post(
            "/live/cam/whep", content=offer, headers={"Content-Type": "text/plain"}
        )
        assert wrong_type.status_code == 415 and "application/sdp" in wrong_type.text
        no_h264 = await client.post(
            "/live/cam/whep", content=await Viewer("video/VP8").offer(), headers=SDP
        )
        assert no_h264.status_code == 400 and "H.264" in no_h264.text
        unknown = await client.post("/live/nobody/whep", content=offer, headers=SDP)
        assert unknown.status_code == 404 and "not live" in unknown.text
        preflight = await client.options("/live/cam/whep")
        assert (
            preflight.status_code == 204
            and "POST" in preflight.headers["access-control-allow-methods"]
        )
        assert live.whep.viewers() == 0


@pytest.mark.parametrize("live", [{"max_viewers_per_stream": 1}], indirect=True)
async def test_viewer_limit_answers_503_with_the_reason(live):
    first, second = Viewer(), Viewer()
    async with http(live) as client:
        try:
            assert (await first.watch(client, "/live/cam/whep")).status_code == 201
            async with asyncio.timeout(15):  # connected: its close reaches the server (DTLS)
                await first.got["video"].wait()
            full = await second.watch(client, "/live/cam/whep")
            assert full.status_code == 503 and "max_viewers_per_stream" in full.text
            assert int(full.headers["retry-after"]) > 0
        finally:
            await first.close()
            await second.close()
    live.whep.settings = live.whep.settings.model_copy(
        update={"max_viewers": 1, "max_viewers_per_stream": 5}
    )
    await until(lambda: live.whep.viewers() == 0, 5)  # the first closed: DTLS close -> ended
    third, fourth = Viewer(), Viewer()
    async with http(live) as client:
        try:
            assert (await third.watch(client, "/live/cam/whep")).status_code == 201
            full = await fourth.watch(client, "/live/cam/whep")
            assert full.status_code == 503 and "server full" in full.text
        finally:
            await third.close()
            await fourth.close()


CLIENT = """
import asyncio, sys
from tests.stream.test_whep import Viewer, http_url
async def main():
    import httpx
    viewer = Viewer()
    async with httpx.AsyncClient(base_url=sys.argv[1], timeout=15) as client:
        answer = await viewer.watch(client, "/live/cam/whep")
        assert answer.status_code == 201, answer.text
    await viewer.got["video"].wait()
    print("watching", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def http_url(server: StreamServer) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.mark.parametrize("live", [{"session_timeout": 2}], indirect=True)
async def test_a_viewer_that_vanishes_is_reaped(live):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        http_url(live),
        stdout=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    try:
        async with asyncio.timeout(20):
            assert (await proc.stdout.readline()).strip() == b"watching"
        assert live.whep.viewers("live/cam") == 1
        proc.send_signal(signal.SIGKILL)  # no DELETE, no DTLS close: it just vanishes
        await proc.wait()
        loop = asyncio.get_running_loop()
        gone = loop.time()
        await until(lambda: live.whep.viewers() == 0, 2 + 3)
        assert loop.time() - gone <= 2 + 2
        assert live.whep.reaped == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_avcc_to_annex_b():
    header = bytes(
        [0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1F, 0xFF, 0xE1, 0, 2, 0x67, 0x64, 1, 0, 2, 0x68, 0xEE]
    )
    length_size, parameter_sets = avc_config(header)
    assert length_size == 4
    assert parameter_sets == b"\0\0\0\1\x67\x64\0\0\0\1\x68\xee"
    assert annex_b(b"\0\0\0\2\x65\x88\0\0\0\1\x41", 4) == b"\0\0\0\1\x65\x88\0\0\0\1\x41"


def watch_in_chromium(url: str) -> dict:
    """The player page in WebRTC mode (blocking Selenium calls; run in a thread)."""
    from tests import browser
    from tests.stream.test_player import PLAYER_FLAGS, current_time, wait_for

    flags = (*PLAYER_FLAGS, "--disable-features=WebRtcHideLocalIpsWithMdns")
    with browser.headless_chromium(flags) as driver:
        driver.get(url)
        wait_for(driver, lambda: current_time(driver) > 0, "the WebRTC video to start", 20)
        start = current_time(driver)
        wait_for(driver, lambda: current_time(driver) - start >= 2.0, "2 s of video", 10)
        wait_for(driver, lambda: driver.find_element("id", "clock").text != "–", "readout", 5)
        seen = driver.execute_script(
            "const v = document.getElementById('video');"
            "return {width: v.videoWidth, mode: window.verge.mode,"
            " latency: document.getElementById('latency').textContent,"
            " clock: document.getElementById('clock').textContent}"
        )
        driver.get("about:blank")  # pagehide: the page DELETEs its session
        return seen


@pytest.mark.skipif(browser_ready() is not None, reason=str(browser_ready()))
async def test_the_player_page_plays_webrtc_in_chromium(live):
    seen = await asyncio.to_thread(watch_in_chromium, http_url(live) + "/live/cam?mode=webrtc")
    assert seen["width"] == 320 and seen["mode"] == "webrtc"
    assert re.fullmatch(r"\d+ ms \(.*\)", seen["latency"]) and seen["clock"].endswith(" ms"), seen
    await until(lambda: live.whep.viewers() == 0, 5)
    assert live.whep.reaped == 0  # ended by the page's DELETE, not reaped


async def test_b_frames_without_an_encoded_rung_are_refused_with_the_reason():
    service = WhepService(WebRtcSettings())
    frame = VideoTag("cam", 40, bytes([0x27, 1, 0, 0, 40]) + b"\0\0\0\1\x41", 7, False, False, 40)
    service.on_media("live/cam", frame)  # a composition-time offset: reordered frames
    offer = await Viewer().offer()
    with pytest.raises(WhepError) as starting:  # the transcoder has not planned yet
        await service.create("live/cam", True, "application/sdp", offer)
    assert starting.value.status == 503 and ("Retry-After", "1") in starting.value.headers
    service.on_rendition_plan("live/cam", None)  # a ladder of only the source
    with pytest.raises(WhepError) as refused:
        await service.create("live/cam", True, "application/sdp", offer)
    assert refused.value.status == 409
    assert "encodes no rendition" in refused.value.reason and "-bf 0" in refused.value.reason
    service.on_publish("live/cam")  # a new publish may come without them
    assert not service.feeds["live/cam"].has_bframes


async def test_signalling_through_an_edge(live, tmp_path):
    edge = await asyncio.to_thread(lambda: EdgeProcess(tmp_path, origin_url=http_url(live)).start())
    viewer = Viewer()
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=15) as client:
            answer = await viewer.watch(client, "/live/cam/whep")
            assert answer.status_code == 201, answer.text
            async with asyncio.timeout(15):  # media flows to the stream server's candidates
                await viewer.got["video"].wait()
            assert (await client.delete(answer.headers["location"])).status_code == 200
        assert live.whep.viewers() == 0
    finally:
        await viewer.close()
        await asyncio.to_thread(edge.stop)
