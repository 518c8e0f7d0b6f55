//! Retries and timeouts of one routed request, as Envoy's router does them.
//!
//! - [`RoutePolicy`] is compiled once per route from `retry_policy` (route, else virtual host),
//!   `per_request_buffer_limit_bytes`, `include_*attempt_count*` and `max_stream_duration`.
//! - [`Plan`] is the per-request view: the route's policy adjusted by Envoy's request headers
//!   (`x-envoy-retry-on`, `x-envoy-retry-grpc-on`, `x-envoy-max-retries`,
//!   `x-envoy-upstream-rq-timeout-ms`, `x-envoy-upstream-rq-per-try-timeout-ms`, `grpc-timeout`),
//!   which are consumed and not forwarded.
//! - [`forward`] runs the attempts: per-try timeout, retry conditions (`retry_on`, including the
//!   gRPC ones read from `grpc-status`), fully jittered exponential back-off, the previous-hosts
//!   predicate, the cluster's retry circuit breaker / budget, and the global route timeout around
//!   all of it. A timed-out or abandoned attempt is dropped, which resets its upstream stream.
//!
//! Request bodies are teed into a buffer while they stream to the first attempt; a retry replays
//! the buffer. A body larger than the limit, or not yet complete when the attempt failed, makes
//! the request non-retriable rather than sending a corrupted copy.

use super::idle;
use crate::cluster::host::Host;
use crate::cluster::outlier::Outcome;
use crate::cluster::Cluster;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use mecha_config::{self as cfg, ConfigError};
use mecha_filters::{empty, full, local_reply, Body, BoxError, UpstreamError};
use parking_lot::Mutex;
use regex::Regex;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// `retry_on` conditions as bits.
pub mod on {
    pub const X5XX: u32 = 1 << 0;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const RESET: u32 = 1 << 2;
    pub const CONNECT_FAILURE: u32 = 1 << 3;
    pub const REFUSED_STREAM: u32 = 1 << 4;
    pub const RETRIABLE_4XX: u32 = 1 << 5;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 6;
    pub const RETRIABLE_HEADERS: u32 = 1 << 7;
    pub const GRPC_CANCELLED: u32 = 1 << 8;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 9;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 10;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 11;
    pub const GRPC_INTERNAL: u32 = 1 << 12;
    pub const GRPC_ANY: u32 = GRPC_CANCELLED
        | GRPC_DEADLINE_EXCEEDED
        | GRPC_RESOURCE_EXHAUSTED
        | GRPC_UNAVAILABLE
        | GRPC_INTERNAL;
    /// Failures without a response (reset, per-try timeout) are retried under these.
    pub const ANY_RESET: u32 = X5XX | GATEWAY_ERROR | RESET;
}

fn token(t: &str, grpc_only: bool) -> Option<u32> {
    let http = match t {
        "5xx" => Some(on::X5XX),
        "gateway-error" => Some(on::GATEWAY_ERROR),
        "reset" | "reset-before-request" => Some(on::RESET),
        "connect-failure" => Some(on::CONNECT_FAILURE),
        "refused-stream" => Some(on::REFUSED_STREAM),
        "retriable-4xx" => Some(on::RETRIABLE_4XX),
        "retriable-status-codes" => Some(on::RETRIABLE_STATUS_CODES),
        "retriable-headers" => Some(on::RETRIABLE_HEADERS),
        _ => None,
    };
    if grpc_only && http.is_some() {
        return None;
    }
    http.or(match t {
        "cancelled" => Some(on::GRPC_CANCELLED),
        "deadline-exceeded" => Some(on::GRPC_DEADLINE_EXCEEDED),
        "resource-exhausted" => Some(on::GRPC_RESOURCE_EXHAUSTED),
        "unavailable" => Some(on::GRPC_UNAVAILABLE),
        "internal" => Some(on::GRPC_INTERNAL),
        _ => None,
    })
}

/// Parses a comma-separated `retry_on` list; unknown tokens are returned for the caller to judge.
pub fn parse_retry_on(s: &str, grpc_only: bool) -> (u32, Vec<String>) {
    let mut bits = 0;
    let mut unknown = vec![];
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token(t, grpc_only) {
            Some(b) => bits |= b,
            None => unknown.push(t.to_string()),
        }
    }
    (bits, unknown)
}

/// A `retriable_headers` matcher (the subset of `HeaderMatcher` that makes sense on responses).
#[derive(Clone, Debug)]
enum HeaderTest {
    Present(bool),
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
struct RetriableHeader {
    name: HeaderName,
    test: HeaderTest,
    invert: bool,
}

impl RetriableHeader {
    fn compile(h: &cfg::HeaderMatcher, path: &str) -> Result<Self, ConfigError> {
        let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
            .map_err(|_| ConfigError::new(format!("{path}.name"), "invalid header name"))?;
        let sm = h.string_match.as_ref();
        let regex = |r: &str, p: String| {
            Regex::new(&format!("^(?:{r})$"))
                .map(HeaderTest::Regex)
                .map_err(|e| ConfigError::new(p, format!("invalid regex: {e}")))
        };
        let test = if let Some(v) = h.exact_match.clone().or(sm.and_then(|s| s.exact.clone())) {
            HeaderTest::Exact(v)
        } else if let Some(v) = h.prefix_match.clone().or(sm.and_then(|s| s.prefix.clone())) {
            HeaderTest::Prefix(v)
        } else if let Some(v) = h.suffix_match.clone().or(sm.and_then(|s| s.suffix.clone())) {
            HeaderTest::Suffix(v)
        } else if let Some(v) = h
            .contains_match
            .clone()
            .or(sm.and_then(|s| s.contains.clone()))
        {
            HeaderTest::Contains(v)
        } else if let Some(r) = &h.safe_regex_match {
            regex(&r.regex, format!("{path}.safe_regex_match.regex"))?
        } else if let Some(r) = sm.and_then(|s| s.safe_regex.as_ref()) {
            regex(&r.regex, format!("{path}.string_match.safe_regex.regex"))?
        } else if h.range_match.is_some() {
            return Err(ConfigError::new(
                format!("{path}.range_match"),
                "range_match is not supported in retriable_headers",
            ));
        } else {
            HeaderTest::Present(h.present_match.unwrap_or(true))
        };
        Ok(Self {
            name,
            test,
            invert: h.invert_match,
        })
    }

    fn matches(&self, headers: &HeaderMap) -> bool {
        let v = headers.get(&self.name).and_then(|v| v.to_str().ok());
        let m = match (&self.test, v) {
            (HeaderTest::Present(p), v) => v.is_some() == *p,
            (_, None) => false,
            (HeaderTest::Exact(s), Some(v)) => v == s,
            (HeaderTest::Prefix(s), Some(v)) => v.starts_with(s.as_str()),
            (HeaderTest::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
            (HeaderTest::Contains(s), Some(v)) => v.contains(s.as_str()),
            (HeaderTest::Regex(r), Some(v)) => r.is_match(v),
        };
        m != self.invert
    }
}

/// A compiled `retry_policy`.
#[derive(Clone, Debug)]
pub struct RetryConfig {
    pub on: u32,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`: no response progress on one attempt for this long cancels it.
    pub per_try_idle_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    pub statuses: Vec<u16>,
    headers: Vec<RetriableHeader>,
    pub previous_hosts: bool,
    pub host_selection_max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            on: 0,
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            statuses: vec![],
            headers: vec![],
            previous_hosts: false,
            host_selection_max_attempts: 1,
        }
    }
}

impl RetryConfig {
    fn compile(p: &cfg::RetryPolicy, path: &str) -> Result<Self, Vec<ConfigError>> {
        let mut errors = vec![];
        let (on, unknown) = parse_retry_on(p.retry_on.as_deref().unwrap_or(""), false);
        if !unknown.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.retry_on"),
                format!("unknown retry condition(s): {}", unknown.join(", ")),
            ));
        }
        let (base, max) = match &p.retry_back_off {
            Some(b) => {
                if b.base_interval.is_zero() {
                    errors.push(ConfigError::new(
                        format!("{path}.retry_back_off.base_interval"),
                        "must be greater than zero",
                    ));
                }
                let max = b
                    .max_interval
                    .map(|d| d.0)
                    .unwrap_or(b.base_interval.0 * 10);
                if max < b.base_interval.0 {
                    errors.push(ConfigError::new(
                        format!("{path}.retry_back_off.max_interval"),
                        "must be at least base_interval",
                    ));
                }
                (b.base_interval.0, max)
            }
            None => (Duration::from_millis(25), Duration::from_millis(250)),
        };
        let mut statuses = vec![];
        for (i, c) in p.retriable_status_codes.iter().enumerate() {
            match u16::try_from(*c) {
                Ok(c) if (100..=599).contains(&c) => statuses.push(c),
                _ => errors.push(ConfigError::new(
                    format!("{path}.retriable_status_codes[{i}]"),
                    format!("{c} is not an HTTP status code"),
                )),
            }
        }
        let mut headers = vec![];
        for (i, h) in p.retriable_headers.iter().enumerate() {
            match RetriableHeader::compile(h, &format!("{path}.retriable_headers[{i}]")) {
                Ok(h) => headers.push(h),
                Err(e) => errors.push(e),
            }
        }
        let mut previous_hosts = false;
        for (i, pr) in p.retry_host_predicate.iter().enumerate() {
            let by_type = pr
                .typed_config
                .as_ref()
                .is_some_and(|t| t.message_name() == cfg::PREVIOUS_HOSTS_TYPE);
            if by_type || pr.name == cfg::PREVIOUS_HOSTS_PREDICATE {
                previous_hosts = true;
            } else {
                errors.push(ConfigError::new(
                    format!("{path}.retry_host_predicate[{i}]"),
                    format!(
                        "unsupported retry host predicate \"{}\" (supported: {})",
                        pr.name,
                        cfg::PREVIOUS_HOSTS_PREDICATE
                    ),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            on,
            num_retries: p.num_retries(),
            per_try_timeout: p.per_try_timeout.filter(|d| !d.is_zero()).map(|d| d.0),
            per_try_idle_timeout: p.per_try_idle_timeout.filter(|d| !d.is_zero()).map(|d| d.0),
            base_interval: base,
            max_interval: max,
            statuses,
            headers,
            previous_hosts,
            host_selection_max_attempts: p
                .host_selection_retry_max_attempts
                .unwrap_or(1)
                .clamp(1, 1000) as u32,
        })
    }

    fn retriable_response(&self, resp: &Response<Body>, extra_statuses: &[u16]) -> bool {
        let s = resp.status().as_u16();
        let on = self.on;
        if (on & on::X5XX != 0 && s >= 500)
            || (on & on::GATEWAY_ERROR != 0 && matches!(s, 502..=504))
            || (on & on::RETRIABLE_4XX != 0 && s == 409)
            || (on & on::RETRIABLE_STATUS_CODES != 0
                && (self.statuses.contains(&s) || extra_statuses.contains(&s)))
            || (on & on::RETRIABLE_HEADERS != 0
                && self.headers.iter().any(|h| h.matches(resp.headers())))
        {
            return true;
        }
        if on & on::GRPC_ANY != 0 {
            // Only a trailers-only gRPC response carries grpc-status in its headers.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            let bit = match code {
                Some(1) => on::GRPC_CANCELLED,
                Some(4) => on::GRPC_DEADLINE_EXCEEDED,
                Some(8) => on::GRPC_RESOURCE_EXHAUSTED,
                Some(13) => on::GRPC_INTERNAL,
                Some(14) => on::GRPC_UNAVAILABLE,
                _ => 0,
            };
            return on & bit != 0;
        }
        false
    }
}

/// Everything per-route that this module needs, compiled once.
#[derive(Debug)]
pub struct RoutePolicy {
    pub retry: Option<RetryConfig>,
    /// Bytes of request body kept for replay (`per_request_buffer_limit_bytes`, default 1 MiB).
    pub buffer_limit: usize,
    pub request_attempt_count: bool,
    pub response_attempt_count: bool,
    /// `max_stream_duration.grpc_timeout_header_max`: `Some(0)` = honour `grpc-timeout` uncapped.
    pub grpc_timeout_max: Option<Duration>,
    pub grpc_timeout_offset: Duration,
    /// Route `priority: HIGH`: requests and retries count against the HIGH thresholds.
    pub high_priority: bool,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            retry: None,
            buffer_limit: 1 << 20,
            request_attempt_count: false,
            response_attempt_count: false,
            grpc_timeout_max: None,
            grpc_timeout_offset: Duration::ZERO,
            high_priority: false,
        }
    }
}

impl RoutePolicy {
    /// Compiles the policy of route `r` (at `path`) in virtual host `vh` (at `vpath`).
    pub fn compile(
        r: &cfg::Route,
        path: &str,
        vh: &cfg::VirtualHost,
        vpath: &str,
    ) -> Result<Arc<Self>, Vec<ConfigError>> {
        let action = r.route.as_ref();
        let retry = match (
            action.and_then(|a| a.retry_policy.as_ref()),
            &vh.retry_policy,
        ) {
            (Some(p), _) => Some(RetryConfig::compile(
                p,
                &format!("{path}.route.retry_policy"),
            )?),
            (None, Some(p)) => Some(RetryConfig::compile(p, &format!("{vpath}.retry_policy"))?),
            (None, None) => None,
        };
        let msd = action.and_then(|a| a.max_stream_duration.as_ref());
        if msd.is_some_and(|m| m.max_stream_duration.is_some_and(|d| !d.is_zero())) {
            return Err(vec![ConfigError::new(
                format!("{path}.route.max_stream_duration.max_stream_duration"),
                "max_stream_duration is not supported yet (grpc_timeout_header_max is)",
            )]);
        }
        Ok(Arc::new(Self {
            retry,
            buffer_limit: r
                .per_request_buffer_limit_bytes
                .or(vh.per_request_buffer_limit_bytes)
                .unwrap_or(1 << 20) as usize,
            request_attempt_count: vh.include_request_attempt_count,
            response_attempt_count: vh.include_attempt_count_in_response,
            grpc_timeout_max: msd.and_then(|m| m.grpc_timeout_header_max).map(|d| d.0),
            grpc_timeout_offset: msd
                .and_then(|m| m.grpc_timeout_header_offset)
                .map(|d| d.0)
                .unwrap_or_default(),
            high_priority: action.is_some_and(|a| a.priority == cfg::RoutingPriority::HIGH),
        }))
    }
}

static RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
static RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
static MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
static RQ_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
static PER_TRY_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
static RETRIABLE_CODES: HeaderName = HeaderName::from_static("x-envoy-retriable-status-codes");
static ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
static OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Headers Envoy's `ConnectionManagerUtility::cleanInternalHeaders` removes from every request
/// it judges external: with them a client could steer retries and timeouts.
const EXTERNAL_STRIPPED: [&str; 14] = [
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-max-retries",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
];
/// Removed as well when the request is an edge request (external, with `use_remote_address`).
const EDGE_STRIPPED: [&str; 3] = [
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

/// Envoy's `cleanInternalHeaders`, for the connection manager to apply to a request it judged
/// external (`edge`: and it uses the remote address) before the filters and the router see it.
/// Costs one scan of the header names when the request carries no `x-envoy-*` header.
pub fn clean_internal_headers(headers: &mut HeaderMap, edge: bool) {
    if !headers.keys().any(|k| k.as_str().starts_with("x-envoy-")) {
        return;
    }
    for name in EXTERNAL_STRIPPED {
        headers.remove(name);
    }
    if edge {
        for name in EDGE_STRIPPED {
            headers.remove(name);
        }
    }
}

/// One request's effective retry and timeout settings.
pub struct Plan<'a> {
    policy: &'a RoutePolicy,
    retry: Option<Cow<'a, RetryConfig>>,
    extra_statuses: Vec<u16>,
    /// Whole-request timeout (all attempts and back-offs).
    pub timeout: Option<Duration>,
    pub per_try: Option<Duration>,
    pub per_try_idle: Option<Duration>,
}

fn header_u64(headers: &mut HeaderMap, name: &HeaderName) -> Option<u64> {
    headers
        .remove(name)
        .and_then(|v| v.to_str().ok().and_then(|s| s.trim().parse().ok()))
}

/// Parses a gRPC `grpc-timeout` value (`100m`, `5S`, …).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<'a> Plan<'a> {
    /// Applies (and removes) the request's retry/timeout headers to the route's settings.
    pub fn new(
        policy: &'a RoutePolicy,
        route_timeout: Option<Duration>,
        headers: &mut HeaderMap,
    ) -> Self {
        let mut retry = policy.retry.as_ref().map(Cow::Borrowed);
        let mut timeout = route_timeout;
        if let Some(max) = policy.grpc_timeout_max {
            if let Some(t) = headers
                .get(&GRPC_TIMEOUT)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout)
            {
                let t = if max.is_zero() { t } else { t.min(max) };
                timeout =
                    Some(t.saturating_sub(policy.grpc_timeout_offset)).filter(|t| !t.is_zero());
            }
        }
        let mut extra_statuses = vec![];
        // Header lookups only when some x-envoy header could be present keeps the common path short.
        if headers.keys().any(|k| k.as_str().starts_with("x-envoy-")) {
            let mut add_on = 0;
            for (name, grpc_only) in [(&RETRY_ON, false), (&RETRY_GRPC_ON, true)] {
                if let Some(v) = headers.remove(name) {
                    add_on |= parse_retry_on(v.to_str().unwrap_or(""), grpc_only).0;
                }
            }
            if add_on != 0 {
                let r = retry.get_or_insert_with(|| Cow::Owned(RetryConfig::default()));
                r.to_mut().on |= add_on;
            }
            if let Some(n) = header_u64(headers, &MAX_RETRIES) {
                if let Some(r) = retry.as_mut() {
                    r.to_mut().num_retries = n.min(u32::MAX as u64) as u32;
                }
            }
            if let Some(v) = headers.remove(&RETRIABLE_CODES) {
                extra_statuses = v
                    .to_str()
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
            }
            if let Some(ms) = header_u64(headers, &RQ_TIMEOUT) {
                timeout = (ms > 0).then(|| Duration::from_millis(ms));
            }
            if let Some(ms) = header_u64(headers, &PER_TRY_TIMEOUT) {
                if let Some(r) = retry.as_mut() {
                    r.to_mut().per_try_timeout = (ms > 0).then(|| Duration::from_millis(ms));
                } else if ms > 0 {
                    let r = RetryConfig {
                        num_retries: 0,
                        per_try_timeout: Some(Duration::from_millis(ms)),
                        ..Default::default()
                    };
                    retry = Some(Cow::Owned(r));
                }
            }
        }
        let per_try = retry.as_ref().and_then(|r| r.per_try_timeout);
        let per_try_idle = retry.as_ref().and_then(|r| r.per_try_idle_timeout);
        Self {
            policy,
            retry,
            extra_statuses,
            timeout,
            per_try,
            per_try_idle,
        }
    }

    /// `x-envoy-expected-rq-timeout-ms`: the per-try timeout if set, else the route timeout.
    pub fn expected_timeout(&self) -> Option<Duration> {
        match (self.per_try, self.timeout) {
            (Some(p), Some(t)) => Some(p.min(t)),
            (p, t) => p.or(t),
        }
    }
}

/// Why an attempt produced no response.
#[derive(Debug)]
enum Failure {
    Overflow,
    ConnectFailed(String),
    Reset(String),
    RefusedStream(String),
    PerTryTimeout,
    NoHost,
    /// The downstream request body failed while it was being sent (see
    /// [`UpstreamError::RequestBody`]).
    RequestBody,
}

impl Failure {
    fn from_upstream(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Overflow(_) => Failure::Overflow,
            UpstreamError::Timeout => Failure::PerTryTimeout,
            UpstreamError::NoHealthyUpstream(_) | UpstreamError::UnknownCluster(_) => {
                Failure::NoHost
            }
            // The cluster reports "reset reason: connection failure" for connect errors.
            UpstreamError::Connect(r) if r.contains("connection failure") => {
                Failure::ConnectFailed(r)
            }
            UpstreamError::Connect(r) if r.contains("refused stream") => Failure::RefusedStream(r),
            UpstreamError::Connect(r) => Failure::Reset(r),
            UpstreamError::RequestBody(_) => Failure::RequestBody,
        }
    }

    fn retriable(&self, on: u32) -> bool {
        match self {
            Failure::Overflow | Failure::NoHost | Failure::RequestBody => false,
            Failure::ConnectFailed(_) => on & (on::ANY_RESET | on::CONNECT_FAILURE) != 0,
            Failure::RefusedStream(_) => on & (on::ANY_RESET | on::REFUSED_STREAM) != 0,
            Failure::Reset(_) | Failure::PerTryTimeout => on & on::ANY_RESET != 0,
        }
    }

    /// The local reply, gRPC-converted as Envoy's router does it (`sendLocalReply` with no
    /// explicit gRPC status: `httpToGrpcStatus`, so an upstream timeout is 14 UNAVAILABLE).
    fn reply(&self, grpc: bool) -> Response<Body> {
        let (status, text) = match self {
            Failure::Overflow => (
                StatusCode::SERVICE_UNAVAILABLE,
                Cow::Borrowed(
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                ),
            ),
            Failure::ConnectFailed(r) | Failure::Reset(r) | Failure::RefusedStream(r) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Cow::Owned(format!(
                    "upstream connect error or disconnect/reset before headers. {r}"
                )),
            ),
            Failure::PerTryTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                Cow::Borrowed("upstream request timeout"),
            ),
            Failure::NoHost => (
                StatusCode::SERVICE_UNAVAILABLE,
                Cow::Borrowed("no healthy upstream"),
            ),
            // As Envoy answers a downstream codec error while no response has started.
            Failure::RequestBody => (StatusCode::BAD_REQUEST, Cow::Borrowed("Bad Request")),
        };
        let mut resp = local_reply_for(status, &text, grpc);
        if matches!(self, Failure::Overflow) {
            resp.headers_mut()
                .insert(OVERLOADED.clone(), HeaderValue::from_static("true"));
        }
        resp
    }
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`: the gRPC status of a local reply's HTTP status.
pub(crate) fn http_to_grpc_status(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// A local reply as Envoy's `sendLocalReply` makes it: for a gRPC request a trailers-only
/// response (HTTP 200, `grpc-status` from the HTTP status, `grpc-message` the text), else the
/// status with the text as a plain-text body.
pub(crate) fn local_reply_for(status: StatusCode, text: &str, grpc: bool) -> Response<Body> {
    if grpc {
        grpc_reply(http_to_grpc_status(status), text)
    } else {
        local_reply(status, text)
    }
}

/// A trailers-only gRPC error, as Envoy sends local replies to gRPC requests.
pub(crate) fn grpc_reply(code: u32, message: &str) -> Response<Body> {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty() {
        if let Some(v) = grpc_message(message) {
            h.insert("grpc-message", v);
        }
    }
    resp
}

/// `grpc-message` as gRPC's wire format wants it (and Envoy's `PercentEncoding::encode` makes
/// it): bytes outside printable ASCII, and `%`, percent-encoded. Copies only when needed.
fn grpc_message(message: &str) -> Option<HeaderValue> {
    let plain = |b: u8| (0x20..=0x7e).contains(&b) && b != b'%';
    if message.bytes().all(plain) {
        return HeaderValue::from_str(message).ok();
    }
    let mut out = String::with_capacity(message.len() + 16);
    for b in message.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    HeaderValue::from_str(&out).ok()
}

/// The reply for a request whose route timeout expired.
pub fn timeout_reply(grpc: bool) -> Response<Body> {
    Failure::PerTryTimeout.reply(grpc)
}

/// Envoy's fully jittered exponential back-off: attempt n waits a random time below
/// `min((2^n − 1) × base, max)`.
struct BackOff {
    base: u64,
    max: u64,
    n: u32,
}

impl BackOff {
    fn next(&mut self) -> Duration {
        let mult = (1u64 << self.n.min(32)) - 1;
        let ceiling = mult.saturating_mul(self.base);
        if ceiling <= self.max {
            self.n += 1;
        }
        let ceiling = ceiling.clamp(1, self.max.max(1));
        Duration::from_micros(rand::random_range(0..ceiling))
    }
}

/// Forwards `req` to `cluster` starting with `first`, applying the plan's retries and timeouts.
/// `Ok` is the upstream response to relay; `Err` is the local reply to send instead.
pub async fn forward(
    plan: Plan<'_>,
    cluster: &Arc<Cluster>,
    first: Arc<Host>,
    hash: Option<u64>,
    req: Request<Body>,
    upgrade: bool,
) -> Result<Response<Body>, Response<Body>> {
    let grpc = super::headers::request_is_grpc(&req);
    let mut current: Option<Arc<Host>> = None;
    // The attempts and the route timer are polled side by side where the attempts are pinned:
    // wrapping their (kilobytes big) future in a `Timeout` would move it one more time.
    let result = {
        let mut attempts =
            std::pin::pin!(run(&plan, cluster, first, hash, req, upgrade, &mut current));
        match plan.timeout {
            Some(t) => within(t, attempts.as_mut()).await,
            None => Some(attempts.await),
        }
    };
    let Some(result) = result else {
        // The attempt in flight was dropped with the future: its upstream stream is reset.
        cluster.stats.upstream_rq_timeout.inc();
        if let Some(h) = &current {
            // Envoy charges the attempt's upstream code (chargeUpstreamAbort: upstream_rq_504,
            // the 5xx class), the host a timeout and, for the 504 it answers, an error.
            cluster.stats.record_status(504);
            h.rq_timeout
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            h.rq_error
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let (Some(h), Some(d)) = (&current, cluster.resilience.outlier()) {
            d.report(h, Outcome::Timeout);
        }
        return Err(timeout_reply(grpc));
    };
    match result {
        Ok((mut resp, n)) => {
            if plan.policy.response_attempt_count {
                resp.headers_mut().insert(
                    ATTEMPT_COUNT.clone(),
                    super::headers::number_header(n as u64),
                );
            }
            Ok(resp)
        }
        Err(f) => Err(f.reply(grpc)),
    }
}

/// `fut`'s output, or None when `t` passed first.
async fn within<F: Future>(t: Duration, mut fut: Pin<&mut F>) -> Option<F::Output> {
    let mut timer = std::pin::pin!(tokio::time::sleep_until(crate::clock::now() + t));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// One attempt. `headers`, when given, are the request's headers lent by the retry loop
/// (`req`'s own are then ignored; see [`Cluster::send_at_with`]).
async fn attempt(
    cluster: &Arc<Cluster>,
    host: Arc<Host>,
    req: Request<Body>,
    headers: Option<&HeaderMap>,
    plan: &Plan<'_>,
) -> Result<Response<Body>, Failure> {
    let (per_try, high) = (plan.per_try, plan.policy.high_priority);
    let Some(idle) = plan.per_try_idle else {
        // No idle timer: the attempt's future and response body are passed through untouched.
        let mut sent = std::pin::pin!(cluster.send_at_with(host.clone(), req, headers, high));
        let r = match per_try {
            Some(t) => match within(t, sent.as_mut()).await {
                Some(r) => r,
                None => return Err(per_try_timed_out(cluster, &host)),
            },
            None => sent.await,
        };
        return r.map_err(Failure::from_upstream);
    };
    // Boxed: this state machine is several times the size of the plain path's, and every
    // request's router future would otherwise carry (and move) it.
    Box::pin(attempt_with_idle(
        cluster, host, req, headers, per_try, high, idle,
    ))
    .await
}

/// [`attempt`] under `per_try_idle_timeout`.
async fn attempt_with_idle(
    cluster: &Arc<Cluster>,
    host: Arc<Host>,
    req: Request<Body>,
    headers: Option<&HeaderMap>,
    per_try: Option<Duration>,
    high: bool,
    idle: Duration,
) -> Result<Response<Body>, Failure> {
    // The request body's progress keeps the idle timer from firing while it is still uploading.
    let (req, progress) = if req.body().is_end_stream() {
        (req, None)
    } else {
        let p = idle::Progress::new();
        (req.map(|b| idle::watch(b, &p)), Some(p))
    };
    let sent = cluster.send_at_with(host.clone(), req, headers, high);
    let sent = idle::await_headers(sent, idle, progress.as_deref());
    let r = match per_try {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r,
            Err(_) => return Err(per_try_timed_out(cluster, &host)),
        },
        None => sent.await,
    };
    let Some(r) = r else {
        // Dropping the attempt's future reset its upstream stream. Envoy handles this exactly
        // like a per-try timeout (retried under the same conditions, 504 when not).
        per_try_idle_timed_out(cluster, &host);
        return Err(Failure::PerTryTimeout);
    };
    let resp = r.map_err(Failure::from_upstream)?;
    if resp.body().is_end_stream() {
        return Ok(resp);
    }
    // Once headers are out, an idle response body can no longer be retried: the body fails,
    // which resets the downstream stream, and the upstream body is dropped (reset) with it.
    let cluster = cluster.clone();
    Ok(resp.map(|b| {
        idle::IdleBody::wrap(b, idle, progress, "per-try idle timeout", move || {
            per_try_idle_timed_out(&cluster, &host)
        })
    }))
}

/// Accounts one attempt that hit `per_try_timeout` (stat, outlier detection).
fn per_try_timed_out(cluster: &Cluster, host: &Arc<Host>) -> Failure {
    cluster.resilience.stats.upstream_rq_per_try_timeout.inc();
    host.rq_timeout
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(d) = cluster.resilience.outlier() {
        d.report(host, Outcome::Timeout);
    }
    Failure::PerTryTimeout
}

/// Accounts one attempt that hit `per_try_idle_timeout` (stat, outlier detection).
fn per_try_idle_timed_out(cluster: &Cluster, host: &Arc<Host>) {
    cluster
        .resilience
        .stats
        .upstream_rq_per_try_idle_timeout
        .inc();
    if let Some(d) = cluster.resilience.outlier() {
        d.report(host, Outcome::Timeout);
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    plan: &Plan<'_>,
    cluster: &Arc<Cluster>,
    first: Arc<Host>,
    hash: Option<u64>,
    req: Request<Body>,
    upgrade: bool,
    current: &mut Option<Arc<Host>>,
) -> Result<(Response<Body>, u32), Failure> {
    let retry = match &plan.retry {
        Some(r) if !upgrade => r.as_ref(),
        _ => {
            *current = Some(first.clone());
            let mut req = req;
            if plan.policy.request_attempt_count {
                req.headers_mut()
                    .insert(ATTEMPT_COUNT.clone(), super::headers::number_header(1));
            }
            return attempt(cluster, first, req, None, plan)
                .await
                .map(|r| (r, 1));
        }
    };
    let stats = &cluster.resilience.stats;
    let (mut parts, body) = req.into_parts();
    // Every attempt needs the request's headers and a retry needs them again. On HTTP/1.1 they
    // stay here and are lent to each attempt (our codec encodes them from the loan); a copy per
    // attempt was most of what a configured-but-unused retry policy cost. HTTP/2 clusters (and
    // a request without Host, which the cluster would have to add) get a copy per attempt.
    let lend = !cluster.pool_settings.http2 && parts.headers.contains_key(http::header::HOST);
    // The headers stay here for every attempt, and their map is recycled when the loop ends.
    let mut headers = mecha_filters::spare::RecycleOnDrop(std::mem::take(&mut parts.headers));
    let (mut next_body, tee) = if body.is_end_stream() {
        (Some(empty()), None)
    } else {
        let tee = Arc::new(Mutex::new(TeeState::default()));
        let body = TeeBody {
            inner: body,
            state: tee.clone(),
            limit: plan.policy.buffer_limit,
        }
        .boxed_unsync();
        (Some(body), Some(tee))
    };
    let mut backoff = BackOff {
        base: retry.base_interval.as_micros() as u64,
        max: retry.max_interval.as_micros() as u64,
        n: 1,
    };
    let mut tried: Vec<Arc<Host>> = vec![];
    // ORIGINAL_DST clusters: retries go to the destination the router resolved for the first
    // attempt (`http_destination` + `pick_for`); other clusters ignore it and load-balance.
    let dst = first.addr;
    let mut host = first;
    let mut retries: u32 = 0;
    let mut _retry_slot = None;
    loop {
        let body = match next_body.take() {
            Some(b) => b,
            None => match &tee {
                Some(t) => t.lock().replay(),
                None => empty(),
            },
        };
        if plan.policy.request_attempt_count {
            headers.0.insert(
                ATTEMPT_COUNT.clone(),
                super::headers::number_header(retries as u64 + 1),
            );
        }
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        if !lend {
            *req.headers_mut() = headers.0.clone();
        }
        *current = Some(host.clone());
        let lent = lend.then_some(&headers.0);
        let out = attempt(cluster, host.clone(), req, lent, plan).await;
        let retriable = match &out {
            Ok(resp) => retry.retriable_response(resp, &plan.extra_statuses),
            Err(f) => f.retriable(retry.on),
        };
        let done = |out: Result<Response<Body>, Failure>| out.map(|r| (r, retries + 1));
        if !retriable {
            if retries > 0 {
                stats.upstream_rq_retry_success.inc();
            }
            return done(out);
        }
        if retries >= retry.num_retries {
            stats.upstream_rq_retry_limit_exceeded.inc();
            return done(out);
        }
        if let Some(t) = &tee {
            if !t.lock().replayable() {
                tracing::debug!("request body not complete or over the buffer limit; not retried");
                return done(out);
            }
        }
        // As Envoy's RetryStateImpl::shouldRetry (resetRetry, then canCreate): the previous
        // retry's slot is given back once that retry's outcome is known, before the next one is
        // admitted, so one request never competes with itself for `max_retries`. The new slot
        // is held from this decision through the back-off and the retry attempt, until its
        // outcome is known, exactly as long as Envoy counts it in `rq_retry_open`.
        _retry_slot = None;
        let breaker = cluster.resilience.breakers.at(plan.policy.high_priority);
        let Some(slot) = breaker.try_retry() else {
            stats.upstream_rq_retry_overflow.inc();
            return done(out);
        };
        // Dropping a retriable response resets its stream; its connection is not reused.
        drop(out);
        _retry_slot = Some(slot);
        retries += 1;
        stats.upstream_rq_retry.inc();
        stats.upstream_rq_retry_backoff_exponential.inc();
        tokio::time::sleep(backoff.next()).await;
        tried.push(host);
        host = match pick_next(cluster, hash, dst, &tried, retry) {
            Some(h) => h,
            None => {
                cluster.stats.upstream_cx_none_healthy.inc();
                return Err(Failure::NoHost);
            }
        };
    }
}

/// Picks the next host; with the previous-hosts predicate, re-picks (up to
/// `host_selection_retry_max_attempts`) while the pick was already tried.
fn pick_next(
    cluster: &Cluster,
    hash: Option<u64>,
    dst: std::net::SocketAddr,
    tried: &[Arc<Host>],
    retry: &RetryConfig,
) -> Option<Arc<Host>> {
    let attempts = if retry.previous_hosts {
        retry.host_selection_max_attempts.max(1)
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        let h = cluster.pick_for(hash, Some(dst))?;
        if !retry.previous_hosts || !tried.iter().any(|t| Arc::ptr_eq(t, &h)) {
            return Some(h);
        }
        last = Some(h);
    }
    last
}

/// The request body seen so far, for replay.
#[derive(Default)]
struct TeeState {
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    complete: bool,
    overflow: bool,
}

impl TeeState {
    fn replayable(&self) -> bool {
        self.complete && !self.overflow
    }

    fn replay(&self) -> Body {
        if self.trailers.is_none() && self.frames.len() <= 1 {
            return self.frames.first().cloned().map(full).unwrap_or_else(empty);
        }
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = self
            .frames
            .iter()
            .cloned()
            .map(|b| Ok(Frame::data(b)))
            .collect();
        if let Some(t) = &self.trailers {
            frames.push(Ok(Frame::trailers(t.clone())));
        }
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }
}

pin_project_lite::pin_project! {
    /// Passes the downstream body through to the first attempt and keeps a copy (up to the limit).
    struct TeeBody {
        #[pin]
        inner: Body,
        state: Arc<Mutex<TeeState>>,
        limit: usize,
    }
}

impl HttpBody for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let res = this.inner.as_mut().poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                let mut st = this.state.lock();
                if let Some(data) = frame.data_ref() {
                    st.size += data.len();
                    if st.size > *this.limit {
                        st.overflow = true;
                        st.frames = vec![];
                    } else if !st.overflow {
                        st.frames.push(data.clone());
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    st.trailers = Some(t.clone());
                }
                if this.inner.is_end_stream() {
                    st.complete = true;
                }
            }
            Poll::Ready(None) => this.state.lock().complete = true,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_parsing() {
        let (b, unknown) = parse_retry_on("5xx, reset,unavailable,bogus", false);
        assert_eq!(b, on::X5XX | on::RESET | on::GRPC_UNAVAILABLE);
        assert_eq!(unknown, vec!["bogus"]);
        let (b, _) = parse_retry_on("5xx,cancelled", true);
        assert_eq!(
            b,
            on::GRPC_CANCELLED,
            "x-envoy-retry-grpc-on takes gRPC names only"
        );
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let mut b = BackOff {
            base: 25_000,
            max: 250_000,
            n: 1,
        };
        let ceilings = [25_000u64, 75_000, 175_000, 250_000, 250_000];
        for c in ceilings {
            for _ in 0..50 {
                let mut probe = BackOff { ..b };
                assert!(probe.next().as_micros() < c as u128);
            }
            b.next();
        }
    }

    #[test]
    fn external_requests_lose_the_headers_that_steer_the_router() {
        let mut h = HeaderMap::new();
        for name in EXTERNAL_STRIPPED.iter().chain(&EDGE_STRIPPED) {
            h.insert(*name, HeaderValue::from_static("1"));
        }
        h.insert("x-envoy-attempt-count", HeaderValue::from_static("1"));
        h.insert("host", HeaderValue::from_static("x"));
        clean_internal_headers(&mut h, false);
        assert_eq!(h.len(), 2 + EDGE_STRIPPED.len(), "{h:?}");
        clean_internal_headers(&mut h, true);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("host") && h.contains_key("x-envoy-attempt-count"));
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn headers_override_route_policy() {
        let policy = RoutePolicy::default();
        let mut h = HeaderMap::new();
        h.insert("x-envoy-retry-on", HeaderValue::from_static("5xx"));
        h.insert("x-envoy-max-retries", HeaderValue::from_static("4"));
        h.insert(
            "x-envoy-upstream-rq-timeout-ms",
            HeaderValue::from_static("300"),
        );
        h.insert(
            "x-envoy-upstream-rq-per-try-timeout-ms",
            HeaderValue::from_static("100"),
        );
        let plan = Plan::new(&policy, Some(Duration::from_secs(15)), &mut h);
        let r = plan.retry.as_ref().unwrap();
        assert_eq!((r.on, r.num_retries), (on::X5XX, 4));
        assert_eq!(plan.timeout, Some(Duration::from_millis(300)));
        assert_eq!(plan.expected_timeout(), Some(Duration::from_millis(100)));
        assert!(h.is_empty(), "consumed headers are not forwarded: {h:?}");
    }
}
