//! The resilience state a cluster carries: circuit breakers, retry/overflow stats, the outlier
//! detector and the active health checker, plus the background tasks that drive the latter two.

use super::circuit_breaker::CircuitBreakers;
use super::health_check::HealthChecker;
use super::outlier::Detector;
use super::Cluster;
use crate::stats::ResilienceStats;
use mecha_config::Cluster as ClusterConfig;
use mecha_filters::stats::{Scope, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

pub struct Resilience {
    pub breakers: CircuitBreakers,
    pub stats: ResilienceStats,
    outlier: Option<Arc<Detector>>,
    health: Option<Arc<HealthChecker>>,
    /// Healthy-panic threshold in percent (`common_lb_config.healthy_panic_threshold`).
    pub panic_threshold: f64,
    started: AtomicBool,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Resilience {
    pub fn new(cfg: &ClusterConfig, store: &Store, owner: Weak<Cluster>) -> Self {
        let scope = Scope::cluster(&cfg.name);
        Self {
            breakers: CircuitBreakers::new(cfg.circuit_breakers.as_ref(), store, &scope),
            stats: ResilienceStats::new(store, &scope),
            outlier: cfg
                .outlier_detection
                .as_ref()
                .map(|o| Arc::new(Detector::new(o, store, &scope, owner.clone()))),
            health: cfg
                .health_checks
                .first()
                .map(|hc| Arc::new(HealthChecker::new(hc, cfg, store, &scope, owner))),
            panic_threshold: mecha_config::CommonLbConfig::panic_threshold(
                cfg.common_lb_config.as_ref(),
            ),
            started: AtomicBool::new(false),
            tasks: parking_lot::Mutex::new(vec![]),
        }
    }

    pub fn outlier(&self) -> Option<&Arc<Detector>> {
        self.outlier.as_ref()
    }

    /// Whether new hosts start unhealthy until their first active health check passes.
    pub fn has_active_health_checks(&self) -> bool {
        self.health.is_some()
    }

    /// Starts the outlier interval timer and the health checker (once; needs a Tokio runtime).
    pub fn start(&self) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut tasks = self.tasks.lock();
        if let Some(d) = &self.outlier {
            tasks.push(d.spawn());
        }
        if let Some(h) = &self.health {
            tasks.push(h.spawn());
        }
    }
}

impl Drop for Resilience {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}
