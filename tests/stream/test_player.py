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
from verge.config import Rendition, StreamApp, StreamSettings
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


# A raised target latency comes down one 0.2 s step per 10 s without a stall, to the
# playlist's PART-HOLD-BACK and no lower (player.js settleLatency; a fake hls.js, times in ms)
SETTLE_STEPS = """
const hls = {levels: [{details: {partHoldBack: 0.5}}], currentLevel: 0, targetLatency: 0.9};
const state = {quietSince: 0}, seen = [];
for (const now of [9000, 10000, 15000, 20000, 30000, 45000]) {
  window.verge.settleLatency(hls, state, now);
  seen.push(Math.round(hls.targetLatency * 10) / 10);
}
const classic = {levels: [{details: {}}], currentLevel: 0, targetLatency: 6};
window.verge.settleLatency(classic, {quietSince: 0}, 60000);
return [seen, classic.targetLatency];
"""
SETTLED = [[0.9, 0.7, 0.7, 0.5, 0.5, 0.5], 6]


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
        assert driver.execute_script(SETTLE_STEPS) == SETTLED
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


# ---- live scenes: a chapter seeks by PROGRAM-DATE-TIME --------------------------------------

# red and blue by turns, a cut every 2 s (scdet finds each); source passed through (no encoding)
SCENES = "color=red:size=320x180:rate=25,drawbox=c=blue:t=fill:enable='gte(mod(t\\,4)\\,2)'"
SEEK_TOLERANCE = 0.05  # s; see live_chapter_seeks
PICTURE_MARGIN = 0.25  # s either side of a cut where the picture must be the scene's; see
# live_chapter_seeks


@pytest.fixture
async def analysed_server(tmp_path):
    app = StreamApp(name="live", ladder=[Rendition(name="source")], analysis=True, record=False)
    settings = StreamSettings(apps=[app], data_dir=str(tmp_path), grace=0.5, dvr_window=8.0)
    server = StreamServer(settings)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    yield server
    await server.close()


async def publish_scenes(server: StreamServer, name: str, seconds: float):
    return await asyncio.create_subprocess_exec(
        "ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", SCENES, "-f", "lavfi", "-i",
        "sine=frequency=440", "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast",
        "-tune", "zerolatency", "-g", "25", "-c:a", "aac", "-f", "flv",
        f"rtmp://127.0.0.1:{server.rtmp.port}/live/{name}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)  # fmt: skip


# what the page knows: the result's anchor and scenes, hls.js' fragments, the seekable window
LIVE_STATE = """
const v = document.getElementById('video'), hls = window.verge.hls;
const result = window.verge.analysis.result;
const level = hls && hls.levels[hls.currentLevel];
if (!result || !level || !level.details || !v.seekable.length) return null;
const last = v.seekable.length - 1;
return {
  startedAt: result.started_at, scenes: result.scenes.map((s) => s.time),
  fragments: level.details.fragments.map((f) => [f.start, f.programDateTime]),
  seekable: [v.seekable.start(last), v.seekable.end(last)],
  currentTime: v.currentTime, seeking: v.seeking, paused: v.paused,
};
"""

# the colour in the middle of the picture shown now: "red", "blue" or something else
COLOUR = """
const v = document.getElementById('video'), c = document.createElement('canvas');
c.width = 32; c.height = 18;
const g = c.getContext('2d');
g.drawImage(v, 0, 0, 32, 18);
const [r, gr, b] = g.getImageData(16, 9, 1, 1).data;
return r > 150 && b < 100 && gr < 100 ? 'red' : b > 150 && r < 100 && gr < 100 ? 'blue'
  : `rgb(${r},${gr},${b})`;
"""

# the chapter button of a scene, clicked in the page (the list is rebuilt as the result grows)
CLICK_CHAPTER = """
const button = [...document.querySelectorAll('#chapters button')]
  .find((b) => Number(b.dataset.time) === arguments[0]);
button.click();
"""

# a click on the scrub bar, at a fraction of its width
CLICK_SCRUB = """
const bar = document.getElementById('scrub'), box = bar.getBoundingClientRect();
bar.dispatchEvent(new MouseEvent('click', {
  bubbles: true, clientX: box.left + arguments[0] * box.width, clientY: box.top + box.height / 2,
}));
"""

SEEK_AND_WAIT = """
const [to, done] = [arguments[0], arguments[arguments.length - 1]];
const v = document.getElementById('video');
v.addEventListener('seeked', () => done(v.currentTime), { once: true });
v.currentTime = to;
"""


def mapped(state: dict, scene: float) -> float:
    """Where a scene is on the video's timeline: the last fragment dated at or before it, plus
    the rest (the same rule as the page, written again here)."""
    wall = (state["startedAt"] + scene) * 1000
    start, pdt = state["fragments"][0]
    for frag_start, frag_pdt in state["fragments"]:
        if frag_pdt <= wall:
            start, pdt = frag_start, frag_pdt
    return start + (wall - pdt) / 1000


def live_chapter_seeks(url: str) -> None:
    """The browser part (blocking Selenium calls; run in a thread).

    A chapter well inside the DVR window and behind the playhead is clicked with the video
    paused: currentTime must become the scene's mapped position. The page and this test map
    from the same fragment list a moment apart, so they agree but for hls.js refining fragment
    starts (milliseconds): SEEK_TOLERANCE is about a frame (40 ms at 25 fps).

    Then the picture checks the anchor (started_at): PICTURE_MARGIN before the mapped cut the
    old scene's colour shows, after it the new one's. The server gives a measured anchor (it
    does not hand the analyzer its packager, see RunAnchor): within a frame of the playlists'
    PROGRAM-DATE-TIME on an idle machine, up to 0.11 s early with this machine loaded (their
    anchor is the first keyframe's arrival, which a busy server's stream start delays); with a
    frame of picture on top, 0.25 s leaves room. The scrub bar spans the live window (its
    middle seeks to the window's), and a scene that left the window gets a notice, no seek.
    """
    from selenium.webdriver.common.by import By

    with browser.headless_chromium(PLAYER_FLAGS) as driver:
        driver.set_script_timeout(20)
        driver.get(url)

        def state() -> dict | None:
            return driver.execute_script(LIVE_STATE)

        def window_start(now: dict) -> float:
            return max(now["seekable"][0], now["fragments"][0][0])

        def candidate() -> float | None:
            """The newest scene a second inside the window and 1.5 s behind the playhead."""
            now = state()
            if now is None or now["startedAt"] is None or now["currentTime"] <= 0:
                return None
            low, high = window_start(now) + 1, now["currentTime"] - 1.5
            fits = [t for t in now["scenes"] if low <= mapped(now, t) <= high]
            return fits[-1] if fits else None

        scene = wait_for(driver, candidate, "a scene inside the DVR window", 60)
        driver.execute_script("document.getElementById('video').pause()")
        before = state()
        assert before["paused"]
        expected = mapped(before, scene)
        driver.execute_script(CLICK_CHAPTER, scene)
        wait_for(
            driver,
            lambda: (now := state()) and not now["seeking"]
            and abs(now["currentTime"] - expected) < SEEK_TOLERANCE,
            f"currentTime to move from {before['currentTime']:.3f} to {expected:.3f} (scene at"
            f" {scene} s)",
            10,
        )  # fmt: skip

        def colour_at(time: float) -> str:
            driver.execute_async_script(SEEK_AND_WAIT, time)
            return driver.execute_script(COLOUR)

        colours = [colour_at(expected - PICTURE_MARGIN), colour_at(expected + PICTURE_MARGIN)]
        assert sorted(colours) == ["blue", "red"], (scene, colours)

        # the scrub bar spans the window: its middle is the window's (which moves by half a
        # segment when the playlist drops one)
        now = state()
        middle = (window_start(now) + now["seekable"][1]) / 2
        driver.execute_script(CLICK_SCRUB, 0.5)
        wait_for(
            driver,
            lambda: (s := state()) and not s["seeking"] and abs(s["currentTime"] - middle) < 0.6,
            f"the scrub bar's middle to seek near {middle:.3f}",
            10,
        )

        # the first cut (2 s) leaves the 8 s window: its mark goes, a click gives a notice
        wait_for(driver, lambda: mapped(s := state(), 2) < window_start(s) - 1, "the cut to go", 30)
        mark = "return document.querySelector('#scrub-marks span[data-time=\"2\"]').hidden"
        wait_for(driver, lambda: driver.execute_script(mark), "its mark to go", 5)
        at = current_time(driver)
        driver.execute_script(CLICK_CHAPTER, 2)
        notice = driver.find_element(By.ID, "notice")
        wait_for(driver, lambda: "no longer in the live window" in notice.text, "the notice", 5)
        assert current_time(driver) == at


@pytest.mark.timeout(180)
@pytest.mark.skipif(browser_ready() is not None, reason=str(browser_ready()))
async def test_live_chapters_seek_by_program_date_time(analysed_server):
    publisher = await publish_scenes(analysed_server, "scenes", 120)
    try:
        await wait_live(analysed_server, "live/scenes")
        url = f"http://127.0.0.1:{analysed_server.http_port}/live/scenes"
        await asyncio.to_thread(live_chapter_seeks, url)
    finally:
        publisher.kill()
        await publisher.wait()
