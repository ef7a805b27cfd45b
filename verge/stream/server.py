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
    /APP/NAME                 the player page; /APP/NAME/chat its chat (verge.stream.web)
    /APP/NAME/key             the AES-128 key of an app with ``encrypt: true`` (never cached)
    /APP/NAME/whep            WebRTC playback: WHEP (POST an SDP offer; verge.stream.webrtc)
    /APP/NAME/analysis        scene cuts, thumbnails, black/silence/faces of an app with
                              ``analysis: true`` (verge.stream.analysis; its files below it)

Cache semantics for the CDN: segments and parts are immutable (a year), playlists live a
second or less, HTTP-FLV is not stored. A publisher that disconnects has ``grace`` seconds to
come back (the stream continues with a discontinuity); after that the stream ends.

With ``encrypt: true`` the HLS playlists name AES-128 segments and parts, under a random key
per stream served at /APP/NAME/key with ``private, no-store`` (see verge.stream.package.hls).
DASH and HTTP-FLV stay in the clear: protect them, and the key, with a signed edge rule.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import parse_qs

from verge.config import StreamApp, StreamSettings
from verge.http.server import HttpApp, ServerLimits, reuseport_socket, serve, text_response
from verge.stream.analysis import LiveAnalyzer, analysis_file, content_type
from verge.stream.analysis.runner import RESULT
from verge.stream.chat import ChatHub
from verge.stream.fanout import FlvFanout
from verge.stream.ingest import RtmpServer
from verge.stream.metrics import IngestClock, StreamMetrics
from verge.stream.package.cmaf import Part
from verge.stream.package.hls import Encryption, aes128_encrypt
from verge.stream.package.live import (
    BlockingRequestError,
    LiveStream,
    StreamNaming,
    parse_blocking_query,
)
from verge.stream.package.mp4 import Mp4Error
from verge.stream.rtmp.session import AudioTag, Publish, VideoTag
from verge.stream.transcode import TranscodeJob, ladder_from_config, resolve_ffmpeg, rtc_track
from verge.stream.vod import VodLibrary, recording_from_live, recording_name
from verge.stream.web import serve_web
from verge.stream.webrtc import WhepService, handle_whep

log = logging.getLogger("verge.stream")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NO_STORE = ("Cache-Control", "no-store")
CORS = ("Access-Control-Allow-Origin", "*")
IMMUTABLE = ("Cache-Control", "public, max-age=31536000, immutable")
SHORT = ("Cache-Control", "public, max-age=1")  # live playlists: the edge collapses and reuses
BLOCKED = ("Cache-Control", "public, max-age=6")  # the answer for one _HLS_msn/_HLS_part
PRIVATE = ("Cache-Control", "private, no-store")  # the AES key: no cache may keep it
ANALYSIS_LIVE = ("Cache-Control", "public, max-age=2")  # a live analysis grows every few seconds
NO_ANALYSIS = ("Cache-Control", "public, max-age=60")  # a stream of an app without analysis
ENCRYPTION = Encryption()
M3U8 = "application/vnd.apple.mpegurl"
MPD = "application/dash+xml"
STARTUP_WAIT = 8.0  # seconds a first request may wait for a new stream's first segment
STREAM_DOC_RE = re.compile(r"/(?P<stream>[^/]+/[^/.]+)\.(?P<kind>m3u8|mpd)")
WHEP_RE = re.compile(r"/(?P<stream>[^/]+/[^/]+)/whep(?:/(?P<session>[A-Za-z0-9_-]{1,64}))?")
ANALYSIS_RE = re.compile(
    r"/(?P<stream>[^/]+/[^/.]+)/analysis"
    r"(?:/(?P<run>[0-9a-f]{6,16})/(?P<file>[\w.-]{1,64}))?"
)
RENDITION_RE = re.compile(r"/(?P<stream>[^/]+/[^/.]+)/(?P<rendition>[a-z0-9-]+)/(?P<file>[\w.-]+)")


@dataclass
class Channel:
    """One live stream: FLV fan-out, transcoder, packager, and a condition that wakes the
    requests blocked on the next part (LL-HLS blocking reload, preload hints)."""

    path: str  # "APP/NAME"
    app: StreamApp
    packager: LiveStream
    fanout: FlvFanout = field(default_factory=FlvFanout)
    live: bool = True
    ending: asyncio.TimerHandle | None = None
    publishes: int = 0
    job: TranscodeJob | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    clock: IngestClock = field(default_factory=IngestClock)
    metrics: StreamMetrics | None = None
    timed: str | None = None  # the rendition whose parts' ingest-to-playlist latency is measured
    key: bytes | None = None  # the AES-128 key of an encrypting app (one per stream)
    analyzer: LiveAnalyzer | None = None  # apps with ``analysis: true``
    analyzed_by_part: set[str] = field(default_factory=set)  # see _restart_analysis

    @property
    def encryption(self) -> Encryption | None:
        return ENCRYPTION if self.key is not None else None

    def on_output(self, rendition: str, kind: str, data: bytes) -> None:
        """Transcoder bytes (one fMP4 output) into the packager; wake the waiters when an
        init, part or segment came of it (most pipe reads complete none)."""
        by_part = rendition in self.analyzed_by_part
        if self.analyzer is not None and not by_part:  # a non-blocking pipe write, niced process
            self.analyzer.write(rendition, data)
        target = self.packager.renditions.get(rendition)
        if target is None:  # on_plan names every output before its first byte
            target = self.packager.add_rendition(rendition)
        try:
            events = target.feed(data)
        except Mp4Error as exc:  # ffmpeg wrote something we cannot package: start over
            log.error("stream %s: rendition %s: bad fragmented MP4 (%s); restarting it",
                      self.path, rendition, exc)
            target.restart()
            events = []
        if rendition == self.timed and self.metrics is not None:
            self._time_parts(events)
        if by_part and self.analyzer is not None:
            for event in events:
                if isinstance(event, Part):
                    self.analyzer.write(rendition, event.data)
        if events:
            asyncio.get_running_loop().create_task(self._notify())

    def _time_parts(self, events) -> None:
        now = time.time()
        for event in events:
            if isinstance(event, Part):
                arrived = self.clock.arrival_of(event.start / event.timescale)
                if arrived is not None:
                    self.metrics.part_listed(max(0.0, now - arrived))

    def on_plan(self, tracks) -> None:
        """The transcoder's outputs are known: every rendition exists before its first byte,
        so the multivariant playlist never lists a partial ladder."""
        self.timed = next((t.name for t in tracks if t.kind == "video"), None)
        if self.analyzer is not None:
            self.analyzer.plan(tracks)
        for track in tracks:
            if track.name not in self.packager.renditions:
                self.packager.add_rendition(track.name, track.bitrate or 0)

    def startable(self) -> bool:
        """Every rendition has a complete segment: what a player (or ffprobe) needs to start."""
        renditions = self.packager.renditions.values()
        return bool(renditions) and all(_has_segment(r) for r in renditions)

    def on_restart(self, discontinuity) -> None:
        """A transcoder process restarted: its renditions (all, if it does not say) continue
        after a discontinuity. Output time goes on (one timeline per job), so the ingest clock
        does too."""
        names = set(discontinuity.renditions or self.packager.renditions)
        log.warning("stream %s: transcoder restarted (%s); discontinuity on %s", self.path,
                    discontinuity.reason, ", ".join(sorted(names)))
        for name in names:
            if name in self.packager.renditions:
                self.packager.renditions[name].restart()
        if self.analyzer is not None:
            self._restart_analysis(names)

    def _restart_analysis(self, restarted: set[str]) -> None:
        """A new analysis run when one of its inputs restarted. An input that goes on is cut
        mid-stream: the new run gets its init segment, then its parts as the packager lists
        them (whole fragments), until that input restarts too."""
        watched = {self.analyzer.video, self.analyzer.audio} - {None}
        if not watched & restarted:
            return
        self.analyzer.restart()
        self.analyzed_by_part -= restarted
        for name in watched - restarted:
            rendition = self.packager.renditions.get(name)
            init = rendition.init_bytes() if rendition is not None else None
            if init is not None:
                self.analyzer.write(name, init)
                self.analyzed_by_part.add(name)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, ready, timeout: float) -> bool:
        """Until ready() or the timeout; False on timeout."""
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(ready)
            return True
        except TimeoutError:
            return ready()


class StreamServer:
    """The ingest sink and the HTTP application of `verge stream`."""

    def __init__(self, settings: StreamSettings, *, transcode: bool = True,
                 ffmpeg: str | None = None) -> None:
        self.settings = settings
        self.transcode = transcode
        self.ffmpeg = resolve_ffmpeg(ffmpeg) if transcode else None
        self.apps = {app.name: app for app in settings.apps}
        self.channels: dict[str, Channel] = {}
        self.metrics = StreamMetrics()
        self.rtmp: RtmpServer | None = None
        self.http: asyncio.AbstractServer | None = None
        self.http_port = 0
        self.chat = ChatHub()
        self.vod = VodLibrary(settings, auto_analyze=transcode)
        self.whep = WhepService(settings.webrtc)

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
            self._resume(channel)
            log.info("stream %s: publisher back, continuing after a discontinuity", stream)
        elif channel is None or not channel.live:
            channel = self.channels[stream] = self._new_channel(stream, self.apps[publish.app])
            log.info("stream %s: live", stream)
        channel.live = True
        channel.publishes += 1
        self.whep.on_publish(stream)
        if channel.job is None:  # nothing encoded: a source with B-frames has no WebRTC video
            self.whep.on_rendition_plan(stream, None)

    def _resume(self, channel: Channel) -> None:
        """A new publish of a stream in its grace period: its timestamps start over, so a new
        transcoder starts and the playlists continue after EXT-X-DISCONTINUITY (a new init)."""
        channel.packager.restart()
        channel.clock.restarted()
        channel.fanout.end()  # new sequence headers: HTTP-FLV viewers reconnect
        channel.fanout = FlvFanout()
        if channel.analyzer is not None:  # a new timeline: a new analysis run
            channel.analyzer.restart()
            channel.analyzed_by_part.clear()
        if channel.job is not None:
            old, channel.job = channel.job, self._transcoder(channel)
            asyncio.get_running_loop().create_task(old.close())

    def _transcoder(self, channel: Channel) -> TranscodeJob:
        """A transcoder whose output counts only while it is the channel's current one (a job
        being replaced may still flush fragments of the old timeline)."""
        job: TranscodeJob | None = None

        def current(callback):
            return lambda *args: callback(*args) if channel.job is job else None

        def on_plan(tracks) -> None:
            channel.on_plan(tracks)
            rung = rtc_track(tracks)  # WebRTC's video when the source has B-frames
            self.whep.on_rendition_plan(channel.path, rung.name if rung is not None else None)

        job = TranscodeJob(
            ladder_from_config(r.model_dump() for r in channel.app.ladder), ffmpeg=self.ffmpeg,
            on_output=current(channel.on_output), on_restart=current(channel.on_restart),
            on_plan=current(on_plan), name=channel.path,
            on_flv=current(partial(self.whep.on_rendition_tag, channel.path)),
            part_target=self.settings.part_target)  # one ffmpeg fragment per LL-HLS part
        return job

    def _new_channel(self, stream: str, app: StreamApp) -> Channel:
        settings = self.settings
        name = stream.rsplit("/", 1)[1]  # documents at /APP/NAME.m3u8, renditions at /APP/NAME/R/
        naming = StreamNaming(playlist=f"{name}/{{rendition}}/index.m3u8",
                              directory=f"{name}/{{rendition}}/")
        packager = LiveStream(
            part_target=settings.part_target, segment_target=settings.segment_target,
            part_hold_back=settings.part_hold_back, window=settings.dvr_window,
            stream_naming=naming)
        channel = Channel(stream, app, packager, metrics=self.metrics,
                          key=os.urandom(16) if app.encrypt else None)
        channel.packager.timeline.arrival = channel.clock.arrival_of  # PDT from the ingest
        if self.transcode:
            channel.job = self._transcoder(channel)
            if app.analysis:
                channel.analyzer = LiveAnalyzer(
                    self.ffmpeg,
                    Path(settings.data_dir) / "analysis" / stream,
                    f"/{stream}/analysis",
                    packager=channel.packager,  # scene times anchored on its PDT
                )
        return channel

    def on_metadata(self, stream: str, metadata: dict) -> None:
        channel = self.channels.get(stream)
        if channel is not None:
            channel.fanout.on_metadata(metadata)
            if channel.job is not None:
                channel.job.write_metadata(metadata)

    def on_media(self, stream: str, tag: VideoTag | AudioTag) -> None:
        channel = self.channels.get(stream)
        if channel is not None:
            video = isinstance(tag, VideoTag)
            channel.clock.frame(tag.timestamp, len(tag.data), video and tag.is_keyframe and
                                not tag.is_sequence_header, video)
            channel.fanout.on_tag(tag)
            self.whep.on_media(stream, tag)
            if channel.job is not None:
                channel.job.write_media(tag)

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
        loop = asyncio.get_running_loop()
        loop.create_task(self.whep.on_end(channel.path))
        if channel.job is not None:
            loop.create_task(self._finish(channel))
        log.info("stream %s: ended", channel.path)

    async def _finish(self, channel: Channel) -> None:
        """Let ffmpeg flush what it has, then close the playlists (EXT-X-ENDLIST)."""
        await channel.job.close()
        channel.packager.end()
        await channel._notify()
        if channel.app.record and channel.packager.ready:
            name = recording_name(channel.path)
            try:
                await self.vod.record(name, recording_from_live(channel.packager))
                log.info("stream %s: recorded as /vod/%s", channel.path, name)
                self.vod.analyze_later(name)
            except Exception as exc:  # a failed recording must not take the server down
                log.error("stream %s: recording failed: %r", channel.path, exc)
        if channel.analyzer is not None:  # its final result (bounded wait), after the recording
            await channel.analyzer.close()

    # ----- serving ----------------------------------------------------------------------------
    async def start(self, rtmp: tuple[str, int], http: tuple[str, int]) -> None:
        self.rtmp = RtmpServer(rtmp[0], rtmp[1], self.authorize, self, apps=set(self.apps))
        await self.rtmp.start()
        sock = reuseport_socket(*http)
        self.http_port = sock.getsockname()[1]
        self.http = await serve(StreamHttp(self), sock, ServerLimits(
            max_body_bytes=max(1 << 20, self.settings.max_upload_bytes)))

    async def close(self) -> None:
        await self.chat.close()
        await self.whep.close()
        await self.vod.close()
        if self.rtmp is not None:
            await self.rtmp.close()
        for channel in self.channels.values():
            if channel.ending is not None:
                channel.ending.cancel()
            channel.fanout.end()
            if channel.job is not None:
                await channel.job.close()
            if channel.analyzer is not None:
                await channel.analyzer.close()
        if self.http is not None:
            self.http.close()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class StreamHttp(HttpApp):
    """HTTP side of the stream server (the edges' origin for streams)."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server

    async def handle(self, request, writer) -> None:
        path = request.path
        if path.startswith("/vod/"):
            await self.server.vod.handle(request, writer)
            return
        if path == "/metrics" and request.method == "GET":
            body = self.server.metrics.render(self.server) + self.server.whep.render_metrics()
            await _send(writer, 200, body, "text/plain; version=0.0.4", NO_STORE)
            return
        self.server.metrics.request(_kind(path))
        if whep := WHEP_RE.fullmatch(path):
            channel = self.server.channels.get(whep["stream"])
            await handle_whep(self.server.whep, request, writer, whep["stream"], whep["session"],
                              live=channel is not None and channel.live)
            return
        if request.method not in ("GET", "HEAD"):
            await writer.send(text_response(405, "method not allowed\n"))
            return
        if path.endswith(".flv"):
            await self.http_flv(request, writer, path[1:-4])
            return
        if await serve_web(request, writer, path, apps=self.server.apps, chat=self.server.chat):
            return
        if path.endswith("/key"):
            await self.stream_key(writer, path[1:-4])
            return
        if analysis := ANALYSIS_RE.fullmatch(path):
            await self.stream_analysis(writer, analysis)
            return
        resource = _resource(path)
        channel = self.server.channels.get(resource[0]) if resource else None
        if channel is None:
            await _send(writer, 404, b"no such stream\n", "text/plain", NO_STORE)
            return
        stream, rendition, name = resource
        if rendition is None:
            await self.stream_document(request, writer, channel, name)
        else:
            await self.rendition_resource(request, writer, channel, rendition, name)

    async def stream_document(self, request, writer, channel: Channel, name: str) -> None:
        """The multivariant playlist or the MPD, once every rendition has its init segment."""
        packager = channel.packager
        await channel.wait_for(lambda: channel.startable() or packager.ended, STARTUP_WAIT)
        if not channel.startable():
            await _send(writer, 404, b"stream is starting\n", "text/plain", NO_STORE)
        elif name == "m3u8":
            await _send(writer, 200, packager.multivariant().encode(), M3U8, SHORT)
        else:
            await _send(writer, 200, packager.mpd().encode(), MPD, SHORT)

    async def rendition_resource(self, request, writer, channel: Channel, rendition: str,
                                 name: str) -> None:
        packager = channel.packager
        await channel.wait_for(lambda: rendition in packager.renditions or packager.ended,
                               STARTUP_WAIT)
        target = packager.renditions.get(rendition)
        if target is None:
            await _send(writer, 404, b"no such rendition\n", "text/plain", NO_STORE)
        elif name in ("index.m3u8", "classic.m3u8"):
            await self.media_playlist(request, writer, channel, target, name == "index.m3u8")
        else:
            await self.media_file(writer, channel, target, name)

    async def media_playlist(self, request, writer, channel: Channel, target, ll: bool) -> None:
        """LL-HLS blocking reload: with _HLS_msn (and _HLS_part) wait until that part exists."""
        query = parse_qs(request.query)
        try:
            msn, part = parse_blocking_query(_first(query, "_HLS_msn"), _first(query, "_HLS_part"))
            target.check_blocking(msn, part)
        except BlockingRequestError as exc:
            await _send(writer, 400, f"{exc}\n".encode(), "text/plain", NO_STORE)
            return
        wait = 3 * max(target.target_duration, 1)
        if not await channel.wait_for(lambda: _has_segment(target) and
                                      target.blocking_ready(msn, part),
                                      wait if msn is not None else STARTUP_WAIT):
            await _send(writer, 503, b"the stream did not reach that part in time\n", "text/plain",
                  NO_STORE)
            return
        text = channel.packager.media_playlist(target.name, ll=ll, encryption=channel.encryption)
        await _send(writer, 200, text.encode(), M3U8, BLOCKED if msn is not None else SHORT)

    async def stream_key(self, writer, stream: str) -> None:
        channel = self.server.channels.get(stream)
        if channel is None or channel.key is None:
            await _send(writer, 404, b"no key for this stream\n", "text/plain", NO_STORE)
            return
        await _send(writer, 200, channel.key, "application/octet-stream", PRIVATE)

    async def media_file(self, writer, channel: Channel, target, name: str) -> None:
        """Init, segment or part bytes; a hinted part not there yet is waited for. The names
        of encrypted ones (AES-128 apps) stand for the clear bytes, encrypted on the way out."""
        clear = ENCRYPTION.clear_name(name) if channel.key is not None else None
        if clear is not None:
            name = clear
        data = target.resolve(name)
        if data is None and target.pending(name):
            wait = 3 * max(target.target_duration, 1)
            await channel.wait_for(lambda: target.resolve(name) is not None or target.ended, wait)
            data = target.resolve(name)
        msn = target.msn_of(name) if clear is not None and data is not None else None
        if clear is not None and msn is not None:
            data = aes128_encrypt(channel.key, msn, data)
        elif clear is not None:
            data = None  # an init segment is never encrypted
        if data is None:
            await _send(writer, 404, b"no such media\n", "text/plain", NO_STORE)
        else:
            await _send(writer, 200, data, "video/mp4" if name.endswith(".mp4") else "video/iso.segment",
                  IMMUTABLE)

    async def stream_analysis(self, writer, match: re.Match) -> None:
        """The live analysis (JSON), or one of its files (chapters, thumbnails)."""
        channel = self.server.channels.get(match["stream"])
        analyzer = channel.analyzer if channel is not None else None
        if analyzer is None:  # players poll for it: let the edges answer for a while
            await _send(writer, 404, b"no analysis for this stream\n", "text/plain", NO_ANALYSIS)
            return
        if match["run"] is None:
            run = analyzer.current()
            path = run / RESULT if run is not None else None
        else:
            path = analysis_file(analyzer.root, match["run"], match["file"])
        try:
            data = path.read_bytes() if path is not None else None
        except OSError:
            data = None
        if data is None:
            await _send(writer, 404, b"not analysed (yet)\n", "text/plain", ANALYSIS_LIVE)
            return
        cache = IMMUTABLE if path.suffix == ".jpg" else ANALYSIS_LIVE
        await _send(writer, 200, data, content_type(path.name), cache)

    async def http_flv(self, request, writer, stream: str) -> None:
        channel = self.server.channels.get(stream)
        if channel is None or not channel.live:
            await writer.send(text_response(404, f"stream {stream} is not live\n"))
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


def _resource(path: str) -> tuple[str, str | None, str] | None:
    """/APP/NAME.m3u8|.mpd -> (stream, None, kind); /APP/NAME/REND/FILE -> (stream, rend, file)."""
    match = STREAM_DOC_RE.fullmatch(path)
    if match:
        return match["stream"], None, match["kind"]
    match = RENDITION_RE.fullmatch(path)
    if match:
        return match["stream"], match["rendition"], match["file"]
    return None


def _kind(path: str) -> str:
    """A request's resource kind, for the request counter (a small fixed label set)."""
    for suffix, kind in ((".flv", "flv"), (".m3u8", "playlist"), (".mpd", "mpd"),
                         (".m4s", "media"), (".mp4", "media")):
        if path.endswith(suffix):
            return kind
    return "other"


def _has_segment(rendition) -> bool:
    return rendition.ended or any(segment.complete for segment in rendition.segments)


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


async def _send(writer, status: int, body: bytes, content_type: str,
                cache: tuple[str, str]) -> None:
    writer.start(status, [("Content-Type", content_type), cache, CORS], content_length=len(body))
    await writer.write(body)


async def run_stream(settings: StreamSettings, rtmp: tuple[str, int], http: tuple[str, int]) -> None:
    server = StreamServer(settings)
    await server.start(rtmp, http)
    print(f"verge stream ready: rtmp rtmp://{rtmp[0]}:{server.rtmp.port}/"
          f"{settings.apps[0].name} http http://{http[0]}:{server.http_port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
