"""The stream section (`verge stream`): RTMP apps, ABR ladders, packaging, VOD and WebRTC."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from verge.config.base import FilePath, Label, Model, Name, Secret, Slug, ip_literal
from verge.config.bounds import (
    MAX_RENDITIONS,
    MAX_STREAM_APPS,
    MAX_STREAM_KEYS,
    MAX_TIMEOUT,
    MAX_WEBRTC_CANDIDATES,
    MAX_WEBRTC_VIEWERS,
    GiB,
)
from verge.config.units import ByteSize, Duration, duration_input


class Rendition(Model):
    """One rung of an ABR ladder; `height: null` is the source, passed through (no re-encode)."""

    name: Slug
    height: int | None = Field(None, ge=64, le=4320)
    video_bitrate: int = Field(0, ge=0, le=100_000_000)
    """Bits per second of the encoded video (0 for the source)."""
    audio_bitrate: int = Field(128_000, ge=8_000, le=512_000)


def _default_ladder() -> list[Rendition]:
    return [
        Rendition(name="source"),
        Rendition(name="720p", height=720, video_bitrate=2_800_000, audio_bitrate=128_000),
        Rendition(name="480p", height=480, video_bitrate=1_400_000, audio_bitrate=96_000),
        Rendition(name="360p", height=360, video_bitrate=800_000, audio_bitrate=96_000),
    ]


class StreamApp(Model):
    """An RTMP application (rtmp://HOST/APP/NAME?key=KEY) and how its streams are packaged."""

    name: Name = "live"
    keys: dict[Label, Secret] = Field(default_factory=dict, max_length=MAX_STREAM_KEYS)
    """Stream name -> publish key; "*" matches any name. Empty: publishing needs no key."""
    ladder: list[Rendition] = Field(
        default_factory=_default_ladder, min_length=1, max_length=MAX_RENDITIONS
    )
    record: bool = True
    """Keep the stream as VOD when it ends."""
    encrypt: bool = False
    """AES-128 HLS: segments and parts encrypted with a per-stream key served at /APP/NAME/key
    (protect it with a signed rule at the edge). DASH and HTTP-FLV stay in the clear."""
    analysis: bool = False
    """Analyse the live stream at the edge of packaging (scene cuts, thumbnails, black/silent
    stretches, faces/people) in a niced subprocess; results at /APP/NAME/analysis."""


def _ip_address(value: str) -> str:
    ip = ip_literal(value.strip())
    if ip is None:
        raise ValueError(f"invalid IP address {value!r}")
    return ip


class WebRtcSettings(Model):
    """WebRTC playback (WHEP at /APP/NAME/whep): candidates, viewer limits, reaping."""

    candidates: list[Annotated[str, Field(max_length=64), AfterValidator(_ip_address)]] = Field(
        default_factory=list, max_length=MAX_WEBRTC_CANDIDATES
    )
    """Host candidate addresses. Local ones are gathered on (instead of every interface but
    127.0.0.1); others (a 1:1 NAT's public address) are advertised with a gathered port."""
    max_viewers_per_stream: int = Field(50, ge=1, le=MAX_WEBRTC_VIEWERS)
    max_viewers: int = Field(500, ge=1, le=MAX_WEBRTC_VIEWERS)
    """WebRTC viewers of the whole server; beyond either limit a WHEP offer gets 503."""
    session_timeout: Annotated[
        float, Field(ge=0.5, le=MAX_TIMEOUT), BeforeValidator(duration_input)
    ] = 15.0
    """A session whose viewer sent no RTCP receiver report this long (never connected, or
    vanished) is ended."""


class StreamSettings(Model):
    """`verge stream`: live ingest, packaging (LL-HLS, HLS, DASH, HTTP-FLV) and VOD."""

    apps: list[StreamApp] = Field(
        default_factory=lambda: [StreamApp()], min_length=1, max_length=MAX_STREAM_APPS
    )
    part_target: Duration = 0.25
    """LL-HLS part duration target (seconds)."""
    segment_target: Duration = 1.0
    """Segment duration target: segments start at the first keyframe past it."""
    part_hold_back: Duration | None = None
    """How far behind the live edge an LL-HLS player starts (PART-HOLD-BACK, seconds); at
    least two part targets (the RFC 8216bis minimum). Unset: two part targets (hls.py
    PART_HOLD_BACK: the measured trade-off); three are safer on an overloaded player."""
    dvr_window: Duration = 120.0
    """How much of a live stream stays in the playlists."""
    grace: Duration = 10.0
    """A publisher gone this long ends the stream (EXT-X-ENDLIST); back sooner: a discontinuity."""
    data_dir: FilePath = "./stream-data"
    """Where recordings and VOD live."""
    max_upload_bytes: ByteSize = 4 * GiB
    """Largest file accepted by the VOD upload API (POST /vod/NAME)."""
    upload_token: Secret | None = Field(default=None, repr=False)
    """Bearer token for the VOD upload API; unset: uploads are disabled."""
    webrtc: WebRtcSettings = Field(default_factory=WebRtcSettings)
    """WebRTC playback (WHEP): candidate addresses, viewer limits, session reaping."""

    @model_validator(mode="after")
    def _hold_back_covers_two_parts(self) -> StreamSettings:
        if self.part_hold_back is not None and self.part_hold_back < 2 * self.part_target:
            raise ValueError(
                f"part_hold_back ({self.part_hold_back} s) must be at least two part targets "
                f"({2 * self.part_target} s): a player closer to the live edge stalls"
            )
        return self
