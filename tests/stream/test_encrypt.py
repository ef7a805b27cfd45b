"""AES-128 HLS (``encrypt: true``): playlists, resources a player can decrypt, the key behind
a signed edge rule."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import EdgeProcess
from tests.stream.package import media
from tests.stream.test_server import publish, wait_live
from verge.config import StreamApp, StreamSettings
from verge.edge.signing import sign
from verge.stream.package import hls
from verge.stream.package.cmaf import InitSegment, MediaPart, MediaSegment, Naming
from verge.stream.package.live import LiveStream
from verge.stream.package.mp4 import InitInfo
from verge.stream.server import StreamServer

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
pytestmark = pytest.mark.timeout(90)

PUBLISH_KEY = "s3cret"
SECRET = "stream-signing-secret-0123"
ENCRYPTION = hls.Encryption()
KEY_RE = re.compile(r'#EXT-X-KEY:METHOD=AES-128,URI="\.\./key",IV=0x([0-9a-f]{32})')


def key_of_each_uri(playlist: str) -> dict[str, int]:
    """Segment and part URI -> the IV (as an int) of the EXT-X-KEY that applies to it."""
    out: dict[str, int] = {}
    iv = None
    for line in playlist.splitlines():
        if match := KEY_RE.fullmatch(line):
            iv = int(match[1], 16)
        elif line.startswith("#EXT-X-KEY:METHOD=NONE"):
            iv = None
        elif line.startswith("#EXT-X-PART:") and iv is not None:
            out[line.split('URI="')[1].split('"')[0]] = iv
        elif line and not line.startswith("#") and iv is not None:
            out[line] = iv
    return out


def ffprobe_file(path: Path) -> list[dict]:
    args = ["ffprobe", "-v", "error", "-show_streams", "-of", "json"]
    if path.suffix == ".m3u8":
        args += ["-allowed_extensions", "ALL"]
    result = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["streams"]


# ---------------------------------------------------------------------------------------------
# the packager: playlists and bytes, no server
# ---------------------------------------------------------------------------------------------


def fake_segment(msn: int, disc: int = 0, complete: bool = True) -> MediaSegment:
    init = InitSegment(b"", InitInfo(()), disc)
    seg = MediaSegment(msn, disc, init, msn * 90000, 90000, 1_700_000_000.0 + msn)
    seg.parts = [MediaPart(msn * 2 + i, i, 0.5, i == 0, b"x") for i in range(2)]
    seg.duration_ts = 90000 if complete else 0
    seg.complete = complete
    return seg


def test_each_segment_and_its_parts_name_the_segments_iv_and_inits_stay_clear():
    segments = [fake_segment(5), fake_segment(6, disc=1), fake_segment(7, disc=1, complete=False)]
    text = hls.media_playlist(
        segments,
        naming=Naming(),
        target=1,
        part_target=0.5,
        preload=hls.PreloadHint(8, 0, 16),
        encryption=ENCRYPTION,
    )
    lines = text.splitlines()
    assert lines.index('#EXT-X-MAP:URI="init0.mp4"') < lines.index(ENCRYPTION.key_line(5))
    # the second init follows a key: METHOD=NONE first, so that it is not taken as encrypted
    assert lines[lines.index('#EXT-X-MAP:URI="init1.mp4"') - 1] == "#EXT-X-KEY:METHOD=NONE"
    assert key_of_each_uri(text) == {
        "aes-part10.m4s": 5, "aes-part11.m4s": 5, "aes-seg5.m4s": 5,
        "aes-part12.m4s": 6, "aes-part13.m4s": 6, "aes-seg6.m4s": 6,
        "aes-part14.m4s": 7, "aes-part15.m4s": 7,
    }  # fmt: skip
    # the hinted part opens segment 8: its key line comes first
    assert lines[-2:] == [
        ENCRYPTION.key_line(8),
        '#EXT-X-PRELOAD-HINT:TYPE=PART,URI="aes-part16.m4s"',
    ]
    classic = hls.media_playlist(segments, naming=Naming(), target=1, encryption=ENCRYPTION)
    assert key_of_each_uri(classic) == {"aes-seg5.m4s": 5, "aes-seg6.m4s": 6}
    assert "#EXT-X-PART" not in classic
    assert "#EXT-X-KEY" not in hls.media_playlist(segments, naming=Naming(), target=1)


def test_parts_and_segments_decrypt_independently_with_the_segment_iv():
    key = bytes(range(16))
    segment = b"".join(bytes([i]) * (100 + i) for i in range(5))  # not a multiple of 16
    sealed = hls.aes128_encrypt(key, 7, segment)
    assert len(sealed) % 16 == 0 and sealed != segment
    assert hls.aes128_decrypt(key, 7, sealed) == segment
    part = segment[100:201]
    assert hls.aes128_decrypt(key, 7, hls.aes128_encrypt(key, 7, part)) == part
    wrong = hls.aes128_decrypt(key, 8, sealed)  # another segment's IV: CBC garbles block one
    assert wrong[:16] != segment[:16] and wrong[16:] == segment[16:]


@needs_ffmpeg
def test_ffprobe_plays_the_encrypted_classic_playlist(tmp_path):
    """ffmpeg's HLS demuxer decrypts AES-128 itself: files written as the server serves them."""
    video, _ = media.separate(seconds=3)
    stream = LiveStream(part_target=0.2, segment_target=1.0, window=30.0)
    rendition = stream.add_rendition("v")
    rendition.feed(video)
    stream.end()
    key = bytes(range(100, 116))
    (tmp_path / "key").write_bytes(key)
    folder = tmp_path / "v"
    folder.mkdir()
    text = stream.media_playlist("v", ll=False, encryption=ENCRYPTION)
    (folder / "index.m3u8").write_text(text)
    (folder / "init0.mp4").write_bytes(rendition.init_bytes())
    for seg in rendition.segments:
        sealed = hls.aes128_encrypt(key, seg.msn, rendition.segment_bytes(seg.msn))
        (folder / f"aes-seg{seg.msn}.m4s").write_bytes(sealed)
    assert len(key_of_each_uri(text)) == len(rendition.segments) == 3
    streams = ffprobe_file(folder / "index.m3u8")
    assert [(s["codec_name"], s["width"]) for s in streams] == [("h264", 320)]


# ---------------------------------------------------------------------------------------------
# the stream server behind an edge with a signed rule
# ---------------------------------------------------------------------------------------------

EDGE_CONFIG = """
services:
  - name: streams
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    rules:
      - path: /live/
        signed: {{secret: {secret}}}
"""


@pytest.fixture
async def encrypting_server(tmp_path):
    settings = StreamSettings(
        apps=[
            StreamApp(
                name="live", keys={"*": PUBLISH_KEY}, encrypt=True, ladder=[{"name": "source"}]
            )
        ],
        grace=0.5,
        data_dir=str(tmp_path / "data"),
    )
    server = StreamServer(settings)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    yield server
    await server.close()


async def until_listed(client: httpx.AsyncClient, url: str, want) -> str:
    """The playlist once ``want(text)`` holds (a live stream grows)."""
    for _ in range(100):
        response = await client.get(url)
        assert response.status_code == 200, response.text
        if want(response.text):
            return response.text
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never listed what was wanted:\n{response.text}")


@needs_ffmpeg
async def test_an_encrypted_stream_through_a_signed_edge(encrypting_server, tmp_path):
    server = encrypting_server
    publisher = await publish(server, "enc", 30, key=PUBLISH_KEY)
    origin = f"http://127.0.0.1:{server.http_port}"
    config = EDGE_CONFIG.format(origin=origin, secret=SECRET)
    edge = None
    try:
        await wait_live(server, "live/enc")
        edge = await asyncio.to_thread(lambda: EdgeProcess(tmp_path, config=config).start())
        async with httpx.AsyncClient(base_url=edge.url, timeout=20) as anonymous:
            assert (await anonymous.get("/live/enc/key")).status_code == 403
            assert (await anonymous.get("/live/enc.m3u8")).status_code == 403
        token = sign(SECRET, "/live/enc", int(time.time()) + 600)
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=20) as player,
            httpx.AsyncClient(base_url=origin, timeout=20) as direct,
        ):
            first = await player.get("/live/enc.m3u8", params={"token": token})
            assert first.status_code == 200 and "source/index.m3u8" in first.text
            assert "Path=/live/" in first.headers["set-cookie"]
            # from here on only the cookie carries the token, as with hls.js' relative URLs
            key_response = await player.get("/live/enc/key")
            assert key_response.status_code == 200
            assert key_response.headers["cache-control"] == "private, no-store"
            assert "stored" not in key_response.headers["cache-status"]
            key = key_response.content
            assert len(key) == 16 and key == server.channels["live/enc"].key
            assert (await player.get("/live/enc/key")).headers["cache-status"].count("hit") == 0

            classic = await until_listed(
                player, "/live/enc/source/classic.m3u8", lambda text: "aes-seg" in text
            )
            segment_uri, iv = next(iter(key_of_each_uri(classic).items()))
            msn = int(segment_uri.removeprefix("aes-seg").removesuffix(".m4s"))
            assert iv == msn
            sealed = (await player.get(f"/live/enc/source/{segment_uri}")).content
            clear = hls.aes128_decrypt(key, iv, sealed)
            assert clear[4:8] == b"moof"
            assert clear == (await direct.get(f"/live/enc/source/seg{msn}.m4s")).content

            ll = await until_listed(
                player, "/live/enc/source/index.m3u8", lambda text: "aes-part" in text
            )
            part_uri, part_iv = next(
                (uri, iv) for uri, iv in key_of_each_uri(ll).items() if uri.startswith("aes-part")
            )
            sealed_part = (await player.get(f"/live/enc/source/{part_uri}")).content
            clear_part = hls.aes128_decrypt(key, part_iv, sealed_part)
            assert clear_part[4:8] == b"moof"
            plain_name = part_uri.removeprefix("aes-")
            assert clear_part == (await direct.get(f"/live/enc/source/{plain_name}")).content

            init = (await player.get("/live/enc/source/init0.mp4")).content
            assert init[4:8] == b"ftyp"  # never encrypted
            (tmp_path / "joined.mp4").write_bytes(init + clear)
            streams = ffprobe_file(tmp_path / "joined.mp4")
            assert ("h264", 320) in {(s["codec_name"], s.get("width")) for s in streams}
            # DASH is not encrypted: it keeps the clear segment names (and the signed rule)
            assert (await player.get("/live/enc.mpd")).status_code == 200
    finally:
        publisher.kill()
        await publisher.wait()
        if edge is not None:
            await asyncio.to_thread(edge.stop)
