//! Factories that build filters from config, keyed by `@type` message name and by filter name.

use crate::{stats::Store, HttpFilter, NetworkFilter, Upstream};
use mecha_config::{ConfigError, TypedConfig};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

/// What a factory may use while building a filter.
#[derive(Clone)]
pub struct FactoryContext {
    pub stats: Arc<Store>,
    pub upstream: Arc<dyn Upstream>,
    /// The connection manager's `stat_prefix` (`http.<prefix>.…` stats).
    pub stat_prefix: String,
}

pub trait HttpFilterFactory: Send + Sync + 'static {
    /// The `@type` message names this factory accepts (without `type.googleapis.com/`).
    fn type_names(&self) -> &[&'static str];
    /// Well-known filter names accepted when `typed_config` is absent.
    fn filter_names(&self) -> &[&'static str] {
        &[]
    }
    /// Builds the filter; `path` locates `typed_config` for error messages.
    fn create(
        &self,
        config: Option<&TypedConfig>,
        path: &str,
        ctx: &FactoryContext,
    ) -> Result<Arc<dyn HttpFilter>, ConfigError>;
    /// Parses a `typed_per_filter_config` entry for this filter.
    fn per_route(
        &self,
        config: &TypedConfig,
        path: &str,
    ) -> Result<Arc<dyn Any + Send + Sync>, ConfigError> {
        let _ = config;
        Err(ConfigError::new(
            path,
            "this filter takes no per-route configuration",
        ))
    }
}

pub trait NetworkFilterFactory: Send + Sync + 'static {
    fn type_names(&self) -> &[&'static str];
    fn create(
        &self,
        config: &TypedConfig,
        path: &str,
        ctx: &FactoryContext,
    ) -> Result<Arc<dyn NetworkFilter>, ConfigError>;
}

/// All known filter factories. Built once at start-up; later issues register their filters here.
#[derive(Default, Clone)]
pub struct Registry {
    http: HashMap<&'static str, Arc<dyn HttpFilterFactory>>,
    network: HashMap<&'static str, Arc<dyn NetworkFilterFactory>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register_http(&mut self, f: Arc<dyn HttpFilterFactory>) {
        for k in f.type_names().iter().chain(f.filter_names()) {
            self.http.insert(k, f.clone());
        }
    }

    pub fn register_network(&mut self, f: Arc<dyn NetworkFilterFactory>) {
        for k in f.type_names() {
            self.network.insert(k, f.clone());
        }
    }

    /// Finds the factory for an `http_filters[]` entry: by `@type`, else by name.
    pub fn http_factory(
        &self,
        name: &str,
        config: Option<&TypedConfig>,
    ) -> Option<&Arc<dyn HttpFilterFactory>> {
        match config {
            Some(tc) => self.http.get(tc.message_name()),
            None => self.http.get(name),
        }
    }

    pub fn network_factory(&self, config: &TypedConfig) -> Option<&Arc<dyn NetworkFilterFactory>> {
        self.network.get(config.message_name())
    }
}
