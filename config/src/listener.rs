//! Listeners, filter chains and the two core network filters (HTTP connection manager, TCP proxy).

use crate::{decode, join_path, Address, ConfigError, PbDuration, RouteConfiguration, TypedConfig};
use serde::Deserialize;

pub const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY_TYPE: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
pub const TCP_PROXY_NAME: &str = "envoy.filters.network.tcp_proxy";

/// `envoy.config.listener.v3.Listener`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listener {
    pub name: String,
    pub address: Address,
    pub filter_chains: Vec<FilterChain>,
    pub per_connection_buffer_limit_bytes: Option<u32>,
    /// Transparent capture (`capture.rs`): use_original_dst, listener_filters, bind_to_port...
    /// Flattened when serialized: these are fields of Envoy's Listener (config dump).
    #[serde(flatten)]
    pub capture: crate::ListenerCapture,
    /// Used when no `filter_chain_match` matches (Envoy's `default_filter_chain`).
    pub default_filter_chain: Option<FilterChain>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FilterChain {
    pub name: String,
    pub filters: Vec<NetworkFilter>,
    pub filter_chain_match: Option<crate::FilterChainMatch>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NetworkFilter {
    pub name: String,
    /// Serialized as Envoy's `typed_config`, with its `@type` (config dump).
    #[serde(rename = "typed_config")]
    pub config: NetworkFilterConfig,
}

/// The core network filters are typed here; other network filters stay opaque until the
/// filter registry (in `mecha-filters`) builds them.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkFilterConfig {
    HttpConnectionManager(Box<HttpConnectionManager>),
    TcpProxy(TcpProxy),
    Other(TypedConfig),
}

impl serde::Serialize for NetworkFilterConfig {
    /// As the `typed_config` it was read from: the message's fields plus its `@type`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Typed<'a, T> {
            #[serde(rename = "@type")]
            type_url: String,
            #[serde(flatten)]
            value: &'a T,
        }
        let url = |m: &str| format!("type.googleapis.com/{m}");
        match self {
            Self::HttpConnectionManager(h) => Typed {
                type_url: url(HCM_TYPE),
                value: &**h,
            }
            .serialize(s),
            Self::TcpProxy(t) => Typed {
                type_url: url(TCP_PROXY_TYPE),
                value: t,
            }
            .serialize(s),
            Self::Other(tc) => tc.serialize(s),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    address: Address,
    #[serde(default)]
    filter_chains: Vec<RawFilterChain>,
    #[serde(default)]
    per_connection_buffer_limit_bytes: Option<u32>,
    // Transparent capture (capture.rs).
    #[serde(default)]
    use_original_dst: Option<bool>,
    #[serde(default)]
    listener_filters: Vec<crate::capture::RawListenerFilter>,
    #[serde(default)]
    listener_filters_timeout: Option<PbDuration>,
    #[serde(default)]
    continue_on_listener_filters_timeout: bool,
    #[serde(default)]
    bind_to_port: Option<bool>,
    #[serde(default)]
    traffic_direction: crate::TrafficDirection,
    #[serde(default)]
    default_filter_chain: Option<RawFilterChain>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilterChain {
    #[serde(default)]
    name: String,
    #[serde(default)]
    filters: Vec<RawNetworkFilter>,
    #[serde(default)]
    filter_chain_match: Option<crate::FilterChainMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetworkFilter {
    name: String,
    #[serde(default)]
    typed_config: Option<TypedConfig>,
}

pub(crate) fn listener_from_value(
    value: serde_yaml::Value,
    path: &str,
) -> Result<Listener, Vec<ConfigError>> {
    let raw: RawListener = decode(value, path).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let mut chains = Vec::new();
    for (ci, chain) in raw.filter_chains.into_iter().enumerate() {
        let mut filters = Vec::new();
        for (fi, f) in chain.filters.into_iter().enumerate() {
            let fpath = format!("{path}.filter_chains[{ci}].filters[{fi}]");
            match network_filter(f, &fpath) {
                Ok(f) => filters.push(f),
                Err(e) => errors.push(e),
            }
        }
        chains.push(FilterChain {
            name: chain.name,
            filters,
            filter_chain_match: chain.filter_chain_match,
        });
    }
    let default_filter_chain = raw.default_filter_chain.map(|chain| {
        let mut filters = Vec::new();
        for (fi, f) in chain.filters.into_iter().enumerate() {
            let fpath = format!("{path}.default_filter_chain.filters[{fi}]");
            match network_filter(f, &fpath) {
                Ok(f) => filters.push(f),
                Err(e) => errors.push(e),
            }
        }
        FilterChain {
            name: chain.name,
            filters,
            filter_chain_match: None,
        }
    });
    let mut listener_filters = Vec::new();
    for (i, f) in raw.listener_filters.into_iter().enumerate() {
        match crate::capture::listener_filter(f, &format!("{path}.listener_filters[{i}]")) {
            Ok(f) => listener_filters.push(f),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Listener {
        name: raw.name,
        address: raw.address,
        filter_chains: chains,
        per_connection_buffer_limit_bytes: raw.per_connection_buffer_limit_bytes,
        capture: crate::ListenerCapture {
            use_original_dst: raw.use_original_dst.unwrap_or(false),
            listener_filters,
            listener_filters_timeout: raw.listener_filters_timeout,
            continue_on_listener_filters_timeout: raw.continue_on_listener_filters_timeout,
            bind_to_port: raw.bind_to_port.unwrap_or(true),
            traffic_direction: raw.traffic_direction,
        },
        default_filter_chain,
    })
}

fn network_filter(f: RawNetworkFilter, path: &str) -> Result<NetworkFilter, ConfigError> {
    let tc_path = join_path(path, "typed_config");
    let (kind, body) = match &f.typed_config {
        Some(tc) => (tc.message_name().to_string(), tc.body()),
        None => (
            f.name.clone(),
            serde_yaml::Value::Mapping(Default::default()),
        ),
    };
    let config = match kind.as_str() {
        HCM_TYPE | HCM_NAME => {
            NetworkFilterConfig::HttpConnectionManager(Box::new(decode(body, &tc_path)?))
        }
        TCP_PROXY_TYPE | TCP_PROXY_NAME => NetworkFilterConfig::TcpProxy(decode(body, &tc_path)?),
        _ => match f.typed_config {
            Some(tc) => NetworkFilterConfig::Other(tc),
            None => {
                return Err(ConfigError::new(
                    path,
                    format!(
                        "network filter \"{}\" needs a typed_config with an \"@type\"",
                        f.name
                    ),
                ))
            }
        },
    };
    Ok(NetworkFilter {
        name: f.name,
        config,
    })
}

/// `envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    #[serde(default)]
    pub codec_type: CodecType,
    #[serde(default)]
    pub route_config: Option<RouteConfiguration>,
    /// Routes from RDS (dynamic config); exclusive with `route_config`.
    #[serde(default)]
    pub rds: Option<crate::Rds>,
    #[serde(default)]
    pub http_filters: Vec<HttpFilter>,
    #[serde(default)]
    pub common_http_protocol_options: Option<HttpProtocolOptionsCommon>,
    #[serde(default)]
    pub http_protocol_options: Option<Http1ProtocolOptions>,
    #[serde(default)]
    pub http2_protocol_options: Option<Http2ProtocolOptions>,
    /// Default 60 KiB, as Envoy.
    #[serde(default)]
    pub max_request_headers_kb: Option<u32>,
    #[serde(default)]
    pub use_remote_address: bool,
    #[serde(default)]
    pub xff_num_trusted_hops: u32,
    #[serde(default)]
    pub skip_xff_append: bool,
    /// Default true, as Envoy.
    #[serde(default)]
    pub generate_request_id: Option<bool>,
    #[serde(default)]
    pub preserve_external_request_id: bool,
    #[serde(default)]
    pub stream_idle_timeout: Option<PbDuration>,
    #[serde(default)]
    pub request_timeout: Option<PbDuration>,
    #[serde(default)]
    pub drain_timeout: Option<PbDuration>,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub server_header_transformation: ServerHeaderTransformation,
    #[serde(default)]
    pub via: Option<String>,
    #[serde(default)]
    pub upgrade_configs: Vec<UpgradeConfig>,
}

impl HttpConnectionManager {
    pub fn max_request_headers_bytes(&self) -> usize {
        self.max_request_headers_kb.unwrap_or(60) as usize * 1024
    }
    pub fn generate_request_id(&self) -> bool {
        self.generate_request_id.unwrap_or(true)
    }
    pub fn upgrade_enabled(&self, kind: &str) -> bool {
        self.upgrade_configs
            .iter()
            .any(|u| u.upgrade_type.eq_ignore_ascii_case(kind) && u.enabled.unwrap_or(true))
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum CodecType {
    #[default]
    AUTO,
    HTTP1,
    HTTP2,
}

/// What the connection manager does with a response's `Server` header (Envoy's
/// `server_header_transformation`): replace it with `server_name` (the default), add it only when
/// the response has none, or leave the response as it is.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ServerHeaderTransformation {
    #[default]
    OVERWRITE,
    APPEND_IF_ABSENT,
    PASS_THROUGH,
}

/// `envoy.config.core.v3.HttpProtocolOptions`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProtocolOptionsCommon {
    #[serde(default)]
    pub idle_timeout: Option<PbDuration>,
    #[serde(default)]
    pub max_connection_duration: Option<PbDuration>,
    #[serde(default)]
    pub max_headers_count: Option<u32>,
}

/// `envoy.config.core.v3.Http1ProtocolOptions`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Http1ProtocolOptions {
    /// Serve HTTP/1.0 (and 0.9) requests; Envoy's default (false) answers them 426.
    #[serde(default)]
    pub accept_http_10: bool,
    /// The `Host` given to HTTP/1.0 requests that carry none (only with `accept_http_10`).
    #[serde(default)]
    pub default_host_for_http_10: Option<String>,
}

/// `envoy.config.core.v3.Http2ProtocolOptions`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Http2ProtocolOptions {
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
    #[serde(default)]
    pub initial_stream_window_size: Option<u32>,
    #[serde(default)]
    pub initial_connection_window_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    pub upgrade_type: String,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// One entry of `http_filters[]`; its `typed_config` is decoded by the filter registry.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFilter {
    pub name: String,
    #[serde(default)]
    pub typed_config: Option<TypedConfig>,
    #[serde(default)]
    pub is_optional: bool,
    #[serde(default)]
    pub disabled: bool,
}

/// `envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub cluster: String,
    /// Default 1 hour, as Envoy; 0 disables.
    #[serde(default)]
    pub idle_timeout: Option<PbDuration>,
    #[serde(default)]
    pub max_connect_attempts: Option<u32>,
}
