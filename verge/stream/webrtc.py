"""WebRTC playback over WHEP: a live stream's H.264 passed through (or, if it has B-frames, its
top encoded rung), its AAC as Opus.

Why this shape: a WebRTC viewer should cost what forwarding packets costs, not an encoder.
So video is never decoded — the publisher's H.264 access units (FLV tags from the RTMP ingest,
the same ones HTTP-FLV serves) are rewritten from AVCC to Annex B and handed to aiortc as
``av.Packet`` objects, which aiortc packetises (RFC 6184) without touching the picture, as
SRS's ``rtmp_to_rtc`` does. Audio must change codec (browsers' WebRTC has Opus, not AAC): one
AAC decoder and one Opus encoder per stream (PyAV, in process) feed every viewer of it, and
run only while the stream has WebRTC viewers.

Rules:

* Browsers' WebRTC decoders assume no frame reordering: the video must have no B-frames. A
  source without them is passed through (no encoder, no extra cost). A source whose tags carry
  a composition-time offset has B-frames (plain ``ffmpeg -c:v libx264``, OBS defaults): its
  viewers' video is the ladder's top encoded rung instead (x264 ``-tune zerolatency``: no
  B-frames; :func:`verge.stream.transcode.rtc_track`), their audio still the source's AAC as
  Opus, once per stream. The encoding ffmpeg writes that rung twice from one encode, with the
  ``tee`` muxer: the fMP4 for HLS and an FLV whose tags, flushed one per frame, reach the
  stream's ``encoded`` feed (:meth:`WhepService.on_rendition_tag`). Why FLV and not the
  packager's fMP4 parts of the rung: a part is whole only at its end (up to the 0.25 s part
  target later); FLV adds only the encoder's delay — measured from the ingest of a frame to its
  encoded tag, 720p with 3 B-frames to 360p on a busy 2-core machine: median 155 ms, p90 270 ms
  (the B-frames' reordering included) — and the tee costs no measurable CPU (10 s of that
  ladder's encoding: 4.7 s of CPU either way; parsing the tags: 4 ms). Viewers already watching
  when B-frames first appear move to the encoded feed at its next keyframe.
* Such a stream is answered ``409`` with the reason if nothing is encoded (a ladder of only
  ``source``, no rung below the source's height, or no transcoder); ``503`` with
  ``Retry-After: 1`` while the transcoder has not planned or its rung has no keyframe yet (the
  encoder just started).
* Lip sync of those viewers. Browsers sync tracks by the sender reports, which map RTP time
  to NTP time; aiortc's map it to the send time of the last packet sent
  (``RTCRtpSender._run_rtp``), so a track plays as late as its packets leave, whatever their
  timestamps: the lever is the send time. :class:`AvSync` (one per stream) measures how far
  the encoded video trails the Opus audio: per Opus packet and per encoded frame, send time
  minus media time (the encoder's timeline mapped onto the source's: its first frame is the
  publish's first keyframe), the median over the last 2 s with each packet weighted as a
  receiver samples it (by the gap until the next one), bounded to ±1 s. Those viewers' tracks
  hold each packet back by it: the audio while the video trails, the video while it leads
  (:attr:`PacketTrack.sync`; a timestamp per queued packet, nothing more). Source viewers hold
  nothing. Measured (tests/stream/test_whep_sync.py: the sender-report times of a flash and
  its beep): counted from the audio, the encoder's delay is far less than from its input
  frame, as a B-frame publisher sends its video ahead of its audio by its reordering delay —
  320x240 to 180p: the video 23-35 ms ahead; 720p30 with 3 B-frames to 360p: a median 6 ms
  ahead (-27 to +19). A viewer's skew: 26 ms (video first) before, 3-22 ms (sound first)
  after; with the encoder's tags 150 ms late (a busy encoder), 136 ms (sound first) before,
  within 6 ms after. Source viewers: video 16-23 ms first (the Opus transcoding), as before.
  (On an idle machine; under a load average of 10 on its 2 cores, any viewer's skew, a source
  viewer's too, scattered by up to 60 ms.) The lag per stream is the metric
  ``verge_stream_webrtc_av_lag_seconds``.
* A new viewer's media flows once its connection is up, video from the next keyframe (not
  the GOP cache: old frames sent in a burst would set the browser's playout delay behind the
  live edge). A viewer whose
  queue overflows drops it and waits for the next keyframe too.
* Signalling is the IETF WHEP draft (the playback twin of WHIP, RFC 9725): ``POST`` an SDP
  offer to ``/APP/NAME/whep``, get ``201`` with the SDP answer (all candidates in it: no
  trickle) and the session's ``Location``; ``DELETE`` that location ends it; ``PATCH``
  (trickle ICE, ICE restart) is answered ``405``.
* Limits: viewers per stream and per server (``503`` with ``Retry-After`` and the reason).
  A session is reaped when its connection fails or closes, or when the viewer has sent no
  RTCP receiver report for ``session_timeout`` (it vanished, or never connected).
* Candidates: aioice gathers host candidates on every interface address except 127.0.0.1.
  ``stream.webrtc.candidates`` replaces that list: local addresses are gathered on (bound);
  addresses that are not local (a 1:1 NAT's public address) are advertised in the answer with
  the port of a gathered candidate, as MediaMTX's ``webrtcAdditionalHosts`` does. The choice
  reaches aioice through :func:`verge.compat.aioice.gather_on` (a wrapper of its
  ``get_host_addresses``, the one patch of aioice's internals).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction

import av
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.exceptions import InternalError, InvalidAccessError, OperationError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from verge.compat.aioice import gather_on
from verge.config import WebRtcSettings
from verge.stream import flv
from verge.stream.rtmp.session import AudioTag, VideoTag

log = logging.getLogger("verge.stream.webrtc")

SDP_TYPE = "application/sdp"
MAX_OFFER_BYTES = 64 * 1024  # browsers' offers are 3-10 kB
NEGOTIATION_TIMEOUT = 10.0
MS = Fraction(1, 1000)
OPUS_RATE = 48_000
OPUS_FRAME = 960  # 20 ms
OPUS_BITRATE = 64_000
VIDEO_QUEUE = 150  # frames a viewer may fall behind (5 s at 30 fps) before it skips a GOP
AUDIO_QUEUE = 250  # 20 ms packets
START_CODE = b"\x00\x00\x00\x01"
RETRY_AFTER = "10"
RETRY_STARTING = "1"  # the encoded rendition's first keyframe is ~1 s away (-g = 1 s)
SYNC_WINDOW = 2.0  # seconds: how recent the packets are whose send times give the lag
MAX_SYNC_DELAY = 1.0  # seconds: the most a viewer's audio (or video) is held back for lip sync
VIDEO_CODECS = ("video/H264", "video/rtx")
AUDIO_CODECS = ("audio/opus",)


class WhepError(Exception):
    """A signalling request that cannot be served: its status, reason and extra headers."""

    def __init__(self, status: int, reason: str, headers: tuple = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


# ----- candidates: which addresses aioice gathers on (verge.compat.aioice) ------------------


def is_local_address(address: str) -> bool:
    """Can a UDP socket bind to it here (a gathered candidate) or not (an advertised one)?"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def advertise(answer: str, addresses: list[str]) -> str:
    """Add a host candidate for each advertised address, with the port of the first gathered
    UDP candidate of its family, after the candidates of every media section."""
    lines = answer.split("\r\n")
    out: list[str] = []
    for index, line in enumerate(lines):
        out.append(line)
        if not line.startswith("a=candidate:"):
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if following.startswith("a=candidate:"):
            continue  # add after the last candidate of the section
        section = _section_candidates(lines, index)
        out += _advertised_lines(section, addresses)
    return "\r\n".join(out)


def _section_candidates(lines: list[str], last: int) -> list[list[str]]:
    first = last
    while first > 0 and lines[first - 1].startswith("a=candidate:"):
        first -= 1
    return [line[len("a=candidate:") :].split() for line in lines[first : last + 1]]


def _advertised_lines(candidates: list[list[str]], addresses: list[str]) -> list[str]:
    added = []
    for number, address in enumerate(addresses):
        v6 = ":" in address
        template = next(
            (
                c
                for c in candidates
                if c[2].lower() == "udp" and (":" in c[4]) == v6 and c[7] == "host"
            ),
            None,
        )
        if template is not None:
            foundation = f"adv{number}"
            added.append(
                f"a=candidate:{foundation} {template[1]} udp {template[3]} {address} "
                f"{template[5]} typ host"
            )
    return added


# ----- media: H.264 access units and Opus packets ------------------------------------------------


def avc_config(sequence_header: bytes) -> tuple[int, bytes]:
    """(NAL length size, SPS and PPS as Annex B) from an FLV AVC sequence header tag body."""
    record = sequence_header[5:]
    if len(record) < 7 or record[0] != 1:
        raise ValueError("not an AVCDecoderConfigurationRecord")
    length_size = (record[4] & 0x03) + 1
    pos, out = 5, bytearray()
    for count_mask in (0x1F, 0xFF):  # SPS count (5 bits), then PPS count (8 bits)
        count = record[pos] & count_mask
        pos += 1
        for _ in range(count):
            size = int.from_bytes(record[pos : pos + 2], "big")
            out += START_CODE + record[pos + 2 : pos + 2 + size]
            pos += 2 + size
    return length_size, bytes(out)


def annex_b(nal_units: bytes, length_size: int) -> bytes:
    """Length-prefixed NAL units (AVCC) as start-code-prefixed ones (Annex B)."""
    out, pos, end = bytearray(), 0, len(nal_units)
    while pos + length_size <= end:
        size = int.from_bytes(nal_units[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > end:
            break
        out += START_CODE + nal_units[pos : pos + size]
        pos += size
    return bytes(out)


class OpusTranscoder:
    """AAC frames (FLV AUDIODATA) to 20 ms Opus packets at 48 kHz; one per stream."""

    def __init__(self, audio_specific_config: bytes, start_ms: int) -> None:
        self.decoder = av.CodecContext.create("aac", "r")
        self.decoder.extradata = audio_specific_config
        self.encoder = av.CodecContext.create("libopus", "w")
        self.encoder.sample_rate = OPUS_RATE
        self.encoder.layout = "stereo"
        self.encoder.format = "s16"
        self.encoder.bit_rate = OPUS_BITRATE
        self.encoder.time_base = Fraction(1, OPUS_RATE)
        self.resampler = av.AudioResampler(
            format="s16", layout="stereo", rate=OPUS_RATE, frame_size=OPUS_FRAME
        )
        self.base = start_ms * OPUS_RATE // 1000
        self.samples = 0

    def feed(self, raw_aac: bytes) -> list[av.Packet]:
        packets: list[av.Packet] = []
        for frame in self.decoder.decode(av.Packet(raw_aac)):
            for chunk in self.resampler.resample(frame):
                chunk.pts = self.samples
                chunk.time_base = self.encoder.time_base
                self.samples += chunk.samples
                for packet in self.encoder.encode(chunk):
                    packet.pts = self.base + max(packet.pts or 0, 0)
                    packets.append(packet)
        return packets


class SendOffset:
    """When a feed's packets are sent, relative to their media time (``sent - media``, seconds),
    as a receiver samples it: what its sender reports say is the offset of the packet sent last
    before each report, so each packet counts for the time until the next one is sent (the last
    of a burst for the whole gap after it, the others for nothing). The weighted median over the
    last :data:`SYNC_WINDOW` seconds: robust to the encoder's start and to outliers."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()  # (sent, sent - media)

    def add(self, media: float, sent: float) -> None:
        self.samples.append((sent, sent - media))
        while sent - self.samples[0][0] > SYNC_WINDOW:
            self.samples.popleft()

    @property
    def value(self) -> float | None:
        if len(self.samples) < 2:
            return None
        weighted = sorted(
            (offset, then - sent) for (sent, offset), (then, _) in itertools.pairwise(self.samples)
        )
        half, total = sum(weight for _, weight in weighted) / 2, 0.0
        for offset, weight in weighted:
            total += weight
            if total >= half:
                return offset
        return weighted[-1][0]


class AvSync:
    """Lip sync for a stream's viewers of its encoded rung: how far that video trails the
    stream's Opus audio (``lag``, seconds; negative: it is ahead), measured live, and how long
    each of their tracks is held back so that both are sent media time for media time.

    Pure (times passed in). The encoded rung has its own timeline: the encoder's first frame is
    the publish's first keyframe (the transcoder starts there), and a restarted encoder goes on
    on the same timeline (``-output_ts_offset``), so ``keyframe_ms + (encoded - first_encoded)``
    is the frame's media time on the source's timeline, the one the Opus packets are on."""

    def __init__(self) -> None:
        self.lag = 0.0
        self.restart()

    def restart(self) -> None:
        """A new publish: new timelines (the last lag stays until both feeds are measured)."""
        self.audio = SendOffset()
        self.video = SendOffset()
        self.keyframe_ms: int | None = None  # the publish's first source keyframe (its pts)
        self.first_encoded_ms: int | None = None  # the encoder's first frame (its timeline)

    def source_keyframe(self, media_ms: int) -> None:
        if self.keyframe_ms is None:
            self.keyframe_ms = media_ms

    def audio_sent(self, media_ms: float, now: float) -> None:
        """An Opus packet handed to the viewers (once per stream)."""
        self.audio.add(media_ms / 1000, now)

    def video_sent(self, encoded_ms: int, now: float) -> None:
        """A frame of the encoded rung handed to its viewers, at its own timestamp."""
        if self.keyframe_ms is None:
            return
        if self.first_encoded_ms is None:
            self.first_encoded_ms = encoded_ms
        self.video.add((self.keyframe_ms + encoded_ms - self.first_encoded_ms) / 1000, now)
        if not self.audio.samples or now - self.audio.samples[-1][0] > SYNC_WINDOW:
            return  # no Opus now (nobody listens): the last lag stands
        video, audio = self.video.value, self.audio.value
        if video is not None and audio is not None:
            self.lag = min(max(video - audio, -MAX_SYNC_DELAY), MAX_SYNC_DELAY)

    def delay(self, kind: str) -> float:
        """How long a viewer's packet of that kind waits before it is sent: audio waits for
        video that trails it, video for audio that trails it."""
        return max(0.0, self.lag if kind == "audio" else -self.lag)


class PacketTrack(MediaStreamTrack):
    """One viewer's audio or video: encoded packets from the stream's feed, bounded; with a
    ``sync``, each held back (:meth:`AvSync.delay`) until the other track's catches up."""

    def __init__(self, kind: str, limit: int) -> None:
        super().__init__()
        self.kind = kind
        self.queue: asyncio.Queue[tuple[av.Packet | None, float]] = asyncio.Queue()
        self.limit = limit
        self.waiting_keyframe = kind == "video"
        self.sync: AvSync | None = None  # set while the viewer's video is the encoded rung
        self.sent = 0

    def skip_to_keyframe(self) -> None:
        """Forget what is queued; go on from the next keyframe (the track changes feeds)."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.waiting_keyframe = self.kind == "video"

    def push(self, packet: av.Packet | None, keyframe: bool = True) -> None:
        if packet is None:
            self.queue.put_nowait((None, 0.0))
            return
        if self.waiting_keyframe:
            if not keyframe:
                return
            self.waiting_keyframe = False
        if self.queue.qsize() >= self.limit:  # far behind: start over at a keyframe
            while not self.queue.empty():
                self.queue.get_nowait()
            self.waiting_keyframe = self.kind == "video"
            if self.waiting_keyframe and not keyframe:
                return
        self.queue.put_nowait((packet, time.monotonic()))

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        packet, pushed = await self.queue.get()
        if packet is None:
            self.stop()
            raise MediaStreamError
        if self.sync is not None:  # aiortc sends it now: its sender reports say so
            hold = pushed + self.sync.delay(self.kind) - time.monotonic()
            if hold > 0:
                await asyncio.sleep(hold)
        self.sent += 1
        return packet


class RtcFeed:
    """One live stream for its WebRTC viewers: sequence headers, a continuous timeline across
    publisher reconnects, the Opus transcoder while anyone listens, and the viewers' tracks.
    A source feed also measures, in its ``sync``, when its Opus packets are sent."""

    def __init__(self, sync: AvSync | None = None) -> None:
        self.length_size = 4
        self.parameter_sets = b""
        self.audio_config: bytes | None = None
        self.has_bframes = False
        self.has_keyframe = False  # a viewer's video can start (an encoder's first frame came)
        self.offset = 0  # ms added to the publisher's timestamps (continuity across publishes)
        self.last_ms = 0
        self.rebase = False
        self.opus: OpusTranscoder | None = None
        self.tracks: set[PacketTrack] = set()
        self.sync = sync

    def restart(self) -> None:
        """A new publish continues this stream: its timestamps start over."""
        self.rebase, self.opus, self.has_bframes = True, None, False
        if self.sync is not None:
            self.sync.restart()

    def on_tag(self, tag: VideoTag | AudioTag) -> None:
        if self.rebase and not tag.is_sequence_header:  # (a header's timestamp may be 0)
            self.offset = self.last_ms + 40 - tag.timestamp
            self.rebase = False
        if isinstance(tag, VideoTag):
            self._video(tag)
        else:
            self._audio(tag)

    def _video(self, tag: VideoTag) -> None:
        if tag.is_sequence_header:
            self.length_size, self.parameter_sets = avc_config(tag.data)
            return
        if tag.avc_packet_type != 1:
            return
        if tag.composition_time:
            self.has_bframes = True
        self.has_keyframe = self.has_keyframe or tag.is_keyframe
        ms = tag.timestamp + tag.composition_time + self.offset
        self.last_ms = max(self.last_ms, ms)
        if tag.is_keyframe and self.sync is not None:
            self.sync.source_keyframe(ms)
        if not self.tracks:
            return
        data = annex_b(tag.data[5:], self.length_size)
        if tag.is_keyframe:
            data = self.parameter_sets + data
        packet = av.Packet(data)
        packet.pts, packet.time_base = ms, MS
        for track in list(self.tracks):
            if track.kind == "video":
                track.push(packet, tag.is_keyframe)

    def _audio(self, tag: AudioTag) -> None:
        if tag.is_sequence_header:
            self.audio_config, self.opus = tag.data[2:], None
            return
        ms = tag.timestamp + self.offset
        self.last_ms = max(self.last_ms, ms)
        if self.audio_config is None or not any(t.kind == "audio" for t in self.tracks):
            self.opus = None  # nobody listens: no transcoding
            return
        if self.opus is None:
            self.opus = OpusTranscoder(self.audio_config, ms)
        try:
            packets = self.opus.feed(tag.data[2:])
        except av.FFmpegError as exc:
            log.warning("webrtc: AAC frame not decodable (%s); restarting the transcoder", exc)
            self.opus = None
            return
        now = time.monotonic()
        for packet in packets:
            if self.sync is not None:
                self.sync.audio_sent(packet.pts * 1000 / OPUS_RATE, now)
            for track in list(self.tracks):
                if track.kind == "audio":
                    track.push(packet)

    def subscribe(self, *tracks: PacketTrack) -> None:
        self.tracks.update(tracks)

    def unsubscribe(self, *tracks: PacketTrack) -> None:
        self.tracks.difference_update(tracks)

    def end(self) -> None:
        for track in list(self.tracks):
            track.push(None)
        self.tracks.clear()


# ----- sessions -------------------------------------------------------------------------------------


def video_tag(stream: str, timestamp: int, body: bytes) -> VideoTag | None:
    """An FLV VIDEODATA body (H.264) as the ingest's tag; None if it is not AVC."""
    if len(body) < 5 or body[0] & 0x0F != 7:
        return None
    return VideoTag.from_h264(stream, timestamp, body)


@dataclass(eq=False)
class WhepSession:
    id: str
    stream: str
    pc: RTCPeerConnection
    tracks: tuple[PacketTrack, ...]
    created: float = field(default_factory=time.monotonic)
    heard: float = 0.0  # monotonic time of the viewer's last RTCP receiver report (0: none yet)

    @property
    def location(self) -> str:
        return f"/{self.stream}/whep/{self.id}"


@dataclass(frozen=True)
class WhepAnswer:
    session: WhepSession
    sdp: str


class WhepService:
    """The WHEP sessions of one stream server, and the streams' WebRTC feeds: ``feeds`` (the
    source: audio always, video when it has no B-frames) and ``encoded`` (the video of the
    transcoder's :func:`~verge.stream.transcode.rtc_track`, for sources with B-frames)."""

    def __init__(self, settings: WebRtcSettings) -> None:
        self.settings = settings
        addresses = [str(ipaddress.ip_address(a)) for a in settings.candidates]
        self.gathered = [a for a in addresses if is_local_address(a)] or None
        self.advertised = [a for a in addresses if not is_local_address(a)]
        self.feeds: dict[str, RtcFeed] = {}
        self.encoded: dict[str, RtcFeed] = {}
        self.rungs: dict[str, str | None] = {}  # stream -> its encoded rung (None: nothing encoded)
        self.sessions: dict[str, WhepSession] = {}
        self.reaped = 0
        self._reaper: asyncio.Task | None = None

    # ----- ingest side (called by the stream server) ----------------------------------------------
    def on_media(self, stream: str, tag: VideoTag | AudioTag) -> None:
        feed = self.feeds.get(stream)
        if feed is None:
            feed = self.feeds[stream] = RtcFeed(AvSync())
        had_bframes = feed.has_bframes
        feed.on_tag(tag)
        if feed.has_bframes and not had_bframes:
            self._bframes_found(stream, feed)

    def on_rendition_plan(self, stream: str, rendition: str | None) -> None:
        """The transcoder's plan names the rung a source with B-frames is watched in (None: the
        stream has no encoded rung, e.g. a ladder of only ``source``, or no transcoder)."""
        self.rungs[stream] = rendition

    def on_rendition_tag(self, stream: str, tag_type: int, timestamp: int, body: bytes) -> None:
        """An FLV tag of that rung, as the encoder makes it (the transcoder's ``on_flv``)."""
        tag = video_tag(stream, timestamp, body) if tag_type == flv.VIDEO else None
        if tag is None:
            return
        feed = self.encoded.get(stream)
        if feed is None:
            feed = self.encoded[stream] = RtcFeed()
        if tag.is_sequence_header:  # a new encoder process: its timestamps, made continuous
            feed.restart()
        feed.on_tag(tag)
        source = self.feeds.get(stream)
        if source is not None and source.sync is not None and tag.avc_packet_type == 1:
            source.sync.video_sent(timestamp + tag.composition_time, time.monotonic())

    def on_publish(self, stream: str) -> None:
        """A publisher (back) on ``stream``: a continuing stream's timestamps start over, and
        a new transcoder plans its rungs again."""
        self.rungs.pop(stream, None)
        for feed in self._feeds_of(stream):
            feed.restart()

    async def on_end(self, stream: str) -> None:
        """The stream ended: its viewers' sessions end with it."""
        feeds = [self.feeds.pop(stream, None), self.encoded.pop(stream, None)]
        self.rungs.pop(stream, None)
        for feed in feeds:
            if feed is not None:
                feed.end()
        for session in [s for s in self.sessions.values() if s.stream == stream]:
            await self._close(session, "stream ended")

    # ----- signalling ---------------------------------------------------------------------------
    def viewers(self, stream: str | None = None) -> int:
        return sum(1 for s in self.sessions.values() if stream is None or s.stream == stream)

    async def create(
        self, stream: str, live: bool, content_type: str | None, offer: bytes
    ) -> WhepAnswer:
        """A session for an SDP offer: checks, limits, then the answer (candidates inside)."""
        if (content_type or "").split(";")[0].strip().lower() != SDP_TYPE:
            raise WhepError(
                415, f"send the SDP offer as Content-Type: {SDP_TYPE}", (("Accept-Post", SDP_TYPE),)
            )
        feed = self.feeds.get(stream)
        if not live or feed is None:
            raise WhepError(404, f"stream {stream} is not live")
        self._check_video(stream, feed)
        self._check_limits(stream)
        text = _offer_text(offer)
        session_id = secrets.token_urlsafe(16)
        pc = RTCPeerConnection()
        video, audio = PacketTrack("video", VIDEO_QUEUE), PacketTrack("audio", AUDIO_QUEUE)
        session = WhepSession(session_id, stream, pc, (video, audio))
        self.sessions[session_id] = session  # holds the slot while negotiating
        try:
            async with asyncio.timeout(NEGOTIATION_TIMEOUT):
                answer = await self._negotiate(pc, text, video, audio)
        except BaseException as exc:
            await self._close(session, None)
            if isinstance(exc, ValueError):
                raise WhepError(400, f"bad SDP offer: {exc}") from None
            if isinstance(exc, TimeoutError):
                raise WhepError(503, "negotiation timed out", (("Retry-After", "1"),)) from None
            raise
        pc.on("connectionstatechange", lambda: self._state_changed(session))
        self._start_reaper()
        log.info(
            "webrtc %s: session %s started (%d viewers)", stream, session_id, self.viewers(stream)
        )
        return WhepAnswer(
            session, advertise(answer, self.advertised) if self.advertised else answer
        )

    def _check_video(self, stream: str, source: RtcFeed) -> None:
        """A source with B-frames is watched in its encoded rung: there must be one (409), and
        it must have begun (503 while the encoder starts)."""
        if not source.has_bframes:
            return
        if stream in self.rungs and self.rungs[stream] is None:
            raise WhepError(
                409,
                f"stream {stream} has B-frames, which WebRTC players cannot show, and its "
                "ladder encodes no rendition to show instead (only the source, or no rung "
                "below the source's height); add an encoded rung (e.g. 720p) to the app's "
                "ladder, or publish with -bf 0 (x264: -tune zerolatency; OBS: bframes=0)",
            )
        encoded = self.encoded.get(stream)
        if encoded is None or not encoded.has_keyframe:
            raise WhepError(
                503,
                f"stream {stream} has B-frames; its WebRTC rendition (encoded without them) "
                "is starting",
                (("Retry-After", RETRY_STARTING),),
            )

    def _video_feed(self, stream: str) -> RtcFeed | None:
        """Where a viewer's video comes from: the source passed through, or the encoded rung
        if the source has B-frames (None: there is none)."""
        source = self.feeds.get(stream)
        if source is None or not source.has_bframes:
            return source
        return self.encoded.get(stream)

    def _bframes_found(self, stream: str, source: RtcFeed) -> None:
        """B-frames after viewers started (a new publish, or a source whose first frames had
        none): their video moves to the encoded rung, or their sessions end if there is none."""
        videos = [track for track in source.tracks if track.kind == "video"]
        if not videos:
            return
        source.unsubscribe(*videos)
        if self.rungs.get(stream, "") is not None:  # planned, or not yet: it will come
            encoded = self.encoded.setdefault(stream, RtcFeed())
            for track in videos:
                track.skip_to_keyframe()
            encoded.subscribe(*videos)
            for session in [s for s in self.sessions.values() if s.tracks[0] in videos]:
                self._keep_in_sync(session, source)
            log.info(
                "webrtc %s: B-frames; %d viewers moved to the encoded rendition",
                stream,
                len(videos),
            )
            return
        loop = asyncio.get_running_loop()
        for session in [s for s in self.sessions.values() if s.tracks[0] in videos]:
            loop.create_task(self._close(session, "B-frames and no encoded rendition"))

    def _feeds_of(self, stream: str) -> list[RtcFeed]:
        return [f for f in (self.feeds.get(stream), self.encoded.get(stream)) if f is not None]

    def _check_limits(self, stream: str) -> None:
        settings = self.settings
        if len(self.sessions) >= settings.max_viewers:
            raise WhepError(
                503,
                f"server full: {settings.max_viewers} WebRTC viewers already "
                "(stream.webrtc.max_viewers)",
                (("Retry-After", RETRY_AFTER),),
            )
        if self.viewers(stream) >= settings.max_viewers_per_stream:
            raise WhepError(
                503,
                f"stream {stream} full: {settings.max_viewers_per_stream} "
                "WebRTC viewers already (stream.webrtc.max_viewers_per_stream)",
                (("Retry-After", RETRY_AFTER),),
            )

    async def _negotiate(
        self, pc: RTCPeerConnection, offer: str, video: PacketTrack, audio: PacketTrack
    ) -> str:
        """Our transceivers first (their codec preferences apply when the offer is set)."""
        kinds = {m.kind for m in aiortc_sdp.SessionDescription.parse(offer).media}
        for track, wanted in ((video, VIDEO_CODECS), (audio, AUDIO_CODECS)):
            if track.kind in kinds:
                transceiver = pc.addTransceiver(track, direction="sendonly")
                transceiver.setCodecPreferences(
                    [
                        c
                        for c in RTCRtpSender.getCapabilities(track.kind).codecs
                        if c.mimeType in wanted
                    ]
                )
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        except (
            OperationError,
            InvalidAccessError,
            InternalError,
        ) as exc:  # e.g. no codec in common
            raise ValueError(str(exc) or type(exc).__name__) from None
        with gather_on(self.gathered):
            await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    async def delete(self, stream: str, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None or session.stream != stream:
            return False
        await self._close(session, "ended by the viewer (DELETE)")
        return True

    def _state_changed(self, session: WhepSession) -> None:
        """Media flows from the moment the connection is up (nothing queues up before: the
        first frames a viewer gets are live ones, from the next keyframe)."""
        state = session.pc.connectionState
        audio = self.feeds.get(session.stream)
        video = self._video_feed(session.stream)
        if state == "connected" and audio is not None and session.id in self.sessions:
            video_track, audio_track = session.tracks
            audio.subscribe(audio_track)
            if video is not None:
                video.subscribe(video_track)
            if video is not None and video is not audio:  # the encoded rung: it trails the audio
                self._keep_in_sync(session, audio)
        if state in ("failed", "closed") and session.id in self.sessions:
            asyncio.get_running_loop().create_task(self._close(session, f"connection {state}"))

    @staticmethod
    def _keep_in_sync(session: WhepSession, source: RtcFeed) -> None:
        """The viewer's video is the encoded rung: its tracks wait for each other."""
        for track in session.tracks:
            track.sync = source.sync

    async def _close(self, session: WhepSession, reason: str | None) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            if reason is not None:
                log.info("webrtc %s: session %s ended: %s", session.stream, session.id, reason)
        for feed in self._feeds_of(session.stream):
            feed.unsubscribe(*session.tracks)
        for track in session.tracks:
            track.stop()
        with contextlib.suppress(Exception):
            await session.pc.close()

    # ----- reaping ------------------------------------------------------------------------------
    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def _reap_loop(self) -> None:
        interval = min(1.0, self.settings.session_timeout / 4)
        while self.sessions:
            await asyncio.sleep(interval)
            for session in list(self.sessions.values()):
                if not await self._alive(session):
                    self.reaped += 1
                    await self._close(
                        session,
                        f"reaped: no receiver report for {self.settings.session_timeout:g} s",
                    )

    async def _alive(self, session: WhepSession) -> bool:
        """Heard from within session_timeout (an RTCP receiver report on any sender)."""
        for sender in session.pc.getSenders():
            with contextlib.suppress(Exception):
                report = await sender.getStats()
                for stats in report.values():
                    if stats.type == "remote-inbound-rtp":
                        heard = time.monotonic() - max(
                            0.0, time.time() - stats.timestamp.timestamp()
                        )
                        session.heard = max(session.heard, heard)
        last = session.heard or session.created
        return time.monotonic() - last < self.settings.session_timeout

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for session in list(self.sessions.values()):
            await self._close(session, "server shutting down")
        for feed in [*self.feeds.values(), *self.encoded.values()]:
            feed.end()

    # ----- metrics --------------------------------------------------------------------------------
    def render_metrics(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry)


class _Collector:
    def __init__(self, service: WhepService) -> None:
        self.service = service

    def collect(self):
        viewers = GaugeMetricFamily(
            "verge_stream_webrtc_viewers", "WebRTC (WHEP) viewers", labels=["stream"]
        )
        streams = sorted({s.stream for s in self.service.sessions.values()})
        for stream in streams:
            viewers.add_metric([stream], self.service.viewers(stream))
        yield viewers
        yield GaugeMetricFamily(
            "verge_stream_webrtc_sessions",
            "WebRTC sessions, all streams",
            value=len(self.service.sessions),
        )
        yield CounterMetricFamily(
            "verge_stream_webrtc_reaped", "WebRTC sessions reaped", value=self.service.reaped
        )
        lag = GaugeMetricFamily(
            "verge_stream_webrtc_av_lag_seconds",
            "How far the encoded rung's video trails the Opus audio (its viewers' audio waits "
            "that long; negative: their video waits)",
            labels=["stream"],
        )
        for stream in sorted(self.service.encoded):
            source = self.service.feeds.get(stream)
            if source is not None and source.sync is not None:
                lag.add_metric([stream], source.sync.lag)
        yield lag


def _offer_text(offer: bytes) -> str:
    """The offer as text, checked for what a WHEP answer needs (ValueError -> 400)."""
    if len(offer) > MAX_OFFER_BYTES:
        raise WhepError(413, f"SDP offer larger than {MAX_OFFER_BYTES} bytes")
    try:
        text = offer.decode("utf-8")
    except UnicodeDecodeError:
        raise WhepError(400, "bad SDP offer: not UTF-8 text") from None
    if not text.lstrip().startswith("v=0"):
        raise WhepError(400, "bad SDP offer: it must start with v=0")
    try:
        parsed = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:
        raise WhepError(400, f"bad SDP offer: {str(exc) or type(exc).__name__}") from None
    kinds = {m.kind: m for m in parsed.media if m.kind in ("audio", "video")}
    if not kinds:
        raise WhepError(400, "bad SDP offer: no audio or video media section")
    video = kinds.get("video")
    if video is not None and not any(c.name.upper() == "H264" for c in video.rtp.codecs):
        raise WhepError(
            400,
            "bad SDP offer: the video section offers no H.264 (this server sends H.264 only)",
        )
    audio = kinds.get("audio")
    if audio is not None and not any(c.name.lower() == "opus" for c in audio.rtp.codecs):
        raise WhepError(400, "bad SDP offer: the audio section offers no Opus")
    for media in kinds.values():
        if media.direction not in (None, "recvonly", "sendrecv"):
            raise WhepError(
                400,
                f"bad SDP offer: the {media.kind} section is {media.direction}; "
                "a WHEP viewer receives (recvonly)",
            )
    return text


# ----- HTTP ------------------------------------------------------------------------------------------

CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Expose-Headers", "Location, Accept-Post, Retry-After"),
)
PREFLIGHT = (
    ("Access-Control-Allow-Methods", "POST, DELETE, PATCH, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type, Authorization, If-Match"),
    ("Access-Control-Max-Age", "86400"),
    ("Accept-Post", SDP_TYPE),
)
NO_STORE = ("Cache-Control", "no-store")


async def handle_whep(
    service: WhepService, request, writer, stream: str, session_id: str | None, live: bool
) -> None:
    """/APP/NAME/whep (POST an offer) and /APP/NAME/whep/SESSION (DELETE; PATCH is 405)."""
    method = request.method
    if method == "OPTIONS":
        await _reply(writer, 204, b"", PREFLIGHT)
        return
    try:
        if session_id is None and method == "POST":
            body = await _read_body(request)
            answer = await service.create(stream, live, request.header("content-type"), body)
            await _reply(
                writer,
                201,
                answer.sdp.encode(),
                (("Content-Type", SDP_TYPE), ("Location", answer.session.location)),
            )
        elif session_id is not None and method == "DELETE":
            if not await service.delete(stream, session_id):
                raise WhepError(404, "no such WHEP session")
            await _reply(writer, 200, b"session ended\n", (("Content-Type", "text/plain"),))
        elif session_id is not None:
            raise WhepError(
                405,
                "only DELETE ends a session; trickle ICE and ICE restarts "
                "(PATCH) are not supported: the answer carries every candidate",
                (("Allow", "DELETE, OPTIONS"),),
            )
        else:
            raise WhepError(405, "POST an SDP offer (WHEP)", (("Allow", "POST, OPTIONS"),))
    except WhepError as exc:
        await _reply(
            writer,
            exc.status,
            f"{exc.reason}\n".encode(),
            (("Content-Type", "text/plain; charset=utf-8"), *exc.headers),
        )


async def _read_body(request) -> bytes:
    if request.body is None:
        return b""
    chunks, size = [], 0
    async for chunk in request.body:
        size += len(chunk)
        if size > MAX_OFFER_BYTES:
            raise WhepError(413, f"SDP offer larger than {MAX_OFFER_BYTES} bytes")
        chunks.append(bytes(chunk))
    return b"".join(chunks)


async def _reply(writer, status: int, body: bytes, headers) -> None:
    writer.start(status, [*headers, NO_STORE, *CORS_HEADERS], content_length=len(body))
    if body:
        await writer.write(body)
