"""WebRTC playback of a publisher whose H.264 has B-frames: its viewers get the top encoded
rung (x264 ``-tune zerolatency``, teed as FLV by the encoding ffmpeg), audio from the source.

The publisher is plain ``ffmpeg -c:v libx264 -bf 3`` (what OBS and most encoders send).
Candidates as in test_whep: the server on 127.0.0.2, the clients on 127.0.0.3.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import av
import pytest

from tests.stream.test_server import KEY, wait_live
from tests.stream.test_whep import Viewer, http, until
from verge.config import StreamApp, StreamSettings, WebRtcSettings
from verge.stream import flv
from verge.stream import transcode as tc
from verge.stream.rtmp.session import VideoTag
from verge.stream.server import StreamServer
from verge.stream.webrtc import START_CODE, PacketTrack, WhepError, WhepService, video_tag

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
]

RUNG = {"name": "180p", "height": 180, "video_bitrate": 300_000}


async def publish_with_bframes(server: StreamServer, name: str, seconds: float):
    """ffmpeg's defaults for x264 (B-frames, as OBS sends), small and fast."""
    return await asyncio.create_subprocess_exec(
        "ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440", "-t", str(seconds), "-c:v", "libx264",
        "-preset", "ultrafast", "-bf", "3", "-g", "25", "-c:a", "aac", "-f", "flv",
        f"rtmp://127.0.0.1:{server.rtmp.port}/live/{name}?key={KEY}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def serve(tmp_path, ladder: list) -> StreamServer:
    settings = StreamSettings(
        apps=[StreamApp(name="live", keys={"*": KEY}, ladder=ladder, record=False)],
        grace=0.5,
        data_dir=str(tmp_path / "data"),
        webrtc={"candidates": ["127.0.0.2"]},
    )
    server = StreamServer(settings)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    return server


def slice_types(annex_b: bytes) -> list[str]:
    """'I', 'P' or 'B' for each coded slice of an Annex B access unit."""
    types = []
    for nal in annex_b.split(START_CODE)[1:]:
        if nal and nal[0] & 0x1F in (1, 5):
            bits = "".join(f"{byte:08b}" for byte in nal[1:8])
            _, rest = _ue(bits)  # first_mb_in_slice
            slice_type, _ = _ue(rest)
            types.append("PBI"[slice_type % 5] if slice_type % 5 < 3 else "S")
    return types


def _ue(bits: str) -> tuple[int, str]:
    zeros = len(bits) - len(bits.lstrip("0"))
    value = int(bits[zeros : 2 * zeros + 1], 2) - 1
    return value, bits[2 * zeros + 1 :]


async def test_a_source_with_b_frames_plays_from_the_encoded_rung(tmp_path):
    server = await serve(tmp_path, [{"name": "source"}, RUNG])
    publisher = await publish_with_bframes(server, "cam", 20)
    viewer = Viewer()
    try:
        await wait_live(server, "live/cam")
        whep = server.whep
        await until(lambda: whep.feeds["live/cam"].has_bframes, 5)
        async with http(server) as client:
            answer = await viewer.watch(client, "/live/cam/whep")
            while answer.status_code == 503:  # the encoder is starting: come back soon
                assert answer.headers["retry-after"] == "1" and "starting" in answer.text
                await viewer.close()
                await asyncio.sleep(0.2)
                viewer = Viewer()
                answer = await viewer.watch(client, "/live/cam/whep")
            assert answer.status_code == 201, answer.text
            assert whep.rungs["live/cam"] == "180p"
            (session,) = whep.sessions.values()
            sent = record_pushes(session.tracks[0])
            async with asyncio.timeout(15):
                await viewer.got["video"].wait()
                await viewer.got["audio"].wait()
                await until(lambda: len(viewer.frames["video"]) >= 25, 15)
        frames = viewer.frames["video"]
        assert {(f.width, f.height) for f in frames} == {(240, 180)}  # the rung, decoded
        pts = [f.pts for f in frames]
        assert pts == sorted(pts) and len(set(pts)) == len(pts)  # presentation = decode order
        assert viewer.frames["audio"][0].sample_rate == 48_000  # the source's AAC as Opus
        slices = [t for packet in sent for t in slice_types(bytes(packet))]
        assert slices and "B" not in slices and slices[0] == "I"
        assert not whep.encoded["live/cam"].has_bframes
        source_tracks = whep.feeds["live/cam"].tracks
        assert session.tracks[0] not in source_tracks and session.tracks[1] in source_tracks
    finally:
        await viewer.close()
        publisher.kill()
        await publisher.wait()
        await server.close()


def record_pushes(track: PacketTrack) -> list[av.Packet]:
    """The packets a server-side track is handed (what aiortc packetises)."""
    pushed: list[av.Packet] = []
    push = track.push

    def recording(packet, keyframe=True):
        push(packet, keyframe)
        if packet is not None and not track.waiting_keyframe:  # queued, not skipped
            pushed.append(packet)

    track.push = recording
    return pushed


async def test_a_ladder_without_an_encoded_rung_refuses_b_frames_with_the_reason(tmp_path):
    server = await serve(tmp_path, [{"name": "source"}])
    publisher = await publish_with_bframes(server, "cam", 10)
    try:
        await wait_live(server, "live/cam")
        whep = server.whep
        await until(lambda: whep.feeds["live/cam"].has_bframes and "live/cam" in whep.rungs, 10)
        async with http(server) as client:
            refused = await Viewer().watch(client, "/live/cam/whep")
        assert refused.status_code == 409 and "encodes no rendition" in refused.text
        assert whep.viewers() == 0 and "live/cam" not in whep.encoded  # no FLV copy made
    finally:
        publisher.kill()
        await publisher.wait()
        await server.close()


def frame(timestamp: int, composition_time: int, keyframe: bool = False) -> VideoTag:
    body = bytes([0x17 if keyframe else 0x27, 1]) + composition_time.to_bytes(3, "big")
    return VideoTag("cam", timestamp, body + b"\0\0\0\1\x41", 7, keyframe, False, composition_time)


SEQUENCE_HEADER = bytes([0x17, 0, 0, 0, 0, 1, 0x42, 0, 0x1F, 0xFF, 0xE1, 0, 2, 0x67, 0x42])
SEQUENCE_HEADER += bytes([1, 0, 2, 0x68, 0xCE])


async def test_the_encoded_rung_admits_viewers_once_it_has_a_keyframe():
    service = WhepService(WebRtcSettings())
    service.on_media("live/cam", frame(40, 80))
    service.on_rendition_plan("live/cam", "180p")
    offer = await Viewer().offer()
    with pytest.raises(WhepError) as starting:
        await service.create("live/cam", True, "application/sdp", offer)
    assert starting.value.status == 503 and "starting" in starting.value.reason
    service.on_rendition_tag("live/cam", flv.VIDEO, 0, SEQUENCE_HEADER)
    service.on_rendition_tag("live/cam", flv.VIDEO, 2000, frame(0, 0, True).data)
    service._check_video("live/cam", service.feeds["live/cam"])  # admitted now
    encoded = service.encoded["live/cam"]
    assert encoded.has_keyframe and encoded.parameter_sets.startswith(START_CODE + b"\x67")


async def test_viewers_move_to_the_encoded_rung_when_b_frames_appear():
    service = WhepService(WebRtcSettings())
    service.on_media("live/cam", frame(0, 0, True))  # no B-frames (yet): passed through
    service.on_rendition_tag("live/cam", flv.VIDEO, 0, SEQUENCE_HEADER)
    video = PacketTrack("video", 10)
    service.feeds["live/cam"].subscribe(video)
    service.on_media("live/cam", frame(40, 80))
    assert video in service.encoded["live/cam"].tracks
    assert video not in service.feeds["live/cam"].tracks and video.waiting_keyframe


def test_flv_video_tags_parse_like_the_ingest():
    tag = video_tag("cam", 120, bytes([0x27, 1, 0xFF, 0xFF, 0xD8, 0, 0, 0, 1, 0x41]))
    assert tag is not None and tag.composition_time == -40 and not tag.is_keyframe
    header = video_tag("cam", 0, SEQUENCE_HEADER)
    assert header is not None and header.is_sequence_header
    assert video_tag("cam", 0, bytes([0x22, 1, 0, 0, 0])) is None  # not AVC


def test_the_top_encoded_rung_is_teed_as_flv():
    source = tc.SourceInfo(True, True, 1280, 720, 30.0, video_codec=7, audio_codec=10)
    tracks = tc.plan_outputs(tc.ladder_from_config(["source", "480p", "360p"]), source)
    assert tc.rtc_track(tracks).name == "480p"
    encoded = [t for t in tracks if tc.group_of(t) == tc.ENCODE]
    command = tc.ffmpeg_command("ffmpeg", encoded, [7, 8], 0.225, 2.5, flv_fd=9)
    assert command.count("tee") == 1 and command.count("-output_ts_offset") == 2
    target = command[command.index("tee") + 1]
    assert target.startswith("[movflags=+empty_moov") and target.endswith("]pipe:9")
    assert "frag_discont:frag_duration=225000:flush_packets=1:f=mp4]pipe:7|[f=flv" in target
    assert command[-1] == "pipe:8"  # the 360p rung: fMP4 only, as before
    assert tc.rtc_track([t for t in tracks if t.copy]) is None


def test_tee_escaping_holds_for_awkward_names(tmp_path):
    """Both outputs play, though the names have tee's separators in them."""
    fmp4, flv_path = tmp_path / "a|b[1].mp4", tmp_path / "c:d'e.flv"
    command = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10"]
    command += [
        "-map",
        "0:v",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-flags:v",
        "+global_header",
    ]
    command += ["-f", "tee", tc.tee_target(list(tc.FMP4_FLAGS), str(fmp4), str(flv_path))]
    subprocess.run(command, check=True, timeout=30)
    assert fmp4.stat().st_size > 0
    tags = list(flv.read_tags(flv_path.read_bytes()))
    assert tags[0].tag_type == flv.VIDEO and tags[0].body[1] == 0  # the AVC sequence header
    assert sum(1 for t in tags if t.tag_type == flv.VIDEO and t.body[1] == 1) == 10  # frames
