//! # mecha-runtime-api
//!
//! The multi-runtime half of mecha (the Dapr / Layotto role): Dapr-compatible state, pub/sub and
//! service invocation APIs over HTTP and gRPC, served as the HTTP filter
//! `mecha.filters.http.runtime_api` in the proxy's filter chain, backed by pluggable components.
//!
//! - [`runtime::Runtime`] — the core both APIs share: app identity, components, subscriptions,
//!   delivery to the app, invocation. Built once at start-up.
//! - [`http_api`] — the HTTP filter; [`grpc`] — `dapr.proto.runtime.v1.Dapr`.
//! - [`state`] (`state.sqlite`, `state.in-memory`, `state.redis`) and [`pubsub`]
//!   (`pubsub.in-memory`, `pubsub.redis`) — components; [`component`] — Dapr resource YAML.
//!
//! It plugs into the data plane only through `mecha-filters`: the filter traits and registry, and
//! the `Upstream` interface for calls to the app and to other sidecars, so the proxy's pools, load
//! balancing and stats apply to them.

pub mod app_channel;
pub mod app_health;
pub mod cloudevents;
pub mod component;
pub mod delivery;
pub mod error;
pub mod grpc;
pub mod http_api;
pub mod matcher;
pub mod pubsub;
pub mod runtime;
pub mod state;
pub mod state_api;

pub use error::ApiError;
pub use runtime::{Runtime, RuntimeOptions};

use mecha_config::{ConfigError, TypedConfig};
use mecha_filters::{FactoryContext, HttpFilter, HttpFilterFactory};
use std::sync::Arc;

/// The filter's `@type` message name.
pub const TYPE_NAME: &str = "mecha.filters.http.runtime_api";

/// Builds the runtime API filter. The runtime itself is created once by the binary (from
/// `--app-id` and friends) and handed to the factory; each config snapshot's filter shares it.
#[derive(Default)]
pub struct RuntimeApiFactory {
    runtime: Option<Arc<Runtime>>,
}

impl RuntimeApiFactory {
    /// A factory without a runtime: a bootstrap that uses the filter validates, and the filter
    /// answers every API call with `ERR_RUNTIME_NOT_CONFIGURED` (mecha was started without
    /// `--app-id`).
    pub fn unbound() -> Self {
        Self { runtime: None }
    }

    pub fn new(runtime: Arc<Runtime>) -> Self {
        Self {
            runtime: Some(runtime),
        }
    }
}

struct Unbound;

impl HttpFilter for Unbound {
    fn call<'a>(
        &'a self,
        req: http::Request<mecha_filters::Body>,
        next: mecha_filters::Next<'a>,
    ) -> mecha_filters::BoxFuture<'a, http::Response<mecha_filters::Body>> {
        let p = req.uri().path();
        if p.starts_with("/v1.0/") || p.starts_with("/v1.0-alpha1/") {
            Box::pin(async {
                ApiError::new(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_RUNTIME_NOT_CONFIGURED",
                    "the runtime API needs mecha to run with --app-id",
                )
                .to_response()
            })
        } else {
            next.run(req)
        }
    }
}

impl HttpFilterFactory for RuntimeApiFactory {
    fn type_names(&self) -> &[&'static str] {
        &[TYPE_NAME]
    }

    fn filter_names(&self) -> &[&'static str] {
        &[TYPE_NAME]
    }

    fn create(
        &self,
        config: Option<&TypedConfig>,
        path: &str,
        ctx: &FactoryContext,
    ) -> Result<Arc<dyn HttpFilter>, ConfigError> {
        // The filter has no per-listener settings: everything comes from the runtime's flags.
        if let Some(tc) = config {
            if let Some((k, _)) = tc.value.iter().next() {
                let name = k.as_str().unwrap_or("?");
                return Err(ConfigError::new(
                    format!("{path}.{name}"),
                    "unknown field (the runtime API filter is configured by mecha run's --app-id, --resources-path … flags)",
                ));
            }
        }
        match &self.runtime {
            Some(rt) => {
                rt.set_upstream(ctx.upstream.clone());
                Ok(Arc::new(http_api::RuntimeApiFilter { rt: rt.clone() }))
            }
            None => {
                tracing::warn!(
                    "{path}: the runtime API filter is configured but mecha runs without --app-id"
                );
                Ok(Arc::new(Unbound))
            }
        }
    }
}

/// The `GET /v1.0/metadata` document, as Dapr shapes it.
pub fn metadata_json(rt: &Runtime) -> serde_json::Value {
    let components: Vec<serde_json::Value> = rt
        .components()
        .iter()
        .map(|(name, ty, version, caps)| {
            serde_json::json!({"name": name, "type": ty, "version": version, "capabilities": caps})
        })
        .collect();
    let subs: Vec<serde_json::Value> = rt
        .subscriptions()
        .into_iter()
        .map(|s| {
            let mut rules: Vec<serde_json::Value> = s
                .routes
                .rules
                .iter()
                .map(|r| serde_json::json!({"match": r.match_, "path": r.path}))
                .collect();
            if let Some(d) = &s.routes.default {
                rules.push(serde_json::json!({"match": "", "path": d}));
            }
            serde_json::json!({
                "pubsubname": s.pubsub,
                "topic": s.topic,
                "metadata": s.metadata,
                "rules": rules,
                "deadLetterTopic": s.dead_letter_topic.unwrap_or_default(),
                "type": s.kind,
            })
        })
        .collect();
    serde_json::json!({
        "id": rt.app_id(),
        "runtimeVersion": runtime::RUNTIME_VERSION,
        "components": components,
        "subscriptions": subs,
        "extended": rt.extended_metadata(),
        "enabledFeatures": [],
        "actors": [],
        "httpEndpoints": [],
    })
}
