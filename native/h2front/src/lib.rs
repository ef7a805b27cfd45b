//! Verge's native HTTPS front (`verge.http._h2front`): TLS, HTTP/2 and HTTP/1.1 in one Rust
//! thread, the application in Python.
//!
//! Why: the Python HTTP/2 server (h2 on the ssl module) costs about four times what nginx
//! does per request. Here rustls terminates TLS (the certificate picked by SNI from a table
//! Python swaps on reload, session tickets sealed with the node's shared keys) and hyper
//! frames the requests, on a current-thread tokio runtime of its own. Requests do not call
//! into Python: they are queued, and an eventfd wakes the worker's asyncio loop, which takes
//! a whole batch with `take()` and answers with one `respond()` call (design B of
//! .notes/H2_SPIKE.md). No code in this thread takes the GIL.
//!
//! The modules, one concern each:
//!   tls.rs      certificates by SNI, ALPN (h2, http/1.1), shared session tickets
//!   conn.rs     accept loop, per-connection driver, timeouts
//!   guard.rs    the HTTP/2 frame guard (CONTINUATION, reset, PING/SETTINGS... floods)
//!   http1.rs    HTTP/1.1: the head clock, upgraded connections (WebSocket) spliced to Python
//!   service.rs  one request of either protocol: queued, body streamed, answer awaited
//!   bridge.rs   the event queue and the response bodies Python fills
//!
//! Events handed to Python (tuples, first item the kind):
//!   (0, id, method, target, authority|None, [(name, value)], body, client, version)
//!        a request; body 0: none, 1: one, 2: one sent on 100 Continue, that is once Python
//!        starts reading (`start_body`); version "2", "1.1" or "1.0"; HTTP/1.x targets are
//!        as sent (Python normalises them), HTTP/2 ones are :path
//!   (1, id, data)   request body (or upgraded connection) bytes; credit comes back with `ack`
//!   (2, id)         request body complete (upgraded: the client closed its side)
//!   (3, id)         request gone (client reset, connection closed, body timeout)
//!   (4, id)         the response stream drained below the low-water mark
//!   (5, id, client) a connection to admit or refuse (`admit`), while the gate is on
//!   (6, id)         an admitted connection closed

mod bridge;
mod conn;
mod guard;
mod http1;
mod service;
mod tls;

use std::collections::HashMap;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::{HeaderMap, StatusCode};
use hyper::server::conn::Http;
use hyper::{Response, Uri, Version};
use pyo3::exceptions::{PyConnectionResetError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use tokio::sync::{mpsc, watch};

use bridge::{Answer, Chunk, Credit, Event, Flow, OutBody, OutStream, Shared, StreamBody, BODY_WINDOW, HIGH_WATER};
use conn::{Ctx, Settings, H1_BUFFER};
use guard::Caps;
use http1::Tunnel;
use tls::{CertEntry, CertParts, SharedCerts, SharedTickets};

const NAME_CACHE: usize = 256; // header names kept as Python bytes objects
const HEADER_BLOCK_SLACK: u32 = 1024; // frame headers of a block split in several frames

// ----- limits ---------------------------------------------------------------------------------

fn default_settings(max_header_list: u32) -> Settings {
    Settings {
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(75),
        body_timeout: Duration::from_secs(60),
        send_timeout: Duration::from_secs(60),
        max_header_fields: 100,
        max_head_bytes: H1_BUFFER,
        gated: false,
        caps: Caps {
            max_header_block: max_header_list + HEADER_BLOCK_SLACK,
            resets: 100,
            server_resets: 100,
            pings: 50,
            settings: 20,
            window_updates: 1000,
            empty_data: 100,
            other: 1000,
            dropped_per_second: 100,
        },
    }
}

fn seconds(value: &PyAny) -> PyResult<Duration> {
    let secs: f64 = value.extract()?;
    if !(secs > 0.0 && secs < 1e9) {
        return Err(PyValueError::new_err("a timeout is a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Applies {name: value} to the settings; unknown names are an error (a typo must not pass).
fn apply_limits(settings: &mut Settings, limits: &PyDict) -> PyResult<()> {
    for (key, value) in limits.iter() {
        let key: &str = key.extract()?;
        let caps = &mut settings.caps;
        match key {
            "handshake_timeout" => settings.handshake_timeout = seconds(value)?,
            "header_timeout" => settings.header_timeout = seconds(value)?,
            "keepalive_timeout" => settings.keepalive_timeout = seconds(value)?,
            "body_timeout" => settings.body_timeout = seconds(value)?,
            "send_timeout" => settings.send_timeout = seconds(value)?,
            "max_header_fields" => settings.max_header_fields = value.extract()?,
            "max_head_bytes" => settings.max_head_bytes = value.extract()?,
            "connection_gate" => settings.gated = value.extract()?,
            "resets_per_second" => caps.resets = value.extract()?,
            "server_resets_per_second" => caps.server_resets = value.extract()?,
            "pings_per_second" => caps.pings = value.extract()?,
            "settings_per_second" => caps.settings = value.extract()?,
            "window_updates_per_second" => caps.window_updates = value.extract()?,
            "empty_data_per_second" => caps.empty_data = value.extract()?,
            "other_frames_per_second" => caps.other = value.extract()?,
            "dropped_per_second" => caps.dropped_per_second = value.extract()?,
            _ => return Err(PyValueError::new_err(format!("unknown limit {key:?}"))),
        }
    }
    Ok(())
}

// ----- response heads -------------------------------------------------------------------------

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

/// An HTTP/1.x request-target as sent: origin-form, absolute-form (Python reduces it and
/// takes its authority as Host), asterisk-form, or a CONNECT's authority-form.
fn h1_target(uri: &Uri) -> String {
    if uri.scheme().is_some() {
        uri.to_string()
    } else if let Some(path) = uri.path_and_query() {
        path.as_str().to_owned()
    } else if let Some(authority) = uri.authority() {
        authority.as_str().to_owned()
    } else {
        "/".to_owned()
    }
}

// ----- the server -------------------------------------------------------------------------------

#[pyclass]
struct Server {
    shared: Arc<Shared>,
    certs: SharedCerts,
    tickets: Arc<SharedTickets>,
    settings: Arc<RwLock<Settings>>,
    stop: watch::Sender<bool>,
    // every method takes &self (interior mutability): `join` waits with the GIL released,
    // and the loop's `take` must not then fail with "Already borrowed"
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    names: Mutex<HashMap<HeaderName, Py<PyBytes>>>,
    versions: [Py<PyString>; 3], // "2", "1.1", "1.0"
}

impl Server {
    fn name_bytes(names: &mut HashMap<HeaderName, Py<PyBytes>>, py: Python, name: &HeaderName) -> Py<PyBytes> {
        if let Some(known) = names.get(name) {
            return known.clone_ref(py);
        }
        let made: Py<PyBytes> = PyBytes::new(py, name.as_str().as_bytes()).into();
        if names.len() < NAME_CACHE {
            names.insert(name.clone(), made.clone_ref(py));
        }
        made
    }

    fn event_tuple(&self, py: Python, names: &mut HashMap<HeaderName, Py<PyBytes>>, event: Event) -> PyObject {
        match event {
            Event::Request { id, method, uri, headers, body, client, version } => {
                let body = body as u8;
                let fields = PyList::empty(py);
                for (name, value) in headers.iter() {
                    let name = Self::name_bytes(names, py, name);
                    let _ = fields.append((name, PyBytes::new(py, value.as_bytes())));
                }
                let method = PyBytes::new(py, method.as_str().as_bytes());
                if version == Version::HTTP_2 {
                    let path = uri.path_and_query().map(|p| PyBytes::new(py, p.as_str().as_bytes()));
                    let authority = uri.authority().map(|a| PyBytes::new(py, a.as_str().as_bytes()));
                    let version = self.versions[0].clone_ref(py);
                    (0u8, id, method, path, authority, fields, body, &*client, version).into_py(py)
                } else {
                    let target = PyBytes::new(py, h1_target(&uri).as_bytes());
                    let version = self.versions[if version == Version::HTTP_10 { 2 } else { 1 }].clone_ref(py);
                    (0u8, id, method, target, py.None(), fields, body, &*client, version).into_py(py)
                }
            }
            Event::Data { id, data } => (1u8, id, PyBytes::new(py, &data)).into_py(py),
            Event::End { id } => (2u8, id).into_py(py),
            Event::Gone { id } => (3u8, id).into_py(py),
            Event::Room { id } => (4u8, id).into_py(py),
            Event::Open { id, client } => (5u8, id, &*client).into_py(py),
            Event::Closed { id } => (6u8, id).into_py(py),
        }
    }
}

fn http_builders(max_streams: u32, max_header_list: u32, stream_window: u32, connection_window: u32) -> (Http, Http) {
    let mut h2 = Http::new();
    h2.http2_only(true)
        .http2_max_concurrent_streams(max_streams)
        .http2_max_header_list_size(max_header_list)
        .http2_initial_stream_window_size(stream_window)
        .http2_initial_connection_window_size(connection_window)
        .http2_max_send_buf_size(256 * 1024);
    let mut h1 = Http::new();
    h1.http1_only(true)
        .http1_keep_alive(true)
        .http1_title_case_headers(true) // "Content-Type", as nginx and the Python server write
        .max_buf_size(H1_BUFFER);
    (h1, h2)
}

#[pymethods]
impl Server {
    /// Serve TLS (HTTP/2 and HTTP/1.1 by ALPN) on a listening socket (its fd is now owned by
    /// the server). `limits`: see `set_limits`.
    #[new]
    #[args(default = "None", max_streams = "100", max_header_list = "65536", stream_window = "262144", connection_window = "1048576", limits = "None")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python,
        fd: i32,
        certs: Vec<CertEntry>,
        default: Option<CertParts>,
        max_streams: u32,
        max_header_list: u32,
        stream_window: u32,
        connection_window: u32,
        limits: Option<&PyDict>,
    ) -> PyResult<Self> {
        let table: SharedCerts = Arc::new(RwLock::new(Arc::new(tls::build_table(certs, default)?)));
        let mut settings = default_settings(max_header_list);
        if let Some(limits) = limits {
            apply_limits(&mut settings, limits)?;
        }
        let settings = Arc::new(RwLock::new(settings));
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(PyOSError::new_err("eventfd failed"));
        }
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        listener.set_nonblocking(true).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let shared = Arc::new(Shared::new(efd));
        let tickets = Arc::new(SharedTickets::new());
        let (h1, h2) = http_builders(max_streams, max_header_list, stream_window, connection_window);
        let ctx = Arc::new(Ctx {
            acceptor: tokio_rustls::TlsAcceptor::from(tls::server_config(table.clone(), tickets.clone())),
            h1,
            h2,
            shared: shared.clone(),
            settings: settings.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("verge-h2front".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
                runtime.block_on(conn::serve(listener, ctx, stopped));
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let versions = ["2", "1.1", "1.0"].map(|v| PyString::new(py, v).into());
        let (thread, names) = (Mutex::new(Some(thread)), Mutex::new(HashMap::new()));
        Ok(Server { shared, certs: table, tickets, settings, stop, thread, names, versions })
    }

    /// The eventfd to watch (loop.add_reader): readable while events wait.
    fn fileno(&self) -> i32 {
        self.shared.efd
    }

    /// Every waiting event, as tuples (see the module docs).
    fn take<'p>(&self, py: Python<'p>) -> &'p PyList {
        let mut counter = 0u64;
        unsafe { libc::read(self.shared.efd, &mut counter as *mut u64 as *mut libc::c_void, 8) };
        let events = std::mem::take(&mut self.shared.inner.lock().unwrap().events);
        let list = PyList::empty(py);
        let mut names = self.names.lock().unwrap();
        for event in events {
            let _ = list.append(self.event_tuple(py, &mut names, event));
        }
        list
    }

    /// A reusable response head from a status and [(name, value)] (bytes).
    fn head(&self, status: u16, fields: &PyList) -> PyResult<Head> {
        make_head(status, fields)
    }

    /// Whole responses: [(id, Head, body)] or [(id, Head, body, close)]; body is bytes or a
    /// sequence of bytes; `close` ends an HTTP/1.1 connection after the response. Answers
    /// to requests that are gone are dropped.
    fn respond(&self, answers: &PyList) -> PyResult<()> {
        let mut ready = Vec::with_capacity(answers.len());
        for item in answers.iter() {
            let item: &PyTuple = item.downcast()?;
            let id: u64 = item.get_item(0)?.extract()?;
            let head: PyRef<Head> = item.get_item(1)?.extract()?;
            let body = body_bytes(item.get_item(2)?)?;
            let close = item.len() > 3 && item.get_item(3)?.is_true()?;
            ready.push((id, Answer { response: with_head(&head, OutBody::full(body)), close, tunnel: None }));
        }
        let mut inner = self.shared.inner.lock().unwrap();
        for (id, answer) in ready {
            if let Some(tx) = inner.waiters.remove(&id) {
                let _ = tx.send(answer);
            }
        }
        Ok(())
    }

    /// Start a streamed response; False when the request is gone.
    #[args(close = "false")]
    fn start_stream(&self, id: u64, head: PyRef<Head>, close: bool) -> bool {
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow::default());
        let body = StreamBody { rx, flow: flow.clone(), shared: self.shared.clone(), id, done: false };
        let mut inner = self.shared.inner.lock().unwrap();
        let Some(waiter) = inner.waiters.remove(&id) else { return false };
        inner.streams.insert(id, Arc::new(OutStream { tx, flow }));
        drop(inner);
        let response = with_head(&head, OutBody::stream(body));
        waiter.send(Answer { response, close, tunnel: None }).is_ok()
    }

    /// Accept an HTTP/1.1 upgrade: answer with `head` (a 101 whose fields include Upgrade
    /// and Connection), then the connection is a byte stream: the client's bytes arrive as
    /// events 1 and 2 (`ack` them), `send` writes to it, `finish` or `abort` closes it.
    /// False when the request is gone.
    fn upgrade(&self, id: u64, head: PyRef<Head>) -> bool {
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow::default());
        let credit = Credit::new();
        let mut inner = self.shared.inner.lock().unwrap();
        let Some(waiter) = inner.waiters.remove(&id) else { return false };
        inner.streams.insert(id, Arc::new(OutStream { tx, flow: flow.clone() }));
        inner.bodies.insert(id, credit.clone());
        drop(inner);
        let tunnel = Tunnel { rx, flow, credit };
        let answer = Answer { response: with_head(&head, OutBody::empty()), close: false, tunnel: Some(tunnel) };
        if waiter.send(answer).is_ok() {
            return true;
        }
        let mut inner = self.shared.inner.lock().unwrap();
        inner.streams.remove(&id);
        inner.bodies.remove(&id);
        false
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

    /// Response bytes queued and not yet taken by the protocol (None: the stream is gone).
    fn queued(&self, id: u64) -> Option<usize> {
        let inner = self.shared.inner.lock().unwrap();
        inner.streams.get(&id).map(|out| out.flow.queued.load(Ordering::Acquire))
    }

    /// End a streamed response (END_STREAM or the last chunk after the queued bytes).
    fn finish(&self, id: u64) {
        self.shared.inner.lock().unwrap().streams.remove(&id);
    }

    /// Reset a streamed response (RST_STREAM; HTTP/1.1: the connection closes) or answer a
    /// pending one with a bare 500.
    fn abort(&self, id: u64) {
        let mut inner = self.shared.inner.lock().unwrap();
        if let Some(out) = inner.streams.remove(&id) {
            let _ = out.tx.send(Chunk::Abort);
        } else if let Some(waiter) = inner.waiters.remove(&id) {
            let _ = waiter.send(Answer::bare(500));
        }
    }

    /// Give back credit for `count` request-body bytes Python has read.
    fn ack(&self, id: u64, count: usize) {
        if let Some(credit) = self.shared.inner.lock().unwrap().bodies.get(&id) {
            credit.permits.add_permits(count);
        }
    }

    /// Python starts reading this request body: one sent on 100 Continue (body 2 in the
    /// request event) is asked for now.
    fn start_body(&self, id: u64) {
        if let Some(credit) = self.shared.inner.lock().unwrap().bodies.get(&id) {
            credit.wanted.notify_one();
        }
    }

    /// The connection gate's verdicts: [(id, admitted)] for Open events. Returns the ids
    /// admitted too late (the connection gave up waiting and closed): Python uncounts them.
    fn admit(&self, verdicts: Vec<(u64, bool)>) -> Vec<u64> {
        let mut late = Vec::new();
        let mut inner = self.shared.inner.lock().unwrap();
        for (id, admitted) in verdicts {
            let delivered = match inner.admissions.remove(&id) {
                Some(waiter) => waiter.send(admitted).is_ok(),
                None => false,
            };
            if admitted && !delivered {
                late.push(id);
            }
        }
        late
    }

    /// Python will not read the rest of this request body.
    fn discard_body(&self, id: u64) {
        if let Some(credit) = self.shared.inner.lock().unwrap().bodies.remove(&id) {
            credit.discard();
        }
    }

    /// Swap the certificate table (new handshakes use it; open connections keep theirs).
    #[args(default = "None")]
    fn set_certs(&self, certs: Vec<CertEntry>, default: Option<CertParts>) -> PyResult<()> {
        let table = Arc::new(tls::build_table(certs, default)?);
        *self.certs.write().unwrap() = table;
        Ok(())
    }

    /// The node's session ticket keys, 80 bytes each (verge.http.tls_tickets.TicketKey
    /// .to_bytes()), the encrypting key first; all of them open presented tickets.
    fn set_ticket_keys(&self, keys: Vec<Vec<u8>>) -> PyResult<()> {
        self.tickets.set_keys(&keys)
    }

    /// The names of the ticket keys in use, encrypting key first.
    fn ticket_key_names<'p>(&self, py: Python<'p>) -> Vec<&'p PyBytes> {
        self.tickets.key_names().iter().map(|name| PyBytes::new(py, name)).collect()
    }

    /// Timeouts (seconds: handshake_timeout, header_timeout, keepalive_timeout,
    /// body_timeout, send_timeout), HTTP/1.1 head limits (max_header_fields,
    /// max_head_bytes), the connection gate (connection_gate: True while Python's gate is
    /// on) and HTTP/2 flood caps (per second: resets, server_resets, pings, settings,
    /// window_updates, empty_data, other_frames, dropped; each `<name>_per_second`). New
    /// connections use them.
    fn set_limits(&self, limits: &PyDict) -> PyResult<()> {
        let mut settings = *self.settings.read().unwrap();
        apply_limits(&mut settings, limits)?;
        *self.settings.write().unwrap() = settings;
        Ok(())
    }

    /// Open connections (including those in their TLS handshake).
    fn connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Stop accepting and send GOAWAY on every connection (HTTP/1.1: keep-alive off);
    /// requests in flight finish. Returns at once: the asyncio loop must keep answering.
    fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Wait for the server thread (after `shutdown` and the drain).
    fn join(&self, py: Python) {
        let _ = self.stop.send(true);
        let thread = self.thread.lock().unwrap().take();
        if let Some(thread) = thread {
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
    m.add("TICKET_KEY_BYTES", tls::KEY_BYTES)?;
    Ok(())
}
