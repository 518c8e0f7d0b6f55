//! Dapr resource files: `kind: Component` (`apiVersion: dapr.io/v1alpha1`) and `kind: Subscription`
//! (`dapr.io/v1alpha1` with `route`, `dapr.io/v2alpha1` with `routes`), loaded from
//! `--resources-path`. Errors name the file and the field path.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A component's `spec.metadata`, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(pub BTreeMap<String, String>);

impl Metadata {
    pub fn get(&self, name: &str) -> Option<&str> {
        // Dapr matches metadata names case-insensitively.
        self.0
            .get(name)
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
            })
            .map(String::as_str)
    }

    pub fn get_bool(&self, name: &str) -> Option<bool> {
        self.get(name)
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "y"))
    }

    /// A duration in Dapr's forms: Go durations (`500ms`, `5s`, `1m`) or plain seconds / the
    /// unit the caller names for bare numbers.
    pub fn get_duration(
        &self,
        name: &str,
        bare_unit: std::time::Duration,
    ) -> Result<Option<std::time::Duration>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => parse_duration(v, bare_unit)
                .map(Some)
                .ok_or_else(|| format!("metadata {name}: invalid duration \"{v}\"")),
        }
    }

    pub fn get_i64(&self, name: &str) -> Result<Option<i64>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| format!("metadata {name}: \"{v}\" is not an integer")),
        }
    }
}

/// Parses `1h2m3s`, `500ms`, `1.5s`, or a bare number in `bare_unit`.
pub fn parse_duration(s: &str, bare_unit: std::time::Duration) -> Option<std::time::Duration> {
    let s = s.trim();
    if let Ok(n) = s.parse::<f64>() {
        return (n >= 0.0).then(|| bare_unit.mul_f64(n));
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += std::time::Duration::from_secs_f64(n * unit);
    }
    Some(total)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    namespace: Option<String>,
    #[serde(flatten)]
    #[allow(dead_code)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataItem {
    name: String,
    #[serde(default)]
    value: Option<serde_yaml::Value>,
    #[serde(default, rename = "secretKeyRef")]
    secret_key_ref: Option<serde_yaml::Value>,
    #[serde(default, rename = "envRef")]
    env_ref: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ComponentSpec {
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    ignore_errors: bool,
    #[serde(default)]
    #[allow(dead_code)]
    init_timeout: Option<String>,
    #[serde(default)]
    metadata: Vec<MetadataItem>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawComponent {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: ComponentSpec,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    auth: Option<serde_yaml::Value>,
}

/// One `kind: Component`.
#[derive(Debug, Clone)]
pub struct ComponentSpecParsed {
    pub name: String,
    pub type_: String,
    pub version: String,
    pub ignore_errors: bool,
    pub metadata: Metadata,
    pub scopes: Vec<String>,
    /// Where it came from, for errors (`file` or `file[doc]`).
    pub source: String,
}

/// A route rule of a subscription: deliver to `path` when `match` holds.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RouteRule {
    #[serde(rename = "match", default)]
    pub match_: String,
    pub path: String,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    #[serde(default)]
    pub rules: Vec<RouteRule>,
    #[serde(default)]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BulkSubscribe {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub max_messages_count: Option<i64>,
    #[serde(default)]
    pub max_await_duration_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubscriptionSpec {
    topic: String,
    #[serde(alias = "pubsubName", rename = "pubsubname")]
    pubsubname: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    routes: Option<Routes>,
    #[serde(default)]
    dead_letter_topic: Option<String>,
    #[serde(default)]
    bulk_subscribe: Option<BulkSubscribe>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSubscription {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    metadata: ObjectMeta,
    spec: SubscriptionSpec,
    #[serde(default)]
    scopes: Vec<String>,
}

/// A subscription, programmatic (from the app's `GET /dapr/subscribe`) or declarative.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub pubsub: String,
    pub topic: String,
    pub routes: Routes,
    pub dead_letter_topic: Option<String>,
    pub bulk_subscribe: Option<BulkSubscribe>,
    pub metadata: BTreeMap<String, String>,
    pub scopes: Vec<String>,
    /// `declarative` or `programmatic`, as the metadata API reports it.
    pub kind: &'static str,
}

/// What a resources directory holds.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    pub components: Vec<ComponentSpecParsed>,
    pub subscriptions: Vec<Subscription>,
}

/// A resource file that cannot be used; names the file and field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {path}{sep}{message}", sep = if path.is_empty() { "" } else { ": " })]
pub struct ResourceError {
    pub file: String,
    pub path: String,
    pub message: String,
}

fn decode<T: serde::de::DeserializeOwned>(
    v: serde_yaml::Value,
    file: &str,
) -> Result<T, ResourceError> {
    serde_path_to_error::deserialize(v).map_err(|e| ResourceError {
        file: file.to_string(),
        path: {
            let p = e.path().to_string();
            if p == "." {
                String::new()
            } else {
                p
            }
        },
        message: e.into_inner().to_string(),
    })
}

fn yaml_scalar(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Null => String::new(),
        other => serde_yaml::to_string(other).unwrap_or_default(),
    }
}

/// Parses every YAML document of one file.
pub fn parse_file(text: &str, file: &str, out: &mut Resources) -> Result<(), ResourceError> {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ResourceError {
            file: file.to_string(),
            path: String::new(),
            message: format!("invalid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let source = if i == 0 {
            file.to_string()
        } else {
            format!("{file}[{i}]")
        };
        match kind {
            "Component" => {
                let c: RawComponent = decode(value, &source)?;
                let mut md = BTreeMap::new();
                for (mi, item) in c.spec.metadata.into_iter().enumerate() {
                    let v = if let Some(v) = &item.value {
                        yaml_scalar(v)
                    } else if let Some(var) = &item.env_ref {
                        std::env::var(var).unwrap_or_default()
                    } else if item.secret_key_ref.is_some() {
                        return Err(ResourceError {
                            file: source,
                            path: format!("spec.metadata[{mi}].secretKeyRef"),
                            message: "secret stores are not supported yet; use value or envRef"
                                .into(),
                        });
                    } else {
                        String::new()
                    };
                    md.insert(item.name, v);
                }
                out.components.push(ComponentSpecParsed {
                    name: c.metadata.name,
                    type_: c.spec.type_,
                    version: c.spec.version.unwrap_or_else(|| "v1".into()),
                    ignore_errors: c.spec.ignore_errors,
                    metadata: Metadata(md),
                    scopes: c.scopes,
                    source,
                });
            }
            "Subscription" => {
                let s: RawSubscription = decode(value, &source)?;
                let mut routes = s.spec.routes.unwrap_or_default();
                if routes.default.is_none() {
                    routes.default = s.spec.route;
                }
                if routes.default.is_none() && routes.rules.is_empty() {
                    return Err(ResourceError {
                        file: source,
                        path: "spec.routes".into(),
                        message: "a subscription needs spec.route or spec.routes".into(),
                    });
                }
                out.subscriptions.push(Subscription {
                    pubsub: s.spec.pubsubname,
                    topic: s.spec.topic,
                    routes,
                    dead_letter_topic: s.spec.dead_letter_topic,
                    bulk_subscribe: s.spec.bulk_subscribe,
                    metadata: s.spec.metadata,
                    scopes: s.scopes,
                    kind: "declarative",
                });
            }
            // Dapr's other kinds (Configuration, Resiliency, HTTPEndpoint) are not components.
            "Configuration" | "Resiliency" | "HTTPEndpoint" => {
                tracing::warn!(file = %source, kind, "resource kind not supported yet; ignored");
            }
            other => {
                return Err(ResourceError {
                    file: source,
                    path: "kind".into(),
                    message: format!(
                        "unknown kind \"{other}\" (expected Component or Subscription)"
                    ),
                })
            }
        }
    }
    Ok(())
}

/// Loads every `*.yaml` / `*.yml` / `*.json` file of a directory, in name order.
pub fn load_dir(dir: &Path) -> Result<Resources, ResourceError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ResourceError {
            file: dir.display().to_string(),
            path: String::new(),
            message: format!("cannot read directory: {e}"),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    let mut out = Resources::default();
    for f in files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(&f).map_err(|e| ResourceError {
            file: name.clone(),
            path: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        parse_file(&text, &name, &mut out)?;
    }
    Ok(out)
}
