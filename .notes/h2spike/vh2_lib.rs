//! Spike: hyper 0.14 HTTP/2 over tokio-rustls in a Rust thread, answering from Python.
//! Mode "callback": the tokio thread takes the GIL and calls a Python callable per request.
//! Mode "queue": requests are queued, an eventfd wakes an asyncio loop, which answers in batches.
use bytes::Bytes;
use hyper::{server::conn::Http, service::service_fn, Body, Request, Response};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch, Notify};
use tokio_rustls::rustls;

type Answer = (u16, Vec<(String, String)>, Bytes);

#[derive(Default)]
struct Queue {
    pending: Vec<(u64, String, String, String, Vec<(String, String)>)>,
    waiters: HashMap<u64, oneshot::Sender<Answer>>,
}

struct Shared {
    queue: Mutex<Queue>,
    next_id: AtomicU64,
    efd: i32,
}

enum Mode {
    Callback(PyObject),
    Queue(Arc<Shared>),
}

fn tls_config(cert_der: &str, key_der: &str) -> Arc<rustls::ServerConfig> {
    let cert = rustls::Certificate(std::fs::read(cert_der).expect("cert"));
    let key = rustls::PrivateKey(std::fs::read(key_der).expect("key"));
    let mut cfg = rustls::ServerConfig::builder()
        .with_safe_defaults()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("cert/key");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::Ticketer::new().expect("ticketer");
    Arc::new(cfg)
}

fn extract_answer(obj: &PyAny) -> PyResult<Answer> {
    let t: &PyTuple = obj.downcast()?;
    let status: u16 = t.get_item(0)?.extract()?;
    let hdrs: &PyList = t.get_item(1)?.downcast()?;
    let mut headers = Vec::with_capacity(hdrs.len());
    for h in hdrs.iter() {
        headers.push(h.extract::<(String, String)>()?);
    }
    let body: &PyBytes = t.get_item(2)?.downcast()?;
    Ok((status, headers, Bytes::copy_from_slice(body.as_bytes())))
}

fn build_response(a: Answer) -> Response<Body> {
    let mut b = Response::builder().status(a.0);
    for (k, v) in a.1 {
        b = b.header(k, v);
    }
    b.body(Body::from(a.2)).unwrap()
}

/// Counts service futures dropped before they finished (client RST_STREAM, or conn gone).
struct ResetGuard {
    done: bool,
    resets: Arc<AtomicU32>,
    limit: u32,
    kill: Arc<Notify>,
}
impl Drop for ResetGuard {
    fn drop(&mut self) {
        if !self.done && self.resets.fetch_add(1, Ordering::Relaxed) + 1 >= self.limit {
            self.kill.notify_one();
        }
    }
}

async fn handle(
    mode: Arc<Mode>,
    req: Request<Body>,
    resets: Arc<AtomicU32>,
    kill: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    let mut guard = ResetGuard { done: false, resets, limit: 200, kill };
    let method = req.method().as_str().to_owned();
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let authority = req.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
    let headers: Vec<(String, String)> = req.headers().iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
    let answer = match &*mode {
        Mode::Callback(handler) => Python::with_gil(|py| {
            handler
                .call1(py, (method, path, authority, headers))
                .and_then(|r| extract_answer(r.as_ref(py)))
                .unwrap_or_else(|e| {
                    e.print(py);
                    (500, vec![], Bytes::new())
                })
        }),
        Mode::Queue(shared) => {
            let (tx, rx) = oneshot::channel();
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let wake = {
                let mut q = shared.queue.lock().unwrap();
                let was_empty = q.pending.is_empty();
                q.pending.push((id, method, path, authority, headers));
                q.waiters.insert(id, tx);
                was_empty
            };
            if wake {
                let one: u64 = 1;
                unsafe { libc::write(shared.efd, &one as *const u64 as *const _, 8) };
            }
            rx.await.unwrap_or((503, vec![], Bytes::new()))
        }
    };
    guard.done = true;
    Ok(build_response(answer))
}

async fn serve(port: u16, tls: Arc<rustls::ServerConfig>, mode: Arc<Mode>, mut stop: watch::Receiver<bool>, max_streams: u32) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut http = Http::new();
    http.http2_max_concurrent_streams(max_streams)
        .http2_max_header_list_size(64 * 1024)
        .http2_max_send_buf_size(256 * 1024);
    let http = Arc::new(http);
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, http, mode, mut stop) = (acceptor.clone(), http.clone(), mode.clone(), stop.clone());
        let live = live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            struct Live(Arc<std::sync::atomic::AtomicUsize>);
            impl Drop for Live { fn drop(&mut self) { self.0.fetch_sub(1, Ordering::SeqCst); } }
            let _live = Live(live);
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let resets = Arc::new(AtomicU32::new(0));
            let kill = Arc::new(Notify::new());
            let (r2, k2) = (resets.clone(), kill.clone());
            let svc = service_fn(move |req| handle(mode.clone(), req, r2.clone(), k2.clone()));
            let conn = http.serve_connection(tls, svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = kill.notified() => { eprintln!("vh2: closing connection after {} early resets", resets.load(Ordering::Relaxed)); return }
                _ = stop.changed() => {}
            }
            conn.as_mut().graceful_shutdown(); // GOAWAY, finish in-flight streams
            let _ = conn.await;
        });
    }
    // drain: let every connection send GOAWAY and finish its in-flight streams (bounded)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while live.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[pyclass]
struct Server {
    shared: Option<Arc<Shared>>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[pymethods]
impl Server {
    /// Eventfd to add_reader() on (queue mode).
    fn fileno(&self) -> i32 {
        self.shared.as_ref().map(|s| s.efd).unwrap_or(-1)
    }
    /// Drain queued requests: list of (id, method, path).
    fn take<'p>(&self, py: Python<'p>) -> &'p PyList {
        let shared = self.shared.as_ref().unwrap();
        let mut buf = 0u64;
        unsafe { libc::read(shared.efd, &mut buf as *mut u64 as *mut _, 8) };
        let items = std::mem::take(&mut shared.queue.lock().unwrap().pending);
        PyList::new(py, items.into_iter().map(|(id, m, p, a, h)| -> PyObject { (id, m, p, a, h).into_py(py) }))
    }
    /// Answer queued requests: list of (id, status, headers, body).
    fn respond(&self, answers: &PyList) -> PyResult<()> {
        let shared = self.shared.as_ref().unwrap();
        let mut parsed = Vec::with_capacity(answers.len());
        for a in answers.iter() {
            let t: &PyTuple = a.downcast()?;
            let id: u64 = t.get_item(0)?.extract()?;
            parsed.push((id, extract_answer(t.get_slice(1, 4))?));
        }
        let mut q = shared.queue.lock().unwrap();
        for (id, ans) in parsed {
            if let Some(tx) = q.waiters.remove(&id) {
                let _ = tx.send(ans);
            }
        }
        Ok(())
    }
    /// Graceful stop: GOAWAY on every connection, then the thread ends.
    fn stop(&mut self, py: Python) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            py.allow_threads(|| {
                let _ = t.join();
            });
        }
    }
}

#[pyfunction]
fn start(port: u16, cert_der: String, key_der: String, handler: Option<PyObject>, max_streams: Option<u32>) -> Server {
    let tls = tls_config(&cert_der, &key_der);
    let (shared, mode) = match handler {
        Some(h) => (None, Mode::Callback(h)),
        None => {
            let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            let s = Arc::new(Shared { queue: Mutex::new(Queue::default()), next_id: AtomicU64::new(0), efd });
            (Some(s.clone()), Mode::Queue(s))
        }
    };
    let mode = Arc::new(mode);
    let (tx, rx) = watch::channel(false);
    let max_streams = max_streams.unwrap_or(100);
    let thread = std::thread::Builder::new()
        .name("vh2-tokio".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(serve(port, tls, mode, rx, max_streams));
            // let graceful shutdowns finish (bounded)
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        })
        .unwrap();
    Server { shared, stop: tx, thread: Some(thread) }
}

#[pymodule]
fn vh2(_py: Python, m: &PyModule) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(start, m)?)?;
    m.add_class::<Server>()?;
    Ok(())
}
