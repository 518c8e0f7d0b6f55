//! `envoy.config.route.v3`: route configuration, virtual hosts, routes, matches and actions.

use crate::{HeaderValueOption, PbDuration, RegexMatcher, StringMatcher, TypedConfig};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfiguration {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub validate_clusters: Option<bool>,
    /// Match virtual-host domains against the host without its port (Envoy's default: with it).
    #[serde(default)]
    pub ignore_port_in_host_matching: bool,
}

/// The four header lists that appear at route-config, virtual-host, route and weighted-cluster level.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderMutations {
    pub request_headers_to_add: Vec<HeaderValueOption>,
    pub request_headers_to_remove: Vec<String>,
    pub response_headers_to_add: Vec<HeaderValueOption>,
    pub response_headers_to_remove: Vec<String>,
}

macro_rules! header_mutations {
    ($($t:ty),*) => {$(
        impl $t {
            /// This level's header lists.
            pub fn header_mutations(&self) -> HeaderMutations {
                HeaderMutations {
                    request_headers_to_add: self.request_headers_to_add.clone(),
                    request_headers_to_remove: self.request_headers_to_remove.clone(),
                    response_headers_to_add: self.response_headers_to_add.clone(),
                    response_headers_to_remove: self.response_headers_to_remove.clone(),
                }
            }
        }
    )*};
}
header_mutations!(RouteConfiguration, VirtualHost, Route, ClusterWeight);

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub typed_per_filter_config: BTreeMap<String, TypedConfig>,
    /// Used by routes without their own `retry_policy` (issue 4, `resilience.rs`).
    #[serde(default)]
    pub retry_policy: Option<crate::RetryPolicy>,
    #[serde(default)]
    pub include_request_attempt_count: bool,
    #[serde(default)]
    pub include_attempt_count_in_response: bool,
    #[serde(default)]
    pub per_request_buffer_limit_bytes: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "match")]
    pub route_match: RouteMatch,
    #[serde(default)]
    pub route: Option<RouteAction>,
    #[serde(default)]
    pub redirect: Option<RedirectAction>,
    #[serde(default)]
    pub direct_response: Option<DirectResponseAction>,
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub typed_per_filter_config: BTreeMap<String, TypedConfig>,
    /// Retry buffer limit (issue 4); falls back to the virtual host's, then 1 MiB.
    #[serde(default)]
    pub per_request_buffer_limit_bytes: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub safe_regex: Option<RegexMatcher>,
    #[serde(default)]
    pub path_separated_prefix: Option<String>,
    /// Default true, as Envoy.
    #[serde(default)]
    pub case_sensitive: Option<bool>,
    #[serde(default)]
    pub headers: Vec<HeaderMatcher>,
    #[serde(default)]
    pub query_parameters: Vec<QueryParameterMatcher>,
    #[serde(default)]
    pub grpc: Option<crate::Empty>,
}

/// `envoy.config.route.v3.HeaderMatcher`, including the deprecated direct forms.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatcher {
    pub name: String,
    #[serde(default)]
    pub exact_match: Option<String>,
    #[serde(default)]
    pub prefix_match: Option<String>,
    #[serde(default)]
    pub suffix_match: Option<String>,
    #[serde(default)]
    pub contains_match: Option<String>,
    #[serde(default)]
    pub safe_regex_match: Option<RegexMatcher>,
    #[serde(default)]
    pub present_match: Option<bool>,
    #[serde(default)]
    pub string_match: Option<StringMatcher>,
    #[serde(default)]
    pub range_match: Option<Int64Range>,
    #[serde(default)]
    pub invert_match: bool,
    #[serde(default)]
    pub treat_missing_header_as_empty: bool,
}

#[derive(Debug, Clone, PartialEq, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Int64Range {
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryParameterMatcher {
    pub name: String,
    #[serde(default)]
    pub string_match: Option<StringMatcher>,
    #[serde(default)]
    pub present_match: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAction {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub cluster_header: Option<String>,
    #[serde(default)]
    pub weighted_clusters: Option<WeightedClusters>,
    #[serde(default)]
    pub cluster_not_found_response_code: Option<ClusterNotFoundResponseCode>,
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    #[serde(default)]
    pub regex_rewrite: Option<RegexRewrite>,
    #[serde(default)]
    pub host_rewrite_literal: Option<String>,
    #[serde(default)]
    pub auto_host_rewrite: Option<bool>,
    #[serde(default)]
    pub host_rewrite_header: Option<String>,
    /// Default 15 s; zero disables, as Envoy.
    #[serde(default)]
    pub timeout: Option<PbDuration>,
    #[serde(default)]
    pub idle_timeout: Option<PbDuration>,
    #[serde(default)]
    pub hash_policy: Vec<HashPolicy>,
    /// Issue 4 (`resilience.rs`): retries and gRPC timeout handling.
    #[serde(default)]
    pub retry_policy: Option<crate::RetryPolicy>,
    #[serde(default)]
    pub max_stream_duration: Option<crate::MaxStreamDuration>,
    /// Which `circuit_breakers.thresholds` this route's requests count against.
    #[serde(default)]
    pub priority: crate::RoutingPriority,
}

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum ClusterNotFoundResponseCode {
    SERVICE_UNAVAILABLE,
    NOT_FOUND,
    INTERNAL_SERVER_ERROR,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusters {
    pub clusters: Vec<ClusterWeight>,
    #[serde(default)]
    pub total_weight: Option<u32>,
    #[serde(default)]
    pub runtime_key_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterWeight {
    pub name: String,
    #[serde(default)]
    pub weight: u32,
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub typed_per_filter_config: BTreeMap<String, TypedConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    pub pattern: RegexMatcher,
    pub substitution: String,
}

/// `envoy.config.route.v3.RouteAction.HashPolicy`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HashPolicy {
    #[serde(default)]
    pub header: Option<HashHeader>,
    #[serde(default)]
    pub cookie: Option<HashCookie>,
    #[serde(default)]
    pub connection_properties: Option<HashConnectionProperties>,
    #[serde(default)]
    pub query_parameter: Option<HashQueryParameter>,
    #[serde(default)]
    pub terminal: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HashHeader {
    pub header_name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HashCookie {
    pub name: String,
    #[serde(default)]
    pub ttl: Option<PbDuration>,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HashConnectionProperties {
    #[serde(default)]
    pub source_ip: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HashQueryParameter {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectAction {
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default)]
    pub scheme_redirect: Option<String>,
    #[serde(default)]
    pub host_redirect: Option<String>,
    #[serde(default)]
    pub port_redirect: Option<u16>,
    #[serde(default)]
    pub path_redirect: Option<String>,
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    #[serde(default)]
    pub regex_rewrite: Option<RegexRewrite>,
    #[serde(default)]
    pub response_code: RedirectResponseCode,
    #[serde(default)]
    pub strip_query: bool,
}

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum RedirectResponseCode {
    #[default]
    MOVED_PERMANENTLY,
    FOUND,
    SEE_OTHER,
    TEMPORARY_REDIRECT,
    PERMANENT_REDIRECT,
}

impl RedirectResponseCode {
    pub fn status(self) -> u16 {
        match self {
            Self::MOVED_PERMANENTLY => 301,
            Self::FOUND => 302,
            Self::SEE_OTHER => 303,
            Self::TEMPORARY_REDIRECT => 307,
            Self::PERMANENT_REDIRECT => 308,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseAction {
    pub status: u16,
    #[serde(default)]
    pub body: Option<DataSource>,
}

/// `envoy.config.core.v3.DataSource`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    #[serde(default)]
    pub inline_string: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
}
