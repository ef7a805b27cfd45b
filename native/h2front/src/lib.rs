//! Verge's native HTTPS front (`verge.http._h2front`): TLS and HTTP/2 in one Rust thread,
//! the application in Python.
//!
//! Why: the Python HTTP/2 server (h2 on the ssl module) costs about four times what nginx
//! does per request. Here rustls terminates TLS (the certificate picked by SNI from a table
//! Python swaps on reload) and hyper/h2 frame the streams, on a current-thread tokio runtime
//! of its own. Requests do not call into Python: they are queued, and an eventfd wakes the
//! worker's asyncio loop, which takes a whole batch with `take()` and answers with one
//! `respond()` call (design B of .notes/H2_SPIKE.md). No code in this thread takes the GIL.
//!
//! Events handed to Python (tuples, first item the kind):
//!   (0, id, method, path, authority|None, [(name, value)], has_body, client)  a request
//!   (1, id, data)   request body bytes (credit comes back with `ack`)
//!   (2, id)         request body complete
//!   (3, id)         stream gone (client reset, connection closed)
//!   (4, id)         the response stream drained below the low-water mark
//!
//! Flood caps: SETTINGS_MAX_CONCURRENT_STREAMS and MAX_HEADER_LIST_SIZE (h2 enforces both);
//! Debian's h2 0.3.13 carries the pending-accept-reset limit (rapid reset); a connection whose
//! clients drop more than RESET_LIMIT unanswered streams is closed. Not handled yet: the
//! CONTINUATION flood (h2 < 0.3.26) and the 2024 reset-flood fix (see H2_SPIKE.md).

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::unix::io::FromRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::HttpBody;
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::{HeaderMap, StatusCode};
use hyper::server::conn::Http;
use hyper::service::service_fn;
use hyper::{Body, Request, Response};
use pyo3::exceptions::{PyConnectionResetError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

const BODY_WINDOW: usize = 256 * 1024; // request-body bytes queued for Python, unread
const HIGH_WATER: usize = 256 * 1024; // response bytes queued before Python's writer waits
const LOW_WATER: usize = 64 * 1024; // ... and wakes again below this
const RESET_LIMIT: u32 = 200; // unanswered streams a client may drop per connection
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_LIMIT: Duration = Duration::from_secs(30); // the thread's own bound after stop
const NAME_CACHE: usize = 256; // header names kept as Python bytes objects

// ----- certificates: the SNI table ------------------------------------------------------

/// Certificates by host name, swapped whole on reload: an exact name, then `*.parent` for
/// one more label, then the default (None: the handshake is refused). The same rules as
/// verge.http.tls.HostTable; names arrive normalised by Python.
#[derive(Default)]
struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = server_name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(key) = self.exact.get(&name) {
                return Some(key.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(key) = self.wildcard.get(parent) {
                    return Some(key.clone());
                }
            }
        }
        self.default.clone()
    }
}

struct Resolver(Arc<RwLock<Arc<CertTable>>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello) -> Option<Arc<CertifiedKey>> {
        let table = self.0.read().unwrap().clone();
        table.lookup(hello.server_name())
    }
}

/// (chain DER list, key DER, OCSP DER or None) from Python.
type CertParts = (Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>);

fn certified_key(parts: CertParts) -> PyResult<Arc<CertifiedKey>> {
    let (chain, key, ocsp) = parts;
    if chain.is_empty() {
        return Err(PyValueError::new_err("certificate chain is empty"));
    }
    let signing = rustls::sign::any_supported_type(&rustls::PrivateKey(key))
        .map_err(|_| PyValueError::new_err("unsupported or invalid private key"))?;
    let mut certified = CertifiedKey::new(chain.into_iter().map(rustls::Certificate).collect(), signing);
    certified.ocsp = ocsp.filter(|der| !der.is_empty());
    Ok(Arc::new(certified))
}

/// entries: [(hosts, chain, key, ocsp)]; the first entry naming a host wins.
fn build_table(entries: Vec<(Vec<String>, Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>)>, default: Option<CertParts>) -> PyResult<CertTable> {
    let mut table = CertTable::default();
    for (hosts, chain, key, ocsp) in entries {
        let certified = certified_key((chain, key, ocsp))?;
        for host in hosts {
            match host.strip_prefix("*.") {
                Some(parent) => table.wildcard.entry(parent.to_owned()).or_insert_with(|| certified.clone()),
                None => table.exact.entry(host).or_insert_with(|| certified.clone()),
            };
        }
    }
    table.default = default.map(certified_key).transpose()?;
    Ok(table)
}

fn tls_config(table: Arc<RwLock<Arc<CertTable>>>) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder()
        .with_safe_defaults()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(table)));
    cfg.alpn_protocols = vec![b"h2".to_vec()]; // this increment serves HTTP/2 only
    if let Ok(ticketer) = rustls::Ticketer::new() {
        cfg.ticketer = ticketer; // per process; Verge's shared key ring: not yet
    }
    Arc::new(cfg)
}

// ----- the queue between the tokio thread and the asyncio loop ---------------------------

enum Event {
    Request { id: u64, method: hyper::Method, uri: hyper::Uri, headers: HeaderMap, has_body: bool, client: Arc<str> },
    Data { id: u64, data: Bytes },
    End { id: u64 },
    Gone { id: u64 },
    Room { id: u64 },
}

/// One response stream Python writes into (the async path). Only the map of open streams
/// holds the sender: `finish` drops it, which ends the body.
struct OutStream {
    tx: mpsc::UnboundedSender<Chunk>,
    flow: Arc<Flow>,
}

/// Bytes queued for a response stream, and whether its writer waits for room.
#[derive(Default)]
struct Flow {
    queued: AtomicUsize,
    wants_room: AtomicBool,
}

enum Chunk {
    Data(Bytes),
    Abort,
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    waiters: HashMap<u64, oneshot::Sender<Response<OutBody>>>,
    bodies: HashMap<u64, Arc<Semaphore>>,
    streams: HashMap<u64, Arc<OutStream>>,
}

struct Shared {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    efd: i32,
    live: AtomicUsize,
    kick: Notify,
}

impl Shared {
    /// Queue an event (tokio thread only); the first one of a batch schedules the wake-up.
    fn push(&self, event: Event) {
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
async fn waker(shared: Arc<Shared>) {
    loop {
        shared.kick.notified().await;
        tokio::task::yield_now().await;
        shared.wake_python();
    }
}

// ----- response bodies -----------------------------------------------------------------------

/// A whole body (the fast path) or a stream Python writes into.
enum OutBody {
    Full(Option<Bytes>),
    Stream(StreamBody),
}

struct StreamBody {
    rx: mpsc::UnboundedReceiver<Chunk>,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
    id: u64,
    done: bool,
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
        match self.get_mut() {
            OutBody::Full(data) => Poll::Ready(data.take().map(Ok)),
            OutBody::Stream(stream) => match stream.rx.poll_recv(cx) {
                Poll::Ready(Some(Chunk::Data(data))) => {
                    let left = stream.flow.queued.fetch_sub(data.len(), Ordering::AcqRel) - data.len();
                    if left <= LOW_WATER && stream.flow.wants_room.swap(false, Ordering::AcqRel) {
                        stream.shared.push(Event::Room { id: stream.id });
                    }
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
        matches!(self, OutBody::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            OutBody::Full(Some(data)) => hyper::body::SizeHint::with_exact(data.len() as u64),
            OutBody::Full(None) => hyper::body::SizeHint::with_exact(0),
            OutBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

fn bare_response(status: u16) -> Response<OutBody> {
    let mut response = Response::new(OutBody::Full(None));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    response
}

// ----- per connection and per stream ------------------------------------------------------

struct ConnInfo {
    client: Arc<str>,
    resets: AtomicU32,
    kill: Notify,
}

/// Notes a stream dropped before Python answered it: Python hears `Gone`, and a client
/// dropping too many closes its connection.
struct StreamGuard {
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    id: u64,
    answered: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.shared.inner.lock().unwrap().waiters.remove(&self.id);
        self.shared.push(Event::Gone { id: self.id });
        if self.conn.resets.fetch_add(1, Ordering::Relaxed) + 1 >= RESET_LIMIT {
            self.conn.kill.notify_one();
        }
    }
}

async fn handle(shared: Arc<Shared>, conn: Arc<ConnInfo>, req: Request<Body>) -> Result<Response<OutBody>, Infallible> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let has_body = !body.is_end_stream();
    let (tx, rx) = oneshot::channel();
    let mut guard = StreamGuard { shared: shared.clone(), conn: conn.clone(), id, answered: false };
    let credit = has_body.then(|| Arc::new(Semaphore::new(BODY_WINDOW)));
    let first = {
        let mut inner = shared.inner.lock().unwrap();
        inner.waiters.insert(id, tx);
        if let Some(credit) = &credit {
            inner.bodies.insert(id, credit.clone());
        }
        inner.events.push(Event::Request {
            id,
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            has_body,
            client: conn.client.clone(),
        });
        inner.events.len() == 1
    };
    if first {
        shared.kick.notify_one();
    }
    if let Some(credit) = credit {
        tokio::spawn(pump_body(shared.clone(), id, body, credit));
    }
    let response = rx.await.unwrap_or_else(|_| bare_response(503));
    guard.answered = true;
    Ok(response)
}

/// Request body to Python, at most BODY_WINDOW bytes ahead of what it has read.
async fn pump_body(shared: Arc<Shared>, id: u64, mut body: Body, credit: Arc<Semaphore>) {
    'read: loop {
        match body.data().await {
            None => {
                shared.push(Event::End { id });
                break;
            }
            Some(Err(_)) => {
                shared.push(Event::Gone { id });
                break;
            }
            Some(Ok(mut data)) => {
                while !data.is_empty() {
                    let part = data.split_to(data.len().min(BODY_WINDOW));
                    match credit.acquire_many(part.len() as u32).await {
                        Ok(permit) => permit.forget(),
                        Err(_) => break 'read, // Python discarded the body
                    }
                    shared.push(Event::Data { id, data: part });
                }
            }
        }
    }
    shared.inner.lock().unwrap().bodies.remove(&id);
}

struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    client: Arc<str>,
    acceptor: tokio_rustls::TlsAcceptor,
    http: Arc<Http>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _live = LiveGuard(shared.clone());
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        _ => return,
    };
    let info = Arc::new(ConnInfo { client, resets: AtomicU32::new(0), kill: Notify::new() });
    let svc_info = info.clone();
    let svc = service_fn(move |req| handle(shared.clone(), svc_info.clone(), req));
    let conn = http.serve_connection(tls, svc);
    tokio::pin!(conn);
    if !*stop.borrow() {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = info.kill.notified() => return, // too many dropped streams: close
            _ = stop.changed() => {}
        }
    }
    conn.as_mut().graceful_shutdown(); // GOAWAY; streams in flight finish
    let _ = conn.await;
}

async fn serve(listener: std::net::TcpListener, http: Arc<Http>, tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("h2front: cannot listen: {err}");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(waker(shared.clone()));
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
        shared.live.fetch_add(1, Ordering::SeqCst);
        let client: Arc<str> = Arc::from(peer.ip().to_string());
        tokio::spawn(connection(tcp, client, acceptor.clone(), http.clone(), shared.clone(), stop.clone()));
    }
    drop(listener); // stop accepting; connections drain (Python waits, bounded)
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    while shared.live.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ----- the Python API ---------------------------------------------------------------------

/// A response head built once (status + fields) and reused for every response that shares it.
#[pyclass(frozen)]
struct Head {
    status: StatusCode,
    headers: HeaderMap,
}

#[pymethods]
impl Head {
    #[getter]
    fn status(&self) -> u16 {
        self.status.as_u16()
    }
}

fn make_head(status: u16, fields: &PyList) -> PyResult<Head> {
    let status = StatusCode::from_u16(status).map_err(|_| PyValueError::new_err("bad status"))?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for item in fields.iter() {
        let (name, value): (&[u8], &[u8]) = item.extract()?;
        let name = HeaderName::from_bytes(name).map_err(|_| PyValueError::new_err("bad header name"))?;
        let value = HeaderValue::from_bytes(value).map_err(|_| PyValueError::new_err("bad header value"))?;
        headers.append(name, value);
    }
    Ok(Head { status, headers })
}

fn with_head(head: &Head, body: OutBody) -> Response<OutBody> {
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers.clone();
    response
}

fn body_bytes(obj: &PyAny) -> PyResult<Bytes> {
    if let Ok(data) = obj.downcast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(data.as_bytes()));
    }
    let mut joined = BytesMut::new(); // a sequence of bytes parts
    for part in obj.iter()? {
        joined.extend_from_slice(part?.downcast::<PyBytes>()?.as_bytes());
    }
    Ok(joined.freeze())
}

#[pyclass]
struct Server {
    shared: Arc<Shared>,
    certs: Arc<RwLock<Arc<CertTable>>>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    names: HashMap<HeaderName, Py<PyBytes>>,
}

impl Server {
    fn name_bytes(&mut self, py: Python, name: &HeaderName) -> Py<PyBytes> {
        if let Some(known) = self.names.get(name) {
            return known.clone_ref(py);
        }
        let made: Py<PyBytes> = PyBytes::new(py, name.as_str().as_bytes()).into();
        if self.names.len() < NAME_CACHE {
            self.names.insert(name.clone(), made.clone_ref(py));
        }
        made
    }

    fn event_tuple(&mut self, py: Python, event: Event) -> PyObject {
        match event {
            Event::Request { id, method, uri, headers, has_body, client } => {
                let fields = PyList::empty(py);
                for (name, value) in headers.iter() {
                    let name = self.name_bytes(py, name);
                    let _ = fields.append((name, PyBytes::new(py, value.as_bytes())));
                }
                let path = uri.path_and_query().map(|p| PyBytes::new(py, p.as_str().as_bytes()));
                let authority = uri.authority().map(|a| PyBytes::new(py, a.as_str().as_bytes()));
                let method = PyBytes::new(py, method.as_str().as_bytes());
                (0u8, id, method, path, authority, fields, has_body, &*client).into_py(py)
            }
            Event::Data { id, data } => (1u8, id, PyBytes::new(py, &data)).into_py(py),
            Event::End { id } => (2u8, id).into_py(py),
            Event::Gone { id } => (3u8, id).into_py(py),
            Event::Room { id } => (4u8, id).into_py(py),
        }
    }
}

#[pymethods]
impl Server {
    /// Serve TLS + HTTP/2 on a listening socket (its fd is now owned by the server).
    #[new]
    #[args(default = "None", max_streams = "100", max_header_list = "65536", stream_window = "262144", connection_window = "1048576")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        fd: i32,
        certs: Vec<(Vec<String>, Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>)>,
        default: Option<CertParts>,
        max_streams: u32,
        max_header_list: u32,
        stream_window: u32,
        connection_window: u32,
    ) -> PyResult<Self> {
        let table = Arc::new(RwLock::new(Arc::new(build_table(certs, default)?)));
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(PyOSError::new_err("eventfd failed"));
        }
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        listener.set_nonblocking(true).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let shared = Arc::new(Shared { inner: Mutex::new(Inner::default()), next_id: AtomicU64::new(1), efd, live: AtomicUsize::new(0), kick: Notify::new() });
        let mut http = Http::new();
        http.http2_only(true)
            .http2_max_concurrent_streams(max_streams)
            .http2_max_header_list_size(max_header_list)
            .http2_initial_stream_window_size(stream_window)
            .http2_initial_connection_window_size(connection_window)
            .http2_max_send_buf_size(256 * 1024);
        let (http, tls, thread_shared) = (Arc::new(http), tls_config(table.clone()), shared.clone());
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("verge-h2front".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
                runtime.block_on(serve(listener, http, tls, thread_shared, stopped));
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(Server { shared, certs: table, stop, thread: Some(thread), names: HashMap::new() })
    }

    /// The eventfd to watch (loop.add_reader): readable while events wait.
    fn fileno(&self) -> i32 {
        self.shared.efd
    }

    /// Every waiting event, as tuples (see the module docs).
    fn take<'p>(&mut self, py: Python<'p>) -> &'p PyList {
        let mut counter = 0u64;
        unsafe { libc::read(self.shared.efd, &mut counter as *mut u64 as *mut libc::c_void, 8) };
        let events = std::mem::take(&mut self.shared.inner.lock().unwrap().events);
        let list = PyList::empty(py);
        for event in events {
            let _ = list.append(self.event_tuple(py, event));
        }
        list
    }

    /// A reusable response head from a status and [(name, value)] (lower-case bytes).
    fn head(&self, status: u16, fields: &PyList) -> PyResult<Head> {
        make_head(status, fields)
    }

    /// Whole responses: [(id, Head, body)]; body is bytes or a sequence of bytes. Answers
    /// to streams that are gone are dropped.
    fn respond(&self, answers: &PyList) -> PyResult<()> {
        let mut ready = Vec::with_capacity(answers.len());
        for item in answers.iter() {
            let item: &PyTuple = item.downcast()?;
            let id: u64 = item.get_item(0)?.extract()?;
            let head: PyRef<Head> = item.get_item(1)?.extract()?;
            let body = body_bytes(item.get_item(2)?)?;
            let body = if body.is_empty() { None } else { Some(body) };
            ready.push((id, with_head(&head, OutBody::Full(body))));
        }
        let mut inner = self.shared.inner.lock().unwrap();
        for (id, response) in ready {
            if let Some(tx) = inner.waiters.remove(&id) {
                let _ = tx.send(response);
            }
        }
        Ok(())
    }

    /// Start a streamed response; False when the stream is gone.
    fn start_stream(&self, id: u64, head: PyRef<Head>) -> bool {
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow::default());
        let out = Arc::new(OutStream { tx, flow: flow.clone() });
        let body = StreamBody { rx, flow, shared: self.shared.clone(), id, done: false };
        let mut inner = self.shared.inner.lock().unwrap();
        let Some(waiter) = inner.waiters.remove(&id) else { return false };
        inner.streams.insert(id, out);
        drop(inner);
        waiter.send(with_head(&head, OutBody::Stream(body))).is_ok()
    }

    /// Queue body bytes; True when the writer should wait for room (event 4).
    fn send(&self, id: u64, data: &PyBytes) -> PyResult<bool> {
        let out = self.shared.inner.lock().unwrap().streams.get(&id).cloned();
        let Some(out) = out else { return Err(PyConnectionResetError::new_err("stream closed")) };
        let data = data.as_bytes();
        let full = out.flow.queued.load(Ordering::Acquire) + data.len() > HIGH_WATER;
        if full {
            out.flow.wants_room.store(true, Ordering::Release);
        }
        out.flow.queued.fetch_add(data.len(), Ordering::AcqRel);
        out.tx
            .send(Chunk::Data(Bytes::copy_from_slice(data)))
            .map_err(|_| PyConnectionResetError::new_err("stream closed"))?;
        Ok(full)
    }

    /// Response bytes queued and not yet taken by HTTP/2 (None: the stream is gone).
    fn queued(&self, id: u64) -> Option<usize> {
        let inner = self.shared.inner.lock().unwrap();
        inner.streams.get(&id).map(|out| out.flow.queued.load(Ordering::Acquire))
    }

    /// End a streamed response (END_STREAM after the queued bytes).
    fn finish(&self, id: u64) {
        self.shared.inner.lock().unwrap().streams.remove(&id);
    }

    /// Reset a streamed response (RST_STREAM) or answer a pending one with a bare 500.
    fn abort(&self, id: u64) {
        let mut inner = self.shared.inner.lock().unwrap();
        if let Some(out) = inner.streams.remove(&id) {
            let _ = out.tx.send(Chunk::Abort);
        } else if let Some(waiter) = inner.waiters.remove(&id) {
            let _ = waiter.send(bare_response(500));
        }
    }

    /// Give back credit for `count` request-body bytes Python has read.
    fn ack(&self, id: u64, count: usize) {
        if let Some(credit) = self.shared.inner.lock().unwrap().bodies.get(&id) {
            credit.add_permits(count);
        }
    }

    /// Python will not read the rest of this request body.
    fn discard_body(&self, id: u64) {
        if let Some(credit) = self.shared.inner.lock().unwrap().bodies.remove(&id) {
            credit.close();
        }
    }

    /// Swap the certificate table (new handshakes use it; open connections keep theirs).
    #[args(default = "None")]
    fn set_certs(&self, certs: Vec<(Vec<String>, Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>)>, default: Option<CertParts>) -> PyResult<()> {
        let table = Arc::new(build_table(certs, default)?);
        *self.certs.write().unwrap() = table;
        Ok(())
    }

    /// Open connections (including those in their TLS handshake).
    fn connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Stop accepting and send GOAWAY on every connection; streams in flight finish.
    /// Returns at once: the asyncio loop must keep answering meanwhile.
    fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Wait for the server thread (after `shutdown` and the drain).
    fn join(&mut self, py: Python) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            py.allow_threads(|| {
                let _ = thread.join();
            });
        }
    }
}

#[pymodule]
fn _h2front(_py: Python, m: &PyModule) -> PyResult<()> {
    m.add_class::<Server>()?;
    m.add_class::<Head>()?;
    m.add("BODY_WINDOW", BODY_WINDOW)?;
    m.add("HIGH_WATER", HIGH_WATER)?;
    Ok(())
}
