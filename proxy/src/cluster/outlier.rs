//! Outlier detection (`outlier_detection`), as Envoy: consecutive 5xx / gateway-failure /
//! local-origin-failure ejection on the request path, success-rate and failure-percentage
//! ejection at every `interval`, ejection time `base_ejection_time × ejections` (capped by
//! `max_ejection_time`), `max_ejection_percent` (at least one host may always be ejected),
//! `enforcing_*` percentages, and Envoy's `outlier_detection.*` stats.
//!
//! Per-host counters are atomics on the host ([`HostState`]); the request path only increments
//! them and, on the rare threshold crossing, flips the host's `FAILED_OUTLIER_CHECK` flag. The
//! interval timer (one task per cluster) brings hosts back and runs the statistical checks.

use super::host::{health, Host};
use super::Cluster;
use crate::stats::OutlierStats;
use mecha_config::OutlierDetection;
use mecha_filters::stats::{Scope, Store};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Outlier bookkeeping of one host.
#[derive(Default, Debug)]
pub struct HostState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Milliseconds since the detector's epoch when the ejection ends; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    /// Ejection-time multiplier: +1 per ejection, -1 per interval spent healthy.
    multiplier: AtomicU32,
    /// Success-rate window (external / local-origin), reset at each interval.
    ext_success: AtomicU64,
    ext_failure: AtomicU64,
    local_success: AtomicU64,
    local_failure: AtomicU64,
}

impl HostState {
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Acquire) != 0
    }
}

/// What one attempt to a host produced, as the detector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers with this status.
    Status(u16),
    /// Could not connect.
    ConnectFailed,
    /// Connected, then the stream was reset before a response.
    Reset,
    /// No response in time (route or per-try timeout).
    Timeout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Consecutive5xx,
    ConsecutiveGateway,
    ConsecutiveLocal,
    SuccessRate,
    FailurePercentage,
    FailurePercentageLocal,
}

pub struct Detector {
    cfg: OutlierDetection,
    stats: OutlierStats,
    epoch: Instant,
    cluster: Weak<Cluster>,
}

fn roll(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && rand::random_range(0..100) < percent)
}

impl Detector {
    pub fn new(
        cfg: &OutlierDetection,
        store: &Store,
        cluster: &Scope,
        owner: Weak<Cluster>,
    ) -> Self {
        Self {
            cfg: cfg.clone(),
            stats: OutlierStats::new(store, &cluster.sub("outlier_detection")),
            epoch: Instant::now(),
            cluster: owner,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Records one attempt's outcome (request path: a few relaxed atomic ops).
    pub fn report(&self, host: &Arc<Host>, outcome: Outcome) {
        let st = &host.outlier;
        let split = self.cfg.split_external_local_origin_errors;
        // Without the split, local-origin failures count as the 503/504 Envoy would answer.
        let status = match outcome {
            Outcome::Status(s) => Some(s),
            Outcome::ConnectFailed | Outcome::Reset if !split => Some(503),
            Outcome::Timeout if !split => Some(504),
            _ => None,
        };
        match status {
            Some(s) => {
                if split {
                    // A response means the connection worked: local-origin streak ends.
                    st.consecutive_local.store(0, Ordering::Relaxed);
                    st.local_success.fetch_add(1, Ordering::Relaxed);
                }
                if s >= 500 {
                    st.ext_failure.fetch_add(1, Ordering::Relaxed);
                    let n = st.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
                    if n == self.cfg.consecutive_5xx.unwrap_or(5) {
                        self.detected(host, Kind::Consecutive5xx);
                    }
                    if matches!(s, 502..=504) {
                        let g = st.consecutive_gateway.fetch_add(1, Ordering::AcqRel) + 1;
                        if g == self.cfg.consecutive_gateway_failure.unwrap_or(5) {
                            self.detected(host, Kind::ConsecutiveGateway);
                        }
                    } else {
                        st.consecutive_gateway.store(0, Ordering::Relaxed);
                    }
                } else {
                    st.ext_success.fetch_add(1, Ordering::Relaxed);
                    st.consecutive_5xx.store(0, Ordering::Relaxed);
                    st.consecutive_gateway.store(0, Ordering::Relaxed);
                }
            }
            None => {
                st.local_failure.fetch_add(1, Ordering::Relaxed);
                let n = st.consecutive_local.fetch_add(1, Ordering::AcqRel) + 1;
                if n == self.cfg.consecutive_local_origin_failure.unwrap_or(5) {
                    self.detected(host, Kind::ConsecutiveLocal);
                }
            }
        }
    }

    fn detected(&self, host: &Arc<Host>, kind: Kind) {
        let st = &host.outlier;
        // Envoy restarts the streak once it has been acted on.
        match kind {
            Kind::Consecutive5xx => st.consecutive_5xx.store(0, Ordering::Relaxed),
            Kind::ConsecutiveGateway => st.consecutive_gateway.store(0, Ordering::Relaxed),
            Kind::ConsecutiveLocal => st.consecutive_local.store(0, Ordering::Relaxed),
            _ => {}
        }
        if st.is_ejected() {
            return;
        }
        let c = &self.cfg;
        let (detected, enforced, enforcing) = match kind {
            Kind::Consecutive5xx => (
                &self.stats.ejections_detected_consecutive_5xx,
                &self.stats.ejections_enforced_consecutive_5xx,
                c.enforcing_consecutive_5xx.unwrap_or(100),
            ),
            Kind::ConsecutiveGateway => (
                &self.stats.ejections_detected_consecutive_gateway_failure,
                &self.stats.ejections_enforced_consecutive_gateway_failure,
                c.enforcing_consecutive_gateway_failure.unwrap_or(0),
            ),
            Kind::ConsecutiveLocal => (
                &self
                    .stats
                    .ejections_detected_consecutive_local_origin_failure,
                &self
                    .stats
                    .ejections_enforced_consecutive_local_origin_failure,
                c.enforcing_consecutive_local_origin_failure.unwrap_or(100),
            ),
            Kind::SuccessRate => (
                &self.stats.ejections_detected_success_rate,
                &self.stats.ejections_enforced_success_rate,
                c.enforcing_success_rate.unwrap_or(100),
            ),
            Kind::FailurePercentage => (
                &self.stats.ejections_detected_failure_percentage,
                &self.stats.ejections_enforced_failure_percentage,
                c.enforcing_failure_percentage.unwrap_or(0),
            ),
            Kind::FailurePercentageLocal => (
                &self
                    .stats
                    .ejections_detected_failure_percentage_local_origin,
                &self
                    .stats
                    .ejections_enforced_failure_percentage_local_origin,
                c.enforcing_failure_percentage_local_origin.unwrap_or(0),
            ),
        };
        detected.inc();
        if kind == Kind::Consecutive5xx {
            // Deprecated Envoy counter, kept for dashboards that still read it.
            self.stats.ejections_consecutive_5xx.inc();
        }
        if !roll(enforcing) {
            return;
        }
        let total = self
            .cluster
            .upgrade()
            .map(|c| c.hosts.load().all.len())
            .unwrap_or(1)
            .max(1);
        let active = self.stats.ejections_active.value().max(0) as usize;
        let percent = 100.0 * (active + 1) as f64 / total as f64;
        if percent > self.cfg.max_ejection_percent.unwrap_or(10) as f64 && active > 0 {
            self.stats.ejections_overflow.inc();
            return;
        }
        if self.eject(host, kind) {
            enforced.inc();
        }
    }

    /// Ejects `host`; false when another thread ejected it first.
    fn eject(&self, host: &Arc<Host>, kind: Kind) -> bool {
        let st = &host.outlier;
        let m = st.multiplier.fetch_add(1, Ordering::AcqRel) + 1;
        let base = self.cfg.base_ejection_time();
        let cap = self.cfg.max_ejection_time().max(base);
        let time = base.saturating_mul(m).min(cap);
        let until = self.now_ms() + time.as_millis() as u64;
        // Only the thread that flips 0 -> until owns this ejection (no double counting).
        if st
            .ejected_until_ms
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            st.multiplier.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        host.health_flags
            .fetch_or(health::FAILED_OUTLIER_CHECK, Ordering::AcqRel);
        self.stats.ejections_active.inc();
        self.stats.ejections_enforced_total.inc();
        self.stats.ejections_total.inc();
        tracing::info!(host = %host.addr, ?kind, ejection_ms = time.as_millis() as u64, "outlier ejected");
        if let Some(c) = self.cluster.upgrade() {
            c.refresh_health_stats();
        }
        true
    }

    /// One interval: return hosts whose time is up, age multipliers, run the statistical checks.
    pub fn tick(&self) {
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        let hosts = cluster.hosts.load().all.clone();
        let now = self.now_ms();
        let mut changed = false;
        for h in &hosts {
            let st = &h.outlier;
            let until = st.ejected_until_ms.load(Ordering::Acquire);
            if until != 0 {
                if now >= until
                    && st
                        .ejected_until_ms
                        .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    h.health_flags
                        .fetch_and(!health::FAILED_OUTLIER_CHECK, Ordering::AcqRel);
                    self.stats.ejections_active.dec();
                    tracing::info!(host = %h.addr, "outlier ejection ended");
                    changed = true;
                }
            } else {
                let _ = st
                    .multiplier
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| m.checked_sub(1));
            }
        }
        self.statistical(&hosts);
        if changed {
            cluster.refresh_health_stats();
        }
    }

    /// Success-rate (mean − stdev × factor) and failure-percentage checks over the last interval.
    /// Without `split_external_local_origin_errors` local-origin failures were already counted
    /// as 503/504 in the external window; with it they get their own failure-percentage check.
    fn statistical(&self, hosts: &[Arc<Host>]) {
        let c = &self.cfg;
        let take = |a: &AtomicU64, b: &AtomicU64| {
            let (ok, bad) = (a.swap(0, Ordering::AcqRel), b.swap(0, Ordering::AcqRel));
            (ok + bad, bad)
        };
        let ext: Vec<(u64, u64)> = hosts
            .iter()
            .map(|h| take(&h.outlier.ext_success, &h.outlier.ext_failure))
            .collect();
        let local: Vec<(u64, u64)> = hosts
            .iter()
            .map(|h| take(&h.outlier.local_success, &h.outlier.local_failure))
            .collect();
        let sr_volume = (c.success_rate_request_volume.unwrap_or(100) as u64).max(1);
        let eligible: Vec<usize> = (0..hosts.len())
            .filter(|&i| ext[i].0 >= sr_volume)
            .collect();
        if !eligible.is_empty()
            && eligible.len() >= c.success_rate_minimum_hosts.unwrap_or(5) as usize
        {
            let rates: Vec<f64> = eligible
                .iter()
                .map(|&i| 100.0 * (ext[i].0 - ext[i].1) as f64 / ext[i].0 as f64)
                .collect();
            let mean = rates.iter().sum::<f64>() / rates.len() as f64;
            let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
            let factor = c.success_rate_stdev_factor.unwrap_or(1900) as f64 / 1000.0;
            let threshold = mean - factor * var.sqrt();
            for (k, &i) in eligible.iter().enumerate() {
                if rates[k] < threshold {
                    self.detected(&hosts[i], Kind::SuccessRate);
                }
            }
        }
        let Some(threshold) = c.failure_percentage_threshold else {
            return;
        };
        let fp_volume = (c.failure_percentage_request_volume.unwrap_or(50) as u64).max(1);
        let min_hosts = c.failure_percentage_minimum_hosts.unwrap_or(5) as usize;
        let mut windows = vec![(&ext, Kind::FailurePercentage)];
        if c.split_external_local_origin_errors {
            windows.push((&local, Kind::FailurePercentageLocal));
        }
        for (w, kind) in windows {
            let eligible: Vec<usize> = (0..hosts.len()).filter(|&i| w[i].0 >= fp_volume).collect();
            if eligible.is_empty() || eligible.len() < min_hosts {
                continue;
            }
            for i in eligible {
                if 100.0 * w[i].1 as f64 / w[i].0 as f64 >= threshold as f64 {
                    self.detected(&hosts[i], kind);
                }
            }
        }
    }

    /// Runs [`Detector::tick`] every `interval` until the cluster is dropped.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        let interval = self.cfg.interval().max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t.tick().await;
            loop {
                t.tick().await;
                match this.upgrade() {
                    Some(d) => d.tick(),
                    None => return,
                }
            }
        })
    }
}
