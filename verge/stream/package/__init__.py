"""Packaging: ffmpeg's fragmented MP4 → CMAF parts and segments → LL-HLS, HLS and DASH.

``mp4`` reads boxes, ``cmaf`` cuts the stream into parts and segments, ``hls`` and ``dash``
render playlists and manifests, ``live`` keeps the DVR window that the stream server queries.
All sans-I/O: bytes in, events, state and text out.
"""

from verge.stream.package.cmaf import InitSegment, Naming, Part, SegmentEnd, Segmenter
from verge.stream.package.live import (
    BlockingRequestError,
    LiveRendition,
    LiveStream,
    StreamNaming,
    parse_blocking_query,
)

__all__ = [
    "BlockingRequestError",
    "InitSegment",
    "LiveRendition",
    "LiveStream",
    "Naming",
    "Part",
    "SegmentEnd",
    "Segmenter",
    "StreamNaming",
    "parse_blocking_query",
]
