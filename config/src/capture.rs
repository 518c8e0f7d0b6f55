//! Transparent-capture configuration: listener filters (`original_dst`, `tls_inspector`,
//! `http_inspector`), `filter_chain_match`, and the `ORIGINAL_DST` cluster options — the parts
//! of Envoy's v3 API an Istio sidecar's 15001/15006 listeners use.

use crate::{decode, join_path, ConfigError, PbDuration, TypedConfig};
use serde::Deserialize;
use std::net::IpAddr;

pub const ORIGINAL_DST_LISTENER_TYPE: &str =
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
pub const ORIGINAL_DST_LISTENER_NAME: &str = "envoy.filters.listener.original_dst";
pub const TLS_INSPECTOR_TYPE: &str =
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
pub const TLS_INSPECTOR_NAME: &str = "envoy.filters.listener.tls_inspector";
pub const HTTP_INSPECTOR_TYPE: &str =
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
pub const HTTP_INSPECTOR_NAME: &str = "envoy.filters.listener.http_inspector";

/// The listener filters mecha implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ListenerFilterKind {
    OriginalDst,
    TlsInspector,
    HttpInspector,
}

/// One entry of `listener_filters[]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ListenerFilter {
    pub name: String,
    pub kind: ListenerFilterKind,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerFilter {
    name: String,
    #[serde(default)]
    typed_config: Option<TypedConfig>,
}

/// The inspectors' configs have no fields mecha supports; an empty body is required so that an
/// option we would ignore (e.g. `enable_ja3_fingerprinting`) is an error instead.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

pub(crate) fn listener_filter(
    raw: RawListenerFilter,
    path: &str,
) -> Result<ListenerFilter, ConfigError> {
    let key = raw
        .typed_config
        .as_ref()
        .map(|t| t.message_name().to_string())
        .unwrap_or_else(|| raw.name.clone());
    let kind = match key.as_str() {
        ORIGINAL_DST_LISTENER_TYPE | ORIGINAL_DST_LISTENER_NAME => ListenerFilterKind::OriginalDst,
        TLS_INSPECTOR_TYPE | TLS_INSPECTOR_NAME => ListenerFilterKind::TlsInspector,
        HTTP_INSPECTOR_TYPE | HTTP_INSPECTOR_NAME => ListenerFilterKind::HttpInspector,
        other => {
            return Err(ConfigError::new(
                join_path(path, if raw.typed_config.is_some() { "typed_config.@type" } else { "name" }),
                format!("unsupported listener filter \"{other}\" (supported: {ORIGINAL_DST_LISTENER_NAME}, {TLS_INSPECTOR_NAME}, {HTTP_INSPECTOR_NAME})"),
            ))
        }
    };
    if let Some(tc) = &raw.typed_config {
        decode::<Empty>(tc.body(), &join_path(path, "typed_config"))?;
    }
    Ok(ListenerFilter {
        name: raw.name,
        kind,
    })
}

/// `envoy.config.core.v3.CidrRange`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CidrRange {
    pub address_prefix: String,
    /// Default: the full address length (a single address).
    #[serde(default)]
    pub prefix_len: Option<u32>,
}

impl CidrRange {
    /// The parsed network and prefix length, or a message saying what is wrong.
    pub fn parse(&self) -> Result<(IpAddr, u8), String> {
        let ip: IpAddr = self
            .address_prefix
            .parse()
            .map_err(|_| format!("\"{}\" is not an IP address", self.address_prefix))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = self.prefix_len.unwrap_or(max);
        if len > max {
            return Err(format!("prefix_len {len} is longer than {max}"));
        }
        Ok((ip, len as u8))
    }
}

/// `envoy.config.listener.v3.FilterChainMatch`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FilterChainMatch {
    #[serde(default)]
    pub destination_port: Option<u32>,
    #[serde(default)]
    pub prefix_ranges: Vec<CidrRange>,
    #[serde(default)]
    pub server_names: Vec<String>,
    /// `tls` or `raw_buffer` (empty = any).
    #[serde(default)]
    pub transport_protocol: String,
    #[serde(default)]
    pub application_protocols: Vec<String>,
    #[serde(default)]
    pub direct_source_prefix_ranges: Vec<CidrRange>,
    #[serde(default)]
    pub source_type: ConnectionSourceType,
    #[serde(default)]
    pub source_prefix_ranges: Vec<CidrRange>,
    #[serde(default)]
    pub source_ports: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ConnectionSourceType {
    #[default]
    ANY,
    SAME_IP_OR_LOOPBACK,
    EXTERNAL,
}

/// `envoy.config.core.v3.TrafficDirection` (informational, as in Envoy).
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum TrafficDirection {
    #[default]
    UNSPECIFIED,
    INBOUND,
    OUTBOUND,
}

/// The capture-related fields of a `Listener`.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct ListenerCapture {
    /// Hand connections redirected here to the listener bound to their original destination.
    pub use_original_dst: bool,
    pub listener_filters: Vec<ListenerFilter>,
    /// Default 15 s, as Envoy; 0 disables.
    pub listener_filters_timeout: Option<PbDuration>,
    pub continue_on_listener_filters_timeout: bool,
    /// Default true; `false` = a virtual listener reached only through `use_original_dst`.
    pub bind_to_port: bool,
    pub traffic_direction: TrafficDirection,
}

impl ListenerCapture {
    pub fn listener_filters_timeout(&self) -> Option<std::time::Duration> {
        match self.listener_filters_timeout {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d.0),
            None => Some(std::time::Duration::from_secs(15)),
        }
    }
    pub fn has(&self, kind: ListenerFilterKind) -> bool {
        self.listener_filters.iter().any(|f| f.kind == kind)
    }
}

/// `envoy.config.cluster.v3.Cluster.OriginalDstLbConfig`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OriginalDstLbConfig {
    /// Take the destination from the `x-envoy-original-dst-host` header (or `http_header_name`).
    #[serde(default)]
    pub use_http_header: bool,
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub upstream_port_override: Option<u32>,
}

impl OriginalDstLbConfig {
    pub fn header_name(&self) -> &str {
        self.http_header_name
            .as_deref()
            .filter(|h| !h.is_empty())
            .unwrap_or("x-envoy-original-dst-host")
    }
}

/// Checks a filter chain match (prefixes parse, ports are ports, transport is known).
pub(crate) fn validate_filter_chain_match(
    m: &FilterChainMatch,
    path: &str,
    errors: &mut Vec<ConfigError>,
) {
    for (field, ranges) in [
        ("prefix_ranges", &m.prefix_ranges),
        ("source_prefix_ranges", &m.source_prefix_ranges),
        (
            "direct_source_prefix_ranges",
            &m.direct_source_prefix_ranges,
        ),
    ] {
        for (i, r) in ranges.iter().enumerate() {
            if let Err(e) = r.parse() {
                errors.push(ConfigError::new(format!("{path}.{field}[{i}]"), e));
            }
        }
    }
    if let Some(p) = m.destination_port {
        if p == 0 || p > 65535 {
            errors.push(ConfigError::new(
                format!("{path}.destination_port"),
                "must be 1-65535",
            ));
        }
    }
    for (i, p) in m.source_ports.iter().enumerate() {
        if *p == 0 || *p > 65535 {
            errors.push(ConfigError::new(
                format!("{path}.source_ports[{i}]"),
                "must be 1-65535",
            ));
        }
    }
    if !matches!(m.transport_protocol.as_str(), "" | "tls" | "raw_buffer") {
        errors.push(ConfigError::new(
            format!("{path}.transport_protocol"),
            format!(
                "unknown transport protocol \"{}\" (expected tls or raw_buffer)",
                m.transport_protocol
            ),
        ));
    }
    for (i, n) in m.server_names.iter().enumerate() {
        if n.is_empty() || (n.contains('*') && !n.starts_with("*.")) {
            errors.push(ConfigError::new(
                format!("{path}.server_names[{i}]"),
                format!("\"{n}\" is not a server name or a \"*.suffix\" wildcard"),
            ));
        }
    }
}

/// Capture checks of one listener: every `filter_chain_match` is well formed.
pub(crate) fn validate_listener_capture(
    l: &crate::Listener,
    path: &str,
    errors: &mut Vec<ConfigError>,
) {
    for (ci, chain) in l.filter_chains.iter().enumerate() {
        if let Some(m) = &chain.filter_chain_match {
            validate_filter_chain_match(
                m,
                &format!("{path}.filter_chains[{ci}].filter_chain_match"),
                errors,
            );
        }
    }
}

/// Envoy's rules for `ORIGINAL_DST` clusters: `lb_policy: CLUSTER_PROVIDED` (ROUND_ROBIN, the
/// default, is accepted as Istio's older configs omit the field) and no static endpoints.
pub(crate) fn validate_original_dst(c: &crate::Cluster, path: &str, errors: &mut Vec<ConfigError>) {
    use crate::LbPolicy;
    if !matches!(
        c.lb_policy,
        LbPolicy::CLUSTER_PROVIDED | LbPolicy::ROUND_ROBIN
    ) {
        errors.push(ConfigError::new(
            format!("{path}.lb_policy"),
            format!(
                "{:?} is not valid for an ORIGINAL_DST cluster; use CLUSTER_PROVIDED",
                c.lb_policy
            ),
        ));
    }
    if c.load_assignment
        .as_ref()
        .is_some_and(|la| la.endpoints.iter().any(|e| !e.lb_endpoints.is_empty()))
    {
        errors.push(ConfigError::new(
            format!("{path}.load_assignment"),
            "an ORIGINAL_DST cluster must not have endpoints (the host is the original destination)",
        ));
    }
    if let Some(p) = c
        .original_dst_lb_config
        .as_ref()
        .and_then(|o| o.upstream_port_override)
    {
        if p == 0 || p > 65535 {
            errors.push(ConfigError::new(
                format!("{path}.original_dst_lb_config.upstream_port_override"),
                "must be 1-65535",
            ));
        }
    }
}
