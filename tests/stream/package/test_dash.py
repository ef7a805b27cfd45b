import xml.etree.ElementTree as ET

from tests.stream.package import media
from tests.stream.package.test_hls import NOW, fake_segment, ffprobe, packaged_stream, write_stream
from verge.stream.package import dash

pytestmark = media.needs_ffmpeg
NS = {"d": dash.NS}


def parse(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(text.split("\n", 1)[1])


def test_dynamic_mpd_while_live():
    stream = packaged_stream()
    root = parse(stream.mpd(now=NOW + 10))
    assert root.get("type") == "dynamic"
    assert root.get("availabilityStartTime") == "2023-11-14T22:13:19.800Z"
    assert root.get("publishTime") == "2023-11-14T22:13:30.000Z"
    assert root.get("minimumUpdatePeriod") == "PT1S" and root.get("timeShiftBufferDepth") == "PT30S"
    assert root.get("suggestedPresentationDelay") == "PT3S"
    assert root.find("d:UTCTiming", NS) is not None
    [period] = root.findall("d:Period", NS)
    sets = {a.get("contentType"): a for a in period.findall("d:AdaptationSet", NS)}
    video = sets["video"].find("d:Representation", NS)
    assert (video.get("width"), video.get("height"), video.get("frameRate")) == ("320", "240", "25")
    assert video.get("codecs").startswith("avc1.") and int(video.get("bandwidth")) > 0
    template = video.find("d:SegmentTemplate", NS)
    assert (
        template.get("media") == "v/seg$Number$.m4s"
        and template.get("initialization") == "v/init0.mp4"
    )
    assert template.get("startNumber") == "0"
    [s] = template.find("d:SegmentTimeline", NS)
    assert s.attrib == {
        "t": "0",
        "d": template.get("timescale"),
        "r": "4",
    }  # 5 complete 1 s segments
    audio = sets["audio"].find("d:Representation", NS)
    assert audio.get("codecs") == "mp4a.40.2" and audio.get("audioSamplingRate") == "48000"


def test_static_mpd_plays_in_ffprobe(tmp_path):
    stream = packaged_stream(seconds=3)
    stream.end()
    root = parse(stream.mpd())
    assert root.get("type") == "static" and root.get("mediaPresentationDuration").startswith("PT3")
    write_stream(stream, tmp_path)
    streams = ffprobe(tmp_path / "index.mpd")
    assert {(s["codec_type"], s["codec_name"]) for s in streams} == {
        ("video", "h264"),
        ("audio", "aac"),
    }
    video = next(s for s in streams if s["codec_type"] == "video")
    assert (video["width"], video["height"]) == (320, 240)


def test_discontinuity_is_a_new_period():
    segs = [fake_segment(0), fake_segment(1), fake_segment(2, disc=1, pdt=NOW + 5)]
    rep = dash.Representation("v", "video", "avc1.64001F", 1000, segs, prefix="v/")
    periods = [dash.PeriodAnchor(0, NOW, 0.0), dash.PeriodAnchor(1, NOW + 7, 2.0)]
    root = parse(
        dash.mpd(
            [rep],
            periods,
            dynamic=True,
            now=NOW + 9,
            availability_start=NOW,
            window=30,
            segment_target=1,
        )
    )
    first, second = root.findall("d:Period", NS)
    assert (first.get("start"), second.get("start")) == ("PT0S", "PT7S")
    template = second.find(".//d:SegmentTemplate", NS)
    assert template.get("initialization") == "v/init1.mp4" and template.get("startNumber") == "2"
    assert template.get("presentationTimeOffset") == str(2 * 90000)


def test_timeline_runs_and_formats():
    segs = [fake_segment(i) for i in range(4)]
    segs[2].duration_ts = 45000
    segs[3].start = 2 * 90000 + 45000
    assert dash.timeline_runs(segs) == [(0, 90000, 1), (None, 45000, 0), (None, 90000, 0)]
    segs[3].start += 1000  # a gap: explicit t
    assert dash.timeline_runs(segs)[-1] == (226000, 90000, 0)
    assert dash._frame_rate(25.0) == "25" and dash._frame_rate(30000 / 1001) == "30000/1001"
    assert dash._duration(1.5) == "PT1.5S" and dash._duration(0) == "PT0S"
