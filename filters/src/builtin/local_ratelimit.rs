//! `envoy.filters.http.local_ratelimit`
//! (`envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`): a token bucket per
//! filter (listener/HCM level) or per route / virtual host (`typed_per_filter_config`), applied to
//! `filter_enabled` of requests and enforced for `filter_enforced` of them. A limited request gets
//! 429 `local_rate_limited` (or `status`), with `x-ratelimit-*` headers when
//! `enable_x_ratelimit_headers: DRAFT_VERSION_03`. Stats:
//! `<stat_prefix>.http_local_rate_limit.{enabled,enforced,rate_limited,ok}`.
//!
//! The bucket is one atomic word (fill epoch, tokens), refilled lazily by compare-and-swap when a
//! request observes that fill intervals have passed — no timer task and no lock.

use crate::stats::{Counter, Scope, Store};
use crate::{
    local_reply, Body, BoxFuture, FactoryContext, HttpFilter, HttpFilterFactory, Next, RequestInfo,
};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use mecha_config::{
    decode, ConfigError, FractionalPercent, HeaderValueOption, PbDuration, TypedConfig,
};
use serde::Deserialize;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TYPE: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
pub const NAME: &str = "envoy.filters.http.local_ratelimit";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRateLimitConfig {
    pub stat_prefix: String,
    #[serde(default)]
    pub status: Option<HttpStatus>,
    #[serde(default)]
    pub token_bucket: Option<TokenBucketConfig>,
    /// Default 0 % (disabled), as Envoy.
    #[serde(default)]
    pub filter_enabled: Option<RuntimeFractionalPercent>,
    /// Default 0 % (not enforced), as Envoy.
    #[serde(default)]
    pub filter_enforced: Option<RuntimeFractionalPercent>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_add_when_not_enforced: Vec<HeaderValueOption>,
    #[serde(default)]
    pub enable_x_ratelimit_headers: Option<XRateLimitHeaders>,
    #[serde(default)]
    pub local_rate_limit_per_downstream_connection: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStatus {
    pub code: u16,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub max_tokens: u32,
    #[serde(default)]
    pub tokens_per_fill: Option<u32>,
    pub fill_interval: PbDuration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFractionalPercent {
    pub default_value: FractionalPercent,
    #[serde(default)]
    pub runtime_key: Option<String>,
}

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum XRateLimitHeaders {
    OFF,
    DRAFT_VERSION_03,
}

/// A lock-free token bucket: high 32 bits = fill epoch, low 32 bits = tokens.
pub struct TokenBucket {
    max: u32,
    per_fill: u32,
    interval: Duration,
    start: Instant,
    state: AtomicU64,
}

impl TokenBucket {
    pub fn new(c: &TokenBucketConfig) -> Self {
        Self {
            max: c.max_tokens,
            per_fill: c.tokens_per_fill.unwrap_or(1),
            interval: c.fill_interval.0,
            start: Instant::now(),
            state: AtomicU64::new(c.max_tokens as u64),
        }
    }

    fn epoch(&self) -> u64 {
        (self.start.elapsed().as_nanos() / self.interval.as_nanos().max(1)) as u64 & 0xffff_ffff
    }

    /// Takes a token; returns the tokens left, or `None` when empty.
    pub fn try_take(&self) -> Option<u32> {
        let now = self.epoch();
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let (epoch, mut tokens) = (cur >> 32, (cur & 0xffff_ffff) as u32);
            if now > epoch {
                let fills = (now - epoch).min(u32::MAX as u64) as u32;
                tokens = tokens
                    .saturating_add(fills.saturating_mul(self.per_fill))
                    .min(self.max);
            }
            let (next_tokens, result) = match tokens.checked_sub(1) {
                Some(t) => (t, Some(t)),
                None => (0, None),
            };
            let next = (now.max(epoch) << 32) | next_tokens as u64;
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return result,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Seconds until the next fill (for `x-ratelimit-reset`).
    fn reset_secs(&self) -> u64 {
        let i = self.interval.as_nanos().max(1);
        let into = self.start.elapsed().as_nanos() % i;
        ((i - into) as f64 / 1e9).ceil() as u64
    }
}

/// One compiled configuration (the filter's, or a route's) with its own bucket and stats.
pub struct Limiter {
    cfg: LocalRateLimitConfig,
    bucket: Option<TokenBucket>,
    enabled: f64,
    enforced: f64,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Registered on first use: per-route limiters are parsed before the stats store is known.
    stats: std::sync::OnceLock<RlStats>,
}

#[derive(Clone)]
struct RlStats {
    enabled: Counter,
    enforced: Counter,
    rate_limited: Counter,
    ok: Counter,
}

impl RlStats {
    fn new(store: &Store, stat_prefix: &str) -> Self {
        let scope = Scope::plain(stat_prefix).sub("http_local_rate_limit");
        Self {
            enabled: store.counter(&scope, "enabled"),
            enforced: store.counter(&scope, "enforced"),
            rate_limited: store.counter(&scope, "rate_limited"),
            ok: store.counter(&scope, "ok"),
        }
    }
}

fn ratio(p: &Option<RuntimeFractionalPercent>) -> f64 {
    p.as_ref().map(|p| p.default_value.ratio()).unwrap_or(0.0)
}

fn hit(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && rand::random::<f64>() < p)
}

impl Limiter {
    fn compile(cfg: LocalRateLimitConfig, path: &str) -> Result<Self, ConfigError> {
        if cfg.local_rate_limit_per_downstream_connection {
            return Err(ConfigError::new(
                format!("{path}.local_rate_limit_per_downstream_connection"),
                "per-connection buckets are not supported yet",
            ));
        }
        if let Some(tb) = &cfg.token_bucket {
            if tb.fill_interval.0 < Duration::from_millis(50) {
                return Err(ConfigError::new(
                    format!("{path}.token_bucket.fill_interval"),
                    "must be at least 50ms, as Envoy",
                ));
            }
        }
        let status = match cfg.status {
            Some(s) => StatusCode::from_u16(s.code)
                .ok()
                .filter(|s| s.as_u16() >= 400)
                .ok_or_else(|| {
                    ConfigError::new(format!("{path}.status.code"), "must be a 4xx or 5xx status")
                })?,
            None => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut headers = vec![];
        for (i, h) in cfg.response_headers_to_add.iter().enumerate() {
            let name = HeaderName::from_bytes(h.header.key.to_ascii_lowercase().as_bytes());
            let value = HeaderValue::from_str(&h.header.value);
            match (name, value) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                _ => {
                    return Err(ConfigError::new(
                        format!("{path}.response_headers_to_add[{i}]"),
                        "invalid header",
                    ))
                }
            }
        }
        Ok(Self {
            bucket: cfg.token_bucket.as_ref().map(TokenBucket::new),
            enabled: ratio(&cfg.filter_enabled),
            enforced: ratio(&cfg.filter_enforced),
            status,
            headers,
            stats: Default::default(),
            cfg,
        })
    }

    async fn run<'a>(
        &'a self,
        store: &Store,
        req: Request<Body>,
        next: Next<'a>,
    ) -> Response<Body> {
        let Some(bucket) = &self.bucket else {
            return next.run(req).await;
        };
        if !hit(self.enabled) {
            return next.run(req).await;
        }
        let stats = self
            .stats
            .get_or_init(|| RlStats::new(store, &self.cfg.stat_prefix));
        stats.enabled.inc();
        let taken = bucket.try_take();
        let xrl = self.cfg.enable_x_ratelimit_headers == Some(XRateLimitHeaders::DRAFT_VERSION_03);
        let add_xrl = |resp: &mut Response<Body>, remaining: u32| {
            if xrl {
                let h = resp.headers_mut();
                h.insert("x-ratelimit-limit", HeaderValue::from(bucket.max));
                h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
                h.insert("x-ratelimit-reset", HeaderValue::from(bucket.reset_secs()));
            }
        };
        match taken {
            Some(left) => {
                stats.ok.inc();
                let mut resp = next.run(req).await;
                add_xrl(&mut resp, left);
                resp
            }
            None => {
                stats.rate_limited.inc();
                if !hit(self.enforced) {
                    return next.run(req).await;
                }
                stats.enforced.inc();
                let mut resp = local_reply(self.status, "local_rate_limited");
                for (k, v) in &self.headers {
                    resp.headers_mut().append(k.clone(), v.clone());
                }
                add_xrl(&mut resp, 0);
                resp
            }
        }
    }
}

pub struct LocalRateLimit {
    name: String,
    limiter: Limiter,
    store: Arc<Store>,
}

impl HttpFilter for LocalRateLimit {
    fn call<'a>(&'a self, req: Request<Body>, next: Next<'a>) -> BoxFuture<'a, Response<Body>> {
        crate::boxed_in_place(|| async move {
            // A route's own config (with its own bucket) replaces the filter's.
            let route = req
                .extensions()
                .get::<RequestInfo>()
                .and_then(|i| i.per_filter.0.as_ref())
                .and_then(|m| m.get(&self.name).cloned());
            match route.as_ref().and_then(|r| r.downcast_ref::<Limiter>()) {
                Some(l) => l.run(&self.store, req, next).await,
                None => self.limiter.run(&self.store, req, next).await,
            }
        })
    }
}

pub struct LocalRateLimitFactory;

impl HttpFilterFactory for LocalRateLimitFactory {
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
        let Some(tc) = config else {
            return Err(ConfigError::new(
                path,
                "a typed_config with stat_prefix is required",
            ));
        };
        let cfg: LocalRateLimitConfig = decode(tc.body(), path)?;
        Ok(Arc::new(LocalRateLimit {
            name: NAME.to_string(),
            limiter: Limiter::compile(cfg, path)?,
            store: ctx.stats.clone(),
        }))
    }
    fn per_route(
        &self,
        config: &TypedConfig,
        path: &str,
    ) -> Result<Arc<dyn Any + Send + Sync>, ConfigError> {
        let cfg: LocalRateLimitConfig = decode(config.body(), path)?;
        Ok(Arc::new(Limiter::compile(cfg, path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_is_exact_under_concurrency() {
        let b = TokenBucket::new(&TokenBucketConfig {
            max_tokens: 1000,
            tokens_per_fill: Some(1),
            fill_interval: PbDuration::secs(3600),
        });
        let taken = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if b.try_take().is_some() {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.load(Ordering::Relaxed), 1000);
        assert!(b.try_take().is_none());
    }

    #[test]
    fn bucket_refills_per_interval() {
        let b = TokenBucket::new(&TokenBucketConfig {
            max_tokens: 2,
            tokens_per_fill: Some(2),
            fill_interval: PbDuration::millis(60),
        });
        assert_eq!(b.try_take(), Some(1));
        assert_eq!(b.try_take(), Some(0));
        assert_eq!(b.try_take(), None);
        std::thread::sleep(Duration::from_millis(130));
        assert_eq!(b.try_take(), Some(1));
    }
}
