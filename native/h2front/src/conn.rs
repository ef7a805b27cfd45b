//! Accepting connections and running each one: TLS handshake, protocol by ALPN, timeouts,
//! and the three ways a connection ends early (server stop, a flood, a timeout).
//!
//! ALPN `h2` gets hyper's HTTP/2 behind the frame guard (guard.rs); `http/1.1` or no ALPN
//! gets hyper's HTTP/1.1 (with upgrades, for WebSocket) behind the head clock (http1.rs).
//! Both feed the same service (service.rs).
//!
//! Timeouts (verge.http.server.ServerLimits, pushed by Python): the TLS handshake; an HTTP/1.1
//! request head (hyper 0.14.19's own header timer restarts on every read, so a client sending
//! one byte a second would never hit it: ours starts at the head's first byte); idle
//! keep-alive on both protocols (no request in flight); and the send timeout: writes to the
//! client stalled (its socket full: it does not read) that long close the connection, as the
//! Python servers' `pause_writing` clock does. One watchdog future per connection sleeps until
//! the nearest deadline; nothing is woken per request. (The request-body timeout is the body
//! pump's: service.rs.)
//!
//! The connection gate (`connections_per_ip`, verge.edge.protect.ConnectionGate): while
//! Python says a gate is on, each accepted connection waits, before its TLS handshake, for
//! Python's verdict on its client address (an `Open` event, answered in the next batch with
//! `admit`): refused, it is closed at once; admitted, a `Closed` event follows when it ends
//! (after its upgraded tunnel, if any), so the gate counts exactly what Python's own
//! listeners count, with the same keys, exemptions and refusal counter.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::Http;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

use crate::bridge::{waker, Event, Shared};
use crate::guard::{Caps, FrameGuard, RateCap};
use crate::http1::HeadClock;
use crate::service;

const DRAIN_LIMIT: Duration = Duration::from_secs(30); // the thread's own bound after stop
const LINGER: Duration = Duration::from_secs(2); // a flooding connection gets this to read GOAWAY
pub const H1_BUFFER: usize = 64 * 1024; // hyper's HTTP/1.1 read buffer (caps a request head), at least

/// What Python configures (`Server(...)`, `set_limits`); read once per connection.
#[derive(Clone, Copy)]
pub struct Settings {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
    pub send_timeout: Duration,
    /// HTTP/1.1: the most header fields a request may have (431 beyond)
    pub max_header_fields: usize,
    /// HTTP/1.1: hyper's read buffer, so the longest head the limits allow (H1_BUFFER at least)
    pub max_head_bytes: usize,
    /// Python's connection gate is on: every connection asks it first
    pub gated: bool,
    pub caps: Caps,
}

/// Everything the accept loop hands each connection.
pub struct Ctx {
    pub acceptor: TlsAcceptor,
    pub h1: Http,
    pub h2: Http,
    pub shared: Arc<Shared>,
    pub settings: Arc<RwLock<Settings>>,
}

// ----- activity: what the timeouts look at ----------------------------------------------------

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1 // 0 means "not set"
}

/// A connection's requests in flight, since when it has been idle, since when an HTTP/1.1
/// head (or an HTTP/2 header block) has been arriving, and since when writes have stalled;
/// and when the watchdog wakes next (so a stall wakes it only if it would wake too late).
pub struct Activity {
    in_flight: AtomicUsize,
    idle_since: AtomicU64,
    head_since: AtomicU64,
    stalled_since: AtomicU64,
    send_ms: AtomicU64,
    wake_at: AtomicU64,
    rearm: Notify,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now_ms()),
            head_since: AtomicU64::new(0),
            stalled_since: AtomicU64::new(0),
            send_ms: AtomicU64::new(u64::MAX / 2),
            wake_at: AtomicU64::new(0),
            rearm: Notify::new(),
        }
    }

    /// A write to the client could not go through (its socket is full): the send timer
    /// starts, unless it runs already. (A client downloading fast stalls and moves many
    /// times a second: the watchdog is woken only when it would sleep past the deadline.)
    fn write_stalled(&self) {
        if self.stalled_since.load(Ordering::Relaxed) == 0 {
            let now = now_ms();
            self.stalled_since.store(now, Ordering::Relaxed);
            if now + self.send_ms.load(Ordering::Relaxed) < self.wake_at.load(Ordering::Relaxed) {
                self.rearm.notify_one();
            }
        }
    }

    /// A write went through: the send timer stops.
    fn write_moved(&self) {
        if self.stalled_since.load(Ordering::Relaxed) != 0 {
            self.stalled_since.store(0, Ordering::Relaxed);
        }
    }

    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// The first byte of a request head arrived (once per head): the header timer starts.
    pub fn head_started(&self) {
        if self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(now_ms(), Ordering::Relaxed);
            self.rearm.notify_one(); // an earlier deadline than the idle one
        }
    }

    pub fn head_done(&self) {
        self.head_since.store(0, Ordering::Relaxed);
    }
}

/// One request in flight; dropped when hyper has sent (or dropped) the last response byte.
pub struct Flight(Arc<Activity>);

impl Flight {
    pub fn start(activity: &Arc<Activity>) -> Self {
        activity.head_done();
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Flight(activity.clone())
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since.store(now_ms(), Ordering::Relaxed);
        }
    }
}

enum Expiry {
    HeadTimeout,
    SendTimeout,
    Idle,
}

/// Resolves when the connection has been idle, reading a head, or unable to write, for too
/// long.
async fn watchdog(activity: Arc<Activity>, settings: Settings) -> Expiry {
    let header_ms = settings.header_timeout.as_millis() as u64;
    let idle_ms = settings.keepalive_timeout.as_millis() as u64;
    let send_ms = settings.send_timeout.as_millis() as u64;
    activity.send_ms.store(send_ms, Ordering::Relaxed);
    loop {
        let now = now_ms();
        let stalled_since = activity.stalled_since.load(Ordering::Relaxed);
        if stalled_since != 0 && now >= stalled_since + send_ms {
            return Expiry::SendTimeout;
        }
        let head_since = activity.head_since.load(Ordering::Relaxed);
        let mut wait_ms = if head_since != 0 {
            if now >= head_since + header_ms {
                return Expiry::HeadTimeout;
            }
            head_since + header_ms - now
        } else if activity.busy() {
            idle_ms // look again later; a busy connection has no idle deadline
        } else {
            let idle_since = activity.idle_since.load(Ordering::Relaxed);
            if now >= idle_since + idle_ms {
                return Expiry::Idle;
            }
            idle_since + idle_ms - now
        };
        if stalled_since != 0 {
            wait_ms = wait_ms.min(stalled_since + send_ms - now);
        }
        activity.wake_at.store(now + wait_ms, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            _ = activity.rearm.notified() => {}
        }
    }
}

// ----- per connection ---------------------------------------------------------------------------

pub struct ConnInfo {
    pub client: Arc<str>,
    pub http1: bool,
    pub activity: Arc<Activity>,
    /// Set to make the HTTP/2 frame guard send GOAWAY ENHANCE_YOUR_CALM and close.
    pub calm: Arc<AtomicBool>,
    /// How long the body pump waits for request-body bytes (service.rs)
    pub body_timeout: Duration,
    dropped: Mutex<RateCap>,
    kill: Notify,
}

impl ConnInfo {
    /// A request dropped before Python answered it; too many a second ends the connection
    /// (the counterpart, above hyper, of the guard's RST_STREAM cap).
    pub fn stream_dropped(&self) {
        if self.dropped.lock().unwrap().hit() {
            self.kill();
        }
    }

    /// End the connection: HTTP/1.1 at once, HTTP/2 with GOAWAY ENHANCE_YOUR_CALM.
    pub fn kill(&self) {
        self.kill.notify_one();
    }
}

/// Marks, for the send timeout, when writes to the client stall and when they move again;
/// and holds the connection's gate ticket, so a connection Python admitted is reported
/// closed when its socket is, after an upgraded tunnel too.
pub struct SendClock<IO> {
    io: IO,
    activity: Arc<Activity>,
    _ticket: Option<GateTicket>,
}

impl<IO> SendClock<IO> {
    fn track<T>(&self, polled: Poll<io::Result<T>>, moved: impl Fn(&T) -> bool) -> Poll<io::Result<T>> {
        match &polled {
            Poll::Pending => self.activity.write_stalled(),
            Poll::Ready(Ok(done)) if moved(done) => self.activity.write_moved(),
            _ => {}
        }
        polled
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendClock<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendClock<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(polled, |n| *n > 0)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(polled, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.track(polled, |_| true)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// ----- the connection gate --------------------------------------------------------------------

/// A connection Python's gate admitted; dropped, it tells Python the connection closed.
pub struct GateTicket {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        self.shared.push(Event::Closed { id: self.id });
    }
}

/// Ask Python's gate about a new connection (before its handshake). `Err`: refused, or no
/// verdict within `wait` (Python's loop is stuck: refused too; a late "yes" is handed back
/// by `admit` for Python to uncount).
async fn admission(shared: &Arc<Shared>, client: &Arc<str>, wait: Duration) -> Result<GateTicket, ()> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::oneshot::channel();
    shared.inner.lock().unwrap().admissions.insert(id, tx);
    shared.push(Event::Open { id, client: client.clone() });
    let admitted = match tokio::time::timeout(wait, rx).await {
        Ok(verdict) => verdict.unwrap_or(false),
        Err(_) => {
            shared.inner.lock().unwrap().admissions.remove(&id);
            false
        }
    };
    if admitted {
        Ok(GateTicket { shared: shared.clone(), id })
    } else {
        Err(())
    }
}

struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs one hyper connection to its end: normally, on stop (graceful: GOAWAY or
/// keep-alive off, requests in flight finish), on a flood (HTTP/2: GOAWAY
/// ENHANCE_YOUR_CALM by the frame guard; HTTP/1.1: closed), or on a timeout.
macro_rules! drive {
    ($conn:expr, $info:expr, $settings:expr, $stop:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let watchdog = watchdog($info.activity.clone(), $settings);
        tokio::pin!(watchdog);
        let mut drain = DRAIN_LIMIT;
        if !*$stop.borrow() {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = $info.kill.notified() => {
                    if $info.http1 {
                        return;
                    }
                    $info.calm.store(true, Ordering::Relaxed); // the guard's next read acts
                    let _ = tokio::time::timeout(LINGER, conn.as_mut()).await;
                    return;
                }
                expiry = &mut watchdog => match expiry {
                    // a head (or header block) dripping in: cut, nothing to answer yet
                    Expiry::HeadTimeout => return,
                    // the client does not read: nothing more can reach it
                    Expiry::SendTimeout => return,
                    Expiry::Idle if $info.http1 && !$info.activity.busy() => return,
                    // HTTP/2: GOAWAY below; nothing is in flight, so h2 only waits for the
                    // client to acknowledge it (its PING), which a live client does at once
                    Expiry::Idle => drain = LINGER,
                },
                _ = $stop.changed() => {}
            }
        }
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(drain, conn).await;
    }};
}

async fn connection(tcp: tokio::net::TcpStream, client: Arc<str>, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let _live = LiveGuard(ctx.shared.clone());
    let settings = *ctx.settings.read().unwrap();
    let ticket = if settings.gated {
        match admission(&ctx.shared, &client, settings.handshake_timeout).await {
            Ok(ticket) => Some(ticket),
            Err(()) => return, // over the cap: closed before the handshake
        }
    } else {
        None
    };
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(settings.handshake_timeout, ctx.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        _ => return,
    };
    let http1 = tls.get_ref().1.alpn_protocol() != Some(b"h2");
    let info = Arc::new(ConnInfo {
        client,
        http1,
        activity: Arc::new(Activity::new()),
        calm: Arc::new(AtomicBool::new(false)),
        body_timeout: settings.body_timeout,
        dropped: Mutex::new(RateCap::new(settings.caps.dropped_per_second)),
        kill: Notify::new(),
    });
    let svc = {
        let (shared, info) = (ctx.shared.clone(), info.clone());
        service_fn(move |req| service::handle(shared.clone(), info.clone(), req))
    };
    let io = SendClock { io: tls, activity: info.activity.clone(), _ticket: ticket };
    if http1 {
        let io = HeadClock::new(io, info.activity.clone());
        let mut h1 = ctx.h1.clone();
        h1.http1_max_headers(settings.max_header_fields).max_buf_size(settings.max_head_bytes.max(H1_BUFFER));
        drive!(h1.serve_connection(io, svc).with_upgrades(), info, settings, stop);
    } else {
        let io = FrameGuard::new(io, settings.caps, info.activity.clone(), info.calm.clone());
        drive!(ctx.h2.serve_connection(io, svc), info, settings, stop);
    }
}

pub async fn serve(listener: std::net::TcpListener, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("h2front: cannot listen: {err}");
            return;
        }
    };
    tokio::spawn(waker(ctx.shared.clone()));
    while !*stop.borrow() {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await; // EMFILE and the like
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        ctx.shared.live.fetch_add(1, Ordering::SeqCst);
        let client: Arc<str> = Arc::from(peer.ip().to_string());
        tokio::spawn(connection(tcp, client, ctx.clone(), stop.clone()));
    }
    drop(listener); // stop accepting; connections drain (Python waits, bounded)
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    while ctx.shared.live.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
