"""The RTMP ingest server with real publishers: FFmpeg (H.264 + AAC from lavfi), refused keys
and names, garbage, stalls; FLV written from the received tags is read back by ffprobe."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.stream.publisher import (
    AAC_SEQUENCE_HEADER,
    AVC_INTER,
    AVC_SEQUENCE_HEADER,
    SocketPublisher,
)
from verge.stream import flv
from verge.stream.ingest import RtmpServer
from verge.stream.rtmp.session import AudioTag, Publish, VideoTag

pytestmark = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
    reason="needs ffmpeg and ffprobe (apt-get install ffmpeg)",
)

KEY = "secret"


class RecordingSink:
    """Keeps every call; tests await conditions on it instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self._changed = asyncio.Event()

    def _record(self, kind: str, stream: str, value: Any) -> None:
        self.calls.append((kind, stream, value))
        self._changed.set()

    def on_publish(self, stream: str, publish: Publish) -> None:
        self._record("publish", stream, publish)

    def on_metadata(self, stream: str, metadata: dict[str, Any]) -> None:
        self._record("metadata", stream, metadata)

    def on_media(self, stream: str, tag: VideoTag | AudioTag) -> None:
        self._record("media", stream, tag)

    def on_unpublish(self, stream: str, reason: str) -> None:
        self._record("unpublish", stream, reason)

    def of(self, kind: str, stream: str = "live/cam") -> list[Any]:
        return [value for k, s, value in self.calls if k == kind and s == stream]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


def authorize(app: str, name: str, key: str | None) -> bool:
    return app == "live" and key == KEY


@contextlib.asynccontextmanager
async def serve(**options: Any) -> AsyncIterator[tuple[RtmpServer, RecordingSink]]:
    sink = RecordingSink()
    options = {"read_timeout": 5.0, "setup_timeout": 5.0, **options}
    async with RtmpServer("127.0.0.1", 0, authorize, sink, **options) as server:
        yield server, sink


@pytest.fixture
async def ingest() -> AsyncIterator[tuple[RtmpServer, RecordingSink]]:
    async with serve() as pair:
        yield pair


async def ffmpeg_publish(
    url: str,
    seconds: float = 3,
    *,
    realtime: bool = False,
    video: tuple[str, ...] = (
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-g",
        "25",
    ),
    audio: tuple[str, ...] = ("-c:a", "aac"),
) -> tuple[int, str]:
    args = [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-v",
        "error",
        *(["-re"] if realtime else []),
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440",
        "-t",
        str(seconds),
        *video,
        *audio,
        "-f",
        "flv",
        url,
    ]
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode or 0, stderr.decode(errors="replace")


def url(server: RtmpServer, name: str = "cam", key: str | None = KEY) -> str:
    query = "" if key is None else f"?key={key}"
    return f"rtmp://127.0.0.1:{server.port}/live/{name}{query}"


def assert_monotonic(tags: list[VideoTag | AudioTag]) -> None:
    stamps = [t.timestamp for t in tags]
    assert stamps == sorted(stamps), "timestamps go backwards"


async def test_ffmpeg_publishes_h264_and_aac(ingest: tuple[RtmpServer, RecordingSink]) -> None:
    server, sink = ingest
    rc, stderr = await ffmpeg_publish(url(server), 3)
    assert rc == 0, stderr
    await sink.wait(lambda: bool(sink.of("unpublish")))

    [publish] = sink.of("publish")
    assert (publish.app, publish.name, publish.key) == ("live", "cam", KEY)
    [metadata] = sink.of("metadata")
    assert (metadata["width"], metadata["height"]) == (320.0, 240.0)
    assert (metadata["videocodecid"], metadata["audiocodecid"]) == (7.0, 10.0)

    media = sink.of("media")
    video = [t for t in media if isinstance(t, VideoTag)]
    audio = [t for t in media if isinstance(t, AudioTag)]
    assert video[0].is_sequence_header and video[0].is_keyframe and video[0].codec_id == 7
    assert audio[0].is_sequence_header and audio[0].sound_format == 10
    assert sum(t.is_sequence_header for t in media) == 2
    frames = [t for t in video if t.avc_packet_type == 1]
    assert len(frames) == 75  # 3 s at 25 fps
    keyframes = [t.timestamp for t in frames if t.is_keyframe]
    assert len(keyframes) == 3 and keyframes[0] < 100  # -g 25: one a second
    assert video[-1].is_end_of_sequence
    assert len(audio) > 120
    assert_monotonic(video)
    assert_monotonic(audio)
    assert 2800 <= video[-1].timestamp <= 3100 and 2800 <= audio[-1].timestamp <= 3100

    assert sink.of("unpublish") == ["unpublished by the client"]
    assert [kind for kind, _, _ in sink.calls][-1] == "unpublish"
    assert server.live == []


async def test_flv_from_received_tags_is_readable_by_ffprobe(
    ingest: tuple[RtmpServer, RecordingSink], tmp_path: Path
) -> None:
    server, sink = ingest
    rc, stderr = await ffmpeg_publish(url(server), 2)
    assert rc == 0, stderr
    await sink.wait(lambda: bool(sink.of("unpublish")))

    path = tmp_path / "out.flv"
    with path.open("wb") as file:
        writer = flv.FlvWriter(file)
        writer.write_metadata(sink.of("metadata")[0])
        for tag in sink.of("media"):
            if isinstance(tag, VideoTag):
                writer.write_video(tag.timestamp, tag.data)
            else:
                writer.write_audio(tag.timestamp, tag.data)
    probe = await asyncio.create_subprocess_exec(
        "ffprobe",
        "-v",
        "error",
        "-show_streams",
        "-of",
        "json",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(probe.communicate(), 20)
    assert probe.returncode == 0 and not err, err
    streams = {s["codec_type"]: s for s in json.loads(out)["streams"]}
    assert streams["video"]["codec_name"] == "h264"
    assert (streams["video"]["width"], streams["video"]["height"]) == (320, 240)
    assert streams["audio"]["codec_name"] == "aac"


@pytest.mark.parametrize("key", ["wrong", None])
async def test_wrong_or_missing_key_is_refused(
    ingest: tuple[RtmpServer, RecordingSink], key: str | None
) -> None:
    server, sink = ingest
    rc, stderr = await ffmpeg_publish(url(server, key=key), 1)
    assert rc != 0
    assert "stream key" in stderr  # FFmpeg prints our onStatus description as "Server error"
    assert sink.calls == [] and server.live == []


async def test_second_publisher_on_a_live_name_is_refused(
    ingest: tuple[RtmpServer, RecordingSink],
) -> None:
    server, sink = ingest
    first = asyncio.create_task(ffmpeg_publish(url(server), 3, realtime=True))
    await sink.wait(lambda: len(sink.of("media")) > 2)

    rc, stderr = await ffmpeg_publish(url(server), 1)
    assert rc != 0 and "already being published" in stderr
    assert server.live == ["live/cam"]

    rc, stderr = await first
    assert rc == 0, stderr
    await sink.wait(lambda: bool(sink.of("unpublish")))
    assert len(sink.of("publish")) == 1
    assert sink.of("unpublish") == ["unpublished by the client"]
    video = [t for t in sink.of("media") if isinstance(t, VideoTag)]
    assert video[-1].timestamp >= 2800
    assert_monotonic(video)


async def test_garbage_closes_that_connection_only(
    ingest: tuple[RtmpServer, RecordingSink], caplog: pytest.LogCaptureFixture
) -> None:
    server, sink = ingest
    caplog.set_level(logging.INFO, "verge.stream.ingest")
    http = await SocketPublisher.connect(server.port)
    await http.send(b"GET /live/cam HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(http.read_until_closed(), 5) == b""

    after_handshake = await SocketPublisher.connect(server.port)
    await after_handshake.handshake()
    await after_handshake.send(bytes(range(256)) * 8)
    await asyncio.wait_for(after_handshake.read_until_closed(), 5)

    good = await SocketPublisher.connect(server.port)
    assert await good.publish("cam?key=secret") == ["NetStream.Publish.Start"]
    await good.send(good.client.video(0, AVC_SEQUENCE_HEADER))
    await sink.wait(lambda: bool(sink.of("media")))
    good.close()
    await sink.wait(lambda: bool(sink.of("unpublish")))

    ended = [r.getMessage() for r in caplog.records if "ended after" in r.getMessage()]
    assert len([line for line in ended if "not RTMP: first byte 'G'" in line]) == 1
    assert len([line for line in ended if "chunk stream" in line]) == 1


async def test_stalled_publisher_is_dropped_and_other_streams_continue() -> None:
    async with serve(read_timeout=0.5) as (server, sink):
        await stalled_and_steady(server, sink)


async def stalled_and_steady(server: RtmpServer, sink: RecordingSink) -> None:
    stalled = await SocketPublisher.connect(server.port)
    assert await stalled.publish("a?key=secret") == ["NetStream.Publish.Start"]
    await stalled.send(stalled.client.video(0, AVC_SEQUENCE_HEADER))

    steady = await SocketPublisher.connect(server.port)
    assert await steady.publish("b?key=secret") == ["NetStream.Publish.Start"]
    keep_sending = asyncio.create_task(send_forever(steady))
    try:
        await sink.wait(lambda: bool(sink.of("unpublish", "live/a")), timeout=5)
        assert sink.of("unpublish", "live/a")[0].startswith("stalled: no data for 0.5 s")
        await asyncio.wait_for(stalled.read_until_closed(), 5)
        count = len(sink.of("media", "live/b"))
        await sink.wait(lambda: len(sink.of("media", "live/b")) > count + 3)
        assert server.live == ["live/b"] and sink.of("unpublish", "live/b") == []
    finally:
        keep_sending.cancel()
        steady.close()


async def send_forever(publisher: SocketPublisher) -> None:
    await publisher.send(publisher.client.audio(0, AAC_SEQUENCE_HEADER))
    stamp = 0
    while True:
        stamp += 40
        await publisher.send(publisher.client.video(stamp, AVC_INTER))
        await asyncio.sleep(0.04)  # a publisher's frame pacing, not a wait for the server


async def test_connection_that_never_publishes_is_closed() -> None:
    async with serve(setup_timeout=0.3) as (server, sink):
        idle = await SocketPublisher.connect(server.port)
        await idle.send(b"\x03" + b"\0" * 100)  # half a C1, then silence
        trickle = await SocketPublisher.connect(server.port)
        await trickle.handshake()  # a whole handshake, then silence
        assert await asyncio.wait_for(idle.read_until_closed(), 5) == b""
        assert await asyncio.wait_for(trickle.read_until_closed(), 5) == b""
    assert sink.calls == []


async def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    async with serve(max_connections=1) as (server, sink):
        first = await SocketPublisher.connect(server.port)
        await first.handshake()  # the server has taken this connection
        second = await SocketPublisher.connect(server.port)
        assert await asyncio.wait_for(second.read_until_closed(), 5) == b""
        assert await first.publish_after_handshake("cam?key=secret") == ["NetStream.Publish.Start"]
        first.close()


async def test_unsupported_codec_ends_the_stream_with_the_reason(
    ingest: tuple[RtmpServer, RecordingSink],
) -> None:
    server, sink = ingest
    # FFmpeg's exit status is not checked: it may finish writing before the server reads.
    await ffmpeg_publish(url(server), 1, video=("-c:v", "flv1"), audio=("-an",))
    await sink.wait(lambda: bool(sink.of("unpublish")))
    [reason] = sink.of("unpublish")
    assert "unsupported video codec Sorenson H.263 (FLV codec id 2)" in reason
    assert server.live == []


async def test_async_authorize_and_close_ends_live_streams() -> None:
    sink = RecordingSink()

    async def check(app: str, name: str, key: str | None) -> bool:
        await asyncio.sleep(0)
        return key == "k"

    server = RtmpServer("127.0.0.1", 0, check, sink)
    await server.start()
    publisher = await SocketPublisher.connect(server.port)
    assert await publisher.publish("cam?key=k") == ["NetStream.Publish.Start"]
    await sink.wait(lambda: bool(sink.of("publish")))
    await server.close()
    assert sink.of("unpublish") == ["server shutting down"]
    await asyncio.wait_for(publisher.read_until_closed(), 5)


# librtmp is what OBS publishes with (its own header compression, 128-byte chunks, no echo of
# our Set Chunk Size). Debian installs it with FFmpeg; it is driven here through ctypes.
LIBRTMP = ctypes.util.find_library("rtmp")


def librtmp_publish(url: str, tags: list[flv.FlvTag]) -> str:
    lib = ctypes.CDLL(LIBRTMP)  # type: ignore[arg-type]
    lib.RTMP_Alloc.restype = ctypes.c_void_p
    for name in ("RTMP_Init", "RTMP_EnableWrite", "RTMP_Close", "RTMP_Free"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.RTMP_SetupURL.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.RTMP_Connect.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.RTMP_ConnectStream.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.RTMP_Write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.RTMP_LogSetLevel(0)
    rtmp = lib.RTMP_Alloc()
    lib.RTMP_Init(rtmp)
    url_buffer = ctypes.create_string_buffer(url.encode())  # librtmp keeps pointers into it
    try:
        lib.RTMP_SetupURL(rtmp, url_buffer)
        lib.RTMP_EnableWrite(rtmp)
        if not lib.RTMP_Connect(rtmp, None) or not lib.RTMP_ConnectStream(rtmp, 0):
            return "refused"
        for tag in tags:  # RTMP_Write wants whole FLV tags
            data = flv.tag(tag.tag_type, tag.timestamp, tag.body)
            if lib.RTMP_Write(rtmp, data, len(data)) <= 0:
                return "write failed"
        return "ok"
    finally:
        lib.RTMP_Close(rtmp)
        lib.RTMP_Free(rtmp)


@pytest.mark.skipif(LIBRTMP is None, reason="needs librtmp (apt-get install librtmp1)")
async def test_librtmp_publisher_as_obs_uses_it(
    ingest: tuple[RtmpServer, RecordingSink], tmp_path: Path
) -> None:
    server, sink = ingest
    source = tmp_path / "source.flv"
    rc, stderr = await ffmpeg_publish(str(source), 2)
    assert rc == 0, stderr
    tags = list(flv.read_tags(source.read_bytes()))
    assert await asyncio.to_thread(librtmp_publish, url(server, key="wrong"), tags) == "refused"
    assert await asyncio.to_thread(librtmp_publish, url(server), tags) == "ok"
    await sink.wait(lambda: bool(sink.of("unpublish")))
    sent = [(t.tag_type, t.timestamp, t.body) for t in tags if t.tag_type != flv.SCRIPT]
    received = [
        (flv.VIDEO if isinstance(t, VideoTag) else flv.AUDIO, t.timestamp, t.data)
        for t in sink.of("media")
    ]
    assert received == sent
    assert sink.of("metadata")[0]["width"] == 320.0
    assert len(sink.of("publish")) == 1
