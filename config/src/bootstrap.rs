//! The top of the document: `node`, `admin`, `static_resources`.

use crate::{decode, Address, Cluster, ConfigError, ConfigErrors, Listener};
use serde::Deserialize;

/// The validated bootstrap mecha runs from.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Bootstrap {
    pub node: Option<Node>,
    pub admin: Option<Admin>,
    pub static_resources: StaticResources,
    pub dynamic_resources: Option<crate::DynamicResources>,
}

#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct StaticResources {
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
}

/// `envoy.config.core.v3.Node`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub metadata: Option<serde_yaml::Mapping>,
    #[serde(default)]
    pub locality: Option<Locality>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub sub_zone: String,
}

/// `envoy.config.bootstrap.v3.Admin`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Address,
    /// Accepted for compatibility with older examples; mecha logs admin access through tracing.
    #[serde(default)]
    pub access_log_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootstrap {
    #[serde(default)]
    node: Option<serde_yaml::Value>,
    #[serde(default)]
    admin: Option<serde_yaml::Value>,
    #[serde(default)]
    static_resources: Option<RawStatic>,
    #[serde(default)]
    dynamic_resources: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatic {
    #[serde(default)]
    listeners: Vec<serde_yaml::Value>,
    #[serde(default)]
    clusters: Vec<serde_yaml::Value>,
}

/// Decodes each resource on its own so that one bad cluster does not hide errors in the next.
pub(crate) fn from_value(value: serde_yaml::Value) -> Result<Bootstrap, ConfigErrors> {
    let raw: RawBootstrap = decode(value, "").map_err(ConfigErrors::one)?;
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut out = Bootstrap::default();
    if let Some(node) = raw.node {
        out.node = keep(decode(node, "node"), &mut errors);
    }
    if let Some(admin) = raw.admin {
        out.admin = keep(decode(admin, "admin"), &mut errors);
    }
    if let Some(d) = raw.dynamic_resources {
        out.dynamic_resources = keep(decode(d, "dynamic_resources"), &mut errors);
    }
    if let Some(st) = raw.static_resources {
        for (i, l) in st.listeners.into_iter().enumerate() {
            let path = format!("static_resources.listeners[{i}]");
            match crate::listener::listener_from_value(l, &path) {
                Ok(l) => out.static_resources.listeners.push(l),
                Err(mut e) => errors.append(&mut e),
            }
        }
        for (i, c) in st.clusters.into_iter().enumerate() {
            let path = format!("static_resources.clusters[{i}]");
            if let Some(c) = keep(decode::<Cluster>(c, &path), &mut errors) {
                out.static_resources.clusters.push(c);
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn keep<T>(r: Result<T, ConfigError>, errors: &mut Vec<ConfigError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(e);
            None
        }
    }
}
