//! Per-host upstream connection pools.
//!
//! hyper-util's pooled client does the pooling (HTTP/1.1 keep-alive reuse, HTTP/2 multiplexing);
//! the connector here pins every connection of a pool to one host address, applies the cluster's
//! `connect_timeout`, sets TCP_NODELAY and keeps Envoy's `upstream_cx_*` stats.

use super::circuit_breaker::{Resource, Slot};
use crate::stats::ClusterStats;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mecha_filters::stats::Counter;
use mecha_filters::Body;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
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

pub type Pool = Client<HostConnector, Body>;

#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub http2: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
}

/// The cluster-wide connection limits the connector enforces (`max_connections`,
/// `max_pending_requests`), shared by every host's pool.
pub struct ConnLimits {
    pub connections: Arc<Resource>,
    pub pending: Arc<Resource>,
    pub cx_overflow: Counter,
    pub pending_overflow: Counter,
    /// Woken whenever a connection closes, so a pending connect can try again.
    pub freed: Notify,
}

pub fn new_pool(
    addr: SocketAddr,
    settings: &PoolSettings,
    cluster: Arc<ClusterStats>,
    host: Arc<ConnStats>,
    limits: Arc<ConnLimits>,
) -> Pool {
    let connector = HostConnector {
        addr,
        timeout: settings.connect_timeout,
        cluster,
        host,
        limits,
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_timer(TokioTimer::new())
        .pool_idle_timeout(settings.idle_timeout)
        .pool_max_idle_per_host(usize::MAX)
        .set_host(false)
        .http2_only(settings.http2);
    if settings.http2 {
        b.timer(TokioTimer::new())
            .http2_keep_alive_while_idle(false);
    }
    b.build(connector)
}

/// Opens connections to exactly one host, whatever the request URI says.
#[derive(Clone)]
pub struct HostConnector {
    addr: SocketAddr,
    timeout: Duration,
    cluster: Arc<ClusterStats>,
    host: Arc<ConnStats>,
    limits: Arc<ConnLimits>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `max_connections` reached and `max_pending_requests` full: Envoy's overflow.
    #[error("circuit breaker overflow: {0}")]
    Overflow(&'static str),
    #[error("connection timeout")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl tower::Service<http::Uri> for HostConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // Connection circuit breaker. At the limit the connect waits as a pending request
            // (hyper's pool hands the request an idle connection as soon as one is free, and a
            // closing connection wakes us to try again); past max_pending_requests it overflows.
            // hyper keeps a connect that lost the race to an idle connection running in the
            // background, so a pending wait is bounded by connect_timeout rather than left to
            // hold its pending unit indefinitely.
            let deadline = tokio::time::Instant::now() + this.timeout;
            let slot = loop {
                let freed = this.limits.freed.notified();
                if let Some(slot) = this.limits.connections.try_acquire() {
                    break slot;
                }
                this.limits.cx_overflow.inc();
                let Some(_pending) = this.limits.pending.try_acquire() else {
                    this.limits.pending_overflow.inc();
                    return Err(ConnectError::Overflow("max_pending_requests"));
                };
                if tokio::time::timeout_at(deadline, freed).await.is_err() {
                    return Err(ConnectError::Overflow("max_connections"));
                }
            };
            this.cluster.upstream_cx_total.inc();
            this.host.cx_total.fetch_add(1, Ordering::Relaxed);
            let res = match tokio::time::timeout(this.timeout, TcpStream::connect(this.addr)).await
            {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(ConnectError::Io(e)),
                Err(_) => {
                    this.cluster.upstream_cx_connect_timeout.inc();
                    Err(ConnectError::Timeout)
                }
            };
            match res {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    this.cluster.upstream_cx_active.inc();
                    this.host.cx_active.fetch_add(1, Ordering::Relaxed);
                    Ok(TokioIo::new(UpstreamStream {
                        inner: stream,
                        cluster: this.cluster,
                        host: this.host,
                        limits: this.limits,
                        slot: Some(slot),
                    }))
                }
                Err(e) => {
                    this.cluster.upstream_cx_connect_fail.inc();
                    this.host.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
                    drop(slot);
                    this.limits.freed.notify_waiters();
                    Err(e)
                }
            }
        })
    }
}

/// An upstream TCP stream that keeps the active-connection gauges exact.
pub struct UpstreamStream {
    inner: TcpStream,
    cluster: Arc<ClusterStats>,
    host: Arc<ConnStats>,
    limits: Arc<ConnLimits>,
    /// The `max_connections` unit this connection holds.
    slot: Option<Slot>,
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        self.cluster.upstream_cx_active.dec();
        self.cluster.upstream_cx_destroy.inc();
        self.host.cx_active.fetch_sub(1, Ordering::Relaxed);
        // Release the unit before waking waiters; they arm `notified()` before checking the
        // counter, so this wake-up cannot be lost.
        self.slot.take();
        self.limits.freed.notify_waiters();
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
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
