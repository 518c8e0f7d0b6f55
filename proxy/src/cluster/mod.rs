//! The cluster manager: clusters, their host sets (static or DNS-resolved), load balancing and
//! per-host pools, and the one function that sends a request to a cluster.

pub mod circuit_breaker;
pub mod dns;
mod h1;
pub mod health_check;
pub mod host;
pub mod lb;
pub mod original_dst;
pub mod outlier;
pub mod pool;
pub mod resilience;

use crate::stats::{ClusterManagerStats, ClusterStats};
use arc_swap::ArcSwap;
use host::{ActiveRequest, Host};
use lb::Lb;
use mecha_config::{Cluster as ClusterConfig, DiscoveryType};
use mecha_filters::stats::{Scope, Store};
use mecha_filters::{Body, BoxFuture, Upstream, UpstreamError};
use pool::{ConnStats, PoolSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// The hosts of a cluster at one moment, grouped by priority, with each level's balancer.
pub struct HostSet {
    pub all: Vec<Arc<Host>>,
    levels: Vec<Level>,
    /// `common_lb_config.healthy_panic_threshold` in percent (default 50).
    panic_threshold: f64,
}

struct Level {
    hosts: Vec<Arc<Host>>,
    lb: Lb,
}

impl HostSet {
    pub fn new(cfg: &ClusterConfig, all: Vec<Arc<Host>>) -> Self {
        let mut priorities: Vec<u32> = all.iter().map(|h| h.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let levels = priorities
            .into_iter()
            .map(|p| {
                let hosts: Vec<Arc<Host>> =
                    all.iter().filter(|h| h.priority == p).cloned().collect();
                Level {
                    lb: Lb::build(cfg, &hosts),
                    hosts,
                }
            })
            .collect();
        let panic_threshold =
            mecha_config::CommonLbConfig::panic_threshold(cfg.common_lb_config.as_ref());
        Self {
            all,
            levels,
            panic_threshold,
        }
    }

    /// Picks a host: the first priority level with a healthy host serves the request; if no host
    /// anywhere is healthy, Envoy's panic mode sends to any host.
    pub fn pick(&self, hash: Option<u64>) -> Option<Arc<Host>> {
        for level in &self.levels {
            let healthy = level.hosts.iter().filter(|h| h.is_healthy()).count();
            if healthy > 0 {
                // Envoy's panic mode: below the healthy-panic threshold, balance over every host.
                if (healthy as f64) * 100.0 < self.panic_threshold * level.hosts.len() as f64 {
                    return level
                        .lb
                        .pick(&level.hosts, hash)
                        .map(|i| level.hosts[i].clone());
                }
                // Try a few picks to skip unhealthy hosts without building a new balancer.
                for _ in 0..level.hosts.len().max(4) {
                    let i = level.lb.pick(&level.hosts, hash)?;
                    if level.hosts[i].is_healthy() {
                        return Some(level.hosts[i].clone());
                    }
                }
                return level.hosts.iter().find(|h| h.is_healthy()).cloned();
            }
        }
        let level = self.levels.first()?;
        level
            .lb
            .pick(&level.hosts, hash)
            .map(|i| level.hosts[i].clone())
    }
}

pub struct Cluster {
    pub name: String,
    pub config: ClusterConfig,
    pub stats: Arc<ClusterStats>,
    pub hosts: ArcSwap<HostSet>,
    pub pool_settings: PoolSettings,
    /// The on-demand host table of an `ORIGINAL_DST` cluster (transparent capture).
    pub original_dst: Option<original_dst::OriginalDstHosts>,
    /// Circuit breakers, retry stats, outlier detection, health checks (issue 4).
    pub resilience: resilience::Resilience,
    /// The connection breakers of each priority (DEFAULT, HIGH), enforced by the hosts' pools
    /// of that priority.
    conn_limits: [Arc<pool::ConnLimits>; 2],
    /// Background resolution (DNS clusters); aborted when the cluster is dropped.
    refresher: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(h) = self.refresher.lock().take() {
            h.abort();
        }
    }
}

/// Where a host came from: its address plus the fields of its `lb_endpoint`.
#[derive(Clone, Debug)]
pub struct HostSpec {
    pub addr: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: Option<mecha_config::Locality>,
}

/// A `max_connections` unit held by an upstream connection outside the HTTP pools (the TCP
/// proxy's). Dropping it gives the unit back and wakes HTTP connects waiting for one, as a pooled
/// connection's close does.
pub struct ConnectionSlot {
    slot: Option<circuit_breaker::Slot>,
    limits: Arc<pool::ConnLimits>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        // Release before waking, so a woken waiter finds the unit free.
        self.slot.take();
        self.limits.freed.notify_waiters();
    }
}

impl Cluster {
    /// Takes one `max_connections` unit for a TCP proxy connection. At the limit Envoy's
    /// tcp_proxy neither queues nor retries: it counts `upstream_cx_overflow` and closes the
    /// downstream connection, so `None` here means exactly that to the caller.
    pub fn try_tcp_connection(&self) -> Option<ConnectionSlot> {
        let limits = &self.conn_limits[0];
        let Some(slot) = limits.connections.try_acquire() else {
            limits.cx_overflow.inc();
            return None;
        };
        Some(ConnectionSlot {
            slot: Some(slot),
            limits: limits.clone(),
        })
    }

    /// Builds a cluster. Static hosts are created now; DNS clusters start empty and are filled by
    /// [`Cluster::start_discovery`].
    pub fn new(cfg: ClusterConfig, store: &Store) -> Arc<Self> {
        let stats = Arc::new(ClusterStats::new(store, &Scope::cluster(&cfg.name)));
        let pool_settings = PoolSettings {
            http2: cfg.upstream_http2(),
            connect_timeout: cfg.connect_timeout(),
            idle_timeout: cfg.upstream_idle_timeout(),
        };
        let cluster = Arc::new_cyclic(|owner| {
            let resilience = resilience::Resilience::new(&cfg, store, owner.clone());
            // As Envoy, each priority has its own connection pools, limited by its own
            // thresholds; the overflow counters are the cluster's.
            let limits = |breakers: &circuit_breaker::Breaker| {
                Arc::new(pool::ConnLimits {
                    connections: breakers.connections.clone(),
                    pending: breakers.pending.clone(),
                    cx_overflow: resilience.stats.upstream_cx_overflow.clone(),
                    pending_overflow: resilience.stats.upstream_rq_pending_overflow.clone(),
                    pools: breakers.pools.clone(),
                    pool_overflow: resilience.stats.upstream_cx_pool_overflow.clone(),
                    freed: tokio::sync::Notify::new(),
                })
            };
            let conn_limits = [
                limits(&resilience.breakers.default),
                limits(&resilience.breakers.high),
            ];
            Self {
                name: cfg.name.clone(),
                stats,
                hosts: ArcSwap::from_pointee(HostSet::new(&cfg, vec![])),
                pool_settings,
                original_dst: original_dst::OriginalDstHosts::new(&cfg),
                resilience,
                conn_limits,
                refresher: parking_lot::Mutex::new(None),
                config: cfg,
            }
        });
        if cluster.config.discovery_type == DiscoveryType::STATIC {
            let specs = static_specs(&cluster.config);
            cluster.update_hosts(specs);
        }
        cluster
    }

    /// Starts DNS resolution for STRICT_DNS / LOGICAL_DNS clusters (needs a Tokio runtime).
    pub fn start_discovery(self: &Arc<Self>) {
        if self.original_dst.is_some() {
            let handle = tokio::spawn(original_dst::cleanup(Arc::downgrade(self)));
            *self.refresher.lock() = Some(handle);
        }
        self.resilience.start();
        if matches!(
            self.config.discovery_type,
            DiscoveryType::STRICT_DNS | DiscoveryType::LOGICAL_DNS
        ) {
            let handle = tokio::spawn(dns::run(Arc::downgrade(self)));
            *self.refresher.lock() = Some(handle);
        }
    }

    /// Replaces the host set, keeping the `Host` (and its pool) of every unchanged endpoint.
    pub fn update_hosts(&self, specs: Vec<HostSpec>) {
        let old = self.hosts.load();
        let mut by_addr: HashMap<(SocketAddr, u32), Arc<Host>> = old
            .all
            .iter()
            .map(|h| ((h.addr, h.priority), h.clone()))
            .collect();
        let hosts: Vec<Arc<Host>> = specs
            .into_iter()
            .map(|s| match by_addr.remove(&(s.addr, s.priority)) {
                Some(h) if h.weight == s.weight && *h.hostname == *s.hostname => h,
                _ => self.new_host(s),
            })
            .collect();
        self.stats.membership_total.set(hosts.len() as i64);
        self.stats
            .membership_healthy
            .set(hosts.iter().filter(|h| h.is_healthy()).count() as i64);
        self.hosts
            .store(Arc::new(HostSet::new(&self.config, hosts)));
    }

    /// Recomputes `membership_healthy` after a health flag changed.
    pub fn refresh_health_stats(&self) {
        let hosts = self.hosts.load();
        self.stats
            .membership_healthy
            .set(hosts.all.iter().filter(|h| h.is_healthy()).count() as i64);
    }

    fn new_host(&self, s: HostSpec) -> Arc<Host> {
        let cx = Arc::new(ConnStats::default());
        // With active health checks a new host is unhealthy until its first check passes.
        let initial_flags = if self.resilience.has_active_health_checks() {
            host::health::FAILED_ACTIVE_HC
        } else {
            0
        };
        Arc::new(Host {
            addr: s.addr,
            hostname: s.hostname.into(),
            weight: s.weight,
            priority: s.priority,
            locality: s.locality,
            rq_active: AtomicU64::new(0),
            rq_total: AtomicU64::new(0),
            rq_error: AtomicU64::new(0),
            rq_success: AtomicU64::new(0),
            rq_timeout: AtomicU64::new(0),
            pool: self.new_pool(s.addr, &cx, false),
            high_pool: std::sync::OnceLock::new(),
            cx,
            health_flags: initial_flags.into(),
            outlier: Default::default(),
        })
    }

    /// A host's connection pool for one routing priority (`high`), under that priority's limits.
    fn new_pool(&self, addr: SocketAddr, cx: &Arc<ConnStats>, high: bool) -> pool::Pool {
        pool::new_pool(
            addr,
            &self.pool_settings,
            self.stats.clone(),
            cx.clone(),
            self.conn_limits[high as usize].clone(),
        )
    }

    pub fn pick(&self, hash: Option<u64>) -> Option<Arc<Host>> {
        self.hosts.load().pick(hash)
    }

    /// Sends `req` to `host` at DEFAULT priority (see [`Cluster::send_at`]).
    pub async fn send(
        &self,
        host: Arc<Host>,
        req: http::Request<Body>,
    ) -> Result<http::Response<Body>, UpstreamError> {
        self.send_at(host, req, false).await
    }

    /// Sends `req` to `host`: fills in scheme/authority, counts the request against the
    /// `max_requests` of the route's priority (`high`), and turns pool errors into
    /// [`UpstreamError`]. The response body keeps the host's active-request count until it ends.
    pub async fn send_at(
        &self,
        host: Arc<Host>,
        req: http::Request<Body>,
        high: bool,
    ) -> Result<http::Response<Body>, UpstreamError> {
        self.send_at_with(host, req, None, high).await
    }

    /// As [`Cluster::send_at`], with the request's headers kept by the caller (for a retry) and
    /// only lent for this attempt; `req`'s own headers are ignored. The lent headers must
    /// already carry `Host` (an HTTP/2 cluster takes a copy instead).
    pub async fn send_at_with(
        &self,
        host: Arc<Host>,
        mut req: http::Request<Body>,
        headers: Option<&http::HeaderMap>,
        high: bool,
    ) -> Result<http::Response<Body>, UpstreamError> {
        // max_requests circuit breaker: a CAS admission, held until the response body ends.
        let Some(rq_slot) = self.resilience.breakers.at(high).requests.try_acquire() else {
            self.resilience.stats.upstream_rq_pending_overflow.inc();
            return Err(UpstreamError::Overflow("max_requests".into()));
        };
        let headers = match headers {
            // HTTP/2 needs the authority in the URI and no Host header: give it its own copy.
            Some(h) if self.pool_settings.http2 => {
                *req.headers_mut() = h.clone();
                None
            }
            h => h,
        };
        if headers.is_none() {
            set_upstream_uri(&mut req, host.addr, self.pool_settings.http2);
        } else {
            origin_form(&mut req);
        }

        let stats = &self.stats;
        stats.upstream_rq_total.inc();
        stats.upstream_rq_active.inc();
        let guard = RequestGuard {
            active: ActiveRequest::new(host.clone()),
            stats: self.stats.clone(),
            _rq_slot: rq_slot,
        };
        let outlier = self.resilience.outlier();
        let start = crate::clock::now_std();
        let pool = match high {
            false => &host.pool,
            true => host
                .high_pool
                .get_or_init(|| self.new_pool(host.addr, &host.cx, true)),
        };
        match pool.request_with(req, headers).await {
            Ok(resp) => {
                stats
                    .upstream_rq_time
                    .record_duration_ms(crate::clock::now_std().saturating_duration_since(start));
                stats.record_status(resp.status().as_u16());
                host.charge_status(resp.status().as_u16());
                stats.upstream_rq_completed.inc();
                if let Some(d) = outlier {
                    d.report(&host, outlier::Outcome::Status(resp.status().as_u16()));
                }
                Ok(resp.map(|b| guarded_body(b, guard)))
            }
            Err(pool::PoolError::Overflow(what)) => {
                // A connection breaker refused: not the host's fault, so no outlier report.
                stats.upstream_rq_completed.inc();
                Err(UpstreamError::Overflow(what.into()))
            }
            Err(e) => {
                host.rq_error
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats.upstream_rq_completed.inc();
                stats.record_status(503);
                let connect = matches!(e, pool::PoolError::Connect(_));
                if let Some(d) = outlier {
                    let o = if connect {
                        outlier::Outcome::ConnectFailed
                    } else {
                        outlier::Outcome::Reset
                    };
                    d.report(&host, o);
                }
                let reason = if connect {
                    "connection failure"
                } else {
                    stats.upstream_rq_rx_reset.inc();
                    "connection termination"
                };
                Err(UpstreamError::Connect(format!(
                    "reset reason: {reason}, transport failure reason: {}",
                    failure_reason(&e)
                )))
            }
        }
    }
}

/// The transport failure with its cause (e.g. h2's "refused stream"), for the local reply.
fn failure_reason(e: &pool::PoolError) -> String {
    let mut out = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

fn static_specs(cfg: &ClusterConfig) -> Vec<HostSpec> {
    cfg.load_assignment
        .as_ref()
        .map(assignment_hosts)
        .unwrap_or_default()
}

/// A load assignment's endpoints as host specs, for static config and EDS alike. Endpoints
/// marked unhealthy, draining or timed out are left out, as Envoy does not route to them.
pub fn assignment_hosts(cla: &mecha_config::ClusterLoadAssignment) -> Vec<HostSpec> {
    use mecha_config::HealthStatus;
    let mut out = vec![];
    for loc in &cla.endpoints {
        for ep in &loc.lb_endpoints {
            if matches!(
                ep.health_status,
                Some(HealthStatus::UNHEALTHY | HealthStatus::DRAINING | HealthStatus::TIMEOUT)
            ) {
                continue;
            }
            let sa = &ep.endpoint.address.socket_address;
            let Ok(ip) = sa.address.parse::<std::net::IpAddr>() else {
                continue;
            };
            out.push(HostSpec {
                addr: SocketAddr::new(ip, sa.port_value),
                hostname: ep.endpoint.hostname.clone().unwrap_or_default(),
                weight: ep.load_balancing_weight.unwrap_or(1),
                priority: loc.priority,
                locality: loc.locality.clone(),
            });
        }
    }
    out
}

/// An HTTP/1.1 request goes out in origin-form: an absolute URI is cut to its path and query.
fn origin_form(req: &mut http::Request<Body>) {
    *req.version_mut() = http::Version::HTTP_11;
    if req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.path_and_query =
            Some(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// The request target for the upstream codec. HTTP/1.1 goes out in origin-form (the original
/// `Host` header travels as a header), so the common case rewrites nothing; HTTP/2 needs the
/// scheme and authority for its pseudo-headers, and must not also carry a `Host` header.
fn set_upstream_uri(req: &mut http::Request<Body>, addr: SocketAddr, http2: bool) {
    if !http2 {
        // HTTP/1.1 requires a Host header (RFC 9112 §3.2); a request that came in as HTTP/2, or
        // a filter's own call to an absolute URI, carries the authority only in the URI.
        let needs_host = !req.headers().contains_key(http::header::HOST);
        let host = req
            .uri()
            .authority()
            .filter(|_| needs_host)
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok());
        origin_form(req);
        if needs_host {
            if let Some(v) = host.or_else(|| http::HeaderValue::from_str(&addr.to_string()).ok()) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
        return;
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| addr.to_string());
    if let Ok(uri) = http::Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = uri;
    }
    req.headers_mut().remove(http::header::HOST);
    *req.version_mut() = http::Version::HTTP_2;
}

struct RequestGuard {
    #[allow(dead_code)]
    active: ActiveRequest,
    stats: Arc<ClusterStats>,
    _rq_slot: circuit_breaker::Slot,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.stats.upstream_rq_active.dec();
    }
}

fn guarded_body(body: pool::PooledBody, guard: RequestGuard) -> Body {
    use http_body_util::BodyExt;
    crate::body::WithGuard::new(body, guard).boxed_unsync()
}

/// All clusters of one configuration.
pub struct ClusterManager {
    pub clusters: HashMap<String, Arc<Cluster>>,
    pub stats: ClusterManagerStats,
}

impl ClusterManager {
    pub fn new(
        configs: &[ClusterConfig],
        store: &Store,
        previous: Option<&ClusterManager>,
    ) -> Self {
        let stats = ClusterManagerStats::new(store, &Scope::plain("cluster_manager"));
        let clusters: HashMap<String, Arc<Cluster>> = configs
            .iter()
            .map(|c| {
                let reuse = previous
                    .and_then(|p| p.clusters.get(&c.name))
                    .filter(|old| old.config == *c);
                (
                    c.name.clone(),
                    reuse
                        .cloned()
                        .unwrap_or_else(|| Cluster::new(c.clone(), store)),
                )
            })
            .collect();
        stats.active_clusters.set(clusters.len() as i64);
        Self { clusters, stats }
    }

    pub fn start_discovery(&self) {
        for c in self.clusters.values() {
            if c.refresher.lock().is_none() {
                c.start_discovery();
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }
}

/// The [`Upstream`] handed to filters: always the cluster manager of the current snapshot.
#[derive(Clone)]
pub struct UpstreamHandle {
    pub clusters: Arc<ArcSwap<ClusterManager>>,
}

impl Upstream for UpstreamHandle {
    fn call(
        &self,
        cluster: &str,
        req: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, UpstreamError>> {
        // Resolved before boxing, so the future holds no copy of the name and a failure
        // allocates nothing large.
        let picked = match self.clusters.load().get(cluster) {
            None => Err(UpstreamError::UnknownCluster(cluster.to_string())),
            Some(c) => match c.pick(None) {
                Some(host) => Ok((c.clone(), host)),
                None => {
                    c.stats.upstream_cx_none_healthy.inc();
                    Err(UpstreamError::NoHealthyUpstream(cluster.to_string()))
                }
            },
        };
        match picked {
            Ok((c, host)) => {
                mecha_filters::boxed_in_place(|| async move { c.send(host, req).await })
            }
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn has_cluster(&self, cluster: &str) -> bool {
        self.clusters.load().get(cluster).is_some()
    }
}
