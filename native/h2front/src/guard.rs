//! The HTTP/2 frame guard: an AsyncRead/AsyncWrite wrapper between tokio-rustls and hyper
//! that reads the 9-byte frame headers going both ways and closes floods.
//!
//! Why here and not in h2: Debian's h2 0.3.13 has the 2023 rapid-reset patch but neither the
//! CONTINUATION-flood fix (h2 0.3.26: it accepted 200 MiB of CONTINUATION frames on one
//! header block) nor the 2024 reset-flood fix (h2 0.3.24: resets it is made to send queue up
//! without bound while the client does not read). Watching frame headers needs no HPACK and
//! does not depend on h2's version. The limits are those of verge/http/h2server.py (Python
//! passes them in): a header block (HEADERS + CONTINUATION, frame headers counted, so empty
//! CONTINUATIONs add up too) is capped at the max header list size, and RST_STREAM (from
//! the client, and sent by the server), PING, SETTINGS, WINDOW_UPDATE, empty DATA and
//! PRIORITY/unknown frames at a rate each. A violation sends GOAWAY ENHANCE_YOUR_CALM (at a
//! frame boundary of what h2 writes, so no frame is cut), closes the write side, and reads
//! and drops what the client still sends for up to LINGER before the connection ends (an
//! immediate close would make the kernel reset, and the client could lose the GOAWAY).
//!
//! Reset flood: resets only queue up while the client does not read. So while h2's writes
//! are blocked, at most BLOCKED_FRAMES frames are passed on to it; then reading pauses until
//! a write goes through (which the blocked write's wake-up brings).
//!
//! WINDOW_UPDATE: a client downloading fast with small windows sends many, so beyond the
//! per-second cap each DATA frame the server sent buys two more.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::Activity;

const PREFACE_LEN: usize = 24; // "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
const FRAME_HEADER: usize = 9;
const LINGER: Duration = Duration::from_secs(2);
const BLOCKED_FRAMES: u32 = 128; // frames passed to h2 while its writes are blocked
const WINDOW_CREDIT_MAX: u64 = 1 << 20;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The limits, per connection (rates are per second).
#[derive(Clone, Copy)]
pub struct Caps {
    pub max_header_block: u32,
    pub resets: u32,
    pub server_resets: u32,
    pub pings: u32,
    pub settings: u32,
    pub window_updates: u32,
    pub empty_data: u32,
    pub other: u32,
    pub dropped_per_second: u32,
}

/// Counts events in one-second windows; `hit()` is true once the cap is exceeded
/// (h2server.RateCap).
pub struct RateCap {
    limit: u32,
    count: u32,
    start: Instant,
}

impl RateCap {
    pub fn new(limit: u32) -> Self {
        RateCap { limit, count: 0, start: Instant::now() }
    }

    pub fn hit(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.start) >= Duration::from_secs(1) {
            self.start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > self.limit
    }
}

#[derive(Clone, Copy)]
struct FrameHead {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Finds frame headers in a byte stream that arrives in arbitrary pieces, skipping payloads.
struct Scanner {
    preface_left: usize,
    head: [u8; FRAME_HEADER],
    have: usize,
    payload_left: usize,
}

impl Scanner {
    fn new(preface: usize) -> Self {
        Scanner { preface_left: preface, head: [0; FRAME_HEADER], have: 0, payload_left: 0 }
    }

    fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.have == 0 && self.payload_left == 0
    }

    /// Bytes until the current frame header, or else the current payload, ends (0 at a
    /// boundary). Writing that much, repeatedly, reaches the next frame boundary.
    fn to_boundary(&self) -> usize {
        if self.have == 0 {
            self.payload_left
        } else {
            FRAME_HEADER - self.have + self.payload_left
        }
    }

    /// Calls `on_frame` for each frame header completed in `data`; false if it rejected
    /// one. Always scans all of `data`, so the position stays right (what h2 wrote is on
    /// its way whatever it holds, and the GOAWAY must still land on a frame boundary).
    fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(FrameHead) -> bool) -> bool {
        let mut ok = true;
        while !data.is_empty() {
            if self.preface_left > 0 {
                let skip = self.preface_left.min(data.len());
                self.preface_left -= skip;
                data = &data[skip..];
            } else if self.payload_left > 0 {
                let skip = self.payload_left.min(data.len());
                self.payload_left -= skip;
                data = &data[skip..];
            } else {
                let take = (FRAME_HEADER - self.have).min(data.len());
                self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have == FRAME_HEADER {
                    self.have = 0;
                    let h = &self.head;
                    let frame = FrameHead {
                        len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
                        kind: h[3],
                        flags: h[4],
                        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                    };
                    self.payload_left = frame.len as usize;
                    ok &= on_frame(frame);
                }
            }
        }
        ok
    }
}

/// The per-connection counters.
struct Rates {
    resets: RateCap,
    server_resets: RateCap,
    pings: RateCap,
    settings: RateCap,
    window_updates: RateCap,
    empty_data: RateCap,
    other: RateCap,
    window_credit: u64,
    block_bytes: u32,
    last_stream: u32,
}

impl Rates {
    fn new(caps: &Caps) -> Self {
        Rates {
            resets: RateCap::new(caps.resets),
            server_resets: RateCap::new(caps.server_resets),
            pings: RateCap::new(caps.pings),
            settings: RateCap::new(caps.settings),
            window_updates: RateCap::new(caps.window_updates),
            empty_data: RateCap::new(caps.empty_data),
            other: RateCap::new(caps.other),
            window_credit: 0,
            block_bytes: 0,
            last_stream: 0,
        }
    }

    /// A frame from the client: false when it breaks a cap.
    fn inbound(&mut self, frame: FrameHead, max_block: u32, activity: &Activity) -> bool {
        let size = FRAME_HEADER as u32 + frame.len;
        match frame.kind {
            DATA => !(frame.len == 0 && frame.flags & END_STREAM == 0 && self.empty_data.hit()),
            HEADERS => {
                self.last_stream = self.last_stream.max(frame.stream);
                self.block_bytes = size;
                self.header_block(frame.flags, max_block, activity)
            }
            CONTINUATION => {
                self.block_bytes = self.block_bytes.saturating_add(size);
                self.header_block(frame.flags, max_block, activity)
            }
            RST_STREAM => !self.resets.hit(),
            PING => frame.flags & ACK != 0 || !self.pings.hit(),
            SETTINGS => frame.flags & ACK != 0 || !self.settings.hit(),
            WINDOW_UPDATE => {
                if !self.window_updates.hit() {
                    return true;
                }
                self.window_credit = self.window_credit.saturating_sub(1);
                self.window_credit > 0
            }
            GOAWAY | PUSH_PROMISE => true, // h2 handles them (PUSH_PROMISE: a protocol error)
            _ => !self.other.hit(),        // PRIORITY (0x2) and unknown types, ignored by h2
        }
    }

    fn header_block(&mut self, flags: u8, max_block: u32, activity: &Activity) -> bool {
        if flags & END_HEADERS != 0 {
            activity.head_done();
        } else {
            activity.head_started(); // a block dripping in is cut by the header timeout
        }
        self.block_bytes <= max_block
    }

    /// A frame h2 sends: false when the server resets streams too fast (reset flood).
    fn outbound(&mut self, frame: FrameHead) -> bool {
        match frame.kind {
            DATA => {
                self.window_credit = (self.window_credit + 2).min(WINDOW_CREDIT_MAX);
                true
            }
            RST_STREAM => !self.server_resets.hit(),
            _ => true,
        }
    }
}

/// After a violation: GOAWAY to send, then the write side closed, then lingering.
struct Calm {
    goaway: [u8; FRAME_HEADER + 8],
    sent: usize,
    shut: bool,
    until: Pin<Box<tokio::time::Sleep>>,
}

pub struct FrameGuard<IO> {
    io: IO,
    caps: Caps,
    activity: Arc<Activity>,
    calm_requested: Arc<AtomicBool>,
    inbound: Scanner,
    outbound: Scanner,
    rates: Rates,
    write_blocked: bool,
    frames_while_blocked: u32,
    calm: Option<Calm>,
}

impl<IO> FrameGuard<IO> {
    pub fn new(io: IO, caps: Caps, activity: Arc<Activity>, calm_requested: Arc<AtomicBool>) -> Self {
        FrameGuard {
            io,
            rates: Rates::new(&caps),
            caps,
            activity,
            calm_requested,
            inbound: Scanner::new(PREFACE_LEN),
            outbound: Scanner::new(0),
            write_blocked: false,
            frames_while_blocked: 0,
            calm: None,
        }
    }

    fn enter_calm(&mut self) {
        if self.calm.is_some() {
            return;
        }
        let mut goaway = [0u8; FRAME_HEADER + 8];
        goaway[..FRAME_HEADER].copy_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        goaway[9..13].copy_from_slice(&self.rates.last_stream.to_be_bytes());
        goaway[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        let until = Box::pin(tokio::time::sleep(LINGER));
        self.calm = Some(Calm { goaway, sent: 0, shut: false, until });
    }
}

fn aborted() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "HTTP/2 flood: GOAWAY ENHANCE_YOUR_CALM")
}

impl<IO: AsyncRead + AsyncWrite + Unpin> FrameGuard<IO> {
    /// Send the GOAWAY once h2's output is at a frame boundary, then close the write side.
    /// Ready when that is done (or failed: the connection ends anyway).
    fn push_goaway(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at_boundary = self.outbound.at_boundary();
        let calm = self.calm.as_mut().expect("calm");
        if !at_boundary {
            return Poll::Pending; // h2 finishes its frame first (see poll_write)
        }
        while calm.sent < calm.goaway.len() {
            match Pin::new(&mut self.io).poll_write(cx, &calm.goaway[calm.sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => calm.sent += n,
                Poll::Ready(_) => {
                    calm.sent = calm.goaway.len();
                    calm.shut = true;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        if !calm.shut {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => {}
            }
            let _ = Pin::new(&mut self.io).poll_shutdown(cx); // close_notify and FIN, best effort
            calm.shut = true;
        }
        Poll::Ready(())
    }

    /// Calm mode's read side: push the GOAWAY, then drop what the client sends until it
    /// closes or LINGER passes, then fail (h2 ends the connection).
    fn poll_calm_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.push_goaway(cx);
        let mut scratch = [0u8; 4096];
        loop {
            if self.calm.as_mut().expect("calm").until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(aborted()));
            }
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if !sink.filled().is_empty() => continue,
                Poll::Ready(_) => return Poll::Ready(Err(aborted())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for FrameGuard<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.calm.is_none() && this.calm_requested.load(Ordering::Relaxed) {
            this.enter_calm();
        }
        if this.calm.is_some() {
            return this.poll_calm_read(cx);
        }
        if this.write_blocked && this.frames_while_blocked >= BLOCKED_FRAMES {
            // h2 cannot write and the client keeps sending: wait for the write to go
            // through (the blocked write registered this task for that wake-up).
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let (caps, rates, activity) = (&this.caps, &mut this.rates, &this.activity);
        let mut frames = 0u32;
        let ok = this.inbound.feed(&buf.filled()[before..], |frame| {
            frames += 1;
            rates.inbound(frame, caps.max_header_block, activity)
        });
        if this.write_blocked {
            this.frames_while_blocked = this.frames_while_blocked.saturating_add(frames);
        }
        if !ok {
            buf.set_filled(before); // h2 sees nothing of the offending read
            this.enter_calm();
            return this.poll_calm_read(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FrameGuard<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut buf = buf;
        if this.calm.is_some() {
            if this.outbound.at_boundary() {
                let _ = this.push_goaway(cx);
                return Poll::Ready(Ok(buf.len())); // after GOAWAY, h2's output is dropped
            }
            buf = &buf[..buf.len().min(this.outbound.to_boundary())]; // finish the frame
        }
        let written = match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending => {
                this.write_blocked = true;
                return Poll::Pending;
            }
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        if written > 0 {
            this.write_blocked = false;
            this.frames_while_blocked = 0;
        }
        let rates = &mut this.rates;
        if !this.outbound.feed(&buf[..written], |frame| rates.outbound(frame)) {
            this.enter_calm(); // the frame is on its way; GOAWAY at the next boundary
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.calm.is_some() && this.outbound.at_boundary() {
            let _ = this.push_goaway(cx);
            return Poll::Ready(Ok(()));
        }
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if flushed.is_pending() {
            this.write_blocked = true;
        } else {
            // everything went out: reading must not wait for a write that will not come
            this.write_blocked = false;
            this.frames_while_blocked = 0;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend(std::iter::repeat(0).take(len as usize));
        out
    }

    #[test]
    fn scanner_finds_headers_split_anywhere() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(6, SETTINGS, 0, 0));
        wire.extend(frame(3, HEADERS, END_HEADERS, 1));
        wire.extend(frame(0, PING, 0, 0));
        for cut in 1..wire.len() {
            let mut scanner = Scanner::new(PREFACE_LEN);
            let mut kinds = Vec::new();
            for part in wire.chunks(cut) {
                assert!(scanner.feed(part, |f| {
                    kinds.push((f.kind, f.stream));
                    true
                }));
            }
            assert_eq!(kinds, vec![(SETTINGS, 0), (HEADERS, 1), (PING, 0)]);
            assert!(scanner.at_boundary());
        }
    }

    fn caps() -> Caps {
        Caps {
            max_header_block: 20 * 1024,
            resets: 100,
            server_resets: 100,
            pings: 50,
            settings: 20,
            window_updates: 1000,
            empty_data: 100,
            other: 1000,
            dropped_per_second: 100,
        }
    }

    /// The reset-flood defence: a client that sends requests and never reads gets its
    /// frames read only until the server's writes block, then BLOCKED_FRAMES more.
    #[tokio::test]
    async fn reading_pauses_while_writes_are_blocked() {
        use tokio::io::AsyncWriteExt;

        let (client, server) = tokio::io::duplex(4096);
        let (_never_read, mut client_out) = tokio::io::split(client);
        let request = frame(3, HEADERS, END_HEADERS, 1); // 12 bytes, not rate-capped
        tokio::spawn(async move {
            let _ = client_out.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            loop {
                if client_out.write_all(&request.repeat(64)).await.is_err() {
                    return;
                }
            }
        });
        let activity = Arc::new(Activity::new());
        let mut guard = FrameGuard::new(server, caps(), activity, Arc::new(AtomicBool::new(false)));
        // h2 stand-in: answers each request with a 100-byte DATA frame, as long as it can
        let answer = frame(100, DATA, 0, 1);
        let (mut out, mut read, mut read_while_blocked, mut blocked) = (Vec::new(), 0usize, 0usize, false);
        for _ in 0..2000 {
            std::future::poll_fn(|cx| {
                while !out.is_empty() {
                    match Pin::new(&mut guard).poll_write(cx, &out) {
                        Poll::Ready(Ok(n)) => drop(out.drain(..n)),
                        _ => {
                            blocked = true;
                            break;
                        }
                    }
                }
                let mut space = [0u8; 4096];
                let mut buf = ReadBuf::new(&mut space);
                if let Poll::Ready(Ok(())) = Pin::new(&mut guard).poll_read(cx, &mut buf) {
                    let bytes = buf.filled().len();
                    read += bytes;
                    if blocked {
                        read_while_blocked += bytes;
                    }
                    for _ in 0..bytes / 12 {
                        out.extend_from_slice(&answer);
                    }
                }
                Poll::Ready(())
            })
            .await;
            tokio::task::yield_now().await;
        }
        assert!(blocked, "the server's writes never blocked");
        assert!(read > 0);
        // BLOCKED_FRAMES frames, plus what one read can carry past the count
        assert!(read_while_blocked <= (BLOCKED_FRAMES as usize) * 12 + 4096, "{read_while_blocked}");
    }

    #[test]
    fn to_boundary_counts_the_rest_of_the_frame() {
        let mut scanner = Scanner::new(0);
        let wire = frame(10, DATA, 0, 1);
        assert!(scanner.feed(&wire[..4], |_| true));
        assert_eq!(scanner.to_boundary(), 5); // the header first; then its payload
        assert!(!scanner.at_boundary());
        assert!(scanner.feed(&wire[4..12], |_| true));
        assert_eq!(scanner.to_boundary(), 7);
    }
}
