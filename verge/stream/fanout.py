"""One live stream as FLV for many viewers: HTTP-FLV straight from the ingest.

A viewer joining mid-stream needs, before any live tag, the FLV header, the metadata, the
AVC and AAC sequence headers, and a keyframe to start decoding from — so the fan-out keeps
those plus the current GOP (every tag since the last keyframe; "GOP cache", as SRS and
nginx-http-flv call it) and hands a new viewer all of it at once. The FLV prefix (header +
metadata + sequence headers) is also what the transcoder is (re)started with.

Viewers read from bounded queues. A viewer that falls behind by more than ``max_lag_bytes``
is dropped rather than letting memory grow: its player reconnects and starts at a keyframe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from verge.stream import flv
from verge.stream.rtmp.session import AudioTag, VideoTag

log = logging.getLogger("verge.stream")

MAX_GOP_BYTES = 16 * 1024 * 1024


class Viewer:
    """One subscriber's queue of FLV bytes; ``None`` marks the end of the stream."""

    def __init__(self, max_lag_bytes: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.lag = 0
        self.max_lag = max_lag_bytes
        self.dropped = False

    def push(self, data: bytes | None) -> bool:
        """Queue data; False (and the viewer is dropped) when it lags too far behind."""
        if data is not None:
            self.lag += len(data)
            if self.lag > self.max_lag:
                self.dropped = True
                self.queue.put_nowait(None)
                return False
        self.queue.put_nowait(data)
        return True

    async def next(self) -> bytes | None:
        data = await self.queue.get()
        if data is not None:
            self.lag -= len(data)
        return data


class FlvFanout:
    def __init__(self, max_lag_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_lag = max_lag_bytes
        self.metadata: dict[str, Any] = {}
        self.video_header: bytes | None = None  # the AVC sequence header tag
        self.audio_header: bytes | None = None  # the AAC sequence header tag
        self.has_video = False
        self.has_audio = False
        self.gop: list[bytes] = []
        self.gop_bytes = 0
        self.viewers: set[Viewer] = set()
        self.ended = False

    # ----- input -------------------------------------------------------------------------------
    def on_metadata(self, metadata: dict[str, Any]) -> None:
        self.metadata = dict(metadata)
        self.has_video = self.has_video or bool(metadata.get("videocodecid") or metadata.get("width"))
        self.has_audio = self.has_audio or bool(metadata.get("audiocodecid"))

    def on_tag(self, tag: VideoTag | AudioTag) -> None:
        if isinstance(tag, VideoTag):
            self.has_video = True
            data = flv.video_tag(tag.timestamp, tag.data)
            if tag.is_sequence_header:
                self.video_header = data
                return self._broadcast(data)
            if tag.is_keyframe:
                self.gop, self.gop_bytes = [], 0
        else:
            self.has_audio = True
            data = flv.audio_tag(tag.timestamp, tag.data)
            if tag.is_sequence_header:
                self.audio_header = data
                return self._broadcast(data)
        if self.gop_bytes + len(data) <= MAX_GOP_BYTES:
            self.gop.append(data)
            self.gop_bytes += len(data)
        self._broadcast(data)

    def end(self) -> None:
        self.ended = True
        for viewer in list(self.viewers):
            viewer.push(None)
        self.viewers.clear()

    # ----- output ------------------------------------------------------------------------------
    def prefix(self) -> bytes:
        """FLV header, metadata and sequence headers: where every FLV consumer starts."""
        parts = [flv.file_header(audio=self.has_audio or not self.has_video,
                                 video=self.has_video or not self.has_audio)]
        if self.metadata:
            parts.append(flv.metadata_tag(self.metadata))
        parts += [h for h in (self.video_header, self.audio_header) if h is not None]
        return b"".join(parts)

    def subscribe(self) -> Viewer:
        viewer = Viewer(self.max_lag)
        viewer.push(self.prefix() + b"".join(self.gop))
        if self.ended:
            viewer.push(None)
        else:
            self.viewers.add(viewer)
        return viewer

    def unsubscribe(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)

    def _broadcast(self, data: bytes) -> None:
        for viewer in list(self.viewers):
            if not viewer.push(data):
                self.viewers.discard(viewer)
                log.warning("HTTP-FLV viewer dropped: more than %d bytes behind", self.max_lag)
