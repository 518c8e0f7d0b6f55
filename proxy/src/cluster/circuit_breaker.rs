//! Circuit breakers (`circuit_breakers.thresholds`), with Envoy's defaults, stats and gauges.
//!
//! Each limited resource is one atomic counter. Admission is a compare-and-swap increment that
//! fails at the limit, so concurrent requests never exceed it and never wait on each other; the
//! returned RAII [`Slot`] gives the unit back when dropped (request end, cancellation, error).
//! The `*_open` gauges (1 while at the limit) and `remaining_*` gauges (with `track_remaining`)
//! are rewritten after every change until they agree with the counter, so they are exact whenever
//! the cluster is quiescent.

use mecha_config::{CircuitBreakers as Config, RoutingPriority, Thresholds};
use mecha_filters::stats::{Gauge, Scope, Store};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One limited resource (connections, pending requests, requests, retries, pools).
pub struct Resource {
    max: u64,
    current: AtomicU64,
    open: Gauge,
    remaining: Option<Gauge>,
}

impl Resource {
    fn new(
        max: u64,
        store: &Store,
        scope: &Scope,
        open: &str,
        remaining: &str,
        track: bool,
    ) -> Self {
        let r = Self {
            max,
            current: AtomicU64::new(0),
            open: store.gauge(scope, open),
            remaining: track.then(|| store.gauge(scope, remaining)),
        };
        r.publish();
        r
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// Takes one unit if below `limit` (normally `max`; the retry budget passes its own).
    fn try_acquire_below(self: &Arc<Self>, limit: u64) -> Option<Slot> {
        self.current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c < limit).then_some(c + 1)
            })
            .ok()?;
        self.publish();
        Some(Slot(self.clone()))
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.try_acquire_below(self.max)
    }

    /// Writes the gauges from the counter, repeating while the counter moved underneath, so the
    /// last writer always leaves the current value.
    fn publish(&self) {
        loop {
            let c = self.current.load(Ordering::Acquire);
            self.open.set((c >= self.max) as i64);
            if let Some(r) = &self.remaining {
                r.set(self.max.saturating_sub(c) as i64);
            }
            if self.current.load(Ordering::Acquire) == c {
                break;
            }
        }
    }
}

/// A unit of a [`Resource`], released on drop.
pub struct Slot(Arc<Resource>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::AcqRel);
        self.0.publish();
    }
}

/// The thresholds of one routing priority.
pub struct Breaker {
    pub connections: Arc<Resource>,
    pub pending: Arc<Resource>,
    pub requests: Arc<Resource>,
    pub retries: Arc<Resource>,
    pub pools: Arc<Resource>,
    /// (budget fraction, min_retry_concurrency) when `retry_budget` is set; it replaces max_retries.
    budget: Option<(f64, u64)>,
}

impl Breaker {
    fn new(t: Option<&Thresholds>, store: &Store, cluster: &Scope, prio: &str) -> Self {
        let scope = cluster.sub(&format!("circuit_breakers.{prio}"));
        let track = t.is_some_and(|t| t.track_remaining);
        let get = |f: fn(&Thresholds) -> Option<u32>, default: u64| {
            t.and_then(f).map(u64::from).unwrap_or(default)
        };
        let res = |max, open, remaining| {
            Arc::new(Resource::new(max, store, &scope, open, remaining, track))
        };
        Self {
            connections: res(get(|t| t.max_connections, 1024), "cx_open", "remaining_cx"),
            pending: res(
                get(|t| t.max_pending_requests, 1024),
                "rq_pending_open",
                "remaining_pending",
            ),
            requests: res(get(|t| t.max_requests, 1024), "rq_open", "remaining_rq"),
            retries: res(
                get(|t| t.max_retries, 3),
                "rq_retry_open",
                "remaining_retries",
            ),
            pools: res(
                get(|t| t.max_connection_pools, u32::MAX as u64),
                "cx_pool_open",
                "remaining_cx_pools",
            ),
            budget: t.and_then(|t| t.retry_budget.as_ref()).map(|b| {
                (
                    b.budget_percent.map(|p| p.value).unwrap_or(20.0) / 100.0,
                    b.min_retry_concurrency.unwrap_or(3) as u64,
                )
            }),
        }
    }

    /// Admits one retry: under `max_retries`, or under the retry budget (a share of the active
    /// and pending requests, at least `min_retry_concurrency`) when one is configured.
    pub fn try_retry(&self) -> Option<Slot> {
        match self.budget {
            None => self.retries.try_acquire(),
            Some((fraction, min)) => {
                let load = self.requests.current() + self.pending.current();
                let limit = ((load as f64 * fraction) as u64).max(min);
                self.retries.try_acquire_below(limit)
            }
        }
    }
}

/// DEFAULT and HIGH priority breakers of one cluster. A route's `priority` picks the breaker
/// for its requests and retries (`max_requests`, `max_retries`, `retry_budget`) and, as each
/// host keeps one connection pool per priority (as Envoy does), for its connections, pending
/// requests and pools (`max_connections`, `max_pending_requests`, `max_connection_pools`).
pub struct CircuitBreakers {
    pub default: Breaker,
    pub high: Breaker,
}

impl CircuitBreakers {
    /// The breaker of a route's priority (`high` = `RoutingPriority::HIGH`).
    #[inline]
    pub fn at(&self, high: bool) -> &Breaker {
        if high {
            &self.high
        } else {
            &self.default
        }
    }

    pub fn new(cfg: Option<&Config>, store: &Store, cluster: &Scope) -> Self {
        let find =
            |p: RoutingPriority| cfg.and_then(|c| c.thresholds.iter().find(|t| t.priority == p));
        Self {
            default: Breaker::new(find(RoutingPriority::DEFAULT), store, cluster, "default"),
            high: Breaker::new(find(RoutingPriority::HIGH), store, cluster, "high"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_under_concurrency_and_gauges_settle() {
        let store = Store::new();
        let scope = Scope::cluster("c");
        let r = Arc::new(Resource::new(
            7,
            &store,
            &scope,
            "rq_open",
            "remaining_rq",
            true,
        ));
        let admitted = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        if let Some(slot) = r.try_acquire() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            peak.fetch_max(r.current(), Ordering::Relaxed);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 7);
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(r.current(), 0);
        assert_eq!(store.value("cluster.c.rq_open"), Some(0));
        assert_eq!(store.value("cluster.c.remaining_rq"), Some(7));
        let held: Vec<Slot> = (0..7).filter_map(|_| r.try_acquire()).collect();
        assert_eq!(held.len(), 7);
        assert!(r.try_acquire().is_none());
        assert_eq!(store.value("cluster.c.rq_open"), Some(1));
        assert_eq!(store.value("cluster.c.remaining_rq"), Some(0));
    }

    #[test]
    fn retry_budget_scales_with_load() {
        let store = Store::new();
        let cfg: Config = serde_yaml::from_str(
            "thresholds: [{retry_budget: {budget_percent: {value: 50}, min_retry_concurrency: 1}}]",
        )
        .unwrap();
        let cb = CircuitBreakers::new(Some(&cfg), &store, &Scope::cluster("b"));
        let first = cb.default.try_retry();
        assert!(first.is_some());
        assert!(
            cb.default.try_retry().is_none(),
            "min_retry_concurrency 1 at no load"
        );
        let load: Vec<Slot> = (0..6)
            .filter_map(|_| cb.default.requests.try_acquire())
            .collect();
        assert_eq!(load.len(), 6);
        let more: Vec<Slot> = (0..5).filter_map(|_| cb.default.try_retry()).collect();
        assert_eq!(
            more.len(),
            2,
            "50% of 6 active = 3 retries, one already held"
        );
    }
}
