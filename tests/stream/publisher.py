"""A minimal RTMP publishing client for tests: sans-I/O pieces plus an asyncio wrapper.

It speaks like FFmpeg (connect, releaseStream, FCPublish, createStream, publish on stream 1)
but lets a test send exactly the bytes it wants: odd chunk sizes, raw chunks, garbage, stalls.
"""

from __future__ import annotations

import asyncio
from typing import Any

from verge.stream.rtmp import amf0
from verge.stream.rtmp.chunk import ChunkReader, ChunkWriter, Message, MessageType
from verge.stream.rtmp.handshake import PACKET_SIZE, client_c0c1, client_c2

AVC_SEQUENCE_HEADER = bytes([0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1F, 0xFF, 0xE1, 0, 0])
AVC_KEYFRAME = bytes([0x17, 1, 0, 0, 0x28]) + b"\x00\x00\x00\x05\x65keyframe-nal"
AVC_INTER = bytes([0x27, 1, 0, 0, 0x28]) + b"\x00\x00\x00\x05\x41inter-nal"
AAC_SEQUENCE_HEADER = bytes([0xAF, 0, 0x12, 0x10])
AAC_RAW = bytes([0xAF, 1]) + b"aac-frame"


class Publisher:
    """Builds client-to-server bytes and decodes server-to-client bytes."""

    def __init__(self, chunk_size: int = 128, compress: bool = True) -> None:
        self.writer = ChunkWriter(chunk_size=chunk_size, compress=compress)
        self.reader = ChunkReader()
        self.txn = 0
        self._handshake_left = 1 + 2 * PACKET_SIZE

    def c0c1(self) -> bytes:
        return client_c0c1()

    def command(self, name: str, *args: Any, stream_id: int = 0, csid: int = 3) -> bytes:
        self.txn += 1
        payload = amf0.encode(name, float(self.txn), *args)
        return self.writer.write(csid, MessageType.COMMAND_AMF0, payload, stream_id=stream_id)

    def connect(self, app: str = "live") -> bytes:
        return self.command(
            "connect",
            {
                "app": app,
                "type": "nonprivate",
                "flashVer": "FMLE/3.0",
                "tcUrl": f"rtmp://127.0.0.1/{app}",
            },
        )

    def publish_sequence(self, name: str) -> bytes:
        """releaseStream, FCPublish, createStream and publish, as FFmpeg sends them."""
        return (
            self.command("releaseStream", None, name)
            + self.command("FCPublish", None, name)
            + self.command("createStream", None)
            + self.command("publish", None, name, "live", stream_id=1, csid=8)
        )

    def unpublish(self, name: str) -> bytes:
        return self.command("FCUnpublish", None, name) + self.command("deleteStream", None, 1.0)

    def metadata(self, data: dict[str, Any], stream_id: int = 1) -> bytes:
        payload = amf0.encode("@setDataFrame", "onMetaData", amf0.EcmaArray(data))
        return self.writer.write(4, MessageType.DATA_AMF0, payload, stream_id=stream_id)

    def video(self, timestamp: int, body: bytes, stream_id: int = 1) -> bytes:
        return self.writer.write(
            6, MessageType.VIDEO, body, timestamp=timestamp, stream_id=stream_id
        )

    def audio(self, timestamp: int, body: bytes, stream_id: int = 1) -> bytes:
        return self.writer.write(
            4, MessageType.AUDIO, body, timestamp=timestamp, stream_id=stream_id
        )

    def receive(self, data: bytes) -> list[Message]:
        """Decode server bytes (after skipping S0/S1/S2); applies Set Chunk Size itself."""
        if self._handshake_left:
            skip = min(self._handshake_left, len(data))
            self._handshake_left -= skip
            data = data[skip:]
        return self.reader.feed(data)


def commands(messages: list[Message]) -> list[list[Any]]:
    """The AMF0 values of every command message in ``messages``."""
    return [amf0.decode(m.payload) for m in messages if m.type_id == MessageType.COMMAND_AMF0]


def status_codes(messages: list[Message]) -> list[str]:
    return [values[3]["code"] for values in commands(messages) if values[0] == "onStatus"]


class SocketPublisher:
    """The same client over a real socket, for the ingest server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.client = Publisher()

    @classmethod
    async def connect(cls, port: int) -> SocketPublisher:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def handshake(self) -> None:
        await self.send(self.client.c0c1())
        s0s1s2 = await self.reader.readexactly(1 + 2 * PACKET_SIZE)
        self.client.receive(s0s1s2)
        await self.send(client_c2(s0s1s2))

    async def publish(self, name: str, app: str = "live") -> list[str]:
        """Handshake, connect and publish; return the onStatus codes up to the answer."""
        await self.handshake()
        return await self.publish_after_handshake(name, app)

    async def publish_after_handshake(self, name: str, app: str = "live") -> list[str]:
        await self.send(self.client.connect(app) + self.client.publish_sequence(name))
        codes: list[str] = []
        while not codes:
            data = await self.reader.read(65536)
            if not data:
                break
            codes += status_codes(self.client.receive(data))
        return codes

    async def read_until_closed(self) -> bytes:
        received = bytearray()
        while data := await self.reader.read(65536):
            received += data
        return bytes(received)

    def close(self) -> None:
        self.writer.close()
