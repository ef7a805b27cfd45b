"""The native engine's HTTP/2 frame guard (native/h2front/src/guard.rs): floods get GOAWAY
ENHANCE_YOUR_CALM and a closed connection, ordinary traffic with many streams does not.

The floods are hand-built frames on a TLS socket (exact bytes, no client-side checks in
the way); ordinary traffic uses the `h2` library.
"""

from __future__ import annotations

import select
import ssl
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest

from tests.http.test_native_harness import (
    needs_native,
    running,
    session_certs,
)

pytestmark = [pytest.mark.timeout(60), needs_native]


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


@pytest.fixture
def native(native_certs, tmp_path):
    with running(native_certs, tmp_path) as harness:
        yield harness


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
ENHANCE_YOUR_CALM = 0xB


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def request_block(path: str = "/fast", method: str = "GET") -> bytes:
    return hpack.Encoder().encode(
        [(":method", method), (":scheme", "https"), (":authority", "shop.test"), (":path", path)]
    )


class RawH2:
    """A TLS socket speaking hand-built HTTP/2 frames; reads the server's frames as they come."""

    def __init__(self, native) -> None:
        self.sock: ssl.SSLSocket = native.tls(["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.sock.setblocking(False)
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False
        self.sent = 0
        self.send(PREFACE + frame(SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.closed:
            try:
                count = self.sock.send(view)
            except (ssl.SSLWantWriteError, BlockingIOError):
                select.select([], [self.sock], [], 1.0)
                continue
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                self.closed = True
                return
            view = view[count:]
            self.sent += count

    def poll(self, timeout: float = 0.0) -> None:
        """Read what has arrived (waiting up to ``timeout`` for the first bytes)."""
        if self.closed:
            return
        if self.sock.pending() == 0 and not select.select([self.sock], [], [], timeout)[0]:
            return
        while True:
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                break
            self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            kind, flags = self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload = self.buffer[9 : 9 + length]
            self.frames.append((kind, flags, stream, payload))
            self.buffer = self.buffer[9 + length :]
            if kind == PING and not flags & ACK:
                self.send(frame(PING, ACK, 0, payload))  # as any live client does

    def goaway_code(self) -> int | None:
        codes = [int.from_bytes(p[4:8], "big") for k, _, _, p in self.frames if k == GOAWAY]
        return codes[0] if codes else None

    def flood(self, data: bytes, max_bytes: int, pause: float = 0.005) -> int:
        """Send ``data`` again and again until GOAWAY, a close, or ``max_bytes``; returns the
        bytes sent by then. The short pause after each send lets the server's answer arrive
        before the kernel's socket buffers swallow megabytes more."""
        while self.sent < max_bytes and not self.closed and self.goaway_code() is None:
            self.send(data)
            self.poll(pause)
        return self.sent

    def wait_closed(self, timeout: float = 5.0) -> bool:
        for _ in range(int(timeout / 0.1)):
            self.poll(0.1)
            if self.closed:
                return True
        return self.closed

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(native):
    conn = RawH2(native)
    yield conn
    conn.close()


def assert_calmed(conn: RawH2, limit: float = 5.0) -> None:
    """GOAWAY ENHANCE_YOUR_CALM arrives (within ``limit`` seconds: a loaded machine may
    take a while over a flood) and the connection closes."""
    deadline = time.monotonic() + limit
    while conn.goaway_code() is None and not conn.closed and time.monotonic() < deadline:
        conn.poll(0.1)
    assert conn.goaway_code() == ENHANCE_YOUR_CALM, conn.frames[-3:]
    assert conn.wait_closed()


def test_continuation_flood_is_closed_within_a_mebibyte(raw):
    raw.send(frame(HEADERS, 0, 1, request_block()))
    sent = raw.flood(frame(CONTINUATION, 0, 1, bytes(16384)), max_bytes=64 << 20)
    assert sent < 1 << 20
    assert_calmed(raw)


def test_empty_continuation_frames_add_up_too(raw):
    raw.send(frame(HEADERS, 0, 1, request_block()))
    sent = raw.flood(frame(CONTINUATION, 0, 1) * 64, max_bytes=16 << 20)
    assert sent < 1 << 20
    assert_calmed(raw)


def test_rapid_reset_is_closed(raw):
    burst = b"".join(
        frame(HEADERS, END_HEADERS | END_STREAM, sid, request_block("/slow"))
        + frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big"))  # CANCEL
        for sid in range(1, 2001, 2)
    )
    raw.send(burst)
    assert_calmed(raw)


def test_streams_cancelled_now_and_then_do_not_cost_the_connection(raw):
    """The caps are rates: a long-lived client cancelling 210 requests at about 65 a
    second (over the 200 per connection the first native build allowed) keeps its
    connection."""
    sid = 1
    for _ in range(21):
        burst = b""
        for _ in range(10):
            burst += frame(HEADERS, END_HEADERS | END_STREAM, sid, request_block("/slow"))
            burst += frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big"))  # CANCEL
            sid += 2
        raw.send(burst)
        raw.poll(0.15)
    raw.send(frame(HEADERS, END_HEADERS | END_STREAM, sid, request_block("/fast")))
    deadline = time.monotonic() + 5
    while not any(k == HEADERS and s == sid for k, _, s, _ in raw.frames):
        assert not raw.closed and time.monotonic() < deadline, raw.frames[-3:]
        raw.poll(0.1)
    assert raw.goaway_code() is None


def test_resets_the_server_is_made_to_send_are_capped(raw):
    """The 2024 reset flood: malformed requests make h2 reset each stream."""
    bad = hpack.Encoder().encode([(":method", "GET")])  # no :scheme, :path
    streams = range(1, 40001, 2)
    for first in range(0, len(streams), 50):
        batch = streams[first : first + 50]
        raw.send(b"".join(frame(HEADERS, END_HEADERS | END_STREAM, sid, bad) for sid in batch))
        raw.poll(0.005)
        if raw.goaway_code() is not None or raw.closed:
            break
    assert_calmed(raw)
    resets = [f for f in raw.frames if f[0] == RST_STREAM]
    assert 0 < len(resets) < 2000  # of the 20000 streams the client would open


@pytest.mark.parametrize(
    ("flood", "name"),
    [
        (frame(PING, 0, 0, bytes(8)), "PING"),
        (frame(SETTINGS, 0, 0), "SETTINGS"),
        (frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")), "WINDOW_UPDATE"),
        (frame(0x2, 0, 3, bytes(5)), "PRIORITY"),
    ],
)
def test_control_frame_floods_are_closed(raw, flood, name):
    sent = raw.flood(flood * 50, max_bytes=8 << 20)
    assert sent < 1 << 20, name
    assert_calmed(raw)


def test_empty_data_flood_is_closed(raw):
    raw.send(frame(HEADERS, END_HEADERS, 1, request_block("/digest", "POST")))
    sent = raw.flood(frame(DATA, 0, 1) * 50, max_bytes=8 << 20)
    assert sent < 1 << 20
    assert_calmed(raw)


def h2_client(native, window: int = 65535):
    sock = native.tls(["h2"])
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config=config)
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    acked = False
    while not acked:  # the window applies once the server has acknowledged it
        events = conn.receive_data(sock.recv(65536))
        acked = any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
        sock.sendall(conn.data_to_send())
    return sock, conn


def run_streams(sock, conn, paths: list[str]) -> dict[int, tuple[int, int]]:
    """Requests on one connection, at most 100 at a time; {stream: (status, body bytes)}."""
    results: dict[int, list] = {}
    pending = list(paths)
    open_streams: set[int] = set()
    while pending or open_streams:
        while pending and len(open_streams) < 100:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(
                sid,
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "shop.test"),
                    (":path", pending.pop()),
                ],
                end_stream=True,
            )
            results[sid] = [0, 0]
            open_streams.add(sid)
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        assert data, "server closed the connection"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                results[event.stream_id][0] = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                results[event.stream_id][1] += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                open_streams.discard(event.stream_id)
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise AssertionError(f"unexpected {event}")
        sock.sendall(conn.data_to_send())
    return {sid: tuple(r) for sid, r in results.items()}


def test_many_streams_and_small_windows_are_not_a_flood(native):
    sock, conn = h2_client(native)
    with sock:
        results = run_streams(sock, conn, ["/fast"] * 1500 + ["/other"] * 300)
    assert len(results) == 1800 and {status for status, _ in results.values()} == {200}
    sock, conn = h2_client(native, window=2048)  # a WINDOW_UPDATE every kilobyte or so
    with sock:
        results = run_streams(sock, conn, ["/file"] * 20)
    assert {r for r in results.values()} == {(200, 200_000)}
