//! `envoy.filters.http.fault` (`envoy.extensions.filters.http.fault.v3.HTTPFault`): delays and
//! aborts injected for a percentage of requests, or as the request's `x-envoy-fault-*` headers
//! ask when `header_delay` / `header_abort` are configured; `max_active_faults` bounds how many
//! requests are faulted at once. Per-route config replaces the filter's. Stats:
//! `http.<stat_prefix>.fault.{delays_injected,aborts_injected,faults_overflow,active_faults}`.

use crate::stats::{Counter, Gauge, Scope};
use crate::{
    local_reply, Body, BoxFuture, FactoryContext, HttpFilter, HttpFilterFactory, Next, RequestInfo,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use mecha_config::{decode, ConfigError, FractionalPercent, PbDuration, TypedConfig};
use serde::Deserialize;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
pub const NAME: &str = "envoy.filters.http.fault";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
    #[serde(default)]
    pub max_active_faults: Option<u32>,
    #[serde(default)]
    pub upstream_cluster: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    #[serde(default)]
    pub fixed_delay: Option<PbDuration>,
    #[serde(default)]
    pub header_delay: Option<serde_yaml::Mapping>,
    /// Default 0 %, as Envoy's unset `FractionalPercent`.
    #[serde(default)]
    pub percentage: Option<FractionalPercent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    #[serde(default)]
    pub http_status: Option<u32>,
    #[serde(default)]
    pub grpc_status: Option<u32>,
    #[serde(default)]
    pub header_abort: Option<serde_yaml::Mapping>,
    #[serde(default)]
    pub percentage: Option<FractionalPercent>,
}

fn percent(p: Option<FractionalPercent>) -> f64 {
    p.map(|p| p.ratio()).unwrap_or(0.0)
}

fn validate(cfg: &FaultConfig, path: &str) -> Result<(), ConfigError> {
    if let Some(a) = &cfg.abort {
        let kinds = [
            a.http_status.is_some(),
            a.grpc_status.is_some(),
            a.header_abort.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(ConfigError::new(
                format!("{path}.abort"),
                "exactly one of http_status, grpc_status or header_abort is required",
            ));
        }
        if let Some(s) = a.http_status {
            if !(200..600).contains(&s) {
                return Err(ConfigError::new(
                    format!("{path}.abort.http_status"),
                    format!("{s} is not in [200, 600)"),
                ));
            }
        }
    }
    if let Some(d) = &cfg.delay {
        if d.fixed_delay.is_some() == d.header_delay.is_some() {
            return Err(ConfigError::new(
                format!("{path}.delay"),
                "exactly one of fixed_delay or header_delay is required",
            ));
        }
    }
    Ok(())
}

#[derive(Clone)]
struct FaultStats {
    delays_injected: Counter,
    aborts_injected: Counter,
    faults_overflow: Counter,
    active_faults: Gauge,
}

pub struct Fault {
    name: String,
    cfg: Arc<FaultConfig>,
    stats: FaultStats,
    active: Arc<AtomicU64>,
}

/// Keeps `active_faults` exact however the request ends.
struct ActiveFault(Arc<AtomicU64>, Gauge);

impl Drop for ActiveFault {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.dec();
    }
}

fn header_num(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// A header-controlled percentage (`x-envoy-fault-*-percentage`): capped by the configured one.
fn header_percent(h: &HeaderMap, name: &str, configured: f64) -> f64 {
    match header_num(h, name) {
        Some(n) => (n as f64 / 100.0).min(configured),
        None => configured,
    }
}

fn hit(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && rand::random::<f64>() < p)
}

impl HttpFilter for Fault {
    fn call<'a>(&'a self, req: Request<Body>, next: Next<'a>) -> BoxFuture<'a, Response<Body>> {
        crate::boxed_in_place(|| async move {
            let per_route = req
                .extensions()
                .get::<RequestInfo>()
                .and_then(|i| i.per_filter.get::<FaultConfig>(&self.name).cloned());
            let cfg = per_route.as_ref().unwrap_or(&self.cfg);
            let h = req.headers();
            let delay = cfg.delay.as_ref().and_then(|d| {
                let p = percent(d.percentage);
                match (d.fixed_delay, &d.header_delay) {
                    (Some(t), _) => hit(p).then_some(t.0),
                    (None, Some(_)) => {
                        let ms = header_num(h, "x-envoy-fault-delay-request")?;
                        hit(header_percent(
                            h,
                            "x-envoy-fault-delay-request-percentage",
                            p,
                        ))
                        .then(|| Duration::from_millis(ms))
                    }
                    _ => None,
                }
            });
            let abort: Option<Result<StatusCode, u32>> = cfg.abort.as_ref().and_then(|a| {
                let p = percent(a.percentage);
                if a.header_abort.is_some() {
                    let pct = header_percent(h, "x-envoy-fault-abort-request-percentage", p);
                    if let Some(code) = header_num(h, "x-envoy-fault-abort-grpc-request") {
                        return hit(pct).then_some(Err(code as u32));
                    }
                    let s = header_num(h, "x-envoy-fault-abort-request")?;
                    let s = StatusCode::from_u16(u16::try_from(s).ok()?).ok()?;
                    return hit(pct).then_some(Ok(s));
                }
                if !hit(p) {
                    return None;
                }
                match (a.http_status, a.grpc_status) {
                    (Some(s), _) => StatusCode::from_u16(s as u16).ok().map(Ok),
                    (None, Some(g)) => Some(Err(g)),
                    _ => None,
                }
            });
            if delay.is_none() && abort.is_none() {
                return next.run(req).await;
            }
            let max = cfg.max_active_faults.map(u64::from).unwrap_or(u64::MAX);
            if self
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                    (a < max).then_some(a + 1)
                })
                .is_err()
            {
                self.stats.faults_overflow.inc();
                return next.run(req).await;
            }
            self.stats.active_faults.inc();
            let _active = ActiveFault(self.active.clone(), self.stats.active_faults.clone());
            if let Some(d) = delay {
                self.stats.delays_injected.inc();
                tokio::time::sleep(d).await;
            }
            match abort {
                None => next.run(req).await,
                Some(Ok(status)) => {
                    self.stats.aborts_injected.inc();
                    local_reply(status, "fault filter abort")
                }
                Some(Err(grpc)) => {
                    self.stats.aborts_injected.inc();
                    let mut resp = Response::new(crate::empty());
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    resp.headers_mut()
                        .insert("grpc-status", HeaderValue::from(grpc));
                    resp.headers_mut().insert(
                        "grpc-message",
                        HeaderValue::from_static("fault filter abort"),
                    );
                    resp
                }
            }
        })
    }
}

/// Registers under the `@type` and the well-known name.
pub struct FaultFactory;

impl HttpFilterFactory for FaultFactory {
    fn type_names(&self) -> &[&'static str] {
        &[TYPE]
    }
    fn filter_names(&self) -> &[&'static str] {
        &[NAME]
    }
    fn create(
        &self,
        config: Option<&TypedConfig>,
        path: &str,
        ctx: &FactoryContext,
    ) -> Result<Arc<dyn HttpFilter>, ConfigError> {
        let cfg: FaultConfig = match config {
            Some(tc) => decode(tc.body(), path)?,
            None => FaultConfig::default(),
        };
        validate(&cfg, path)?;
        let scope = Scope::http(&ctx.stat_prefix).sub("fault");
        let s = &ctx.stats;
        Ok(Arc::new(Fault {
            name: NAME.to_string(),
            cfg: Arc::new(cfg),
            stats: FaultStats {
                delays_injected: s.counter(&scope, "delays_injected"),
                aborts_injected: s.counter(&scope, "aborts_injected"),
                faults_overflow: s.counter(&scope, "faults_overflow"),
                active_faults: s.gauge(&scope, "active_faults"),
            },
            active: Arc::new(AtomicU64::new(0)),
        }))
    }
    fn per_route(
        &self,
        config: &TypedConfig,
        path: &str,
    ) -> Result<Arc<dyn Any + Send + Sync>, ConfigError> {
        let cfg: FaultConfig = decode(config.body(), path)?;
        validate(&cfg, path)?;
        Ok(Arc::new(cfg))
    }
}
