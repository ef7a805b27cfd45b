//! One request, either protocol: queue it for Python, stream its body, wait for the answer.
//!
//! HTTP/2 streams and HTTP/1.1 requests take the same path; what differs is said where it
//! differs (the `Connection: close` an HTTP/1.1 answer may carry, and the upgrade handle of
//! an HTTP/1.1 `Upgrade` request, kept until Python accepts or refuses it).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::HttpBody;
use hyper::header::{HeaderValue, CONNECTION, TRANSFER_ENCODING, UPGRADE};
use hyper::{Body, Request, Response};
use tokio::sync::oneshot;

use crate::bridge::{Answer, Credit, Event, OutBody, Shared, BODY_WINDOW};
use crate::conn::{ConnInfo, Flight};
use crate::http1;

/// Notes a request dropped before Python answered it (a client reset, a closed connection):
/// Python hears `Gone`, and a client dropping streams too fast loses its connection.
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
        self.conn.stream_dropped();
    }
}

pub async fn handle(shared: Arc<Shared>, conn: Arc<ConnInfo>, mut req: Request<Body>) -> Result<Response<OutBody>, Infallible> {
    let flight = Flight::start(&conn.activity);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    // hyper keeps the upgrade handle of an HTTP/1.1 `Upgrade` request in its extensions;
    // it resolves to the raw connection once a 101 has been sent (see http1.rs), and is
    // dropped unused when Python answers otherwise.
    let upgrade = (conn.http1 && req.headers().contains_key(UPGRADE)).then(|| hyper::upgrade::on(&mut req));
    // Smuggling: hyper drops a Content-Length that follows Transfer-Encoding and frames the
    // body as chunked. That is what RFC 9112 §6.3 says, but it also says to close after such
    // a request, and hyper does not tell us which requests had both: so the connection
    // closes after every chunked request (bytes after the body are never read as a request).
    let close_after = conn.http1 && req.headers().contains_key(TRANSFER_ENCODING);
    let (parts, body) = req.into_parts();
    let has_body = !body.is_end_stream();
    let (tx, rx) = oneshot::channel();
    let mut guard = StreamGuard { shared: shared.clone(), conn: conn.clone(), id, answered: false };
    let credit = has_body.then(Credit::new);
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
            version: parts.version,
        });
        inner.events.len() == 1
    };
    if first {
        shared.kick.notify_one();
    }
    if let Some(credit) = credit {
        tokio::spawn(pump_body(shared.clone(), id, body, credit));
    }
    let answer = rx.await.unwrap_or_else(|_| Answer::bare(503));
    guard.answered = true;
    let Answer { mut response, close, tunnel } = answer;
    if conn.http1 && (close || close_after) {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(tunnel) = tunnel {
        match upgrade {
            Some(upgrade) => drop(tokio::spawn(http1::splice(shared.clone(), id, upgrade, tunnel))),
            None => shared.push(Event::Gone { id }), // not an upgradable request
        }
    }
    response.body_mut().set_flight(flight); // busy until hyper has sent the whole body
    Ok(response)
}

/// Request body to Python, at most BODY_WINDOW bytes ahead of what it has read.
async fn pump_body(shared: Arc<Shared>, id: u64, mut body: Body, credit: Arc<Credit>) {
    'read: loop {
        let next = tokio::select! {
            next = body.data() => next,
            _ = credit.discarded.notified() => break,
        };
        match next {
            None => {
                shared.push(Event::End { id });
                break;
            }
            Some(Err(_)) => {
                // HTTP/1.1: a malformed body (a bad chunk) is the client's error, and hyper
                // waits for the answer; HTTP/2: the stream is gone, and so is its waiter.
                let waiter = shared.inner.lock().unwrap().waiters.remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Answer { close: true, ..Answer::bare(400) });
                }
                shared.push(Event::Gone { id });
                break;
            }
            Some(Ok(mut data)) => {
                while !data.is_empty() {
                    let part = data.split_to(data.len().min(BODY_WINDOW));
                    match credit.permits.acquire_many(part.len() as u32).await {
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
