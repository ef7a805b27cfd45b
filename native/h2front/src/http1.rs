//! HTTP/1.1 specifics: the head clock (for the header timeout) and upgraded connections
//! (WebSocket) spliced to Python.
//!
//! hyper parses HTTP/1.1 itself, strictly (httparse: no obs-fold, differing Content-Lengths
//! refused, chunk sizes checked; patched: Content-Length with Transfer-Encoding refused, the
//! field count from Python's byte cap, see patches/); what it does not do, and Python does
//! (native_h2.py, the rules of verge/http/server.py), is the Host, target and size checks.
//!
//! An `Upgrade` request that Python accepts (`Server.upgrade`) is answered 101 through the
//! usual waiter; hyper then hands over the raw connection and `splice` copies it both ways:
//! bytes from the client become Data/End events (with the request-body credit, so Python
//! runs at most BODY_WINDOW behind), bytes from Python arrive on the stream channel `send`
//! feeds (with its room events). This is the native side of verge.http.server's
//! UpgradedStream, which verge/edge/tunnel.py splices to the origin.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use crate::bridge::{Chunk, Credit, Event, Flow, Shared};
use crate::conn::Activity;

const READ_CHUNK: usize = 16 * 1024;

/// Starts the header timer when the first byte of a request head arrives, that is, when
/// bytes arrive while no request is in flight. (hyper 0.14.19's own header timer restarts
/// on every read, so a client sending one byte a second never hits it.)
pub struct HeadClock<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO> HeadClock<IO> {
    pub fn new(io: IO, activity: Arc<Activity>) -> Self {
        HeadClock { io, activity }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadClock<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before && !self.activity.busy() {
            self.activity.head_started();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadClock<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What Python's `upgrade()` sets up for the splice: the channel its `send()` feeds, and
/// the credit its `ack()` returns.
pub struct Tunnel {
    pub rx: mpsc::UnboundedReceiver<Chunk>,
    pub flow: Arc<Flow>,
    pub credit: Arc<Credit>,
}

/// Copies an upgraded connection both ways until Python closes it (`abort`, after the
/// bytes it queued) or the client's side fails. The client closing its side is an End
/// event; Python decides when the tunnel ends.
pub async fn splice(shared: Arc<Shared>, id: u64, upgrade: OnUpgrade, tunnel: Tunnel) {
    let io = match upgrade.await {
        Ok(io) => io,
        Err(_) => {
            shared.push(Event::Gone { id });
            return forget(&shared, id);
        }
    };
    let (mut from_client, mut to_client) = tokio::io::split(io);
    let Tunnel { mut rx, flow, credit } = tunnel;
    let reader = async {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // credit first, so Python never has more than BODY_WINDOW bytes waiting
            let Ok(permit) = credit.permits.acquire_many(READ_CHUNK as u32).await else { break };
            match from_client.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    permit.forget();
                    credit.permits.add_permits(READ_CHUNK - n);
                    shared.push(Event::Data { id, data: Bytes::copy_from_slice(&buf[..n]) });
                }
                Ok(_) => {
                    shared.push(Event::End { id });
                    break;
                }
                Err(_) => {
                    shared.push(Event::Gone { id });
                    break;
                }
            }
        }
        std::future::pending::<()>().await // the writer decides when the tunnel ends
    };
    let writer = async {
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Chunk::Data(data) => {
                    let sent = to_client.write_all(&data).await;
                    flow.taken(data.len(), &shared, id);
                    if sent.is_err() {
                        shared.push(Event::Gone { id });
                        return;
                    }
                }
                Chunk::Abort => break,
            }
        }
        let _ = to_client.shutdown().await;
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    forget(&shared, id);
}

fn forget(shared: &Shared, id: u64) {
    let mut inner = shared.inner.lock().unwrap();
    inner.streams.remove(&id);
    inner.bodies.remove(&id);
}
