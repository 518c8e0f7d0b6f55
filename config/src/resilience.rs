//! Resilience configuration, as Envoy spells it: route `retry_policy` and `max_stream_duration`,
//! cluster `circuit_breakers`, `outlier_detection`, `health_checks` and `common_lb_config`.
//!
//! These structs only describe; `mecha-proxy` compiles them into the retry state machine,
//! circuit breakers, outlier detector and health checker. Defaults follow Envoy's documentation
//! and are exposed through the accessor methods so there is one place that states them.

use crate::{HeaderMatcher, PbDuration, TypedConfig};
use serde::Deserialize;
use std::time::Duration;

/// `envoy.config.route.v3.RetryPolicy` (route or virtual-host level).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Comma-separated conditions (`5xx,reset,connect-failure`, gRPC names included).
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Default 1, as Envoy.
    #[serde(default)]
    pub num_retries: Option<u32>,
    #[serde(default)]
    pub per_try_timeout: Option<PbDuration>,
    #[serde(default)]
    pub per_try_idle_timeout: Option<PbDuration>,
    #[serde(default)]
    pub retry_back_off: Option<RetryBackOff>,
    #[serde(default)]
    pub retriable_status_codes: Vec<u32>,
    #[serde(default)]
    pub retriable_headers: Vec<HeaderMatcher>,
    #[serde(default)]
    pub retry_host_predicate: Vec<RetryHostPredicate>,
    /// Default 1, as Envoy.
    #[serde(default)]
    pub host_selection_retry_max_attempts: Option<i64>,
}

impl RetryPolicy {
    pub fn num_retries(&self) -> u32 {
        self.num_retries.unwrap_or(1)
    }
}

/// `envoy.config.route.v3.RetryPolicy.RetryBackOff`: base 25 ms, max 10 × base by default.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBackOff {
    pub base_interval: PbDuration,
    #[serde(default)]
    pub max_interval: Option<PbDuration>,
}

/// One `retry_host_predicate` entry; only `envoy.retry_host_predicates.previous_hosts` exists here.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryHostPredicate {
    pub name: String,
    #[serde(default)]
    pub typed_config: Option<TypedConfig>,
}

pub const PREVIOUS_HOSTS_PREDICATE: &str = "envoy.retry_host_predicates.previous_hosts";
pub const PREVIOUS_HOSTS_TYPE: &str =
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// `envoy.config.route.v3.RouteAction.MaxStreamDuration`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaxStreamDuration {
    #[serde(default)]
    pub max_stream_duration: Option<PbDuration>,
    /// When set, a request's `grpc-timeout` header becomes its timeout, capped by this (0 = no cap).
    #[serde(default)]
    pub grpc_timeout_header_max: Option<PbDuration>,
    #[serde(default)]
    pub grpc_timeout_header_offset: Option<PbDuration>,
}

/// `envoy.config.cluster.v3.CircuitBreakers`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    #[serde(default)]
    pub thresholds: Vec<Thresholds>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum RoutingPriority {
    #[default]
    DEFAULT,
    HIGH,
}

/// `envoy.config.cluster.v3.CircuitBreakers.Thresholds`. Envoy's defaults: 1024 connections,
/// 1024 pending requests, 1024 requests, 3 retries, unlimited connection pools.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    #[serde(default)]
    pub priority: RoutingPriority,
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    #[serde(default)]
    pub max_requests: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub retry_budget: Option<RetryBudget>,
    #[serde(default)]
    pub track_remaining: bool,
    #[serde(default)]
    pub max_connection_pools: Option<u32>,
}

/// `Thresholds.RetryBudget`: defaults 20 % and 3, as Envoy.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    #[serde(default)]
    pub budget_percent: Option<Percent>,
    #[serde(default)]
    pub min_retry_concurrency: Option<u32>,
}

/// `envoy.type.v3.Percent`.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

/// `envoy.config.cluster.v3.OutlierDetection`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_failure: Option<u32>,
    #[serde(default)]
    pub consecutive_local_origin_failure: Option<u32>,
    #[serde(default)]
    pub interval: Option<PbDuration>,
    #[serde(default)]
    pub base_ejection_time: Option<PbDuration>,
    #[serde(default)]
    pub max_ejection_time: Option<PbDuration>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub enforcing_consecutive_5xx: Option<u32>,
    #[serde(default)]
    pub enforcing_consecutive_gateway_failure: Option<u32>,
    #[serde(default)]
    pub enforcing_consecutive_local_origin_failure: Option<u32>,
    #[serde(default)]
    pub enforcing_success_rate: Option<u32>,
    #[serde(default)]
    pub enforcing_local_origin_success_rate: Option<u32>,
    #[serde(default)]
    pub success_rate_minimum_hosts: Option<u32>,
    #[serde(default)]
    pub success_rate_request_volume: Option<u32>,
    #[serde(default)]
    pub success_rate_stdev_factor: Option<u32>,
    #[serde(default)]
    pub failure_percentage_threshold: Option<u32>,
    #[serde(default)]
    pub enforcing_failure_percentage: Option<u32>,
    #[serde(default)]
    pub enforcing_failure_percentage_local_origin: Option<u32>,
    #[serde(default)]
    pub failure_percentage_minimum_hosts: Option<u32>,
    #[serde(default)]
    pub failure_percentage_request_volume: Option<u32>,
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
}

impl OutlierDetection {
    pub fn interval(&self) -> Duration {
        dur(self.interval, 10_000)
    }
    pub fn base_ejection_time(&self) -> Duration {
        dur(self.base_ejection_time, 30_000)
    }
    pub fn max_ejection_time(&self) -> Duration {
        dur(self.max_ejection_time, 300_000)
    }
}

fn dur(d: Option<PbDuration>, default_ms: u64) -> Duration {
    d.map(|d| d.0).unwrap_or(Duration::from_millis(default_ms))
}

/// `envoy.config.core.v3.HealthCheck`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub timeout: PbDuration,
    pub interval: PbDuration,
    #[serde(default)]
    pub initial_jitter: Option<PbDuration>,
    #[serde(default)]
    pub interval_jitter: Option<PbDuration>,
    #[serde(default)]
    pub interval_jitter_percent: Option<u32>,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// Default 60 s, as Envoy: the interval while the cluster has seen no traffic.
    #[serde(default)]
    pub no_traffic_interval: Option<PbDuration>,
    #[serde(default)]
    pub no_traffic_healthy_interval: Option<PbDuration>,
    #[serde(default)]
    pub unhealthy_interval: Option<PbDuration>,
    #[serde(default)]
    pub unhealthy_edge_interval: Option<PbDuration>,
    #[serde(default)]
    pub healthy_edge_interval: Option<PbDuration>,
    #[serde(default)]
    pub reuse_connection: Option<bool>,
    #[serde(default)]
    pub always_log_health_check_failures: bool,
    #[serde(default)]
    pub http_health_check: Option<HttpHealthCheck>,
    #[serde(default)]
    pub tcp_health_check: Option<TcpHealthCheck>,
    #[serde(default)]
    pub grpc_health_check: Option<GrpcHealthCheck>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpHealthCheck {
    #[serde(default)]
    pub host: Option<String>,
    pub path: String,
    /// Default `[200, 201)`, as Envoy.
    #[serde(default)]
    pub expected_statuses: Vec<Int64RangeHc>,
    #[serde(default)]
    pub codec_client_type: Option<String>,
    #[serde(default)]
    pub request_headers_to_add: Vec<crate::HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
}

/// `envoy.type.v3.Int64Range`: `[start, end)`.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Int64RangeHc {
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {
    #[serde(default)]
    pub send: Option<HcPayload>,
    #[serde(default)]
    pub receive: Vec<HcPayload>,
}

/// `HealthCheck.Payload`: hex-encoded bytes or text.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HcPayload {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub binary: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcHealthCheck {
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub authority: Option<String>,
}

/// `envoy.config.cluster.v3.Cluster.CommonLbConfig`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommonLbConfig {
    /// Default 50 %, as Envoy; 0 disables panic mode.
    #[serde(default)]
    pub healthy_panic_threshold: Option<Percent>,
}

impl CommonLbConfig {
    pub fn panic_threshold(cfg: Option<&CommonLbConfig>) -> f64 {
        cfg.and_then(|c| c.healthy_panic_threshold)
            .map(|p| p.value)
            .unwrap_or(50.0)
    }
}

/// Checks what the health checker would otherwise have to guess: one checker per cluster, one
/// protocol, payloads that decode, request headers that are valid.
pub(crate) fn validate_health_checks(
    c: &crate::Cluster,
    path: &str,
    errors: &mut Vec<crate::ConfigError>,
) {
    use crate::ConfigError;
    if c.health_checks.len() > 1 {
        errors.push(ConfigError::new(
            format!("{path}.health_checks[1]"),
            "mecha runs one health checker per cluster",
        ));
    }
    let Some(hc) = c.health_checks.first() else {
        return;
    };
    let hpath = format!("{path}.health_checks[0]");
    let kinds = [
        hc.http_health_check.is_some(),
        hc.tcp_health_check.is_some(),
        hc.grpc_health_check.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        errors.push(ConfigError::new(
            &hpath,
            "exactly one of http_health_check, tcp_health_check, grpc_health_check is required",
        ));
    }
    if hc.interval.0.is_zero() || hc.timeout.0.is_zero() {
        errors.push(ConfigError::new(
            &hpath,
            "interval and timeout must be greater than 0",
        ));
    }
    if let Some(h) = &hc.http_health_check {
        let p = format!("{hpath}.http_health_check");
        if let Some(c) = h.codec_client_type.as_deref() {
            if c != "HTTP1" && c != "HTTP2" {
                errors.push(ConfigError::new(
                    format!("{p}.codec_client_type"),
                    format!("unsupported value \"{c}\" (HTTP1 or HTTP2)"),
                ));
            }
        }
        for (i, a) in h.request_headers_to_add.iter().enumerate() {
            let ap = format!("{p}.request_headers_to_add[{i}]");
            if !is_token(&a.header.key) || a.header.key.eq_ignore_ascii_case("host") {
                errors.push(ConfigError::new(
                    format!("{ap}.header.key"),
                    format!("invalid or unmodifiable header name \"{}\"", a.header.key),
                ));
            }
            if a.header.value.contains('%') {
                errors.push(ConfigError::new(
                    format!("{ap}.header.value"),
                    "substitution formatters are not supported in health check headers",
                ));
            } else if a
                .header
                .value
                .bytes()
                .any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
            {
                errors.push(ConfigError::new(
                    format!("{ap}.header.value"),
                    "invalid header value",
                ));
            }
        }
        for (i, n) in h.request_headers_to_remove.iter().enumerate() {
            if !is_token(n) {
                errors.push(ConfigError::new(
                    format!("{p}.request_headers_to_remove[{i}]"),
                    format!("invalid header name \"{n}\""),
                ));
            }
        }
    }
    if let Some(t) = &hc.tcp_health_check {
        let p = format!("{hpath}.tcp_health_check");
        let payloads = t.send.iter().map(|s| (format!("{p}.send"), s)).chain(
            t.receive
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("{p}.receive[{i}]"), r)),
        );
        for (pp, payload) in payloads {
            if payload.binary.is_some() {
                errors.push(ConfigError::new(
                    format!("{pp}.binary"),
                    "binary payloads are not supported; give the bytes as hex in text",
                ));
            }
            match payload.text.as_deref() {
                Some(t) if !is_hex(t) => errors.push(ConfigError::new(
                    format!("{pp}.text"),
                    format!("\"{t}\" is not hex-encoded bytes"),
                )),
                None if payload.binary.is_none() => errors.push(ConfigError::new(
                    &pp,
                    "a payload needs text (hex-encoded bytes)",
                )),
                _ => {}
            }
        }
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_hex(s: &str) -> bool {
    let s = s.trim();
    s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit())
}
