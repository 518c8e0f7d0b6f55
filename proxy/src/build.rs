//! Builds the runtime [`Snapshot`] from a validated bootstrap: compiles route tables, creates
//! filters through the registry, and creates (or reuses) clusters. Every error carries the
//! field path it concerns.

use crate::capture::CaptureRuntime;
use crate::cluster::{ClusterManager, UpstreamHandle};
use crate::filter_chain_match::ChainMatcher;
use crate::http::{Hcm, Router};
use crate::listener::{FilterChainRuntime, ListenerRuntime, Terminal};
use crate::route::RouteTable;
use crate::stats::{HttpStats, ListenerStats, TcpStats};
use crate::tcp_proxy::TcpProxy;
use arc_swap::ArcSwap;
use mecha_config::{
    decode, Bootstrap, ConfigError, ConfigErrors, HttpConnectionManager, NetworkFilterConfig,
    TypedConfig,
};
use mecha_filters::stats::{Scope, Store};
use mecha_filters::{FactoryContext, FilterChain, HttpFilter, HttpFilterFactory, Registry};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";
pub const ROUTER_NAME: &str = "envoy.filters.http.router";

/// Shared handles a snapshot is built against.
#[derive(Clone)]
pub struct BuildContext {
    pub registry: Arc<Registry>,
    pub stats: Arc<Store>,
    /// The live cluster manager routers and filters read; the new snapshot's clusters are
    /// stored here when the snapshot is activated.
    pub clusters: Arc<ArcSwap<ClusterManager>>,
}

impl BuildContext {
    pub fn new(registry: Registry) -> Self {
        let stats = Store::new();
        let clusters = Arc::new(ArcSwap::from_pointee(ClusterManager::new(
            &[],
            &stats,
            None,
        )));
        Self {
            registry: Arc::new(registry),
            stats,
            clusters,
        }
    }

    pub fn upstream(&self) -> UpstreamHandle {
        UpstreamHandle {
            clusters: self.clusters.clone(),
        }
    }
}

/// Everything the data plane serves from, built once per configuration.
pub struct Snapshot {
    pub bootstrap: Bootstrap,
    pub listeners: Vec<Arc<ListenerRuntime>>,
    pub clusters: Arc<ClusterManager>,
}

/// Envoy's router config. `start_child_span` only matters with a tracer, which mecha's data plane
/// does not have (as Envoy without one); `dynamic_stats: true` is Envoy's default and mecha's only
/// mode, so `false` is rejected rather than ignored.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RouterConfig {
    #[serde(default)]
    suppress_envoy_headers: bool,
    #[serde(default)]
    dynamic_stats: Option<bool>,
    #[serde(default)]
    start_child_span: bool,
}

pub fn build(b: &Bootstrap, ctx: &BuildContext) -> Result<Snapshot, ConfigErrors> {
    let mut errors = vec![];
    let previous = ctx.clusters.load();
    let clusters = Arc::new(ClusterManager::new(
        &b.static_resources.clusters,
        &ctx.stats,
        Some(&previous),
    ));
    let mut listeners = vec![];
    for (li, l) in b.static_resources.listeners.iter().enumerate() {
        let lpath = format!("static_resources.listeners[{li}]");
        let sa = &l.address.socket_address;
        let ip: IpAddr = match sa.address.parse() {
            Ok(ip) => ip,
            Err(_) => {
                errors.push(ConfigError::new(
                    format!("{lpath}.address.socket_address.address"),
                    format!("\"{}\" is not an IP address", sa.address),
                ));
                continue;
            }
        };
        let address = SocketAddr::new(ip, sa.port_value);
        let mut chains = vec![];
        // The default chain (if any) is built last and split off after the loop.
        let default_chain = l
            .default_filter_chain
            .iter()
            .map(|c| (format!("{lpath}.default_filter_chain"), c));
        let all_chains = l.filter_chains.iter().enumerate();
        let all_chains = all_chains.map(|(ci, c)| (format!("{lpath}.filter_chains[{ci}]"), c));
        for (cpath, chain) in all_chains.chain(default_chain) {
            let mut network_filters = vec![];
            let mut terminal = None;
            for (fi, f) in chain.filters.iter().enumerate() {
                let fpath = format!("{cpath}.filters[{fi}].typed_config");
                match &f.config {
                    NetworkFilterConfig::HttpConnectionManager(hcm) => {
                        match build_hcm(hcm, &fpath, ctx) {
                            Ok(h) => terminal = Some(Terminal::Http(h)),
                            Err(mut e) => errors.append(&mut e),
                        }
                    }
                    NetworkFilterConfig::TcpProxy(tp) => {
                        terminal = Some(Terminal::Tcp(Arc::new(TcpProxy {
                            cluster: tp.cluster.clone(),
                            stats: TcpStats::new(&ctx.stats, &Scope::tcp(&tp.stat_prefix)),
                            idle_timeout: match tp.idle_timeout {
                                Some(d) if d.is_zero() => None,
                                Some(d) => Some(d.0),
                                None => Some(Duration::from_secs(3600)),
                            },
                            max_connect_attempts: tp.max_connect_attempts.unwrap_or(1),
                            clusters: ctx.clusters.clone(),
                        })))
                    }
                    NetworkFilterConfig::Other(tc) => match ctx.registry.network_factory(tc) {
                        Some(factory) => {
                            match factory.create(tc, &fpath, &factory_context(ctx, "")) {
                                Ok(nf) => network_filters.push(nf),
                                Err(e) => errors.push(e),
                            }
                        }
                        None => errors.push(ConfigError::new(
                            format!("{fpath}.@type"),
                            format!("unknown network filter type \"{}\"", tc.type_url),
                        )),
                    },
                }
            }
            match terminal {
                Some(terminal) => chains.push(FilterChainRuntime { network_filters, terminal }),
                None => errors.push(ConfigError::new(
                    format!("{cpath}.filters"),
                    "the filter chain must end with envoy.filters.network.http_connection_manager or envoy.filters.network.tcp_proxy",
                )),
            }
        }
        let default_chain =
            if l.default_filter_chain.is_some() && chains.len() > l.filter_chains.len() {
                chains.pop()
            } else {
                None
            };
        let scope = Scope::listener(&address.to_string());
        listeners.push(Arc::new(ListenerRuntime {
            name: l.name.clone(),
            address,
            ipv4_compat: l.address.socket_address.ipv4_compat,
            chains,
            stats: ListenerStats::new(&ctx.stats, &scope),
            matcher: ChainMatcher::new(
                l.filter_chains
                    .iter()
                    .map(|c| c.filter_chain_match.as_ref()),
            ),
            default_chain,
            capture: CaptureRuntime::new(&l.capture, &ctx.stats, &scope),
        }));
    }
    crate::capture::link_handoff(&listeners);
    if errors.is_empty() {
        Ok(Snapshot {
            bootstrap: b.clone(),
            listeners,
            clusters,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

fn factory_context(ctx: &BuildContext, stat_prefix: &str) -> FactoryContext {
    FactoryContext {
        stats: ctx.stats.clone(),
        upstream: Arc::new(ctx.upstream()),
        stat_prefix: stat_prefix.to_string(),
    }
}

fn is_router(name: &str, tc: Option<&TypedConfig>) -> bool {
    match tc {
        Some(tc) => tc.message_name() == ROUTER_TYPE,
        None => name == ROUTER_NAME,
    }
}

/// Builds one HTTP connection manager: its filter chain (ending in the router) and route table.
pub fn build_hcm(
    cfg: &HttpConnectionManager,
    path: &str,
    ctx: &BuildContext,
) -> Result<Arc<Hcm>, Vec<ConfigError>> {
    let mut errors = vec![];
    let fctx = factory_context(ctx, &cfg.stat_prefix);
    let stats = HttpStats::new(&ctx.stats, &Scope::http(&cfg.stat_prefix));
    let mut filters: Vec<Arc<dyn HttpFilter>> = vec![];
    let mut by_name: HashMap<String, Arc<dyn HttpFilterFactory>> = HashMap::new();
    let mut router: Option<RouterConfig> = None;
    for (i, f) in cfg.http_filters.iter().enumerate() {
        let fpath = format!("{path}.http_filters[{i}]");
        if is_router(&f.name, f.typed_config.as_ref()) {
            let body = f
                .typed_config
                .as_ref()
                .map(|t| t.body())
                .unwrap_or(serde_yaml::Value::Mapping(Default::default()));
            match decode::<RouterConfig>(body, &format!("{fpath}.typed_config")) {
                Ok(r) if r.dynamic_stats == Some(false) => errors.push(ConfigError::new(
                    format!("{fpath}.typed_config.dynamic_stats"),
                    "false is not supported: mecha always keeps per-status cluster stats",
                )),
                Ok(r) => router = Some(r),
                Err(e) => errors.push(e),
            }
            continue;
        }
        match ctx.registry.http_factory(&f.name, f.typed_config.as_ref()) {
            Some(factory) => {
                by_name.insert(f.name.clone(), factory.clone());
                if f.disabled {
                    continue;
                }
                match factory.create(
                    f.typed_config.as_ref(),
                    &format!("{fpath}.typed_config"),
                    &fctx,
                ) {
                    Ok(filter) => filters.push(filter),
                    Err(e) => errors.push(e),
                }
            }
            None if f.is_optional => {
                tracing::warn!(filter = %f.name, "optional HTTP filter is not supported; skipped")
            }
            None => errors.push(match &f.typed_config {
                Some(tc) => ConfigError::new(
                    format!("{fpath}.typed_config.@type"),
                    format!("unknown HTTP filter type \"{}\"", tc.type_url),
                ),
                None => ConfigError::new(
                    format!("{fpath}.name"),
                    format!("unknown HTTP filter \"{}\"", f.name),
                ),
            }),
        }
    }
    let Some(router_cfg) = router else {
        errors.push(ConfigError::new(
            format!("{path}.http_filters"),
            "the last HTTP filter must be envoy.filters.http.router",
        ));
        return Err(errors);
    };
    let registry = ctx.registry.clone();
    let parser = move |name: &str, tc: &TypedConfig, p: &str| {
        let factory = by_name
            .get(name)
            .or_else(|| registry.http_factory(name, Some(tc)));
        match factory {
            Some(f) => f.per_route(tc, p),
            None => Err(ConfigError::new(
                p,
                format!("no HTTP filter named \"{name}\" in this connection manager"),
            )),
        }
    };
    let routes = match &cfg.route_config {
        Some(rc) => match RouteTable::compile(rc, &format!("{path}.route_config"), &parser) {
            Ok(t) => Some(t),
            Err(mut e) => {
                errors.append(&mut e);
                None
            }
        },
        None => {
            errors.push(ConfigError::new(
                format!("{path}.route_config"),
                "an inline route_config is required",
            ));
            None
        }
    };
    let (Some(routes), true) = (routes, errors.is_empty()) else {
        return Err(errors);
    };
    let routes = Arc::new(ArcSwap::from_pointee(routes));
    let router = Router {
        routes: routes.clone(),
        clusters: ctx.clusters.clone(),
        stats: stats.clone(),
        suppress_envoy_headers: router_cfg.suppress_envoy_headers,
    };
    let chain = FilterChain::new(filters, Arc::new(router));
    Ok(Arc::new(Hcm::new(cfg, stats, routes, chain)))
}
