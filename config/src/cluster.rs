//! `envoy.config.cluster.v3.Cluster` and `envoy.config.endpoint.v3.ClusterLoadAssignment`.

use crate::{
    Address, Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptionsCommon, Locality,
    PbDuration,
};
use serde::Deserialize;
use std::collections::BTreeMap;

pub const UPSTREAM_HTTP_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default, rename = "type")]
    pub discovery_type: DiscoveryType,
    /// Default 5 s, as Envoy.
    #[serde(default)]
    pub connect_timeout: Option<PbDuration>,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    #[serde(default)]
    pub load_assignment: Option<ClusterLoadAssignment>,
    /// Where an `EDS` cluster's endpoints come from.
    #[serde(default)]
    pub eds_cluster_config: Option<crate::EdsClusterConfig>,
    /// Default 5 s, as Envoy.
    #[serde(default)]
    pub dns_refresh_rate: Option<PbDuration>,
    #[serde(default)]
    pub respect_dns_ttl: bool,
    #[serde(default)]
    pub dns_lookup_family: DnsLookupFamily,
    #[serde(default)]
    pub typed_extension_protocol_options: BTreeMap<String, UpstreamHttpProtocolOptions>,
    /// Legacy form: present = upstream HTTP/2.
    #[serde(default)]
    pub http2_protocol_options: Option<Http2ProtocolOptions>,
    #[serde(default)]
    pub http_protocol_options: Option<Http1ProtocolOptions>,
    #[serde(default)]
    pub common_http_protocol_options: Option<HttpProtocolOptionsCommon>,
    #[serde(default)]
    pub ring_hash_lb_config: Option<RingHashLbConfig>,
    #[serde(default)]
    pub maglev_lb_config: Option<MaglevLbConfig>,
    #[serde(default)]
    pub least_request_lb_config: Option<LeastRequestLbConfig>,
    #[serde(default)]
    pub per_connection_buffer_limit_bytes: Option<u32>,
    /// `ORIGINAL_DST` clusters (capture.rs): header override and idle-host cleanup (default 5 s).
    #[serde(default)]
    pub original_dst_lb_config: Option<crate::OriginalDstLbConfig>,
    #[serde(default)]
    pub cleanup_interval: Option<PbDuration>,
    /// Issue 4 (`resilience.rs`): circuit breakers, outlier detection, health checks, panic threshold.
    #[serde(default)]
    pub circuit_breakers: Option<crate::CircuitBreakers>,
    #[serde(default)]
    pub outlier_detection: Option<crate::OutlierDetection>,
    #[serde(default)]
    pub health_checks: Vec<crate::HealthCheck>,
    #[serde(default)]
    pub common_lb_config: Option<crate::CommonLbConfig>,
}

impl Cluster {
    pub fn connect_timeout(&self) -> std::time::Duration {
        self.connect_timeout
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_secs(5))
    }

    /// Whether requests to this cluster's hosts use HTTP/2 (prior knowledge).
    pub fn upstream_http2(&self) -> bool {
        if let Some(opts) = self
            .typed_extension_protocol_options
            .get(UPSTREAM_HTTP_OPTIONS_KEY)
        {
            if let Some(explicit) = &opts.explicit_http_config {
                return explicit.http2_protocol_options.is_some();
            }
        }
        self.http2_protocol_options.is_some()
    }

    /// The idle timeout of pooled upstream connections (default 1 h, as Envoy).
    pub fn upstream_idle_timeout(&self) -> Option<std::time::Duration> {
        let common = self
            .typed_extension_protocol_options
            .get(UPSTREAM_HTTP_OPTIONS_KEY)
            .and_then(|o| o.common_http_protocol_options.as_ref())
            .or(self.common_http_protocol_options.as_ref());
        match common.and_then(|c| c.idle_timeout) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d.0),
            None => Some(std::time::Duration::from_secs(3600)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum DiscoveryType {
    #[default]
    STATIC,
    STRICT_DNS,
    LOGICAL_DNS,
    /// Endpoints from EDS (dynamic config).
    EDS,
    /// The host is the connection's original destination (transparent capture).
    ORIGINAL_DST,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum LbPolicy {
    #[default]
    ROUND_ROBIN,
    LEAST_REQUEST,
    RANDOM,
    RING_HASH,
    MAGLEV,
    /// Required by `ORIGINAL_DST` clusters: the cluster itself picks the host.
    CLUSTER_PROVIDED,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum DnsLookupFamily {
    #[default]
    AUTO,
    V4_ONLY,
    V6_ONLY,
    V4_PREFERRED,
    ALL,
}

/// The value of `typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamHttpProtocolOptions {
    #[serde(rename = "@type")]
    pub type_url: String,
    #[serde(default)]
    pub explicit_http_config: Option<ExplicitHttpConfig>,
    #[serde(default)]
    pub common_http_protocol_options: Option<HttpProtocolOptionsCommon>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitHttpConfig {
    #[serde(default)]
    pub http_protocol_options: Option<Http1ProtocolOptions>,
    #[serde(default)]
    pub http2_protocol_options: Option<Http2ProtocolOptions>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RingHashLbConfig {
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
    #[serde(default)]
    pub maximum_ring_size: Option<u64>,
    #[serde(default)]
    pub hash_function: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaglevLbConfig {
    #[serde(default)]
    pub table_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeastRequestLbConfig {
    #[serde(default)]
    pub choice_count: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterLoadAssignment {
    #[serde(default)]
    pub cluster_name: String,
    #[serde(default)]
    pub endpoints: Vec<LocalityLbEndpoints>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLbEndpoints {
    #[serde(default)]
    pub locality: Option<Locality>,
    #[serde(default)]
    pub lb_endpoints: Vec<LbEndpoint>,
    #[serde(default)]
    pub load_balancing_weight: Option<u32>,
    #[serde(default)]
    pub priority: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LbEndpoint {
    pub endpoint: Endpoint,
    #[serde(default)]
    pub load_balancing_weight: Option<u32>,
    #[serde(default)]
    pub health_status: Option<HealthStatus>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: Address,
    #[serde(default)]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum HealthStatus {
    UNKNOWN,
    HEALTHY,
    UNHEALTHY,
    DRAINING,
    TIMEOUT,
    DEGRADED,
}
