"""Unit tests of the pure helpers of bench/stream_bench.py: playlist parsing, the media-time
rule that maps a listed part or segment to the frame it starts with, request counting, CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stream_bench as sb  # noqa: E402

LL_PLAYLIST = """#EXTM3U
#EXT-X-VERSION:9
#EXT-X-TARGETDURATION:2
#EXT-X-PART-INF:PART-TARGET=0.5
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.5,HOLD-BACK=6
#EXT-X-MEDIA-SEQUENCE:0
#EXT-X-INDEPENDENT-SEGMENTS
#EXT-X-MAP:URI="init0.mp4"
#EXT-X-PROGRAM-DATE-TIME:2024-01-01T00:00:00.000Z
#EXTINF:2,
seg0.m4s
#EXT-X-PROGRAM-DATE-TIME:2024-01-01T00:00:02.000Z
#EXT-X-PART:DURATION=0.4,URI="part5.m4s",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.4,URI="part6.m4s"
#EXT-X-PART:DURATION=0.2,URI="part7.m4s"
#EXTINF:1,
seg1.m4s
#EXT-X-PART:DURATION=0.4,URI="part8.m4s",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.4,URI="part9.m4s"
#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part10.m4s"
#EXT-X-RENDITION-REPORT:URI="../audio/index.m3u8",LAST-MSN=2,LAST-PART=1
"""

CLASSIC_PLAYLIST = """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-MEDIA-SEQUENCE:3
#EXT-X-TARGETDURATION:2
#EXTINF:2.000,
s-3.ts
#EXTINF:2.033,
s-4.ts
"""


def test_parse_ll_hls_playlist() -> None:
    playlist = sb.parse_playlist(LL_PLAYLIST)
    assert playlist.part_target == 0.5
    assert (playlist.part_hold_back, playlist.hold_back) == (1.5, 6.0)
    assert [s.msn for s in playlist.segments] == [0, 1, 2]
    assert [s.duration for s in playlist.segments] == [2.0, 1.0, None]
    assert playlist.segments[1].parts[0] == sb.PlaylistPart(0, 0.4, "part5.m4s", True)
    assert playlist.segments[2].uri is None
    assert playlist.preload_hint == "part10.m4s"
    assert playlist.last_part() == (2, 1)
    assert not playlist.ended


def test_parse_classic_playlist() -> None:
    playlist = sb.parse_playlist(CLASSIC_PLAYLIST + "#EXT-X-ENDLIST\n")
    assert [(s.msn, s.duration, s.uri) for s in playlist.segments] == [
        (3, 2.0, "s-3.ts"),
        (4, 2.033, "s-4.ts"),
    ]
    assert playlist.part_target is None and playlist.ended
    assert playlist.last_part() is None


def test_next_blocking_target() -> None:
    assert sb.next_blocking_target(sb.parse_playlist(LL_PLAYLIST)) == (2, 2)
    # The newest part closes a complete segment: the next one opens the next segment.
    complete = LL_PLAYLIST.split('#EXT-X-PART:DURATION=0.4,URI="part8.m4s"')[0]
    assert sb.next_blocking_target(sb.parse_playlist(complete)) == (2, 0)


def test_part_media_starts_sum_listed_durations() -> None:
    tracker = sb.ListingTracker("part")
    listings = tracker.update(sb.parse_playlist(LL_PLAYLIST), now=10.0)
    starts = {x.uri: x.media_start for x in listings}
    assert starts == pytest.approx(
        {"part5.m4s": 2.0, "part6.m4s": 2.4, "part7.m4s": 2.8, "part8.m4s": 3.0, "part9.m4s": 3.4}
    )
    assert tracker.update(sb.parse_playlist(LL_PLAYLIST), now=11.0) == []  # nothing new


def test_segment_starts_unknown_without_media_sequence_zero() -> None:
    tracker = sb.ListingTracker("segment")
    listings = tracker.update(sb.parse_playlist(CLASSIC_PLAYLIST), now=1.0)
    assert [x.media_start for x in listings] == [None, None]


def test_shared_timeline_chains_segments_across_playlists() -> None:
    timeline = sb.MediaTimeline()
    first = "#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.0,\na-0.ts\n"
    later = "#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:1\n#EXTINF:2.5,\na-1.ts\n#EXTINF:2.0,\na-2.ts\n"
    sb.ListingTracker("segment", timeline).update(sb.parse_playlist(first), now=2.0)
    other = sb.ListingTracker("segment", timeline)
    listings = other.update(sb.parse_playlist(later), now=7.0)
    assert [(x.msn, x.media_start) for x in listings] == [(1, 2.0), (2, 4.5)]


def _sends(frames: int, start: float = 100.0) -> sb.SendLog:
    sends = sb.SendLog()
    for i in range(frames):
        ms = round(i * 1000 / 30)
        sends.add(ms, start + ms / 1000)
    return sends


def test_send_time_picks_the_nearest_frame() -> None:
    sends = _sends(90)
    assert sends.send_time(1.0) == pytest.approx(101.0)
    assert sends.send_time(1.0004) == pytest.approx(101.0)  # rounding in listed durations
    assert sends.send_time(0.9996) == pytest.approx(101.0)
    assert sends.send_time(10.0) is None  # beyond what was sent


def test_latencies_apply_warmup_and_end_rules() -> None:
    sends = _sends(30 * 10)  # 10 s sent, last frame at 9.967 s
    rows = [
        sb.Listing(0, 0, "early", 1.0, 0.4, 101.5),  # before the warm-up: left out
        sb.Listing(3, 0, "ok", 6.0, 0.4, 106.45),
        sb.Listing(4, 0, "late", 9.0, 0.4, 112.0),  # ends < 1 s before the last frame: out
        sb.Listing(3, 1, "unknown", None, 0.4, 107.0),
    ]
    assert sb.latencies(rows, sends) == pytest.approx([0.45])


def test_percentile_median_and_estimate() -> None:
    assert sb.percentile([], 0.5) is None
    assert sb.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert sb.percentile([float(i) for i in range(101)], 0.95) == 95.0
    assert sb.median([None, 1.0, 3.0]) == 2.0
    assert sb.glass_to_glass(0.45, 1.5) == pytest.approx(1.95)
    assert sb.glass_to_glass(None, 1.5) is None


def test_request_counter_splits_pipelined_and_fragmented_requests() -> None:
    counter = sb.RequestCounter()
    first = b"GET /a.m3u8?_HLS_msn=3&_HLS_part=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /live/s/sou"
    assert counter.feed(first) == ["/a.m3u8?_HLS_msn=3&_HLS_part=1"]
    assert counter.feed(b"rce/part7.m4s HTTP/1.1\r\nHost: x\r\n") == []
    assert counter.feed(b"\r\n") == ["/live/s/source/part7.m4s"]


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("/live/s/source/index.m3u8?_HLS_msn=3&_HLS_part=0", "blocking-playlist"),
        ("/live/s/source/index.m3u8", "playlist"),
        ("/live/s.m3u8", "playlist"),
        ("/live/s/source/part12.m4s", "part"),
        ("/live/s/source/seg2.m4s", "segment"),
        ("/live/s/source/init0.mp4", "init"),
        ("/live/s.flv", "other"),
    ],
)
def test_target_kind(target: str, kind: str) -> None:
    assert sb.target_kind(target) == kind


def test_stat_cpu_and_descendants() -> None:
    stat = "42 (my (odd) name) S 7 42 42 0 -1 4194304 100 0 0 0 150 50 3 2 20 0 1 0 5 1 1"
    assert sb.stat_cpu(stat) == (7, 150 + 50 + 3 + 2)
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1}
    assert sb.descendants(10, parents) == {10, 11, 12}


def test_own_process_tree_has_cpu_time() -> None:
    import os

    assert sb.tree_cpu_seconds(os.getpid()) > 0
