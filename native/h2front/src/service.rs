//! One request, either protocol: queue it for Python, stream its body, wait for the answer.
//!
//! HTTP/2 streams and HTTP/1.1 requests take the same path; what differs is said where it
//! differs (the `Connection: close` an HTTP/1.1 answer may carry, and the upgrade handle of
//! an HTTP/1.1 `Upgrade` request, kept until Python accepts or refuses it).
//!
//! The body pump reads at most BODY_WINDOW bytes ahead of Python, and:
//!   * `Expect: 100-continue` (HTTP/1.x): it reads nothing until Python starts reading
//!     (`start_body`); hyper sends the 100 Continue when the body is first polled, so a
//!     request refused unread (413, 429...) never gets one, as on the Python server;
//!   * the body timeout: a client that sends nothing of its body for `body_timeout`
//!     (while the pump waits for it, not while Python is busy) gets 408 and the connection
//!     closes (HTTP/1.1; HTTP/2: the stream is reset), as the Python server's sweeper does.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::HttpBody;
use hyper::header::{HeaderValue, CONNECTION, EXPECT, UPGRADE};
use hyper::{Body, Request, Response, Version};
use tokio::sync::oneshot;

use crate::bridge::{Answer, BodyState, Credit, Event, OutBody, Shared, BODY_WINDOW};
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
    // (Smuggling: a request with both Content-Length and Transfer-Encoding never gets here;
    // patched hyper refuses it, see patches/hyper-0.14.19-verge.patch. So a chunked body
    // ends where hyper's decoder says, and the connection stays open after it.)
    let body_state = body_state(&req);
    let (parts, body) = req.into_parts();
    let (tx, rx) = oneshot::channel();
    let mut guard = StreamGuard { shared: shared.clone(), conn: conn.clone(), id, answered: false };
    let credit = (body_state != BodyState::None).then(Credit::new);
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
            body: body_state,
            client: conn.client.clone(),
            version: parts.version,
        });
        inner.events.len() == 1
    };
    if first {
        shared.kick.notify_one();
    }
    if let Some(credit) = credit {
        let on_read = body_state == BodyState::OnRead;
        tokio::spawn(pump_body(shared.clone(), conn.clone(), id, body, credit, on_read));
    }
    let answer = rx.await.unwrap_or_else(|_| Answer::bare(503));
    guard.answered = true;
    let Answer { mut response, close, tunnel } = answer;
    if conn.http1 && close {
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

fn body_state(req: &Request<Body>) -> BodyState {
    if req.body().is_end_stream() {
        return BodyState::None;
    }
    let expects = |value: &HeaderValue| value.as_bytes().eq_ignore_ascii_case(b"100-continue");
    // HTTP/1.x (hyper answers `Expect` on 1.0 too, as the Python server does)
    if req.version() != Version::HTTP_2 && req.headers().get(EXPECT).is_some_and(expects) {
        BodyState::OnRead
    } else {
        BodyState::Ready
    }
}

/// Request body to Python, at most BODY_WINDOW bytes ahead of what it has read (`on_read`:
/// from Python's first read on); see the module docs.
async fn pump_body(shared: Arc<Shared>, conn: Arc<ConnInfo>, id: u64, body: Body, credit: Arc<Credit>, on_read: bool) {
    let wanted = !on_read
        || tokio::select! {
            _ = credit.wanted.notified() => true,
            _ = credit.discarded.notified() => false,
        };
    if wanted {
        read_body(&shared, &conn, id, body, &credit).await;
    }
    shared.inner.lock().unwrap().bodies.remove(&id);
}

async fn read_body(shared: &Shared, conn: &ConnInfo, id: u64, mut body: Body, credit: &Credit) {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(conn.body_timeout, body.data()) => next,
            _ = credit.discarded.notified() => return,
        };
        let Ok(next) = next else {
            return body_timed_out(shared, conn, id);
        };
        match next {
            None => return shared.push(Event::End { id }),
            Some(Err(_)) => {
                // HTTP/1.1: a malformed body (a bad chunk) is the client's error, and hyper
                // waits for the answer; HTTP/2: the stream is gone, and so is its waiter.
                let waiter = shared.inner.lock().unwrap().waiters.remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Answer { close: true, ..Answer::bare(400) });
                }
                return shared.push(Event::Gone { id });
            }
            Some(Ok(mut data)) => {
                while !data.is_empty() {
                    let part = data.split_to(data.len().min(BODY_WINDOW));
                    match credit.permits.acquire_many(part.len() as u32).await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return, // Python discarded the body
                    }
                    shared.push(Event::Data { id, data: part });
                }
            }
        }
    }
}

/// No body bytes for `body_timeout`: 408 if Python has not answered yet (HTTP/1.1: then
/// the connection closes), else the connection ends (HTTP/1.1) or the stream is reset when
/// the pump drops the body (HTTP/2). Python hears that the request is gone.
fn body_timed_out(shared: &Shared, conn: &ConnInfo, id: u64) {
    let waiter = shared.inner.lock().unwrap().waiters.remove(&id);
    match waiter {
        Some(waiter) => drop(waiter.send(Answer::closing(408, "request body timeout\n"))),
        None if conn.http1 => conn.kill(),
        None => {}
    }
    shared.push(Event::Gone { id });
}
