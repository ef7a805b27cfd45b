import pytest

from tests.stream.package import media
from verge.stream.package.cmaf import InitSegment, Naming, Part, SegmentEnd, Segmenter
from verge.stream.package.mp4 import BoxReader, parse_moof

pytestmark = media.needs_ffmpeg


def segment(data: bytes, part_target=0.2, segment_target=1.0, seed=1):
    seg = Segmenter(part_target, segment_target)
    events = [e for piece in media.chunks(data, seed) for e in seg.feed(piece)]
    return seg, events + seg.flush()


def parts_of(events):
    return [e for e in events if isinstance(e, Part)]


def ends_of(events):
    return [e for e in events if isinstance(e, SegmentEnd)]


def check_sequences(events):
    parts, ends = parts_of(events), ends_of(events)
    assert [p.seq for p in parts] == list(range(len(parts)))
    expected_msn, expected_index = 0, 0
    for event in events:
        if isinstance(event, Part):
            assert (event.msn, event.index) == (expected_msn, expected_index)
            expected_index += 1
        elif isinstance(event, SegmentEnd):
            assert event.msn == expected_msn and event.part_count == expected_index
            expected_msn, expected_index = expected_msn + 1, 0
    assert [e.msn for e in ends] == list(range(len(ends)))
    for end in ends:
        own = [p for p in parts if p.msn == end.msn]
        assert end.duration_ts == sum(p.duration_ts for p in own)
        assert end.start == own[0].start


def test_video_parts_and_segments():
    video, _ = media.separate()
    seg, events = segment(video)
    assert isinstance(events[0], InitSegment) and events[0].discontinuity == 0
    check_sequences(events)
    parts = parts_of(events)
    assert all(p.duration <= 0.2 + 1e-9 for p in parts) and seg.overlong_parts == 0
    # GOP 1 s: five 0.2 s parts a segment, independent exactly at the segment start
    assert [p.independent for p in parts] == [p.index == 0 for p in parts]
    assert [round(e.duration, 6) for e in ends_of(events)] == [1.0] * 6
    for p in parts:  # the part's own bytes say the same
        moof = parse_moof(BoxReader().feed(p.data)[0].data, seg.init.info)
        assert moof.trafs[0].first_sync == p.independent
    # init + parts reproduce the stream (less ffmpeg's trailing mfra)
    stream = events[0].data + b"".join(p.data for p in parts)
    assert video.startswith(stream) and BoxReader().feed(video[len(stream) :])[0].type == "mfra"


def test_audio_parts_fit_the_part_target():
    _, audio = media.separate()
    seg, events = segment(audio, seed=2)
    check_sequences(events)
    parts = parts_of(events)
    assert all(p.independent for p in parts)
    assert max(p.duration for p in parts) <= 0.2 and seg.overlong_parts == 0
    durations = [e.duration for e in ends_of(events)[:-1]]
    assert all(0.7 < d < 1.3 for d in durations)
    assert abs(sum(durations) / len(durations) - 1.0) < 0.1  # the grid keeps the average


@pytest.mark.parametrize("separate_moof", [False, True])
def test_muxed_stream_parts_carry_both_tracks(separate_moof):
    seg, events = segment(media.muxed(separate_moof=separate_moof), segment_target=1.0)
    check_sequences(events)
    parts = parts_of(events)
    assert seg.primary.is_video and len(seg.init.info.tracks) == 2
    for part in parts[:-1]:
        tracks = set()
        for box in BoxReader().feed(part.data):
            if box.type == "moof":
                tracks |= {t.track_id for t in parse_moof(box.data).trafs}
        assert tracks == {1, 2}
    assert [p.independent for p in parts] == [p.index == 0 for p in parts]


def test_small_fragments_merge_into_parts():
    video, _ = media.separate(seconds=2, frag_us=40000)  # ffmpeg flushes every frame
    seg, events = segment(video)
    check_sequences(events)
    parts = parts_of(events)
    assert [round(p.duration, 6) for p in parts] == [0.2] * 10
    assert all(p.sample_count == 5 for p in parts)


def test_fragments_larger_than_the_part_target_are_counted():
    video, _ = media.separate()
    seg, _ = segment(video, part_target=0.1)
    assert seg.overlong_parts > 0 and seg.max_part_duration == pytest.approx(0.2)


def test_new_init_is_a_discontinuity():
    video, _ = media.separate(seconds=2)
    seg = Segmenter(0.2, 1.0)
    first = seg.feed(video)
    second = seg.feed(video)
    assert isinstance(second[0], SegmentEnd)  # the open segment closes first
    init = second[1]
    assert isinstance(init, InitSegment) and init.discontinuity == 1
    parts = parts_of(second)
    assert parts[0].discontinuity_start and parts[0].discontinuity == 1
    assert not any(p.discontinuity_start for p in parts[1:])
    assert parts[0].msn == parts_of(first)[-1].msn + 1 and parts[0].index == 0
    assert parts[0].seq == parts_of(first)[-1].seq + 1


def test_restart_drops_partial_bytes():
    video, _ = media.separate(seconds=2)
    seg = Segmenter(0.2, 1.0)
    events = seg.feed(video[: len(video) // 2])
    events += seg.restart()
    assert isinstance(events[-1], SegmentEnd)
    again = seg.feed(video)
    assert isinstance(again[0], InitSegment) and again[0].discontinuity == 1
    assert parts_of(again)[0].discontinuity_start


def test_fragments_before_init_are_skipped():
    video, _ = media.separate(seconds=2)
    boxes = BoxReader().feed(video)
    seg = Segmenter(0.2, 1.0)
    assert seg.feed(b"".join(b.data for b in boxes[2:6])) == []


def test_bad_targets():
    with pytest.raises(ValueError):
        Segmenter(0.5, 0.2)


def test_naming_round_trip():
    naming = Naming(part="p{msn}-{part}.m4s")
    assert naming.part_uri(3, 2, 99) == "p3-2.m4s"
    assert naming.parse("p3-2.m4s") == ("part", {"msn": 3, "part": 2})
    assert Naming().parse("init0.mp4") == ("init", {"disc": 0})
    assert Naming().parse("seg12.m4s") == ("segment", {"msn": 12})
    assert Naming().parse("part7.m4s") == ("part", {"seq": 7})
    assert Naming().parse("seg12.m4s.bak") is None and Naming().parse("../seg1.m4s") is None
    assert Naming().segment_template() == "seg$Number$.m4s"
