import pytest

from tests.stream.package import media
from tests.stream.package.test_hls import NOW, check_ll_playlist
from verge.stream.package.cmaf import Naming, Part, SegmentEnd, Segmenter
from verge.stream.package.live import (
    BlockingRequestError,
    LiveRendition,
    LiveStream,
    parse_blocking_query,
)

pytestmark = media.needs_ffmpeg


def events_of(data: bytes) -> list:
    seg = Segmenter(0.2, 1.0)
    return seg.feed(data) + seg.flush()


def test_parse_blocking_query():
    assert parse_blocking_query(None, None) == (None, None)
    assert parse_blocking_query("12", None) == (12, None)
    assert parse_blocking_query("12", "3") == (12, 3)
    for msn, part in [
        (None, "1"),
        ("-1", None),
        ("1.5", None),
        ("", None),
        ("3", "x"),
        ("１", None),
    ]:
        with pytest.raises(BlockingRequestError):
            parse_blocking_query(msn, part)


def test_blocking_readiness_follows_the_parts():
    video, _ = media.separate(seconds=3)
    rendition = LiveRendition("v", clock=lambda: NOW)
    assert rendition.last_msn_part() is None and not rendition.blocking_ready(0, 0)
    seen = []
    for event in events_of(video)[:-1]:  # leave the last segment open
        rendition.add(event)
        if isinstance(event, Part):
            assert rendition.has_part(event.msn, event.index)
            assert rendition.last_msn_part() == (event.msn, event.index)
            assert rendition.blocking_ready(event.msn, event.index)
            assert not rendition.blocking_ready(event.msn, event.index + 1)
            assert rendition.part_bytes(event.msn, event.index) == event.data
            assert rendition.resolve(f"part{event.seq}.m4s") == event.data
            seen.append(event)
        if isinstance(event, SegmentEnd):
            assert rendition.blocking_ready(event.msn, None)
            assert not rendition.blocking_ready(event.msn + 1, None)
            assert rendition.segment_bytes(event.msn) == b"".join(
                p.data for p in seen if p.msn == event.msn
            )
            # a part index past the segment's last part is satisfied by the next segment's first
            assert not rendition.blocking_ready(event.msn, 7)
    assert rendition.blocking_ready(2, 4) and not rendition.blocking_ready(2, 5)
    assert rendition.blocking_ready(1, None) and not rendition.blocking_ready(2, None)
    assert rendition.segment_bytes(2) is None  # open
    rendition.end()
    assert rendition.blocking_ready(99, 0) and rendition.segment_bytes(2) is not None


def test_blocking_requests_too_far_ahead_are_bad():
    video, _ = media.separate(seconds=3)
    rendition = LiveRendition("v", clock=lambda: NOW)
    for event in events_of(video)[:-1]:
        rendition.add(event)
    assert rendition.last_msn_part() == (2, 4)
    rendition.check_blocking(4, None)
    rendition.check_blocking(2, 19)  # advance part limit: 3 / 0.2 = 15 parts ahead
    rendition.check_blocking(3, 0)
    with pytest.raises(BlockingRequestError, match="two past"):
        rendition.check_blocking(5, None)
    with pytest.raises(BlockingRequestError, match="advance part limit"):
        rendition.check_blocking(2, 20)
    rendition.check_blocking(0, 99)  # old segments are answered with the current playlist


def test_preload_hint_and_pending_names():
    video, _ = media.separate(seconds=3)
    rendition = LiveRendition("v", clock=lambda: NOW)
    rendition.feed(video[:100_000])
    hint = rendition.next_part()
    assert rendition.pending(f"part{hint.seq}.m4s") and not rendition.pending(
        f"part{hint.seq + 1}.m4s"
    )
    assert rendition.resolve(f"part{hint.seq}.m4s") is None
    assert rendition.pending(f"seg{hint.msn}.m4s") and not rendition.pending("seg9.m4s")
    assert not rendition.pending("part0.m4s") and not rendition.pending("nonsense")
    assert (
        rendition.resolve("init0.mp4") == rendition.init_bytes()
        and rendition.resolve("init1.mp4") is None
    )
    rendition.feed(video[100_000:])
    assert rendition.resolve(f"part{hint.seq}.m4s") is not None
    # msn-based part names
    named = LiveRendition("v", naming=Naming(part="p{msn}.{part}.m4s"), clock=lambda: NOW)
    named.feed(video[:100_000])
    msn, index = named.last_msn_part()
    assert named.resolve(f"p{msn}.{index}.m4s") == named.part_bytes(msn, index)
    assert named.pending(f"p{msn}.{index + 1}.m4s") and named.pending(f"p{msn + 1}.0.m4s")


def test_dvr_window_slides_and_keeps_recent_bytes():
    video, _ = media.separate()
    rendition = LiveRendition("v", window=2.0, clock=lambda: NOW)
    rendition.feed(video)
    rendition.feed(video)  # the same stream again: after a discontinuity, msn 6..11
    rendition.end()
    info = check_ll_playlist(rendition.playlist())
    assert [s["msn"] for s in info["segments"]] == [9, 10, 11]  # three target durations at least
    assert "#EXT-X-MEDIA-SEQUENCE:9\n#EXT-X-DISCONTINUITY-SEQUENCE:1" in rendition.playlist(
        ll=False
    )
    assert rendition.segment_bytes(6) is not None  # left the playlist, still fetchable
    assert rendition.segment_bytes(5) is None and rendition.part_bytes_by_seq(0) is None  # gone
    assert rendition.init_bytes(0) is None and rendition.init_bytes(1) is not None


def test_stream_restart_makes_a_discontinuity():
    video, audio = media.separate(seconds=2)
    stream = LiveStream(clock=lambda: NOW)
    v = stream.add_rendition("v")
    v.feed(video[:150_000])
    stream.restart(now=NOW + 1)
    v.feed(video, now=NOW + 5)
    text = stream.media_playlist("v")
    check_ll_playlist(text)
    assert "#EXT-X-DISCONTINUITY\n" in text and '#EXT-X-MAP:URI="init1.mp4"' in text
    assert v.resolve("init1.mp4") == v.init_bytes(1) and v.init_bytes(0) is not None
    assert sorted(stream.timeline.anchors) == [0, 1]
    stream.end()
    assert stream.ended and "#EXT-X-ENDLIST" in stream.media_playlist("v")


def test_stream_readiness_and_duplicate_names():
    video, audio = media.separate(seconds=2)
    stream = LiveStream(clock=lambda: NOW)
    v, a = stream.add_rendition("v"), stream.add_rendition("a")
    with pytest.raises(ValueError):
        stream.add_rendition("v")
    assert not stream.ready
    v.feed(video)
    assert not stream.ready
    a.feed(audio)
    assert stream.ready and not stream.ended
    assert "#EXT-X-RENDITION-REPORT" not in stream.media_playlist("v", ll=False)
