"""The player page and the live chat.

Chat over real WebSockets against a real StreamServer: fan-out within a stream only, HTML
escaping and server timestamps, history for late joiners, the size / rate / abuse / viewer
limits, and slow viewers dropped. Then the acceptance test: ffmpeg publishes, an edge sits in
front, and headless Chromium opens the player page through the edge in two windows: the video
plays (currentTime advances by 3 s or more), the latency readout shows a number, and a chat
message sent in one window appears, as text, in the other.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time

import httpx
import pytest
from wsproto.events import CloseConnection

from tests import browser
from tests.conftest import EdgeProcess
from tests.http.test_websocket import HandshakeRefused, WsClient
from tests.stream.test_server import KEY, publish, wait_live
from verge.config import StreamApp, StreamSettings
from verge.stream.chat import (
    ChatHub,
    ChatInputError,
    ChatLimits,
    ChatRoom,
    Viewer,
    parse_message,
)
from verge.stream.server import StreamServer
from verge.stream.web import WEB_DIR

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def stream_server():
    settings = StreamSettings(apps=[StreamApp(name="live", keys={"*": KEY})], grace=0.5)
    server = StreamServer(settings)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    yield server
    await server.close()


async def join(server, stream: str = "live/room") -> tuple[WsClient, dict]:
    client = await WsClient.connect(server.http_port, f"/{stream}/chat")
    hello = json.loads(await client.receive())
    assert hello["type"] == "hello"
    return client, hello


async def say(client: WsClient, text: str, name: str = "al") -> None:
    await client.send(json.dumps({"name": name, "text": text}))


async def next_json(client: WsClient) -> dict:
    message = await client.receive()
    assert isinstance(message, str), message
    return json.loads(message)


# ---- chat: pure parts -----------------------------------------------------------------------


def test_parse_message_accepts_and_refuses():
    limits = ChatLimits(max_text=10, max_name=4)
    assert parse_message('{"name": " alexander ", "text": " hi "}', limits) == ("alex", "hi")
    assert parse_message('{"text": "hi"}', limits) == ("anonymous", "hi")
    for raw in (
        b"{}",
        "not json",
        '["text"]',
        '{"name": "x"}',
        '{"text": "   "}',
        '{"text": "' + "x" * 11 + '"}',
        '{"text": 5}',
    ):
        with pytest.raises(ChatInputError):
            parse_message(raw, limits)


class StubStream:
    closed = False

    def close(self) -> None:
        self.closed = True


class StubSocket:
    def __init__(self) -> None:
        self.stream = StubStream()


async def test_a_slow_viewer_is_dropped_not_waited_for():
    limits = ChatLimits(queue=2)
    room = ChatRoom("live/x", limits)
    slow, fast = Viewer(StubSocket(), limits), Viewer(StubSocket(), limits)
    room.viewers |= {slow, fast}
    assert room.broadcast("1") == 0 and room.broadcast("2") == 0
    fast.queue.get_nowait(), fast.queue.get_nowait()  # fast keeps up, slow does not
    assert room.broadcast("3") == 1
    assert slow.dropped and slow.ws.stream.closed and not fast.dropped
    assert fast.queue.get_nowait() == "3"


# ---- chat: over WebSockets ------------------------------------------------------------------


async def test_messages_fan_out_escaped_and_timestamped(stream_server):
    alice, _ = await join(stream_server)
    bob, hello = await join(stream_server)
    assert hello["viewers"] == 1  # alice; bob is not counted in his own hello
    elsewhere, _ = await join(stream_server, "live/other")
    before = time.time() * 1000
    await say(alice, "<b>hi</b> & <script>x()</script>", name="<i>al</i>")
    for client in (alice, bob):  # the sender gets its own message too
        message = await next_json(client)
        assert message["type"] == "message"
        assert message["name"] == "&lt;i&gt;al&lt;/i&gt;"
        assert message["text"] == "&lt;b&gt;hi&lt;/b&gt; &amp; &lt;script&gt;x()&lt;/script&gt;"
        assert before - 1000 <= message["ts"] <= time.time() * 1000 + 1000
    await say(elsewhere, "other room")
    assert (await next_json(elsewhere))["text"] == "other room"  # and nothing from room 1 first
    late, hello = await join(stream_server)
    assert [m["name"] for m in hello["history"]] == ["&lt;i&gt;al&lt;/i&gt;"]
    assert hello["history"][0]["text"].startswith("&lt;b&gt;hi&lt;/b&gt;")
    assert hello["limits"]["text"] == 500
    for client in (alice, bob, elsewhere, late):
        await client.close()


async def test_size_and_rate_limits_then_close_on_abuse(stream_server):
    stream_server.chat = ChatHub(ChatLimits(rate=3, window=60, strikes=3))
    client, _ = await join(stream_server)
    await say(client, "x" * 501)
    assert "longer than 500" in (await next_json(client))["error"]  # strike 1
    for i in range(3):
        await say(client, f"m{i}")
        assert (await next_json(client))["text"] == f"m{i}"
    await say(client, "one too many")
    assert "slow down" in (await next_json(client))["error"]  # strike 2
    await client.send(b"binary")
    assert "JSON text" in (await next_json(client))["error"]  # strike 3: closed
    closed = await client.receive()
    assert isinstance(closed, CloseConnection) and closed.code == 1008
    assert await client.eof()


async def test_oversized_frames_close_with_1009(stream_server):
    client, _ = await join(stream_server)
    await say(client, "y" * 5000)  # more than max_frame (4 KiB) before it is even parsed
    closed = await client.receive()
    assert isinstance(closed, CloseConnection) and closed.code == 1009


async def test_viewers_per_stream_are_limited(stream_server):
    stream_server.chat = ChatHub(ChatLimits(max_viewers=2))
    first, _ = await join(stream_server)
    second, _ = await join(stream_server)
    with pytest.raises(HandshakeRefused) as refused:
        await join(stream_server)
    assert refused.value.status == 503
    other, _ = await join(stream_server, "live/other")  # another stream has its own room
    await first.close()
    await asyncio.wait_for(_until(lambda: stream_server.chat.viewers("live/room") == 1), 5)
    third, _ = await join(stream_server)
    for client in (second, other, third):
        await client.close()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.02)


async def test_page_assets_and_unknown_apps(stream_server):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stream_server.http_port}") as http:
        page = await http.get("/live/cam")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert '<video id="video"' in page.text
        script = await http.get("/live/_player/player.js")
        assert script.status_code == 200 and "lowLatencyMode: true" in script.text
        assert (await http.get("/live/_player/player.css")).status_code == 200
        assert (await http.get("/live/_player/../server.py")).status_code == 404
        assert (await http.get("/nope/cam")).status_code == 404
        assert (await http.get("/live/cam/chat")).status_code == 400  # no Upgrade
    with pytest.raises(HandshakeRefused) as refused:
        await WsClient.connect(stream_server.http_port, "/nope/cam/chat")
    assert refused.value.status == 404


# ---- the player page in headless Chromium, through an edge ----------------------------------

HLSJS = WEB_DIR / "vendor" / "hls.min.js"
PLAYER_FLAGS = (
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-media-suspend",
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--window-size=1200,800",
)


def browser_ready() -> str | None:
    if (reason := browser.missing()) is not None:
        return reason
    if shutil.which("ffmpeg") is None:
        return "ffmpeg not installed"
    if not HLSJS.is_file():
        return "hls.js not vendored: bash scripts/vendor-web.sh"
    return None


def wait_for(driver, condition, what: str, timeout: float = 30.0):
    return browser.wait_for(driver, condition, what, timeout, poll=0.1)


def current_time(driver) -> float:
    return driver.execute_script("return document.getElementById('video').currentTime")


def play_and_chat(url: str) -> None:
    """The browser part (blocking Selenium calls; run in a thread)."""
    from selenium.webdriver.common.by import By

    with browser.headless_chromium(PLAYER_FLAGS) as driver:
        driver.get(url)
        viewer = driver.current_window_handle
        wait_for(driver, lambda: current_time(driver) > 0, "the video to start", 40)
        start = current_time(driver)
        wait_for(
            driver, lambda: current_time(driver) - start >= 3.0, "currentTime to advance by 3 s", 20
        )
        latency = driver.find_element(By.ID, "latency").text
        assert re.match(r"\d+\.\d s", latency), latency
        assert driver.execute_script("return window.verge.chat.readyState") == 1

        driver.switch_to.new_window("window")  # a second viewer
        driver.get(url)
        wait_for(
            driver,
            lambda: driver.execute_script(
                "return window.verge.chat && window.verge.chat.readyState === 1"
            ),
            "chat to connect",
        )
        driver.find_element(By.ID, "chat-name").send_keys("bob")
        driver.find_element(By.ID, "chat-text").send_keys("<b>hi</b>")
        driver.find_element(By.ID, "chat-send").click()

        driver.switch_to.window(viewer)
        wait_for(
            driver,
            lambda: (
                "<b>hi</b>"
                in [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .text")]
            ),
            "the message in the other window",
        )
        assert driver.find_elements(By.CSS_SELECTOR, "#messages b") == []  # text, not markup
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .name")]
        assert names == ["bob"]
        assert current_time(driver) - start >= 3.0


@pytest.mark.timeout(180)
@pytest.mark.skipif(browser_ready() is not None, reason=str(browser_ready()))
async def test_player_page_through_an_edge_plays_and_chats(stream_server, tmp_path):
    publisher = await publish(stream_server, "cam", 90)
    edge = None
    try:
        await wait_live(stream_server, "live/cam")
        origin = f"http://127.0.0.1:{stream_server.http_port}"
        edge = await asyncio.to_thread(lambda: EdgeProcess(tmp_path, origin_url=origin).start())
        await asyncio.to_thread(play_and_chat, f"{edge.url}/live/cam")
    finally:
        publisher.kill()
        await publisher.wait()
        if edge is not None:
            await asyncio.to_thread(edge.stop)
