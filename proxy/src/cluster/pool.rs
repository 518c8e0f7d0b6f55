//! Per-host upstream connection pools.
//!
//! hyper-util's pooled client does the pooling (HTTP/1.1 keep-alive reuse, HTTP/2 multiplexing);
//! the connector here pins every connection of a pool to one host address, applies the cluster's
//! `connect_timeout`, sets TCP_NODELAY and keeps Envoy's `upstream_cx_*` stats.

use crate::stats::ClusterStats;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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

pub fn new_pool(
    addr: SocketAddr,
    settings: &PoolSettings,
    cluster: Arc<ClusterStats>,
    host: Arc<ConnStats>,
) -> Pool {
    let connector = HostConnector {
        addr,
        timeout: settings.connect_timeout,
        cluster,
        host,
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
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
                    }))
                }
                Err(e) => {
                    this.cluster.upstream_cx_connect_fail.inc();
                    this.host.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
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
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        self.cluster.upstream_cx_active.dec();
        self.cluster.upstream_cx_destroy.inc();
        self.host.cx_active.fetch_sub(1, Ordering::Relaxed);
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
