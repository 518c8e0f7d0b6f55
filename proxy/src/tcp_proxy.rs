//! The TCP proxy: one upstream connection per downstream connection, bytes copied both ways with
//! half-close passed through, and an idle timeout (default 1 h, as Envoy).

use crate::cluster::{host::ActiveRequest, ClusterManager};
use crate::stats::TcpStats;
use arc_swap::ArcSwap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub struct TcpProxy {
    pub cluster: String,
    pub stats: TcpStats,
    pub idle_timeout: Option<Duration>,
    /// Connection attempts before giving up (`max_connect_attempts`, default 1); each attempt
    /// picks a host again, as Envoy's does.
    pub max_connect_attempts: u32,
    pub clusters: Arc<ArcSwap<ClusterManager>>,
}

impl TcpProxy {
    /// Proxies `downstream`; `local` is its (restored) destination, the host of an
    /// `ORIGINAL_DST` cluster.
    pub async fn serve<IO>(self: Arc<Self>, downstream: IO, local: std::net::SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.stats.downstream_cx_total.inc();
        let cm = self.clusters.load_full();
        let Some(cluster) = cm.get(&self.cluster).cloned() else {
            self.stats.downstream_cx_no_route.inc();
            return;
        };
        // The connection counts against the cluster's max_connections, shared with its HTTP
        // pools, for as long as it lives.
        let Some(_cx_slot) = cluster.try_tcp_connection() else {
            tracing::debug!(cluster = %cluster.name, "tcp_proxy: max_connections overflow");
            return;
        };
        let s = &cluster.stats;
        let mut attempts = 0;
        let (host, upstream) = loop {
            let Some(host) = cluster.pick_for(None, Some(local)) else {
                cluster.stats.upstream_cx_none_healthy.inc();
                return;
            };
            s.upstream_cx_total.inc();
            host.cx.cx_total.fetch_add(1, Ordering::Relaxed);
            attempts += 1;
            match tokio::time::timeout(
                cluster.config.connect_timeout(),
                TcpStream::connect(host.addr),
            )
            .await
            {
                Ok(Ok(u)) => break (host, u),
                Ok(Err(e)) => {
                    tracing::debug!(cluster = %cluster.name, host = %host.addr, error = %e, attempt = attempts, "tcp_proxy connect failed");
                    s.upstream_cx_connect_fail.inc();
                    host.cx.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    s.upstream_cx_connect_timeout.inc();
                    s.upstream_cx_connect_fail.inc();
                    host.cx.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
                }
            }
            if attempts >= self.max_connect_attempts.max(1) {
                self.stats.upstream_cx_connect_attempts_exceeded.inc();
                return;
            }
        };
        // As Envoy's TCP connection pool: a connection handed to the proxy counts as one
        // request, on the cluster and on the host, for as long as it lives.
        let _active = ActiveRequest::new(host.clone());
        s.upstream_rq_total.inc();
        s.upstream_rq_active.inc();
        let _rq_active = RqActive(s.upstream_rq_active.clone());
        let _ = upstream.set_nodelay(true);
        s.upstream_cx_active.inc();
        host.cx.cx_active.fetch_add(1, Ordering::Relaxed);
        let epoch = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let mut down = Tracked::new(downstream, &last, epoch);
        let mut up = Tracked::new(upstream, &last, epoch);
        {
            let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
            tokio::pin!(copy);
            loop {
                let deadline = self
                    .idle_timeout
                    .map(|t| epoch + Duration::from_millis(last.load(Ordering::Relaxed)) + t);
                tokio::select! {
                    _ = &mut copy => break,
                    _ = async { match deadline { Some(d) => tokio::time::sleep_until(d.into()).await, None => std::future::pending().await } } => {
                        let idle_for = epoch.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                        if self.idle_timeout.is_some_and(|t| idle_for >= t) {
                            self.stats.idle_timeout.inc();
                            break;
                        }
                    }
                }
            }
        }
        // Counted by the streams themselves, so a session cut by the idle timeout or an error
        // still reports what it moved.
        self.stats.downstream_cx_rx_bytes_total.add(down.read);
        self.stats.downstream_cx_tx_bytes_total.add(down.written);
        s.upstream_cx_active.dec();
        s.upstream_cx_destroy.inc();
        host.cx.cx_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements the cluster's `upstream_rq_active` when the proxied connection ends.
struct RqActive(mecha_filters::stats::Gauge);

impl Drop for RqActive {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A stream that records the time of its last read or write (for the idle timeout) and the
/// bytes it moved.
struct Tracked<T> {
    inner: T,
    last: Arc<AtomicU64>,
    epoch: Instant,
    read: u64,
    written: u64,
}

impl<T> Tracked<T> {
    fn new(inner: T, last: &Arc<AtomicU64>, epoch: Instant) -> Self {
        Self {
            inner,
            last: last.clone(),
            epoch,
            read: 0,
            written: 0,
        }
    }

    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.read += (buf.filled().len() - before) as u64;
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written += *n as u64;
        }
        if r.is_ready() {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
