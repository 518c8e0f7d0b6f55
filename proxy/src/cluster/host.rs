//! One upstream host: its address, weight, live counters and its connection pool.

use super::pool::{ConnStats, Pool};
use mecha_config::Locality;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Health flags as Envoy's `/clusters` prints them; issue-4 checks set the failure bits.
pub mod health {
    pub const FAILED_ACTIVE_HC: u32 = 1;
    pub const FAILED_OUTLIER_CHECK: u32 = 2;
    pub const FAILED_EDS_HEALTH: u32 = 4;
}

pub struct Host {
    pub addr: SocketAddr,
    /// The endpoint's hostname (DNS name or `hostname` field), used by `auto_host_rewrite`.
    pub hostname: Arc<str>,
    pub weight: u32,
    pub priority: u32,
    pub locality: Option<Locality>,
    pub rq_active: AtomicU64,
    pub rq_total: AtomicU64,
    /// As Envoy: responses with a 5xx status, and requests that got none (reset, connect
    /// failure, timeout).
    pub rq_error: AtomicU64,
    /// As Envoy: responses with any other status.
    pub rq_success: AtomicU64,
    /// Attempts to this host that hit the route timeout or the per-try timeout.
    pub rq_timeout: AtomicU64,
    pub cx: Arc<ConnStats>,
    pub health_flags: AtomicU32,
    /// The connection pool of DEFAULT-priority requests. As Envoy, each routing priority has its
    /// own pools, limited by that priority's `max_connections`, `max_pending_requests` and
    /// `max_connection_pools`.
    pub pool: Pool,
    /// The HIGH-priority pool, made by the first HIGH request (most hosts never see one).
    pub high_pool: std::sync::OnceLock<Pool>,
    /// Outlier-detection counters and ejection state (issue 4, `outlier.rs`).
    pub outlier: super::outlier::HostState,
}

impl Host {
    /// Charges a response's status to the host, as Envoy's router does.
    pub fn charge_status(&self, status: u16) {
        if status >= 500 {
            self.rq_error.fetch_add(1, Ordering::Relaxed);
        } else {
            self.rq_success.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.health_flags.load(Ordering::Relaxed) == 0
    }

    /// Envoy's `/clusters` health flag text.
    pub fn health_text(&self) -> String {
        let f = self.health_flags.load(Ordering::Relaxed);
        if f == 0 {
            return "healthy".into();
        }
        let mut parts = vec![];
        if f & health::FAILED_ACTIVE_HC != 0 {
            parts.push("/failed_active_hc");
        }
        if f & health::FAILED_OUTLIER_CHECK != 0 {
            parts.push("/failed_outlier_check");
        }
        if f & health::FAILED_EDS_HEALTH != 0 {
            parts.push("/failed_eds_health");
        }
        parts.concat()
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("addr", &self.addr)
            .field("weight", &self.weight)
            .finish()
    }
}

/// Tracks one in-flight request on a host (decrements on drop, even on cancellation).
pub struct ActiveRequest(pub Arc<Host>);

impl ActiveRequest {
    pub fn new(host: Arc<Host>) -> Self {
        host.rq_active.fetch_add(1, Ordering::Relaxed);
        host.rq_total.fetch_add(1, Ordering::Relaxed);
        Self(host)
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.rq_active.fetch_sub(1, Ordering::Relaxed);
    }
}
