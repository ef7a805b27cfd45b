"""HLS playlists as text: LL-HLS and classic media playlists, and the multivariant playlist.

Pure rendering over :class:`~verge.stream.package.cmaf.MediaSegment` lists (draft-pantos-hls-
rfc8216bis). Low-Latency additions: ``EXT-X-PART-INF``, ``EXT-X-SERVER-CONTROL`` (blocking
reload, ``PART-HOLD-BACK`` two part targets, ``HOLD-BACK`` three target durations),
``EXT-X-PART`` for the segments within three target durations of the live edge and for the
segment in progress, ``EXT-X-PRELOAD-HINT`` for the next part, ``EXT-X-RENDITION-REPORT`` for
the sibling renditions. The classic playlist lists the same completed segments and nothing
else, for players that predate LL-HLS. URIs come from a :class:`Naming`, relative to the
playlist.

AES-128 (:class:`Encryption`, RFC 8216bis 4.4.4.4 and 5.2): every segment gets its own
``EXT-X-KEY`` with an explicit IV, the segment's Media Sequence Number as a 128-bit
big-endian integer (what the default rule would give a segment, stated so that its parts use
it too). The segment resource and each of its part resources are encrypted independently
(AES-128-CBC, PKCS7) with that key and IV, which is how LL-HLS players decrypt parts (hls.js
decrypts each part on its own with its segment's IV). Encrypted resources have their own names
(``aes-seg7.m4s``, ``aes-part42.m4s``) so that DASH keeps the clear ones; init segments stay in
the clear (an ``EXT-X-KEY:METHOD=NONE`` precedes every ``EXT-X-MAP`` after the first key).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from verge.stream.package.cmaf import MediaSegment, Naming

LL_VERSION = 9  # CAN-BLOCK-RELOAD and parts with rendition reports (the draft's LL-HLS baseline)
CLASSIC_VERSION = 6  # EXT-X-MAP in a playlist without I-frames-only
# PART-HOLD-BACK in part targets: the RFC 8216bis minimum. Measured in headless Chromium with
# hls.js (bench/latency_bench.py, 720p30, 0.25 s parts, the default ladder, publisher, player
# and server on 2 cores): nine 30 s sessions at two parts had glass-to-glass p50s of
# 0.75-1.32 s (median 0.99 s), with stalls in one run of three (the one whose load reached 8);
# six at three parts 1.00-1.33 s (median 1.12 s) without stalls. Two parts: the lower latency;
# hls.js moves its target back 0.2 s after a stall (player.js).
PART_HOLD_BACK = 2
PART_WINDOW_TARGETS = 3  # parts are listed for segments this many target durations from the end


@dataclass(frozen=True, slots=True)
class RenditionReport:
    uri: str
    last_msn: int
    last_part: int | None


@dataclass(frozen=True, slots=True)
class PreloadHint:
    msn: int
    index: int
    seq: int


@dataclass(frozen=True, slots=True)
class Variant:
    """One entry of the multivariant playlist."""

    uri: str
    bandwidth: int
    codecs: str
    average_bandwidth: int = 0
    resolution: tuple[int, int] | None = None
    frame_rate: float | None = None
    audio_group: str | None = None


@dataclass(frozen=True, slots=True)
class AudioMedia:
    """An ``EXT-X-MEDIA:TYPE=AUDIO`` rendition (separate audio in the CMAF way)."""

    uri: str
    group: str
    name: str
    default: bool = True
    channels: int = 0
    language: str | None = None


@dataclass(frozen=True, slots=True)
class Encryption:
    """AES-128 for the media playlists: where the key is, how encrypted resources are named."""

    key_uri: str = "../key"  # relative to a media playlist: /APP/NAME/key
    prefix: str = "aes-"  # an encrypted segment or part is the clear one's name with this before

    def key_line(self, msn: int) -> str:
        return f'#EXT-X-KEY:METHOD=AES-128,URI="{self.key_uri}",IV=0x{msn:032x}'

    def clear_name(self, name: str) -> str | None:
        """The clear resource an encrypted name stands for; None for any other name."""
        return name[len(self.prefix) :] if name.startswith(self.prefix) else None


def segment_iv(msn: int) -> bytes:
    return msn.to_bytes(16, "big")


def aes128_encrypt(key: bytes, msn: int, data: bytes) -> bytes:
    """One segment or part resource, AES-128-CBC with PKCS7 padding, IV = its segment's msn."""
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(segment_iv(msn))).encryptor()
    return encryptor.update(padder.update(data) + padder.finalize()) + encryptor.finalize()


def aes128_decrypt(key: bytes, msn: int, data: bytes) -> bytes:
    """The inverse of :func:`aes128_encrypt` (what a player does; for tests and tools)."""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(segment_iv(msn))).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(decryptor.update(data) + decryptor.finalize()) + unpadder.finalize()


def target_duration(segments: Sequence[MediaSegment], segment_target: float) -> int:
    """EXT-X-TARGETDURATION: every EXTINF rounded to the nearest integer must fit under it."""
    longest = max((s.duration for s in segments if s.complete), default=0.0)
    return max(1, math.ceil(segment_target - 1e-9), math.floor(longest + 0.5))


def media_playlist(
    segments: Sequence[MediaSegment],
    *,
    naming: Naming,
    target: int,
    part_target: float | None = None,
    ended: bool = False,
    preload: PreloadHint | None = None,
    reports: Sequence[RenditionReport] = (),
    hold_back: float | None = None,
    part_hold_back: float | None = None,
    encryption: Encryption | None = None,
) -> str:
    """A media playlist; LL-HLS when ``part_target`` is given, classic otherwise.

    ``segments`` is the window, oldest first; the last one may be in progress (listed as parts
    only, and only in LL-HLS). With ``encryption``, segments and parts are AES-128 ones.
    """
    low_latency = part_target is not None
    listed = [s for s in segments if s.complete or (low_latency and s.parts)]
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{LL_VERSION if low_latency else CLASSIC_VERSION}"]
    lines.append(f"#EXT-X-TARGETDURATION:{target}")
    if low_latency:
        assert part_target is not None
        part_hb = part_hold_back if part_hold_back is not None else PART_HOLD_BACK * part_target
        hb = hold_back if hold_back is not None else 3 * target
        lines.append(f"#EXT-X-PART-INF:PART-TARGET={_num(part_target)}")
        lines.append(
            f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={_num(part_hb)},HOLD-BACK={_num(hb)}"
        )
    first = listed[0] if listed else None
    lines.append(f"#EXT-X-MEDIA-SEQUENCE:{first.msn if first else 0}")
    if first and first.discontinuity:
        lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{first.discontinuity}")
    lines.append("#EXT-X-INDEPENDENT-SEGMENTS")
    with_parts = _segments_with_parts(listed, target) if low_latency else set()
    previous: MediaSegment | None = None
    for seg in listed:
        lines += _segment_lines(seg, previous, naming, seg.msn in with_parts, encryption)
        previous = seg
    if low_latency and preload is not None and not ended:
        uri = naming.part_uri(preload.msn, preload.index, preload.seq)
        if encryption is not None:
            if previous is None or previous.msn != preload.msn:  # the hint opens a segment
                lines.append(encryption.key_line(preload.msn))
            uri = encryption.prefix + uri
        lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{uri}"')
    if low_latency:
        lines += [_report_line(r) for r in reports]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def _segments_with_parts(listed: Sequence[MediaSegment], target: int) -> set[int]:
    """MSNs whose parts are listed: those ending within three target durations of the edge."""
    out: set[int] = set()
    from_end = 0.0
    for seg in reversed(listed):
        if from_end >= PART_WINDOW_TARGETS * target:
            break
        out.add(seg.msn)
        from_end += sum(p.duration for p in seg.parts)
    return out


def _segment_lines(
    seg: MediaSegment,
    previous: MediaSegment | None,
    naming: Naming,
    parts: bool,
    encryption: Encryption | None = None,
) -> list[str]:
    lines: list[str] = []
    new_period = previous is None or previous.discontinuity != seg.discontinuity
    prefix = encryption.prefix if encryption is not None else ""
    if previous is not None and new_period:
        lines.append("#EXT-X-DISCONTINUITY")
    if new_period:
        if encryption is not None and previous is not None:
            lines.append("#EXT-X-KEY:METHOD=NONE")  # the init segment is not encrypted
        lines.append(f'#EXT-X-MAP:URI="{naming.init_uri(seg.discontinuity)}"')
        lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{format_pdt(seg.pdt)}")
    if encryption is not None:
        lines.append(encryption.key_line(seg.msn))
    if parts:
        for p in seg.parts:
            independent = ",INDEPENDENT=YES" if p.independent else ""
            uri = prefix + naming.part_uri(seg.msn, p.index, p.seq)
            lines.append(f'#EXT-X-PART:DURATION={_num(p.duration)},URI="{uri}"{independent}')
    if seg.complete:
        lines.append(f"#EXTINF:{_num(seg.duration)},")
        lines.append(prefix + naming.segment_uri(seg.msn))
    return lines


def _report_line(report: RenditionReport) -> str:
    line = f'#EXT-X-RENDITION-REPORT:URI="{report.uri}",LAST-MSN={report.last_msn}'
    if report.last_part is not None:
        line += f",LAST-PART={report.last_part}"
    return line


def multivariant_playlist(variants: Sequence[Variant], audio: Sequence[AudioMedia] = ()) -> str:
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{CLASSIC_VERSION}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for media in audio:
        attrs = [
            "TYPE=AUDIO",
            f'GROUP-ID="{media.group}"',
            f'NAME="{media.name}"',
            f"DEFAULT={'YES' if media.default else 'NO'}",
            "AUTOSELECT=YES",
        ]
        if media.language:
            attrs.append(f'LANGUAGE="{media.language}"')
        if media.channels:
            attrs.append(f'CHANNELS="{media.channels}"')
        attrs.append(f'URI="{media.uri}"')
        lines.append("#EXT-X-MEDIA:" + ",".join(attrs))
    for v in variants:
        attrs = [f"BANDWIDTH={max(1, v.bandwidth)}"]
        if v.average_bandwidth:
            attrs.append(f"AVERAGE-BANDWIDTH={v.average_bandwidth}")
        attrs.append(f'CODECS="{v.codecs}"')
        if v.resolution:
            attrs.append(f"RESOLUTION={v.resolution[0]}x{v.resolution[1]}")
        if v.frame_rate:
            attrs.append(f"FRAME-RATE={v.frame_rate:.3f}")
        if v.audio_group:
            attrs.append(f'AUDIO="{v.audio_group}"')
        lines += ["#EXT-X-STREAM-INF:" + ",".join(attrs), v.uri]
    return "\n".join(lines) + "\n"


def format_pdt(seconds: float) -> str:
    """ISO 8601 with milliseconds and Z, as EXT-X-PROGRAM-DATE-TIME wants it."""
    when = datetime.fromtimestamp(seconds, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _num(value: float) -> str:
    """Decimal with up to five places and no trailing zeros (EXTINF, DURATION, PART-TARGET)."""
    text = f"{value:.5f}".rstrip("0").rstrip(".")
    return text or "0"
