//! # mecha-config
//!
//! The typed configuration model of mecha: the subset of Envoy's v3 bootstrap that mecha supports
//! (same field names, nesting and `@type` URLs), parsed from YAML/JSON with errors that name the
//! exact field path (`static_resources.clusters[2].lb_policy: unknown value "FASTEST"`).
//!
//! This crate only *describes and validates* configuration. It knows nothing about sockets or
//! filters; the proxy turns a validated [`Bootstrap`] into the runtime snapshot it serves from.
//! Unsupported fields are rejected (`deny_unknown_fields` everywhere) so nothing is silently ignored.

mod bootstrap;
mod capture;
mod cluster;
mod common;
mod dynamic;
mod error;
mod listener;
mod resilience;
mod route;
mod validate;

pub use bootstrap::*;
pub use capture::*;
pub use cluster::*;
pub use common::*;
pub use dynamic::*;
pub use error::{ConfigError, ConfigErrors};
pub use listener::*;
pub use resilience::*;
pub use route::*;

/// Parses and validates a bootstrap document (YAML or JSON), collecting every error found.
pub fn parse_bootstrap(text: &str) -> Result<Bootstrap, ConfigErrors> {
    let value: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| ConfigErrors::one(ConfigError::new("", format!("invalid YAML: {e}"))))?;
    let bootstrap = bootstrap::from_value(value)?;
    let errors = validate::validate(&bootstrap);
    if errors.is_empty() {
        Ok(bootstrap)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads and parses a bootstrap file.
pub fn load_bootstrap(path: &std::path::Path) -> Result<Bootstrap, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::one(ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        ))
    })?;
    parse_bootstrap(&text)
}

/// Deserializes `value` as `T`, reporting the failing field as a path below `prefix`.
pub fn decode<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    prefix: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = join_path(prefix, if inner == "." { "" } else { &inner });
        ConfigError::new(path, error::humanize(&e.into_inner().to_string()))
    })
}

/// Joins two field paths (`a.b` + `c[0]` = `a.b.c[0]`).
pub fn join_path(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_string(),
        (_, true) => prefix.to_string(),
        _ if rest.starts_with('[') => format!("{prefix}{rest}"),
        _ => format!("{prefix}.{rest}"),
    }
}
