//! Envoy protos → mecha-config types.
//!
//! A resource arrives as a protobuf `Any`. It is decoded with the Envoy descriptors into a dynamic
//! message, written out as protobuf JSON with the proto field names (the same shape as Envoy's YAML),
//! and then decoded and validated by mecha-config exactly like static config. So the static and
//! dynamic paths share one model and one validator, and a field mecha does not support is rejected
//! with its path instead of being dropped.

use mecha_config::{Cluster, ClusterLoadAssignment, ConfigError, Listener, RouteConfiguration};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use std::collections::HashSet;
use std::sync::OnceLock;

pub use mecha_config::type_url::{
    CLUSTER as CLUSTER_TYPE, ENDPOINT as ENDPOINT_TYPE, LISTENER as LISTENER_TYPE,
    ROUTE as ROUTE_TYPE,
};

/// The Envoy file descriptors mecha translates (see `examples/prune_descriptors.rs`).
static DESCRIPTORS: &[u8] = include_bytes!("envoy_descriptors.bin");

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The bytes are a build artifact checked by the `descriptors_decode` test; a failure here
        // would be a broken build, not bad input.
        DescriptorPool::decode(DESCRIPTORS).unwrap_or_else(|e| {
            tracing::error!(error = %e, "embedded Envoy descriptors are corrupt");
            DescriptorPool::new()
        })
    })
}

/// Why a resource could not be accepted; `Display` is the NACK's `error_detail` line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind} \"{name}\": {}", errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ResourceError {
    pub kind: &'static str,
    pub name: String,
    pub errors: Vec<ConfigError>,
}

fn kind_of(type_url: &str) -> &'static str {
    match type_url {
        LISTENER_TYPE => "Listener",
        CLUSTER_TYPE => "Cluster",
        ROUTE_TYPE => "RouteConfiguration",
        ENDPOINT_TYPE => "ClusterLoadAssignment",
        _ => "resource",
    }
}

/// Decodes an `Any` into the JSON/YAML value of its message (proto field names, enums by name,
/// 64-bit integers as numbers, nested `Any`s as `{"@type": ..., fields}`).
pub fn any_to_value(type_url: &str, bytes: &[u8]) -> Result<serde_yaml::Value, String> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| format!("unsupported resource type \"{type_url}\""))?;
    let msg = DynamicMessage::decode(desc, bytes).map_err(|e| format!("cannot decode: {e}"))?;
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(true);
    // Straight into a YAML value: going through a `serde_json::Value` first built and dropped a
    // second copy of the whole tree (a third of the time of a 10,000-route RDS response).
    msg.serialize_with_options(serde_yaml::value::Serializer, &opts)
        .map_err(|e| format!("cannot translate: {e}"))
}

/// The inverse of [`any_to_value`]: encodes a JSON/YAML description of a message (as written in
/// an Envoy config) into protobuf bytes. Used by tests and the benchmark to script a control plane.
pub fn value_to_bytes(type_url: &str, value: &serde_json::Value) -> Result<Vec<u8>, String> {
    use prost::Message;
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| format!("unsupported resource type \"{type_url}\""))?;
    let msg = DynamicMessage::deserialize(desc, value).map_err(|e| e.to_string())?;
    Ok(msg.encode_to_vec())
}

/// One decoded and validated resource.
// Decoded resources live only while one response is applied, and the client's per-type code
// matches every variant the same way; boxing one of them would buy little memory for that.
#[allow(clippy::large_enum_variant)]
pub enum Decoded {
    Listener(Listener),
    Cluster(Cluster),
    Route(RouteConfiguration),
    Endpoints(ClusterLoadAssignment),
}

impl Decoded {
    pub fn name(&self) -> &str {
        match self {
            Decoded::Listener(l) => &l.name,
            Decoded::Cluster(c) => &c.name,
            Decoded::Route(r) => &r.name,
            Decoded::Endpoints(e) => &e.cluster_name,
        }
    }
}

/// Decodes one resource of `type_url`. `known_clusters` are the clusters an inline route table may
/// reference. Errors name the resource and the field.
pub fn decode_resource(
    type_url: &str,
    bytes: &[u8],
    known_clusters: &HashSet<&str>,
) -> Result<Decoded, ResourceError> {
    if let Some(d) = decode_fast(type_url, bytes, known_clusters) {
        return d;
    }
    decode_general(type_url, bytes, known_clusters)
}

/// The typed fast path ([`crate::fast`]) for the bulk resource types: `None` when the resource is
/// outside its subset, and the general path must decide. Validation is the same as on the general
/// path (`mecha_config::check_*`), so only the decoding differs.
fn decode_fast(
    type_url: &str,
    bytes: &[u8],
    known_clusters: &HashSet<&str>,
) -> Option<Result<Decoded, ResourceError>> {
    use prost::Message;
    let kind = kind_of(type_url);
    let err = |name: &str, errors: Vec<ConfigError>| ResourceError {
        kind,
        name: name.to_string(),
        errors,
    };
    match type_url {
        ROUTE_TYPE => {
            let pb = envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(bytes)
                .ok()?;
            let rc = crate::fast::route_configuration(pb)?;
            if rc.name.is_empty() {
                return Some(Err(err(
                    "",
                    vec![ConfigError::new("name", "must not be empty")],
                )));
            }
            let name = rc.name.clone();
            Some(
                mecha_config::check_route_configuration(rc, "", known_clusters)
                    .map(Decoded::Route)
                    .map_err(|e| err(&name, e)),
            )
        }
        CLUSTER_TYPE => {
            let pb = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(bytes).ok()?;
            let c = crate::fast::cluster(pb)?;
            if c.name.is_empty() {
                return Some(Err(err(
                    "",
                    vec![ConfigError::new("name", "must not be empty")],
                )));
            }
            let name = c.name.clone();
            Some(
                mecha_config::check_cluster(c, "")
                    .map(Decoded::Cluster)
                    .map_err(|e| err(&name, e)),
            )
        }
        ENDPOINT_TYPE => {
            let pb =
                envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(bytes)
                    .ok()?;
            let cla = crate::fast::cluster_load_assignment(pb)?;
            if cla.cluster_name.is_empty() {
                return Some(Err(err(
                    "",
                    vec![ConfigError::new("cluster_name", "must not be empty")],
                )));
            }
            let name = cla.cluster_name.clone();
            Some(
                mecha_config::check_cluster_load_assignment(cla, "")
                    .map(Decoded::Endpoints)
                    .map_err(|e| err(&name, e)),
            )
        }
        _ => None,
    }
}

/// The general path: protobuf → dynamic message → JSON-shaped value → mecha-config's serde
/// decoders, which name any field mecha does not support.
pub fn decode_general(
    type_url: &str,
    bytes: &[u8],
    known_clusters: &HashSet<&str>,
) -> Result<Decoded, ResourceError> {
    let kind = kind_of(type_url);
    let value = any_to_value(type_url, bytes).map_err(|m| ResourceError {
        kind,
        name: String::new(),
        errors: vec![ConfigError::new("", m)],
    })?;
    let name_field = if type_url == ENDPOINT_TYPE {
        "cluster_name"
    } else {
        "name"
    };
    let name = value
        .get(name_field)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let err = |errors: Vec<ConfigError>| ResourceError {
        kind,
        name: name.clone(),
        errors,
    };
    if name.is_empty() {
        return Err(err(vec![ConfigError::new(name_field, "must not be empty")]));
    }
    let decoded = match type_url {
        LISTENER_TYPE => Decoded::Listener(
            mecha_config::decode_listener(value, "", known_clusters).map_err(err)?,
        ),
        CLUSTER_TYPE => Decoded::Cluster(mecha_config::decode_cluster(value, "").map_err(err)?),
        ROUTE_TYPE => Decoded::Route(
            mecha_config::decode_route_configuration(value, "", known_clusters).map_err(err)?,
        ),
        ENDPOINT_TYPE => Decoded::Endpoints(
            mecha_config::decode_cluster_load_assignment(value, "").map_err(err)?,
        ),
        other => {
            return Err(err(vec![ConfigError::new(
                "",
                format!("unsupported resource type \"{other}\""),
            )]))
        }
    };
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode() {
        for t in [LISTENER_TYPE, CLUSTER_TYPE, ROUTE_TYPE, ENDPOINT_TYPE] {
            let name = t.rsplit('/').next().unwrap();
            assert!(pool().get_message_by_name(name).is_some(), "{name}");
        }
        assert!(pool()
            .get_message_by_name(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
            )
            .is_some());
    }

    #[test]
    fn cluster_round_trip_and_field_errors() {
        let json = serde_json::json!({
            "name": "backend", "type": "EDS", "connect_timeout": "0.25s",
            "eds_cluster_config": {"eds_config": {"ads": {}}},
            "lb_policy": "LEAST_REQUEST",
        });
        let bytes = value_to_bytes(CLUSTER_TYPE, &json).unwrap();
        let Decoded::Cluster(c) = decode_resource(CLUSTER_TYPE, &bytes, &HashSet::new()).unwrap()
        else {
            panic!("not a cluster")
        };
        assert_eq!(c.name, "backend");
        assert_eq!(c.discovery_type, mecha_config::DiscoveryType::EDS);
        assert_eq!(c.connect_timeout(), std::time::Duration::from_millis(250));

        // A field mecha does not implement is rejected with its path, not dropped.
        let json = serde_json::json!({"name": "bad", "dns_jitter": "1s"});
        let bytes = value_to_bytes(CLUSTER_TYPE, &json).unwrap();
        let e = decode_resource(CLUSTER_TYPE, &bytes, &HashSet::new())
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("Cluster \"bad\": "), "{e}");
        assert!(e.to_string().contains("dns_jitter"), "{e}");
    }
}
