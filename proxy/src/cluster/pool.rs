//! Per-host upstream connection pools.
//!
//! One [`Pool`] per host. HTTP/1.1 connections are kept in a LIFO idle stack and lent to one
//! request at a time; ordinary requests are written and read by our own codec (`h1.rs`) in the
//! request's task, upgrades and chunked uploads by hyper's connection-level client on the same
//! kind of connection. HTTP/2 uses one shared multiplexed hyper connection. Compared with hyper-util's generic pooled client this
//! needs no pool key (the pool *is* the host), no absolute-form URI, and no task per request to
//! watch for the connection becoming idle: the response body hands the connection back when it
//! ends. Connections enforce the cluster's `max_connections` / `max_pending_requests` breakers,
//! apply `connect_timeout` and TCP_NODELAY, and keep Envoy's `upstream_cx_*` stats exact.

use super::circuit_breaker::{Resource, Slot};
use super::h1;
use crate::stats::ClusterStats;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mecha_filters::stats::Counter;
use mecha_filters::{Body, BoxError};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Per-host connection counters (shown by `/clusters`).
#[derive(Default, Debug)]
pub struct ConnStats {
    pub cx_active: AtomicU64,
    pub cx_total: AtomicU64,
    pub cx_connect_fail: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub http2: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
}

/// The cluster-wide connection limits every host's pool enforces (`max_connections`,
/// `max_pending_requests`, `max_connection_pools`).
pub struct ConnLimits {
    pub connections: Arc<Resource>,
    pub pending: Arc<Resource>,
    pub cx_overflow: Counter,
    pub pending_overflow: Counter,
    /// `max_connection_pools`: a host's pool counts while it has a connection open or opening.
    pub pools: Arc<Resource>,
    pub pool_overflow: Counter,
    /// Woken whenever a connection closes, so a pending request can try again.
    pub freed: Notify,
}

/// This pool's unit of `max_connection_pools`, held from its first connection opening to its
/// last one closing (as Envoy counts a pool from creation until it is drained and removed).
/// Touched only when a connection opens or closes, never per request.
#[derive(Default)]
struct PoolHold(Mutex<(u64, Option<Slot>)>);

impl PoolHold {
    /// Counts one more connection; false when the pool has none yet and no pool unit is left.
    fn enter(&self, pools: &Arc<Resource>) -> bool {
        let mut g = self.0.lock();
        if g.1.is_none() {
            match pools.try_acquire() {
                Some(unit) => g.1 = Some(unit),
                None => return false,
            }
        }
        g.0 += 1;
        true
    }

    fn leave(&self) {
        let mut g = self.0.lock();
        g.0 = g.0.saturating_sub(1);
        if g.0 == 0 {
            g.1 = None;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection timeout")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Handshake(hyper::Error),
}

/// Why the pool could not deliver a response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// `max_connections` reached and `max_pending_requests` full (or the wait timed out).
    #[error("circuit breaker overflow: {0}")]
    Overflow(&'static str),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    /// The connection failed or was reset while the request was on it.
    #[error("{0}")]
    Http(#[source] hyper::Error),
    /// The same, seen by our HTTP/1.1 codec.
    #[error("{0}")]
    H1(#[source] h1::H1Error),
}

impl PoolError {
    /// The request's own body failed while it was being sent (a downstream client's malformed
    /// or truncated body, or a filter's error): the downstream's fault, not the upstream's.
    /// Envoy answers it as a downstream protocol error and does not count it against the host.
    pub fn is_request_body_error(&self) -> bool {
        match self {
            PoolError::H1(h1::H1Error::Body(_)) => true,
            // hyper's "error from user's Body stream": the only client-side user error that
            // carries a cause.
            PoolError::Http(e) => e.is_user() && std::error::Error::source(e).is_some(),
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    addr: SocketAddr,
    settings: PoolSettings,
    cluster: Arc<ClusterStats>,
    host: Arc<ConnStats>,
    limits: Arc<ConnLimits>,
    hold: Arc<PoolHold>,
    h1: http1::Builder,
    /// Idle HTTP/1.1 connections, most recently used last (reusing the warmest one first).
    idle: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection.
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    /// Serialises HTTP/2 connects so concurrent requests share one new connection.
    h2_connecting: tokio::sync::Mutex<()>,
    /// Requests waiting for a connection (at `max_connections`); only then do returns notify.
    waiting: AtomicUsize,
    returned: Notify,
    reaper: AtomicBool,
}

struct Idle {
    conn: IdleConn,
    since: Instant,
}

/// A pooled HTTP/1.1 connection: driven by our codec, or (once it carried an upgrade-capable or
/// chunked request) by a hyper connection task.
enum IdleConn {
    Raw(h1::Conn),
    Hyper(http1::SendRequest<Body>),
}

pub fn new_pool(
    addr: SocketAddr,
    settings: &PoolSettings,
    cluster: Arc<ClusterStats>,
    host: Arc<ConnStats>,
    limits: Arc<ConnLimits>,
) -> Pool {
    Pool {
        inner: Arc::new(Inner {
            addr,
            settings: settings.clone(),
            cluster,
            host,
            limits,
            hold: Arc::default(),
            h1: http1::Builder::new(),
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
            reaper: AtomicBool::new(false),
        }),
    }
}

impl Pool {
    /// Sends `req` on a pooled connection. An HTTP/1.1 request goes out as given (origin-form
    /// URI, its own `Host` header); an HTTP/2 request needs an absolute URI for `:authority`.
    pub async fn request(
        &self,
        req: http::Request<Body>,
    ) -> Result<http::Response<PooledBody>, PoolError> {
        self.request_with(req, None).await
    }

    /// As [`Pool::request`], with the request's headers outside `req` (`req`'s own are then
    /// ignored): a caller that may send the request again keeps them, and our HTTP/1.1 codec
    /// encodes them from there, so no copy is made per attempt. hyper's paths (HTTP/2,
    /// upgrades, chunked uploads) need them owned and get a copy.
    pub async fn request_with(
        &self,
        mut req: http::Request<Body>,
        headers: Option<&http::HeaderMap>,
    ) -> Result<http::Response<PooledBody>, PoolError> {
        if self.inner.settings.http2 {
            if let Some(h) = headers {
                *req.headers_mut() = h.clone();
            }
            self.request_h2(req).await
        } else {
            self.request_h1(req, headers).await
        }
    }

    async fn request_h1(
        &self,
        mut req: http::Request<Body>,
        mut headers: Option<&http::HeaderMap>,
    ) -> Result<http::Response<PooledBody>, PoolError> {
        let ours = h1::eligible(&req, headers.unwrap_or(req.headers()));
        loop {
            let (conn, reused) = self.inner.checkout().await?;
            let mut tx = match conn {
                IdleConn::Raw(conn) if ours => {
                    match h1::send(conn, req, headers, reused, &self.inner).await {
                        Ok(resp) => return Ok(resp.map(|b| PooledBody(Kind::Own(b)))),
                        // A kept-alive connection the server had closed: send it again on
                        // another one.
                        Err((_, Some(again))) => {
                            req = again;
                            continue;
                        }
                        Err((e, None)) => return Err(PoolError::H1(e)),
                    }
                }
                IdleConn::Raw(conn) => Box::pin(self.inner.handshake(conn)).await?,
                IdleConn::Hyper(tx) => tx,
            };
            if let Some(h) = headers.take() {
                *req.headers_mut() = h.clone();
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    // An upgraded connection belongs to the tunnel now, never to the pool.
                    let back = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (tx, self.inner.clone()));
                    return Ok(resp.map(|body| PooledBody(Kind::Hyper { body, back })));
                }
                Err(mut e) => match e.take_message() {
                    // A kept-alive connection the server closed before our request went out:
                    // nothing was sent, so try again on another connection (as hyper-util does).
                    Some(r) if reused => req = r,
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    async fn request_h2(
        &self,
        mut req: http::Request<Body>,
    ) -> Result<http::Response<PooledBody>, PoolError> {
        // One retry on a fresh connection when the shared one turned out to be closed before
        // the request went out.
        let mut first = true;
        loop {
            let mut tx = self.inner.h2_sender().await?;
            if let Err(e) = tx.ready().await {
                self.inner.forget_closed_h2();
                if std::mem::take(&mut first) {
                    continue;
                }
                return Err(PoolError::Http(e));
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(resp.map(|body| PooledBody(Kind::Hyper { body, back: None })))
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if std::mem::take(&mut first) => {
                        self.inner.forget_closed_h2();
                        req = r;
                    }
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }
}

impl Inner {
    /// An HTTP/1.1 connection for one request: an idle one, a new one, or — at `max_connections`
    /// — the first one returned or freed while waiting as a pending request (bounded by
    /// `connect_timeout`, past `max_pending_requests` an overflow). `true` when reused.
    async fn checkout(self: &Arc<Self>) -> Result<(IdleConn, bool), PoolError> {
        let mut deadline = None;
        loop {
            while let Some(idle) = self.pop_idle() {
                match idle.conn {
                    IdleConn::Raw(conn) if conn.idle_ok() => {
                        return Ok((IdleConn::Raw(conn), true))
                    }
                    IdleConn::Raw(_) => {}
                    IdleConn::Hyper(mut tx) => {
                        if tx.is_closed() {
                            continue;
                        }
                        if tx.is_ready() || tx.ready().await.is_ok() {
                            return Ok((IdleConn::Hyper(tx), true));
                        }
                    }
                }
            }
            // Armed before the checks below, so a return or close in between is not missed.
            let returned = self.returned.notified();
            let freed = self.limits.freed.notified();
            if let Some(slot) = self.limits.connections.try_acquire() {
                // Boxed, like the pending wait below: the connect and handshake states would
                // otherwise sit in (and be copied with) every request's future.
                let io = Box::pin(self.connect(slot)).await?;
                return Ok((IdleConn::Raw(h1::Conn::new(io)), false));
            }
            self.limits.cx_overflow.inc();
            let Some(_pending) = self.limits.pending.try_acquire() else {
                self.limits.pending_overflow.inc();
                return Err(PoolError::Overflow("max_pending_requests"));
            };
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.settings.connect_timeout);
            self.waiting.fetch_add(1, Ordering::AcqRel);
            let woken = Box::pin(async {
                tokio::select! {
                    _ = returned => true,
                    _ = freed => true,
                    _ = tokio::time::sleep_until(deadline) => false,
                }
            })
            .await;
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if !woken {
                return Err(PoolError::Overflow("max_connections"));
            }
        }
    }

    /// Hands a connection to hyper (for a request our codec does not take).
    async fn handshake(&self, conn: h1::Conn) -> Result<http1::SendRequest<Body>, ConnectError> {
        let (tx, conn) = self
            .h1
            .handshake(TokioIo::new(conn.io))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection error");
            }
        });
        Ok(tx)
    }

    fn pop_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock();
        let i = idle.pop()?;
        if self
            .settings
            .idle_timeout
            .is_some_and(|t| crate::clock::now_std().saturating_duration_since(i.since) >= t)
        {
            // Older entries sit below: all of them have expired too.
            idle.clear();
            return None;
        }
        Some(i)
    }

    /// Called when a response body ended on an HTTP/1.1 connection that can carry another request.
    fn put_idle(self: &Arc<Self>, tx: http1::SendRequest<Body>) {
        if tx.is_closed() {
            return;
        }
        self.push_idle(IdleConn::Hyper(tx));
    }

    /// Called by our codec's response body when it ended and the connection can be reused.
    pub(crate) fn put_idle_raw(self: &Arc<Self>, conn: h1::Conn) {
        self.push_idle(IdleConn::Raw(conn));
    }

    fn push_idle(self: &Arc<Self>, conn: IdleConn) {
        self.idle.lock().push(Idle {
            conn,
            since: crate::clock::now_std(),
        });
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.returned.notify_waiters();
        }
        if let Some(t) = self.settings.idle_timeout {
            if !self.reaper.swap(true, Ordering::AcqRel) {
                tokio::spawn(reap(Arc::downgrade(self), t));
            }
        }
    }

    async fn h2_sender(self: &Arc<Self>) -> Result<http2::SendRequest<Body>, PoolError> {
        if let Some(tx) = self.live_h2() {
            return Ok(tx);
        }
        Box::pin(self.open_h2()).await
    }

    /// Opens the shared HTTP/2 connection (one connect at a time; the others wait and share it).
    async fn open_h2(self: &Arc<Self>) -> Result<http2::SendRequest<Body>, PoolError> {
        let _connecting = self.h2_connecting.lock().await;
        if let Some(tx) = self.live_h2() {
            return Ok(tx);
        }
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        let slot = loop {
            let freed = self.limits.freed.notified();
            if let Some(slot) = self.limits.connections.try_acquire() {
                break slot;
            }
            self.limits.cx_overflow.inc();
            let Some(_pending) = self.limits.pending.try_acquire() else {
                self.limits.pending_overflow.inc();
                return Err(PoolError::Overflow("max_pending_requests"));
            };
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(PoolError::Overflow("max_connections"));
            }
        };
        let io = self.connect(slot).await?;
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new()).keep_alive_while_idle(false);
        let (tx, conn) = b
            .handshake(TokioIo::new(io))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection error");
            }
        });
        *self.h2.lock() = Some(tx.clone());
        Ok(tx)
    }

    fn live_h2(&self) -> Option<http2::SendRequest<Body>> {
        let mut g = self.h2.lock();
        match &*g {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            Some(_) => {
                *g = None;
                None
            }
            None => None,
        }
    }

    fn forget_closed_h2(&self) {
        let mut g = self.h2.lock();
        if g.as_ref().is_some_and(|t| t.is_closed()) {
            *g = None;
        }
    }

    /// Opens one TCP connection to the host, holding the `max_connections` unit it was given
    /// (and, for the pool's first connection, a `max_connection_pools` unit).
    async fn connect(&self, slot: Slot) -> Result<UpstreamStream, PoolError> {
        if !self.hold.enter(&self.limits.pools) {
            self.limits.pool_overflow.inc();
            drop(slot);
            self.limits.freed.notify_waiters();
            return Err(PoolError::Overflow("max_connection_pools"));
        }
        self.cluster.upstream_cx_total.inc();
        self.host.cx_total.fetch_add(1, Ordering::Relaxed);
        let res = match tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect(self.addr),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(ConnectError::Io(e)),
            Err(_) => {
                self.cluster.upstream_cx_connect_timeout.inc();
                Err(ConnectError::Timeout)
            }
        };
        match res {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                self.cluster.upstream_cx_active.inc();
                self.host.cx_active.fetch_add(1, Ordering::Relaxed);
                Ok(UpstreamStream {
                    inner: stream,
                    cluster: self.cluster.clone(),
                    host: self.host.clone(),
                    limits: self.limits.clone(),
                    slot: Some(slot),
                    hold: Some(self.hold.clone()),
                })
            }
            Err(e) => {
                self.cluster.upstream_cx_connect_fail.inc();
                self.host.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
                self.hold.leave();
                drop(slot);
                self.limits.freed.notify_waiters();
                Err(e.into())
            }
        }
    }
}

/// Closes idle connections older than the cluster's idle timeout; ends with the pool.
async fn reap(pool: Weak<Inner>, timeout: Duration) {
    loop {
        tokio::time::sleep(timeout / 2).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.idle.lock().retain(|i| i.since.elapsed() < timeout);
    }
}

/// An upstream response body. On an HTTP/1.1 connection it hands the connection back to the
/// pool when the body has been read to its end; a body dropped half-read takes the connection
/// with it (the rest of the response can't be skipped safely).
pub struct PooledBody(Kind);

enum Kind {
    /// Read by our HTTP/1.1 codec.
    Own(h1::H1Body),
    /// Read by hyper (HTTP/2, upgrades, chunked uploads).
    Hyper {
        body: Incoming,
        back: Option<(http1::SendRequest<Body>, Arc<Inner>)>,
    },
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Kind::Hyper { back, .. } = &mut self.0 {
            if let Some((tx, pool)) = back.take() {
                pool.put_idle(tx);
            }
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let (body, back) = match &mut self.0 {
            Kind::Own(b) => return Pin::new(b).poll_frame(cx),
            Kind::Hyper { body, back } => (body, back),
        };
        let res = Pin::new(body).poll_frame(cx);
        match &res {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => *back = None,
            _ => {}
        }
        res.map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Own(b) => b.is_end_stream(),
            Kind::Hyper { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.0 {
            Kind::Own(b) => b.size_hint(),
            Kind::Hyper { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Bodies known empty (204, HEAD, content-length 0) are often never polled.
        if let Kind::Hyper { body, .. } = &self.0 {
            if http_body::Body::is_end_stream(body) {
                self.give_back();
            }
        }
    }
}

/// An upstream TCP stream that keeps the active-connection gauges exact.
pub struct UpstreamStream {
    pub(crate) inner: TcpStream,
    cluster: Arc<ClusterStats>,
    host: Arc<ConnStats>,
    limits: Arc<ConnLimits>,
    /// The `max_connections` unit this connection holds.
    slot: Option<Slot>,
    /// Its pool's share of `max_connection_pools`.
    hold: Option<Arc<PoolHold>>,
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        self.cluster.upstream_cx_active.dec();
        self.cluster.upstream_cx_destroy.inc();
        self.host.cx_active.fetch_sub(1, Ordering::Relaxed);
        if let Some(h) = self.hold.take() {
            h.leave();
        }
        // Release the unit before waking waiters; they arm `notified()` before checking the
        // counter, so this wake-up cannot be lost.
        self.slot.take();
        self.limits.freed.notify_waiters();
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
