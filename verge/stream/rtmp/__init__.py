"""RTMP as a sans-I/O protocol: AMF0 values, the handshake, the chunk stream, the server session.

Nothing here touches a socket; :mod:`verge.stream.ingest` wraps :class:`RtmpSession` in asyncio.
"""

from verge.stream.rtmp.session import (
    AudioTag,
    Closed,
    Connect,
    Error,
    Event,
    Metadata,
    Publish,
    RtmpSession,
    Unpublish,
    VideoTag,
)

__all__ = [
    "AudioTag",
    "Closed",
    "Connect",
    "Error",
    "Event",
    "Metadata",
    "Publish",
    "RtmpSession",
    "Unpublish",
    "VideoTag",
]
