"""The RTMP handshake, server side, in its simple (non-digest) form.

C0 (version 3) + C1 (1536 bytes: time, zero, random) arrive; we answer S0 + S1 + S2 at once,
where S1 carries zero in its "version" bytes 4..7 and S2 is an exact copy of C1; then C2
(1536 bytes, an echo of S1) completes it. The zero version bytes are what make digest-capable
clients fall back to the simple form:

* FFmpeg (libavformat/rtmpproto.c) verifies the server's digest only when it plays
  (``is_input && serverdata[5] >= 3``); a publisher just echoes S1 as C2.
* librtmp (OBS) uses the FP9 digest handshake only for RTMPE or SWF verification, and drops
  it anyway when S1's version byte is zero; its non-digest path compares S2 with C1 (a
  warning only), which our exact copy satisfies.

We do not check C2 against S1: some clients send their own time there, and nothing depends on it.
Bytes after C2 (clients often send the connect command in the same segment) are kept for the
chunk layer: :meth:`ServerHandshake.take_leftover`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

RTMP_VERSION = 3
PACKET_SIZE = 1536


class HandshakeError(ValueError):
    """The peer is not speaking (plain) RTMP."""


def _describe_version(version: int) -> str:
    if version in (6, 8, 9):
        return f"encrypted RTMP (RTMPE, version {version}) is not supported"
    if 0x20 <= version < 0x7F:
        return f"not RTMP: first byte {chr(version)!r} (0x{version:02x})"
    return f"not RTMP: version byte 0x{version:02x}"


class ServerHandshake:
    """Feed it the client's bytes; send what :meth:`feed` returns; stop when :attr:`complete`."""

    def __init__(
        self, *, random_bytes: Callable[[int], bytes] = os.urandom, uptime_ms: int = 0
    ) -> None:
        self._random_bytes = random_bytes
        self._uptime_ms = uptime_ms & 0xFFFFFFFF
        self._buffer = bytearray()
        self._sent_reply = False
        self.complete = False

    def feed(self, data: bytes) -> bytes:
        """Consume client bytes; return the bytes to send to the client (possibly empty)."""
        if self.complete:
            raise HandshakeError("handshake already complete")
        self._buffer += data
        reply = b""
        if not self._sent_reply and self._buffer:
            if self._buffer[0] != RTMP_VERSION:
                raise HandshakeError(_describe_version(self._buffer[0]))
            if len(self._buffer) >= 1 + PACKET_SIZE:
                c1 = bytes(self._buffer[1 : 1 + PACKET_SIZE])
                del self._buffer[: 1 + PACKET_SIZE]
                reply = bytes((RTMP_VERSION,)) + self._s1() + c1
                self._sent_reply = True
        if self._sent_reply and len(self._buffer) >= PACKET_SIZE:
            del self._buffer[:PACKET_SIZE]  # C2: an echo of S1 that nothing depends on
            self.complete = True
        return reply

    def take_leftover(self) -> bytes:
        """Bytes received after C2 — the start of the chunk stream."""
        leftover = bytes(self._buffer)
        self._buffer.clear()
        return leftover

    def _s1(self) -> bytes:
        return struct.pack(">II", self._uptime_ms, 0) + self._random_bytes(PACKET_SIZE - 8)


def client_c0c1(random_bytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """C0 + C1 of a simple-handshake client (used by tests and by anything that publishes)."""
    return bytes((RTMP_VERSION,)) + struct.pack(">II", 0, 0) + random_bytes(PACKET_SIZE - 8)


def client_c2(s0s1s2: bytes) -> bytes:
    """C2 for a server's S0 + S1 + S2: the echo of S1."""
    if len(s0s1s2) < 1 + 2 * PACKET_SIZE or s0s1s2[0] != RTMP_VERSION:
        raise HandshakeError("incomplete or invalid S0/S1/S2")
    return bytes(s0s1s2[1 : 1 + PACKET_SIZE])
