"""What keeps LL-HLS near one second glass-to-glass, guarded without timing anything.

The measured figure comes from ``bench/latency_bench.py`` (headless Chromium, frames stamped
with the wall clock). These tests guard its causes: the transcoder cuts one fragment per part,
within the part target (so a part is complete the moment ffmpeg writes it, not when a second
fragment arrives); the playlist advertises a part hold-back of two part targets and blocking
reload; a blocked playlist request is answered by the part's arrival (the request waits on the
channel's condition, and feeding the part's bytes alone releases it); PROGRAM-DATE-TIME is
anchored at the ingest, so the player's wall-clock readout includes the transcoder's delay.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from tests.stream.package import media
from verge.config import StreamApp, StreamSettings
from verge.stream.package.cmaf import InitSegment, Part, Segmenter
from verge.stream.package.live import LiveStream
from verge.stream.rtmp.session import Publish
from verge.stream.server import StreamServer
from verge.stream.transcode import fmp4_flags, fragment_for

pytestmark = pytest.mark.timeout(60)

PART_TARGET = 0.2
FRAMES = {  # seconds per frame (video) or per AAC frame of 1024 samples (audio)
    "25 fps": 1 / 25,
    "30 fps": 1 / 30,
    "50 fps": 1 / 50,
    "60 fps": 1 / 60,
    "AAC 44.1 kHz": 1024 / 44100,
    "AAC 48 kHz": 1024 / 48000,
}


def ffmpeg_fragment(frame: float, frag_duration: float) -> float:
    """A fragment's duration under ffmpeg's rule (movenc): a packet whose decode time is at
    least ``frag_duration`` past the fragment's first starts the next fragment."""
    return math.ceil(frag_duration / frame - 1e-9) * frame


@pytest.mark.parametrize("part_target", [0.2, 0.25, 1 / 3, 0.5])
@pytest.mark.parametrize("kind", list(FRAMES))
def test_a_fragment_is_one_part_within_the_target(part_target, kind):
    fragment = ffmpeg_fragment(FRAMES[kind], fragment_for(part_target))
    assert fragment <= part_target + 1e-9
    assert fragment + FRAMES[kind] > part_target * 0.75  # and not needlessly short


def test_the_muxer_cuts_at_the_fragment_duration():
    flags = fmp4_flags(fragment_for(PART_TARGET))
    assert flags[flags.index("-frag_duration") + 1] == "180000"
    assert "+frag_keyframe" in flags[flags.index("-movflags") + 1]
    assert flags[flags.index("-flush_packets") + 1] == "1"


@media.needs_ffmpeg
def test_each_fragment_becomes_a_part_when_it_is_written():
    """Fed one ffmpeg fragment at a time, the segmenter emits its part at once."""
    video, audio = media.separate(seconds=3, frag_us=round(fragment_for(PART_TARGET) * 1e6))
    for stream in (video, audio):
        parts = [e for e in _events(stream) if isinstance(e, Part)]
        segmenter = Segmenter(PART_TARGET, 1.0)
        init = next(e for e in _events(stream) if isinstance(e, InitSegment))
        segmenter.feed(init.data)
        for part in parts:
            emitted = [e for e in segmenter.feed(part.data) if isinstance(e, Part)]
            assert [p.seq for p in emitted] == [part.seq]  # this fragment's part, now
        assert segmenter.overlong_parts == 0


def test_the_playlist_holds_back_two_parts_and_blocks():
    video, _ = media.separate(seconds=3, frag_us=180000)
    stream = LiveStream(part_target=PART_TARGET, segment_target=1.0, clock=lambda: 1e9)
    stream.add_rendition("v").feed(video)
    text = stream.media_playlist("v")
    assert "#EXT-X-PART-INF:PART-TARGET=0.2\n" in text
    assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.4," in text
    assert "#EXT-X-PRELOAD-HINT:TYPE=PART," in text
    durations = [
        float(line.split("DURATION=")[1].split(",")[0])
        for line in text.splitlines()
        if line.startswith("#EXT-X-PART:")
    ]
    assert durations and max(durations) <= PART_TARGET


def test_a_configured_part_hold_back_is_advertised():
    video, _ = media.separate(seconds=3, frag_us=180000)
    stream = LiveStream(part_target=PART_TARGET, segment_target=1.0, part_hold_back=0.5,
                        clock=lambda: 1e9)
    stream.add_rendition("v").feed(video)
    assert "PART-HOLD-BACK=0.5," in stream.media_playlist("v")


@pytest.mark.parametrize("hold_back", [0.0, 0.3, 0.49, -1])
def test_a_part_hold_back_under_two_parts_is_refused(hold_back):
    with pytest.raises(ValueError, match="part_hold_back|greater than"):
        StreamSettings(part_target=0.25, part_hold_back=hold_back)


def test_the_defaults_are_the_low_latency_ones():
    settings = StreamSettings()
    assert settings.part_target <= 0.25 and settings.segment_target <= 1.0


def test_program_date_time_is_anchored_at_the_ingest():
    video, _ = media.separate(seconds=3, frag_us=180000)
    stream = LiveStream(part_target=PART_TARGET, segment_target=1.0, clock=lambda: 1000.0)
    stream.timeline.arrival = lambda media_seconds: 999.0 + media_seconds  # a second earlier
    stream.add_rendition("v").feed(video)
    assert stream.renditions["v"].segments[0].pdt == 999.0


def _events(data: bytes) -> list:
    segmenter = Segmenter(PART_TARGET, 1.0)
    return segmenter.feed(data) + segmenter.flush()


@pytest.fixture
async def server():
    settings = StreamSettings(
        apps=[StreamApp(name="live", keys={})],
        part_target=PART_TARGET,
        segment_target=1.0,
        grace=0.5,
    )
    server = StreamServer(settings, transcode=False)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    yield server
    await server.close()


@media.needs_ffmpeg
async def test_a_blocked_reload_is_answered_by_the_part_arriving(server):
    video, _ = media.separate(seconds=3, frag_us=180000)
    events = _events(video)
    init = next(e for e in events if isinstance(e, InitSegment))
    parts = [e for e in events if isinstance(e, Part)]
    server.on_publish("live/cam", Publish("live", "cam", None, {}, 1))
    channel = server.channels["live/cam"]
    channel.on_output("v", "video", init.data)
    fed = 0
    while not any(s.complete for s in channel.packager.renditions["v"].segments):
        channel.on_output("v", "video", parts[fed].data)
        fed += 1
    waiting = asyncio.Event()
    wait_for = channel.wait_for

    async def watched_wait_for(ready, timeout):
        if not ready():
            waiting.set()
        return await wait_for(ready, timeout)

    channel.wait_for = watched_wait_for
    following = parts[fed]
    url = f"http://127.0.0.1:{server.http_port}/live/cam/v/index.m3u8"
    query = {"_HLS_msn": following.msn, "_HLS_part": following.index}
    async with httpx.AsyncClient() as client:
        request = asyncio.create_task(client.get(url, params=query))
        await waiting.wait()  # the server holds the request: the part is not there
        assert not request.done()
        channel.on_output("v", "video", following.data)  # the part's bytes, nothing else
        answer = await request
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "public, max-age=6"
    name = (
        f'URI="{channel.packager.naming.part_uri(following.msn, following.index, following.seq)}"'
    )
    assert name in answer.text
