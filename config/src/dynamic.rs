//! The dynamic (xDS) parts of the bootstrap — `dynamic_resources`, HCM `rds`, cluster
//! `eds_cluster_config` — and [`XdsResources`], the set of resources an xDS client has accepted,
//! which the proxy applies as a whole.
//!
//! Resources that arrive over xDS are decoded and validated here with the same decoders and
//! validator as static config ([`decode_listener`], [`decode_cluster`], [`decode_route_configuration`],
//! [`decode_cluster_load_assignment`]), so a field mecha does not support is an error with its path,
//! never silently dropped.

use crate::{decode, Cluster, ClusterLoadAssignment, ConfigError, Listener, PbDuration};
use crate::{NetworkFilterConfig, RouteConfiguration};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

/// `envoy.config.bootstrap.v3.Bootstrap.DynamicResources`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicResources {
    #[serde(default)]
    pub ads_config: Option<ApiConfigSource>,
    #[serde(default)]
    pub lds_config: Option<ConfigSource>,
    #[serde(default)]
    pub cds_config: Option<ConfigSource>,
}

/// `envoy.config.core.v3.ApiConfigSource` (gRPC only).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfigSource {
    pub api_type: ApiType,
    #[serde(default)]
    pub transport_api_version: ApiVersion,
    #[serde(default)]
    pub grpc_services: Vec<GrpcService>,
    #[serde(default)]
    pub set_node_on_first_message_only: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ApiType {
    GRPC,
    DELTA_GRPC,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum ApiVersion {
    #[default]
    V3,
}

/// `envoy.config.core.v3.GrpcService` (only `envoy_grpc`: the control plane is a static cluster).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcService {
    pub envoy_grpc: EnvoyGrpc,
    #[serde(default)]
    pub timeout: Option<PbDuration>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyGrpc {
    pub cluster_name: String,
    #[serde(default)]
    pub authority: Option<String>,
}

/// `envoy.config.core.v3.ConfigSource`: `ads: {}` (over the ADS stream) or `path_config_source`
/// (a watched file). mecha has a single ADS stream, so a `resource_api_version` other than V3 is
/// an error.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSource {
    #[serde(default)]
    pub ads: Option<AdsSource>,
    #[serde(default)]
    pub path_config_source: Option<PathConfigSource>,
    /// Default 15 s, as Envoy; zero waits forever.
    #[serde(default)]
    pub initial_fetch_timeout: Option<PbDuration>,
    #[serde(default)]
    pub resource_api_version: ApiVersion,
}

impl ConfigSource {
    pub fn initial_fetch_timeout(&self) -> Option<std::time::Duration> {
        match self.initial_fetch_timeout {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d.0),
            None => Some(std::time::Duration::from_secs(15)),
        }
    }
}

/// `envoy.config.core.v3.AggregatedConfigSource` (no fields).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdsSource {}

/// `envoy.config.core.v3.PathConfigSource`: a file holding a `DiscoveryResponse` (YAML or
/// JSON), replaced atomically (written elsewhere, then renamed/moved into place) to update.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathConfigSource {
    pub path: String,
    /// When set, a move into this directory (not only onto `path`) triggers a reload: the
    /// Kubernetes ConfigMap layout, where `path` sits behind a symlinked `..data` directory that
    /// is swapped as a whole.
    #[serde(default)]
    pub watched_directory: Option<WatchedDirectory>,
}

/// `envoy.config.core.v3.WatchedDirectory`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct WatchedDirectory {
    pub path: String,
}

/// HCM `rds`: `envoy.extensions.filters.network.http_connection_manager.v3.Rds`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rds {
    pub route_config_name: String,
    #[serde(default)]
    pub config_source: Option<serde_yaml::Value>,
}

/// Cluster `eds_cluster_config`: `envoy.config.cluster.v3.Cluster.EdsClusterConfig`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EdsClusterConfig {
    #[serde(default)]
    pub eds_config: Option<serde_yaml::Value>,
    #[serde(default)]
    pub service_name: String,
}

/// Checks that a `config_source` (of `rds` or `eds_cluster_config`) is one mecha can serve: `ads: {}`.
pub fn validate_config_source(v: &Option<serde_yaml::Value>, path: &str) -> Vec<ConfigError> {
    let Some(v) = v else {
        return vec![ConfigError::new(
            path,
            "a config_source with ads: {} is required",
        )];
    };
    match decode::<ConfigSource>(v.clone(), path) {
        Err(e) => vec![e],
        Ok(cs) if cs.ads.is_none() => vec![ConfigError::new(
            path,
            "only ads: {} is supported as the config source of RDS and EDS",
        )],
        Ok(_) => vec![],
    }
}

/// The EDS resource name of a cluster: `eds_cluster_config.service_name`, else the cluster name.
pub fn eds_service_name(c: &Cluster) -> &str {
    match &c.eds_cluster_config {
        Some(e) if !e.service_name.is_empty() => &e.service_name,
        _ => &c.name,
    }
}

/// The RDS names a listener's connection managers subscribe to.
pub fn rds_names(l: &Listener) -> Vec<String> {
    let mut out = vec![];
    for chain in &l.filter_chains {
        for f in &chain.filters {
            if let NetworkFilterConfig::HttpConnectionManager(h) = &f.config {
                if let Some(r) = &h.rds {
                    out.push(r.route_config_name.clone());
                }
            }
        }
    }
    out
}

/// One accepted resource with the version the control plane gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub version: String,
    pub value: Arc<T>,
    /// When this resource was accepted.
    pub last_updated: std::time::SystemTime,
}

/// Everything an xDS client has accepted, keyed by resource name. The proxy applies it as a whole;
/// what did not change keeps its runtime objects (clusters, pools, route tables).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct XdsResources {
    pub listeners: BTreeMap<String, Versioned<Listener>>,
    pub clusters: BTreeMap<String, Versioned<Cluster>>,
    pub route_configs: BTreeMap<String, Versioned<RouteConfiguration>>,
    pub endpoints: BTreeMap<String, Versioned<ClusterLoadAssignment>>,
    /// The last accepted `version_info` per type (SotW) or system version (delta).
    pub versions: BTreeMap<String, String>,
    /// The type URLs of which a response (or a watched file) was accepted at least once: the
    /// server is initialized (`/ready` 200) once LDS and CDS have been, as Envoy's init manager.
    pub received: BTreeSet<String>,
}

/// The xDS resource type URLs.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
}

impl XdsResources {
    /// The RDS names the current listeners reference.
    pub fn wanted_route_configs(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .flat_map(|l| rds_names(&l.value))
            .collect()
    }

    /// The EDS names the current EDS clusters reference.
    pub fn wanted_endpoints(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter(|c| c.value.discovery_type == crate::DiscoveryType::EDS)
            .map(|c| eds_service_name(&c.value).to_string())
            .collect()
    }
}

/// Decodes and validates one listener resource (e.g. from LDS). `known_clusters` are the names an
/// inline route configuration may reference.
pub fn decode_listener(
    value: serde_yaml::Value,
    path: &str,
    known_clusters: &HashSet<&str>,
) -> Result<Listener, Vec<ConfigError>> {
    let l = crate::listener::listener_from_value(value, path)?;
    let mut errors = vec![];
    crate::validate::validate_listener(&l, path, known_clusters, &mut errors);
    if errors.is_empty() {
        Ok(l)
    } else {
        Err(errors)
    }
}

/// Decodes and validates one cluster resource (e.g. from CDS).
pub fn decode_cluster(value: serde_yaml::Value, path: &str) -> Result<Cluster, Vec<ConfigError>> {
    let c: Cluster = decode(value, path).map_err(|e| vec![e])?;
    check_cluster(c, path)
}

/// Validates a cluster that was decoded by other means (the typed protobuf fast path of the xDS
/// client): the same checks as [`decode_cluster`].
pub fn check_cluster(c: Cluster, path: &str) -> Result<Cluster, Vec<ConfigError>> {
    let mut errors = vec![];
    crate::validate::validate_cluster(&c, path, &mut errors);
    if errors.is_empty() {
        Ok(c)
    } else {
        Err(errors)
    }
}

/// Decodes and validates one route configuration (e.g. from RDS). As in Envoy,
/// `validate_clusters` defaults to false for RDS, so clusters are checked only when it is set.
pub fn decode_route_configuration(
    value: serde_yaml::Value,
    path: &str,
    known_clusters: &HashSet<&str>,
) -> Result<RouteConfiguration, Vec<ConfigError>> {
    let rc: RouteConfiguration = decode(value, path).map_err(|e| vec![e])?;
    check_route_configuration(rc, path, known_clusters)
}

/// Validates a route configuration that was decoded by other means (the typed protobuf fast path
/// of the xDS client): the same checks as [`decode_route_configuration`].
pub fn check_route_configuration(
    mut rc: RouteConfiguration,
    path: &str,
    known_clusters: &HashSet<&str>,
) -> Result<RouteConfiguration, Vec<ConfigError>> {
    let explicit = rc.validate_clusters;
    rc.validate_clusters = Some(explicit.unwrap_or(false));
    let mut errors = vec![];
    crate::validate::validate_route_config(&rc, path, known_clusters, &mut errors);
    rc.validate_clusters = explicit;
    if errors.is_empty() {
        Ok(rc)
    } else {
        Err(errors)
    }
}

/// Decodes and validates one `ClusterLoadAssignment` (EDS). Endpoints must be IP addresses.
pub fn decode_cluster_load_assignment(
    value: serde_yaml::Value,
    path: &str,
) -> Result<ClusterLoadAssignment, Vec<ConfigError>> {
    let cla: ClusterLoadAssignment = decode(value, path).map_err(|e| vec![e])?;
    check_cluster_load_assignment(cla, path)
}

/// Validates a load assignment that was decoded by other means (the typed protobuf fast path of
/// the xDS client): the same checks as [`decode_cluster_load_assignment`].
pub fn check_cluster_load_assignment(
    cla: ClusterLoadAssignment,
    path: &str,
) -> Result<ClusterLoadAssignment, Vec<ConfigError>> {
    let mut errors = vec![];
    for (li, loc) in cla.endpoints.iter().enumerate() {
        for (ei, ep) in loc.lb_endpoints.iter().enumerate() {
            let epath = format!("{path}.endpoints[{li}].lb_endpoints[{ei}]");
            let sa = &ep.endpoint.address.socket_address;
            if sa.address.parse::<std::net::IpAddr>().is_err() {
                errors.push(ConfigError::new(
                    format!("{epath}.endpoint.address.socket_address.address"),
                    format!("\"{}\" is not an IP address", sa.address),
                ));
            }
            if sa.port_value == 0 {
                errors.push(ConfigError::new(
                    format!("{epath}.endpoint.address.socket_address.port_value"),
                    "port_value must be set",
                ));
            }
            if ep.load_balancing_weight == Some(0) {
                errors.push(ConfigError::new(
                    format!("{epath}.load_balancing_weight"),
                    "must be at least 1",
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(cla)
    } else {
        Err(errors)
    }
}
