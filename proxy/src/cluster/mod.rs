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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The hosts of a cluster at one moment, grouped by priority, with each level's balancer.
pub struct HostSet {
    pub all: Vec<Arc<Host>>,
    levels: Vec<Level>,
    /// `common_lb_config.healthy_panic_threshold` in percent (default 50).
    panic_threshold: f64,
    /// Which share of requests each level serves and which levels are in panic; recomputed when
    /// a host's health changes (not per request), read with one lock-free load per pick.
    loads: ArcSwap<PriorityLoads>,
}

struct Level {
    hosts: Vec<Arc<Host>>,
    lb: Lb,
}

/// Envoy's default `overprovisioning_factor`, in percent.
const OVERPROVISIONING_FACTOR: u64 = 140;

/// Envoy's priority load (`LoadBalancerBase::recalculatePerPriorityState` and
/// `recalculatePerPriorityPanic`), in the same integer percent arithmetic.
#[derive(Debug, PartialEq)]
struct PriorityLoads {
    /// Running total of each level's load in percent (the last is 100): a draw `r` in `0..100`
    /// goes to the first level whose total exceeds `r`.
    cumulative: Vec<u32>,
    /// Levels in panic balance over all their hosts, ignoring health.
    panic: Vec<bool>,
}

impl PriorityLoads {
    /// `(healthy, total)` host counts per level, in priority order.
    fn compute(counts: &[(usize, usize)], panic_threshold: f64) -> Self {
        let n = counts.len();
        let mut load = vec![0u32; n];
        let mut panic = vec![false; n];
        if n > 0 {
            // A level's health: its healthy share scaled by the overprovisioning factor, so a
            // level keeps all its load until fewer than 1/1.4 (~71 %) of its hosts are healthy.
            let health: Vec<u32> = counts
                .iter()
                .map(|&(healthy, total)| match total {
                    0 => 0,
                    t => (OVERPROVISIONING_FACTOR * healthy as u64 / t as u64).min(100) as u32,
                })
                .collect();
            let normalized = health.iter().sum::<u32>().min(100);
            if normalized == 0 && panic_threshold <= 0.0 {
                // No healthy host and panic disabled: the pick finds no host (503), as Envoy.
                load[0] = 100;
            } else {
                if normalized > 0 {
                    // Levels take load in order until 100 %, scaled up when the total health is
                    // below 100; the rounding remainder goes to the first level with health.
                    let mut left = 100u32;
                    for (l, h) in load.iter_mut().zip(&health) {
                        *l = left.min((h * 100).checked_div(normalized).unwrap_or(0));
                        left -= *l;
                    }
                    if let Some(first) = health.iter().position(|h| *h > 0) {
                        load[first] += left;
                    }
                }
                if normalized < 100 {
                    for (p, &(healthy, total)) in panic.iter_mut().zip(counts) {
                        let healthy_pct = match total {
                            0 => 0.0,
                            t => 100.0 * healthy as f64 / t as f64,
                        };
                        *p = healthy_pct < panic_threshold;
                    }
                }
                if (normalized as f64) < panic_threshold {
                    // Total panic: the load follows the host counts, ignoring health.
                    let all: usize = counts.iter().map(|c| c.1).sum();
                    let mut left = 100u32;
                    for (l, c) in load.iter_mut().zip(counts) {
                        *l = (100 * c.1 / all.max(1)) as u32;
                        left -= *l;
                    }
                    let first = counts.iter().position(|c| c.1 > 0).unwrap_or(0);
                    load[first] += left;
                }
            }
        }
        let cumulative = load
            .iter()
            .scan(0u32, |acc, l| {
                *acc += l;
                Some(*acc)
            })
            .collect();
        Self { cumulative, panic }
    }
}

impl Level {
    /// A healthy host from the level's balancer. The balancer covers every host of the level (a
    /// health change does not rebuild it), so unhealthy picks are skipped.
    fn pick_healthy(&self, hash: Option<u64>) -> Option<Arc<Host>> {
        // A hash picks the same host every time: one try is all it gets.
        let tries = if hash.is_some() {
            1
        } else {
            self.hosts.len().max(4)
        };
        for _ in 0..tries {
            let i = self.lb.pick(&self.hosts, hash)?;
            if self.hosts[i].is_healthy() {
                return Some(self.hosts[i].clone());
            }
        }
        // Spread the misses over the healthy hosts (by the hash, if any, to stay sticky).
        let healthy = self.hosts.iter().filter(|h| h.is_healthy()).count();
        if healthy == 0 {
            return None;
        }
        let k = (hash.unwrap_or_else(rand::random) % healthy as u64) as usize;
        self.hosts.iter().filter(|h| h.is_healthy()).nth(k).cloned()
    }

    fn counts(&self) -> (usize, usize) {
        let healthy = self.hosts.iter().filter(|h| h.is_healthy()).count();
        (healthy, self.hosts.len())
    }
}

impl HostSet {
    pub fn new(cfg: &ClusterConfig, all: Vec<Arc<Host>>) -> Self {
        let mut priorities: Vec<u32> = all.iter().map(|h| h.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let levels: Vec<Level> = priorities
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
        let counts: Vec<_> = levels.iter().map(Level::counts).collect();
        Self {
            all,
            levels,
            panic_threshold,
            loads: ArcSwap::from_pointee(PriorityLoads::compute(&counts, panic_threshold)),
        }
    }

    /// Recomputes the priority loads from the hosts' current health flags. `rcu` retries if
    /// another recompute stored in between, so the last store always saw the latest flags.
    pub fn recompute_loads(&self) {
        self.loads.rcu(|_| {
            let counts: Vec<_> = self.levels.iter().map(Level::counts).collect();
            PriorityLoads::compute(&counts, self.panic_threshold)
        });
    }

    /// Picks a host as Envoy does: a priority level by the precomputed loads (with the route's
    /// hash, if any, so hashing stays sticky), then a healthy host of that level — or any host of
    /// it when the level is in panic.
    pub fn pick(&self, hash: Option<u64>) -> Option<Arc<Host>> {
        let loads = self.loads.load();
        let p = match self.levels.len() {
            0 => return None,
            1 => 0,
            _ => {
                let draw = (hash.unwrap_or_else(rand::random) % 100) as u32;
                loads.cumulative.partition_point(|c| *c <= draw)
            }
        };
        let level = self.levels.get(p)?;
        if loads.panic.get(p).copied().unwrap_or(false) {
            return level
                .lb
                .pick(&level.hosts, hash)
                .map(|i| level.hosts[i].clone());
        }
        // The level may have lost its healthy hosts since the loads were computed (the
        // recompute follows the flag change): any healthy host beats a 503.
        level
            .pick_healthy(hash)
            .or_else(|| self.levels.iter().find_map(|l| l.pick_healthy(hash)))
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
    /// The endpoint's `health_status` is UNHEALTHY, DRAINING or TIMEOUT: the host stays in the
    /// set (it counts in the priority maths and panic mode) flagged `/failed_eds_health`.
    pub eds_unhealthy: bool,
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
                Some(h) if h.weight == s.weight && *h.hostname == *s.hostname => {
                    // EDS may change a kept endpoint's health_status.
                    if s.eds_unhealthy {
                        h.health_flags
                            .fetch_or(host::health::FAILED_EDS_HEALTH, Ordering::AcqRel);
                    } else {
                        h.health_flags
                            .fetch_and(!host::health::FAILED_EDS_HEALTH, Ordering::AcqRel);
                    }
                    h
                }
                _ => self.new_host(s),
            })
            .collect();
        self.stats.membership_total.set(hosts.len() as i64);
        self.stats
            .membership_healthy
            .set(hosts.iter().filter(|h| h.is_healthy()).count() as i64);
        self.hosts
            .store(Arc::new(HostSet::new(&self.config, hosts)));
        // A health check may have flipped a kept host's flag while the new set was being built
        // and refreshed the old set's loads instead: recompute on the set now published.
        self.hosts.load().recompute_loads();
    }

    /// Recomputes the priority loads and `membership_healthy` after a health flag changed.
    pub fn refresh_health_stats(&self) {
        let hosts = self.hosts.load();
        hosts.recompute_loads();
        self.stats
            .membership_healthy
            .set(hosts.all.iter().filter(|h| h.is_healthy()).count() as i64);
    }

    fn new_host(&self, s: HostSpec) -> Arc<Host> {
        let cx = Arc::new(ConnStats::default());
        // With active health checks a new host is unhealthy until its first check passes.
        let mut initial_flags = if self.resilience.has_active_health_checks() {
            host::health::FAILED_ACTIVE_HC
        } else {
            0
        };
        if s.eds_unhealthy {
            initial_flags |= host::health::FAILED_EDS_HEALTH;
        }
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
            Err(e) if e.is_request_body_error() => {
                // The downstream body failed: no upstream failure, no outlier report.
                stats.upstream_rq_completed.inc();
                Err(UpstreamError::RequestBody(failure_reason(&e)))
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
/// marked unhealthy, draining or timed out are kept but flagged: Envoy routes no traffic to them
/// outside panic mode, yet counts them when it weighs a priority level's health.
pub fn assignment_hosts(cla: &mecha_config::ClusterLoadAssignment) -> Vec<HostSpec> {
    use mecha_config::HealthStatus;
    let mut out = vec![];
    for loc in &cla.endpoints {
        for ep in &loc.lb_endpoints {
            let eds_unhealthy = matches!(
                ep.health_status,
                Some(HealthStatus::UNHEALTHY | HealthStatus::DRAINING | HealthStatus::TIMEOUT)
            );
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
                eds_unhealthy,
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

#[cfg(test)]
mod tests {
    use super::PriorityLoads;

    fn loads(counts: &[(usize, usize)], threshold: f64) -> (Vec<u32>, Vec<bool>) {
        let l = PriorityLoads::compute(counts, threshold);
        (l.cumulative, l.panic)
    }

    #[test]
    fn priority_loads_follow_envoys_overprovisioned_health() {
        // 1 of 3 healthy: 140 × 1/3 = 46 % stays on P0, the rest spills to P1.
        assert_eq!(
            loads(&[(1, 3), (1, 1)], 50.0),
            (vec![46, 100], vec![false, false])
        );
        // A healthy P0 takes everything.
        assert_eq!(
            loads(&[(3, 3), (1, 1)], 50.0),
            (vec![100, 100], vec![false, false])
        );
        // No healthy host in P0: P1 takes everything (total health 100 %: no panic anywhere).
        assert_eq!(
            loads(&[(0, 2), (1, 1)], 50.0),
            (vec![0, 100], vec![false, false])
        );
        // 3 of 4 healthy: 140 × 3/4 = 105 → 100 %, no spillover.
        assert_eq!(
            loads(&[(3, 4), (1, 1)], 50.0),
            (vec![100, 100], vec![false, false])
        );
        // Total health 70 % is scaled up to 100; P1 (no healthy host) is in panic but has no load.
        assert_eq!(
            loads(&[(2, 4), (0, 1)], 50.0),
            (vec![100, 100], vec![false, true])
        );
    }

    #[test]
    fn panic_spreads_over_all_hosts() {
        // Alone, 1 of 3 healthy is 46 % < 50 %: total panic.
        assert_eq!(loads(&[(1, 3)], 50.0), (vec![100], vec![true]));
        // Total panic splits the load by host count (2:1), the remainder to the first level.
        assert_eq!(
            loads(&[(0, 2), (0, 1)], 50.0),
            (vec![67, 100], vec![true, true])
        );
        // Threshold 0 disables panic: nothing healthy means no host at all.
        assert_eq!(
            loads(&[(0, 2), (0, 1)], 0.0),
            (vec![100, 100], vec![false, false])
        );
        // Below 100 % but above the threshold, only the levels under it are in panic.
        assert_eq!(loads(&[(2, 5)], 50.0), (vec![100], vec![true]));
        assert_eq!(loads(&[(3, 5)], 50.0), (vec![100], vec![false]));
    }
}
