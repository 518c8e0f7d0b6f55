//! App health checks (Dapr's `--enable-app-health-check`): mecha probes the app on an interval and,
//! after `threshold` consecutive failures, considers it unhealthy: subscriptions stop pulling from
//! their brokers and invocations of this app are refused with `ERR_DIRECT_INVOKE` ("app is not in a
//! healthy state") instead of being forwarded. One successful probe makes it healthy again and
//! everything resumes. As Dapr, the app starts unhealthy until the first probe succeeds, and the
//! sidecar's own `/v1.0/healthz` does not reflect the app's health.
//!
//! HTTP apps: `GET {path}` through the local app's cluster, healthy on 2xx. gRPC apps:
//! `dapr.proto.runtime.v1.AppCallbackHealthCheck/HealthCheck`, healthy on OK.

use crate::app_channel::{AppProtocol, UpstreamChannel};
use crate::runtime::Runtime;
use dapr::dapr::proto::runtime::v1 as rt;
use std::sync::Weak;
use std::time::Duration;

/// Dapr's defaults: path `/healthz`, every 5 s, 500 ms timeout, unhealthy after 3 failures.
#[derive(Debug, Clone)]
pub struct AppHealthConfig {
    /// Probe path for HTTP apps (ignored for gRPC apps).
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub threshold: u32,
}

impl Default for AppHealthConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_millis(500),
            threshold: 3,
        }
    }
}

impl AppHealthConfig {
    /// Dapr's checks: a positive interval, a timeout no longer than it, a threshold of at least 1.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("--app-health-probe-interval must be larger than 0".into());
        }
        if self.timeout.is_zero() {
            return Err("--app-health-probe-timeout must be larger than 0".into());
        }
        if self.timeout > self.interval {
            return Err(
                "app health checks probe timeouts must be smaller than probe intervals".into(),
            );
        }
        if self.threshold == 0 {
            return Err("--app-health-threshold must be at least 1".into());
        }
        if !self.path.starts_with('/') {
            return Err(format!(
                "--app-health-check-path \"{}\" must start with '/'",
                self.path
            ));
        }
        Ok(())
    }
}

/// Consecutive-failure counting as Dapr's `apphealth`: starts at `threshold` (unhealthy until
/// proven healthy); a success resets it, a failure increments it.
#[derive(Debug)]
pub(crate) struct Counter {
    failures: u32,
    threshold: u32,
}

impl Counter {
    pub(crate) fn new(threshold: u32) -> Self {
        Self {
            failures: threshold,
            threshold,
        }
    }

    pub(crate) fn healthy(&self) -> bool {
        self.failures < self.threshold
    }

    /// Records a probe result; `Some(new state)` when the state changed.
    pub(crate) fn record(&mut self, ok: bool) -> Option<bool> {
        let before = self.healthy();
        if ok {
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
        }
        let after = self.healthy();
        (before != after).then_some(after)
    }
}

/// One probe, bounded by the timeout. `Err` says why it failed (for the log).
async fn probe(rt: &Runtime, cfg: &AppHealthConfig) -> Result<(), String> {
    let fut = async {
        match rt.opts.app_protocol {
            AppProtocol::Http => {
                let (status, _) = rt
                    .app_request(http::Method::GET, &cfg.path, bytes::Bytes::new(), None)
                    .await?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("{} answered HTTP {}", cfg.path, status.as_u16()))
                }
            }
            AppProtocol::Grpc => {
                let ch: UpstreamChannel = rt.app_channel()?;
                let mut client =
                    rt::app_callback_health_check_client::AppCallbackHealthCheckClient::with_origin(
                        ch,
                        http::Uri::from_static("http://localhost"),
                    );
                client
                    .health_check(rt.grpc_request(()))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("HealthCheck: {:?}: {}", s.code(), s.message()))
            }
        }
    };
    match tokio::time::timeout(cfg.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
    }
}

/// The probe loop: runs until the runtime is dropped or stopped. A weak reference, so the loop
/// never keeps the runtime alive.
pub(crate) async fn run(
    rt: Weak<Runtime>,
    cfg: AppHealthConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut counter = Counter::new(cfg.threshold);
    let mut tick = tokio::time::interval(cfg.interval);
    // A probe that overran its slot is not followed by a burst of catch-up probes.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = stop.changed() => return,
        }
        let Some(rt) = rt.upgrade() else { return };
        let result = probe(&rt, &cfg).await;
        if let Err(e) = &result {
            tracing::debug!(error = %e, "app health probe failed");
        }
        if let Some(healthy) = counter.record(result.is_ok()) {
            if healthy {
                tracing::info!("app entered healthy status");
            } else {
                tracing::warn!(
                    reason = %result.err().unwrap_or_default(),
                    failures = cfg.threshold,
                    "app entered unhealthy status: subscriptions paused, invocations refused"
                );
            }
            rt.set_app_healthy(healthy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_unhealthy_and_follows_dapr_counting() {
        let mut c = Counter::new(2);
        assert!(!c.healthy());
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), Some(true));
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(false));
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), Some(true));
    }

    #[test]
    fn validation() {
        assert!(AppHealthConfig::default().validate().is_ok());
        let bad = AppHealthConfig {
            timeout: Duration::from_secs(10),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = AppHealthConfig {
            threshold: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
