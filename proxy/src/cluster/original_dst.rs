//! `ORIGINAL_DST` clusters: the upstream host is the connection's original destination (recovered
//! with SO_ORIGINAL_DST by the listener), or the `x-envoy-original-dst-host` header when
//! `original_dst_lb_config.use_http_header` is set. Istio's `PassthroughCluster` and
//! `InboundPassthroughCluster` are clusters of this type.
//!
//! Hosts are created on first use and kept in a copy-on-write map (lookups are a lock-free
//! `ArcSwap` load; inserting a new destination swaps in a new map), so each destination keeps
//! its connection pool. A cleanup task removes hosts unused for a `cleanup_interval` (default
//! 5 s, as Envoy) that have no request in flight.

use super::host::Host;
use super::{Cluster, HostSet, HostSpec};
use arc_swap::ArcSwap;
use http::header::{HeaderMap, HeaderName};
use mecha_config::{Cluster as ClusterConfig, DiscoveryType};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

struct Entry {
    host: Arc<Host>,
    /// Set on every use, cleared by the cleanup task; a host found clear twice in a row is idle.
    used: AtomicBool,
}

pub struct OriginalDstHosts {
    hosts: ArcSwap<HashMap<SocketAddr, Arc<Entry>>>,
    port_override: Option<u16>,
    /// `Some` when `use_http_header` is set.
    header: Option<HeaderName>,
    cleanup_interval: Duration,
}

impl OriginalDstHosts {
    /// The host table of an `ORIGINAL_DST` cluster; `None` for every other cluster type.
    pub fn new(cfg: &ClusterConfig) -> Option<Self> {
        if cfg.discovery_type != DiscoveryType::ORIGINAL_DST {
            return None;
        }
        let lb = cfg.original_dst_lb_config.clone().unwrap_or_default();
        Some(Self {
            hosts: ArcSwap::from_pointee(HashMap::new()),
            port_override: lb
                .upstream_port_override
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0),
            header: lb
                .use_http_header
                .then(|| HeaderName::from_bytes(lb.header_name().as_bytes()).ok())
                .flatten(),
            cleanup_interval: cfg
                .cleanup_interval
                .filter(|d| !d.is_zero())
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(5)),
        })
    }
}

impl Cluster {
    /// The host for a connection or request: for `ORIGINAL_DST` clusters the host at `dst`
    /// (created on first use; `None` without a destination), otherwise the load balancer's pick.
    pub fn pick_for(&self, hash: Option<u64>, dst: Option<SocketAddr>) -> Option<Arc<Host>> {
        match &self.original_dst {
            None => self.pick(hash),
            Some(od) => {
                let mut dst = dst?;
                if let Some(p) = od.port_override {
                    dst.set_port(p);
                }
                Some(self.original_dst_host(od, dst))
            }
        }
    }

    /// The destination of an HTTP request on this cluster: the override header when the cluster
    /// uses one and the request carries a valid `ip:port`, else the connection's original
    /// destination (`downstream_local`, restored by the listener).
    pub fn http_destination(&self, headers: &HeaderMap, local: SocketAddr) -> Option<SocketAddr> {
        let od = self.original_dst.as_ref()?;
        if let Some(h) = &od.header {
            if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
                match v.trim().parse::<SocketAddr>() {
                    Ok(a) => return Some(a),
                    Err(_) => {
                        tracing::debug!(cluster = %self.name, header = %h, value = v, "invalid original destination header; using the connection's")
                    }
                }
            }
        }
        Some(local)
    }

    fn original_dst_host(&self, od: &OriginalDstHosts, dst: SocketAddr) -> Arc<Host> {
        if let Some(e) = od.hosts.load().get(&dst) {
            if !e.used.load(Ordering::Relaxed) {
                e.used.store(true, Ordering::Relaxed);
            }
            return e.host.clone();
        }
        let fresh = Arc::new(Entry {
            host: self.new_host(HostSpec {
                addr: dst,
                hostname: dst.to_string(),
                weight: 1,
                priority: 0,
                locality: None,
                eds_unhealthy: false,
            }),
            used: AtomicBool::new(true),
        });
        // A racing insert of the same destination wins; both callers then use its host.
        let mut chosen = None;
        od.hosts.rcu(|m| {
            if let Some(e) = m.get(&dst) {
                chosen = Some(e.host.clone());
                return m.clone();
            }
            chosen = Some(fresh.host.clone());
            let mut m = HashMap::clone(m);
            m.insert(dst, fresh.clone());
            Arc::new(m)
        });
        self.publish_hosts(od);
        chosen.unwrap_or_else(|| fresh.host.clone())
    }

    /// Mirrors the table into the host set so `/clusters` and the membership gauges show it.
    fn publish_hosts(&self, od: &OriginalDstHosts) {
        let all: Vec<Arc<Host>> = od.hosts.load().values().map(|e| e.host.clone()).collect();
        self.stats.membership_total.set(all.len() as i64);
        self.stats.membership_healthy.set(all.len() as i64);
        self.hosts.store(Arc::new(HostSet::new(&self.config, all)));
    }
}

/// Removes idle hosts every `cleanup_interval` until the cluster is dropped.
pub(super) async fn cleanup(cluster: Weak<Cluster>) {
    let interval = match cluster.upgrade() {
        Some(c) => match &c.original_dst {
            Some(od) => od.cleanup_interval,
            None => return,
        },
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(c) = cluster.upgrade() else { return };
        let Some(od) = &c.original_dst else { return };
        let mut removed = 0usize;
        od.hosts.rcu(|m| {
            removed = 0;
            let mut keep = HashMap::with_capacity(m.len());
            for (addr, e) in m.iter() {
                let busy = e.host.rq_active.load(Ordering::Relaxed) > 0;
                if e.used.swap(false, Ordering::Relaxed) || busy {
                    keep.insert(*addr, e.clone());
                } else {
                    removed += 1;
                }
            }
            Arc::new(keep)
        });
        if removed > 0 {
            tracing::debug!(cluster = %c.name, removed, "original_dst: removed idle hosts");
            c.publish_hosts(od);
        }
    }
}
