import json
import math
import re
import subprocess
from pathlib import Path

from tests.stream.package import media
from verge.stream.package import hls
from verge.stream.package.cmaf import InitSegment, MediaPart, MediaSegment, Naming
from verge.stream.package.live import LiveStream
from verge.stream.package.mp4 import InitInfo

pytestmark = media.needs_ffmpeg
NOW = 1_700_000_000.0


def attributes(line: str) -> dict[str, str]:
    text = line.split(":", 1)[1]
    return {k: v.strip('"') for k, v in re.findall(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)', text)}


def check_ll_playlist(text: str) -> dict:
    """The LL-HLS rules (draft-pantos-hls-rfc8216bis) a media playlist must obey."""
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U" and text.endswith("\n")
    tags = {line.split(":", 1)[0]: line for line in lines if line.startswith("#EXT")}
    target = int(tags["#EXT-X-TARGETDURATION"].split(":")[1])
    part_target = float(attributes(tags["#EXT-X-PART-INF"])["PART-TARGET"])
    control = attributes(tags["#EXT-X-SERVER-CONTROL"])
    assert control["CAN-BLOCK-RELOAD"] == "YES"
    assert float(control["PART-HOLD-BACK"]) >= 2 * part_target - 1e-9  # the RFC 8216bis minimum
    assert float(control.get("HOLD-BACK", 3 * target)) >= 3 * target - 1e-9
    assert int(tags["#EXT-X-VERSION"].split(":")[1]) >= 6
    msn = int(tags["#EXT-X-MEDIA-SEQUENCE"].split(":")[1])
    segments, pending, last_part_uri = [], [], None
    for line in lines:
        if line.startswith("#EXT-X-PART:"):
            attrs = attributes(line)
            assert float(attrs["DURATION"]) <= part_target
            pending.append(attrs)
            last_part_uri = attrs["URI"]
        elif line.startswith("#EXTINF:"):
            duration = float(line.split(":")[1].rstrip(","))
            assert round(duration) <= target
            if pending:
                assert math.isclose(
                    sum(float(p["DURATION"]) for p in pending), duration, abs_tol=1e-3
                )
                assert pending[0].get("INDEPENDENT") == "YES"
            segments.append({"msn": msn, "duration": duration, "parts": pending})
            msn, pending = msn + 1, []
    if pending:
        assert pending[0].get("INDEPENDENT") == "YES"
    # parts only for segments within three target durations of the end
    from_end = sum(float(p["DURATION"]) for p in pending)
    for seg in reversed(segments):
        if from_end >= 3 * target:
            assert not seg["parts"], f"parts listed for msn {seg['msn']}, too far from the end"
        from_end += seg["duration"]
    ended = "#EXT-X-ENDLIST" in tags
    hint = tags.get("#EXT-X-PRELOAD-HINT")
    assert (hint is None) == ended
    if hint and last_part_uri:
        assert attributes(hint)["TYPE"] == "PART"
        number = lambda uri: int(re.findall(r"\d+", uri.split(".")[0])[-1])  # noqa: E731
        assert number(attributes(hint)["URI"]) == number(last_part_uri) + 1
    return {"segments": segments, "open_parts": pending, "target": target, "ended": ended}


def packaged_stream(seconds=6, window=30.0) -> LiveStream:
    video, audio = media.separate(seconds=seconds)
    stream = LiveStream(part_target=0.2, segment_target=1.0, window=window, clock=lambda: NOW)
    for name, data in (("v", video), ("a", audio)):
        rendition = stream.add_rendition(name)
        for piece in media.chunks(data, seed=len(name)):
            rendition.feed(piece)
    return stream


def test_ll_playlists_obey_the_rules():
    stream = packaged_stream()
    for name in ("v", "a"):
        text = stream.media_playlist(name)
        info = check_ll_playlist(text)
        assert info["open_parts"] and not info["ended"]
        assert (
            '#EXT-X-MAP:URI="init0.mp4"' in text
            and "#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13" in text
        )
        other = "a" if name == "v" else "v"
        report = [line for line in text.splitlines() if line.startswith("#EXT-X-RENDITION-REPORT")]
        assert len(report) == 1 and attributes(report[0])["URI"] == f"../{other}/index.m3u8"
        last = stream.renditions[other].last_msn_part()
        assert (
            int(attributes(report[0])["LAST-MSN"]),
            int(attributes(report[0])["LAST-PART"]),
        ) == last
    stream.end()
    info = check_ll_playlist(stream.media_playlist("v"))
    assert info["ended"] and not info["open_parts"] and len(info["segments"]) == 6


def test_classic_playlist_has_no_low_latency_tags():
    stream = packaged_stream()
    text = stream.media_playlist("v", ll=False)
    for tag in ("EXT-X-PART", "PRELOAD-HINT", "SERVER-CONTROL", "RENDITION-REPORT"):
        assert tag not in text
    assert "#EXT-X-VERSION:6" in text and text.count("#EXTINF:1,") == 5  # the 6th is open


def write_stream(stream: LiveStream, root: Path) -> None:
    (root / "index.m3u8").write_text(stream.multivariant())
    (root / "index.mpd").write_text(stream.mpd())
    for name, rendition in stream.renditions.items():
        folder = root / name
        folder.mkdir()
        (folder / "index.m3u8").write_text(stream.media_playlist(name, ll=False))
        (folder / "ll.m3u8").write_text(stream.media_playlist(name, ll=True))
        (folder / "init0.mp4").write_bytes(rendition.init_bytes())
        for seg in rendition.segments:
            (folder / f"seg{seg.msn}.m4s").write_bytes(rendition.segment_bytes(seg.msn))
            for part in seg.parts:
                (folder / f"part{part.seq}.m4s").write_bytes(part.data)


def ffprobe(path: Path) -> list[dict]:
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-allowed_extensions",
            "ALL",
            "-show_streams",
            "-of",
            "json",
            str(path),
        ]
        if path.suffix == ".m3u8"
        else ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)["streams"]


def test_ffprobe_plays_the_hls_output(tmp_path):
    stream = packaged_stream(seconds=3)
    stream.end()
    write_stream(stream, tmp_path)
    streams = ffprobe(tmp_path / "index.m3u8")
    kinds = {(s["codec_type"], s["codec_name"]) for s in streams}
    assert kinds == {("video", "h264"), ("audio", "aac")}
    video = next(s for s in streams if s["codec_type"] == "video")
    assert (video["width"], video["height"]) == (320, 240)
    ll = ffprobe(tmp_path / "v" / "ll.m3u8")
    assert [(s["codec_name"], s["width"]) for s in ll] == [("h264", 320)]


def test_multivariant_playlist():
    stream = packaged_stream(seconds=3)
    text = stream.multivariant()
    lines = text.splitlines()
    media_line = next(line for line in lines if line.startswith("#EXT-X-MEDIA:"))
    assert attributes(media_line) == {
        "TYPE": "AUDIO", "GROUP-ID": "audio", "NAME": "a", "DEFAULT": "YES", "AUTOSELECT": "YES",
        "CHANNELS": "2", "URI": "a/index.m3u8",
    }  # fmt: skip
    inf = lines.index(next(line for line in lines if line.startswith("#EXT-X-STREAM-INF")))
    attrs = attributes(lines[inf])
    assert lines[inf + 1] == "v/index.m3u8"
    assert re.fullmatch(r"avc1\.[0-9A-F]{6},mp4a\.40\.2", attrs["CODECS"])
    assert (
        attrs["RESOLUTION"] == "320x240"
        and attrs["FRAME-RATE"] == "25.000"
        and attrs["AUDIO"] == "audio"
    )
    v, a = stream.renditions["v"], stream.renditions["a"]
    assert (
        int(attrs["BANDWIDTH"]) == v.bandwidth + a.bandwidth >= int(attrs["AVERAGE-BANDWIDTH"]) > 0
    )


def test_audio_only_multivariant():
    _, audio = media.separate(seconds=3)
    stream = LiveStream(clock=lambda: NOW)
    stream.add_rendition("music").feed(audio)
    lines = stream.multivariant().splitlines()
    assert "#EXT-X-MEDIA" not in "\n".join(lines)
    inf = next(line for line in lines if line.startswith("#EXT-X-STREAM-INF"))
    assert attributes(inf)["CODECS"] == "mp4a.40.2" and "RESOLUTION" not in inf


def fake_segment(msn, disc=0, parts=5, complete=True, pdt=NOW):
    init = InitSegment(b"", InitInfo(()), disc)
    seg = MediaSegment(msn, disc, init, msn * 90000, 90000, pdt + msn)
    seg.parts = [MediaPart(msn * 5 + i, i, 0.2, i == 0, b"x") for i in range(parts)]
    seg.duration_ts = 90000 if complete else 0
    seg.complete = complete
    return seg


def test_discontinuity_and_part_window_rendering():
    segments = [fake_segment(i) for i in range(3)] + [fake_segment(i, disc=1) for i in range(3, 8)]
    segments.append(fake_segment(8, disc=1, parts=2, complete=False))
    text = hls.media_playlist(
        segments, naming=Naming(), target=1, part_target=0.2, preload=hls.PreloadHint(8, 2, 42)
    )
    info = check_ll_playlist(text)
    assert text.count("#EXT-X-DISCONTINUITY\n") == 1
    assert '#EXT-X-MAP:URI="init1.mp4"' in text and text.count("#EXT-X-PROGRAM-DATE-TIME") == 2
    # segments that end within 3 target durations of the edge (0.4 s open + 1 + 1 < 3) keep parts
    assert [s["msn"] for s in info["segments"] if s["parts"]] == [5, 6, 7]
    assert text.rstrip().endswith('#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part42.m4s"')
    tail = hls.media_playlist(segments[4:], naming=Naming(), target=1)
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:1" in tail and "#EXT-X-MEDIA-SEQUENCE:4" in tail


def test_target_duration_and_number_formats():
    segs = [fake_segment(0)]
    segs[0].duration_ts = int(90000 * 2.6)
    assert hls.target_duration(segs, 2.0) == 3
    assert hls.target_duration([], 1.5) == 2
    assert hls.format_pdt(NOW + 0.25) == "2023-11-14T22:13:20.250Z"
    assert hls._num(0.2) == "0.2" and hls._num(1.0) == "1" and hls._num(0.213333333) == "0.21333"
