"""`verge stream`: RTMP ingest in, HTTP-FLV / LL-HLS / HLS / DASH out, for the edges to cache.

Each published stream (``rtmp://HOST/APP/NAME?key=KEY``) becomes a :class:`Channel`:

* an :class:`~verge.stream.fanout.FlvFanout` — HTTP-FLV straight from the ingest;
* a transcoder (one ffmpeg per stream, the application's ABR ladder) whose fragmented-MP4
  outputs feed the packager (LL-HLS parts, segments, playlists, DASH).

URLs (SRS / MediaMTX conventions), relative to the HTTP listener:

    /APP/NAME.flv             HTTP-FLV
    /APP/NAME.m3u8            multivariant playlist (LL-HLS capable players use it too)
    /APP/NAME.mpd             DASH
    /APP/NAME/...             renditions' playlists, init segments, segments and parts

Cache semantics for the CDN: segments and parts are immutable (a year), playlists live a
second or less, HTTP-FLV is not stored. A publisher that disconnects has ``grace`` seconds to
come back (the stream continues with a discontinuity); after that the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field

from verge.config import StreamApp, StreamSettings
from verge.http.server import HttpApp, ServerLimits, reuseport_socket, serve, simple_response
from verge.stream.fanout import FlvFanout
from verge.stream.ingest import RtmpServer
from verge.stream.rtmp.session import AudioTag, Publish, VideoTag

log = logging.getLogger("verge.stream")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NO_STORE = ("Cache-Control", "no-store")
CORS = ("Access-Control-Allow-Origin", "*")


@dataclass
class Channel:
    """One live stream: its FLV fan-out and (when packaging runs) its packager state."""

    path: str  # "APP/NAME"
    app: StreamApp
    fanout: FlvFanout = field(default_factory=FlvFanout)
    live: bool = True
    ending: asyncio.TimerHandle | None = None
    publishes: int = 0


class StreamServer:
    """The ingest sink and the HTTP application of `verge stream`."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.apps = {app.name: app for app in settings.apps}
        self.channels: dict[str, Channel] = {}
        self.rtmp: RtmpServer | None = None
        self.http: asyncio.AbstractServer | None = None
        self.http_port = 0

    # ----- publishing -------------------------------------------------------------------------
    def authorize(self, app: str, name: str, key: str | None) -> bool:
        spec = self.apps.get(app)
        if spec is None or not NAME_RE.fullmatch(name):
            return False
        if not spec.keys:
            return True
        expected = spec.keys.get(name, spec.keys.get("*"))
        return expected is not None and key is not None and _same(key, expected)

    def on_publish(self, stream: str, publish: Publish) -> None:
        channel = self.channels.get(stream)
        if channel is not None and channel.ending is not None:  # back within the grace period
            channel.ending.cancel()
            channel.ending = None
            log.info("stream %s: publisher back, continuing", stream)
        elif channel is None or not channel.live:
            channel = self.channels[stream] = Channel(stream, self.apps[publish.app])
            log.info("stream %s: live", stream)
        channel.live = True
        channel.publishes += 1

    def on_metadata(self, stream: str, metadata: dict) -> None:
        channel = self.channels.get(stream)
        if channel is not None:
            channel.fanout.on_metadata(metadata)

    def on_media(self, stream: str, tag: VideoTag | AudioTag) -> None:
        channel = self.channels.get(stream)
        if channel is not None:
            channel.fanout.on_tag(tag)

    def on_unpublish(self, stream: str, reason: str) -> None:
        channel = self.channels.get(stream)
        if channel is None or channel.ending is not None:
            return
        log.info("stream %s: publisher gone (%s); ending in %.0f s unless it returns",
                 stream, reason, self.settings.grace)
        loop = asyncio.get_running_loop()
        channel.ending = loop.call_later(self.settings.grace, self._end, channel)

    def _end(self, channel: Channel) -> None:
        channel.ending = None
        channel.live = False
        channel.fanout.end()
        log.info("stream %s: ended", channel.path)

    # ----- serving ----------------------------------------------------------------------------
    async def start(self, rtmp: tuple[str, int], http: tuple[str, int]) -> None:
        self.rtmp = RtmpServer(rtmp[0], rtmp[1], self.authorize, self, apps=set(self.apps))
        await self.rtmp.start()
        sock = reuseport_socket(*http)
        self.http_port = sock.getsockname()[1]
        self.http = await serve(StreamHttp(self), sock, ServerLimits(max_body_bytes=1 << 20))

    async def close(self) -> None:
        if self.rtmp is not None:
            await self.rtmp.close()
        for channel in self.channels.values():
            if channel.ending is not None:
                channel.ending.cancel()
            channel.fanout.end()
        if self.http is not None:
            self.http.close()


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())


class StreamHttp(HttpApp):
    """HTTP side of the stream server (the edges' origin for streams)."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server

    async def handle(self, request, writer) -> None:
        path = request.path
        if request.method not in ("GET", "HEAD"):
            writer.send_prepared(405, simple_response(405, b"method not allowed\n"), 0)
            return
        if path.endswith(".flv"):
            await self.http_flv(request, writer, path[1:-4])
            return
        writer.send_prepared(404, simple_response(404, b"no such stream resource\n"), 0)

    async def http_flv(self, request, writer, stream: str) -> None:
        channel = self.server.channels.get(stream)
        if channel is None or not channel.live:
            writer.send_prepared(404, simple_response(404, f"stream {stream} is not live\n".encode()), 0)
            return
        writer.start(200, [("Content-Type", "video/x-flv"), NO_STORE, CORS])
        if request.method == "HEAD":
            return
        viewer = channel.fanout.subscribe()
        try:
            while (data := await viewer.next()) is not None:
                await writer.write(data)
        finally:
            channel.fanout.unsubscribe(viewer)


async def run_stream(settings: StreamSettings, rtmp: tuple[str, int], http: tuple[str, int]) -> None:
    server = StreamServer(settings)
    await server.start(rtmp, http)
    print(f"verge stream ready: rtmp rtmp://{rtmp[0]}:{server.rtmp.port}/"
          f"{settings.apps[0].name} http http://{http[0]}:{server.http_port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
