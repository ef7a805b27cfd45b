//! The queue between the tokio thread and the worker's asyncio loop, and the response bodies
//! Python fills.
//!
//! Nothing here takes the GIL: the tokio side pushes `Event`s under a mutex and writes an
//! eventfd once per scheduler pass; Python drains the whole batch with `take()` and answers
//! with `respond()` (whole responses) or `start_stream()` + `send()` (streamed ones).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::HttpBody;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::http::{HeaderMap, StatusCode};
use hyper::Response;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use crate::conn::Flight;
use crate::http1::Tunnel;

pub const BODY_WINDOW: usize = 256 * 1024; // request-body bytes queued for Python, unread
pub const HIGH_WATER: usize = 256 * 1024; // response bytes queued before Python's writer waits
const LOW_WATER: usize = 64 * 1024; // ... and wakes again below this

/// What Python hears about, in `take()` order (see lib.rs for the tuples).
pub enum Event {
    Request {
        id: u64,
        method: hyper::Method,
        uri: hyper::Uri,
        headers: HeaderMap,
        body: BodyState,
        client: Arc<str>,
        version: hyper::Version,
    },
    Data { id: u64, data: Bytes },
    End { id: u64 },
    Gone { id: u64 },
    Room { id: u64 },
    /// A connection accepted while the connection gate is on: Python admits it or not
    /// (`admit`); `id` is the connection's, in the same space as the requests'.
    Open { id: u64, client: Arc<str> },
    /// A connection Python admitted has closed.
    Closed { id: u64 },
}

/// Whether a request has a body, and whether it waits for Python's first read
/// (`Expect: 100-continue`: the client sends it after the 100 that reading brings).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    None = 0,
    Ready = 1,
    OnRead = 2,
}

/// Python's answer to one request: the response, whether an HTTP/1.1 connection closes
/// after it (`Connection: close`; HTTP/2 ignores it), and for an accepted upgrade (a 101)
/// what the splice needs.
pub struct Answer {
    pub response: Response<OutBody>,
    pub close: bool,
    pub tunnel: Option<Tunnel>,
}

impl Answer {
    pub fn bare(status: u16) -> Self {
        let mut response = Response::new(OutBody::empty());
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        Answer { response, close: false, tunnel: None }
    }

    /// A short plain-text answer that closes an HTTP/1.1 connection (the Python server's
    /// protocol-error answers: `simple_response(..., close=True)`).
    pub fn closing(status: u16, text: &'static str) -> Self {
        let mut answer = Answer::bare(status);
        *answer.response.body_mut() = OutBody::full(Bytes::from_static(text.as_bytes()));
        let type_ = HeaderValue::from_static("text/plain; charset=utf-8");
        answer.response.headers_mut().insert(CONTENT_TYPE, type_);
        answer.close = true;
        answer
    }
}

/// One response stream Python writes into (the async path, and an upgraded connection's
/// bytes to the client). Only the map of open streams holds the sender: `finish` drops it,
/// which ends the body.
pub struct OutStream {
    pub tx: mpsc::UnboundedSender<Chunk>,
    pub flow: Arc<Flow>,
}

/// Bytes queued for a response stream, and whether its writer waits for room.
#[derive(Default)]
pub struct Flow {
    pub queued: AtomicUsize,
    pub wants_room: AtomicBool,
}

impl Flow {
    /// `count` bytes left the queue; tells Python when a waiting writer has room again.
    pub fn taken(&self, count: usize, shared: &Shared, id: u64) {
        let left = self.queued.fetch_sub(count, Ordering::AcqRel) - count;
        if left <= LOW_WATER && self.wants_room.swap(false, Ordering::AcqRel) {
            shared.push(Event::Room { id });
        }
    }
}

/// Python's credit for one request body (or upgraded connection): the bytes it may be sent
/// ahead of reading (`ack` gives them back), whether it started reading (`start_body`, for
/// a body sent on 100 Continue) and whether it gave up on the rest.
pub struct Credit {
    pub permits: Semaphore,
    pub wanted: Notify,
    pub discarded: Notify,
}

impl Credit {
    pub fn new() -> Arc<Self> {
        Arc::new(Credit { permits: Semaphore::new(BODY_WINDOW), wanted: Notify::new(), discarded: Notify::new() })
    }

    /// Python will not read more: the reader stops now, even while it waits for bytes
    /// (hyper then drops the rest of an HTTP/1.1 body by closing after the response).
    pub fn discard(&self) {
        self.permits.close();
        self.discarded.notify_one();
    }
}

pub enum Chunk {
    Data(Bytes),
    Abort,
}

#[derive(Default)]
pub struct Inner {
    pub events: Vec<Event>,
    pub waiters: HashMap<u64, oneshot::Sender<Answer>>,
    pub bodies: HashMap<u64, Arc<Credit>>,
    pub streams: HashMap<u64, Arc<OutStream>>,
    /// Connections waiting for Python's verdict on the connection gate (`admit`).
    pub admissions: HashMap<u64, oneshot::Sender<bool>>,
}

pub struct Shared {
    pub inner: Mutex<Inner>,
    pub next_id: AtomicU64,
    pub efd: i32,
    pub live: AtomicUsize,
    pub kick: Notify,
}

impl Shared {
    pub fn new(efd: i32) -> Self {
        Shared { inner: Mutex::new(Inner::default()), next_id: AtomicU64::new(1), efd, live: AtomicUsize::new(0), kick: Notify::new() }
    }

    /// Queue an event (tokio thread only); the first one of a batch schedules the wake-up.
    pub fn push(&self, event: Event) {
        let first = {
            let mut inner = self.inner.lock().unwrap();
            inner.events.push(event);
            inner.events.len() == 1
        };
        if first {
            self.kick.notify_one();
        }
    }

    fn wake_python(&self) {
        let one: u64 = 1;
        unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Writes the eventfd once per scheduler pass rather than per request: after a kick it
/// yields, so the connections made ready by the same poll queue their requests first, and
/// the asyncio loop (often on the same core) wakes once for the whole batch.
pub async fn waker(shared: Arc<Shared>) {
    loop {
        shared.kick.notified().await;
        tokio::task::yield_now().await;
        shared.wake_python();
    }
}

// ----- response bodies -----------------------------------------------------------------------

/// A response body: whole (the fast path) or a stream Python writes into. It carries the
/// request's `Flight`, so the connection counts it as busy until hyper has sent (or dropped)
/// the last byte.
pub struct OutBody {
    kind: BodyKind,
    _flight: Option<Flight>,
}

enum BodyKind {
    Full(Option<Bytes>),
    Stream(StreamBody),
}

impl OutBody {
    pub fn empty() -> Self {
        OutBody { kind: BodyKind::Full(None), _flight: None }
    }

    pub fn full(data: Bytes) -> Self {
        let data = if data.is_empty() { None } else { Some(data) };
        OutBody { kind: BodyKind::Full(data), _flight: None }
    }

    pub fn stream(stream: StreamBody) -> Self {
        OutBody { kind: BodyKind::Stream(stream), _flight: None }
    }

    pub fn set_flight(&mut self, flight: Flight) {
        self._flight = Some(flight);
    }
}

pub struct StreamBody {
    pub rx: mpsc::UnboundedReceiver<Chunk>,
    pub flow: Arc<Flow>,
    pub shared: Arc<Shared>,
    pub id: u64,
    pub done: bool,
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.shared.inner.lock().unwrap().streams.remove(&self.id);
        if !self.done {
            self.shared.push(Event::Gone { id: self.id }); // a writer may be waiting for room
        }
    }
}

impl HttpBody for OutBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_data(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Full(data) => Poll::Ready(data.take().map(Ok)),
            BodyKind::Stream(stream) => match stream.rx.poll_recv(cx) {
                Poll::Ready(Some(Chunk::Data(data))) => {
                    stream.flow.taken(data.len(), &stream.shared, stream.id);
                    Poll::Ready(Some(Ok(data)))
                }
                Poll::Ready(Some(Chunk::Abort)) => {
                    stream.done = true;
                    Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::Other, "aborted"))))
                }
                Poll::Ready(None) => {
                    stream.done = true;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn poll_trailers(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, Self::Error>> {
        Poll::Ready(Ok(None))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, BodyKind::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.kind {
            BodyKind::Full(Some(data)) => hyper::body::SizeHint::with_exact(data.len() as u64),
            BodyKind::Full(None) => hyper::body::SizeHint::with_exact(0),
            BodyKind::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}
