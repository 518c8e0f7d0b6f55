//! Applies a set of xDS resources ([`mecha_config::XdsResources`]) to a running server, hitlessly.
//!
//! Everything that can fail is built first, off the hot path: the new cluster manager (unchanged
//! clusters are reused, so their hosts and connection pools survive; EDS endpoint changes go
//! through `Cluster::update_hosts`, which keeps the hosts that did not change), new listener
//! runtimes, new route tables for RDS changes, new sockets. Only then is anything swapped in, so a
//! refused update changes nothing. Swaps are `arc-swap` stores: new requests see the new config,
//! requests in flight finish on what they started with.
//!
//! Warming follows Envoy: an EDS cluster is added once its endpoints arrived (until then the
//! previous version of it keeps serving), a listener once the route configurations it names arrived.
//! A replaced or removed listener's connections are drained (graceful close after in-flight
//! requests, forced after the server's drain time) while the replacement accepts new ones.

use crate::build::build;
use crate::cluster::ClusterManager;
use crate::drain::Drain;
use crate::listener::{self, ListenerRuntime, Terminal};
use crate::route::RouteTable;
use crate::server::ServerState;
use arc_swap::ArcSwap;
use mecha_config::{
    Bootstrap, Cluster as ClusterConfig, ClusterLoadAssignment, ConfigError, DiscoveryType,
    Listener, NetworkFilterConfig, RouteConfiguration, TypedConfig, XdsResources,
};
use mecha_filters::HttpFilterFactory;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// What a listener's accept loop hands each new connection: the runtime and the drain scope of
/// this generation of the listener.
pub struct Generation {
    pub runtime: Arc<ListenerRuntime>,
    pub drain: Drain,
}

struct ActiveListener {
    cfg: Arc<Listener>,
    /// Per filter chain: the RDS route configuration its connection manager serves, if any.
    routes: Vec<Option<Arc<RouteConfiguration>>>,
    addr: SocketAddr,
    /// What `/listeners` shows.
    admin: Arc<ArcSwap<ListenerRuntime>>,
    current: Arc<ArcSwap<Generation>>,
    /// Stops the accept loop.
    stop: Drain,
}

#[derive(Default)]
struct Applied {
    listeners: HashMap<String, ActiveListener>,
    /// EDS clusters: the cluster object and the assignment last given to it.
    eds: HashMap<String, (usize, Arc<ClusterLoadAssignment>)>,
}

/// Applies xDS resources to one server. Calls are serialized (one xDS stream); the lock is never
/// taken on the request path.
pub struct XdsApplier {
    state: Arc<ServerState>,
    static_clusters: Vec<ClusterConfig>,
    static_listeners: Vec<(Arc<ArcSwap<ListenerRuntime>>, SocketAddr)>,
    applied: parking_lot::Mutex<Applied>,
}

enum ListenerPlan {
    /// Same config and routes: nothing to do.
    Keep,
    /// Same listener config, new RDS route tables for some connection managers.
    Routes(Vec<(usize, Arc<RouteConfiguration>, RouteTable)>),
    /// A new runtime on the same socket.
    Replace(Arc<ListenerRuntime>, Vec<Option<Arc<RouteConfiguration>>>),
    /// A new runtime on a new socket (new listener or a changed address).
    Bind(
        Arc<ListenerRuntime>,
        Vec<Option<Arc<RouteConfiguration>>>,
        TcpListener,
        SocketAddr,
    ),
}

impl XdsApplier {
    /// Wraps a started server; its current (static) listeners and clusters stay as they are.
    pub fn new(state: Arc<ServerState>) -> Self {
        let static_clusters = state.bootstrap.load().static_resources.clusters.clone();
        let static_listeners = (**state.listeners.load()).clone();
        Self {
            state,
            static_clusters,
            static_listeners,
            applied: Default::default(),
        }
    }

    /// Validates what only the data plane can check (filters, sockets), then swaps everything in.
    /// On error nothing changed; the text is the NACK's `error_detail`.
    pub fn apply(&self, r: &XdsResources) -> Result<(), String> {
        let mut applied = self.applied.lock();
        let ctx = &self.state.ctx;
        let mut errors: Vec<String> = vec![];
        let previous = ctx.clusters.load_full();

        // Clusters: static ones, ready dynamic ones, and the previous version of warming ones.
        // Whether a new cluster or listener waits for its EDS/RDS (initialization is not over).
        let mut warming = false;
        let mut configs: Vec<&ClusterConfig> = self.static_clusters.iter().collect();
        for (name, c) in &r.clusters {
            if self.static_clusters.iter().any(|s| &s.name == name) {
                errors.push(format!(
                    "Cluster \"{name}\": a static cluster has the same name"
                ));
                continue;
            }
            let cfg = &*c.value;
            if cfg.discovery_type == DiscoveryType::EDS
                && !r
                    .endpoints
                    .contains_key(mecha_config::eds_service_name(cfg))
            {
                match previous.get(name) {
                    Some(old) => configs.push(&old.config),
                    None => {
                        warming = true;
                        tracing::info!(cluster = %name, "cluster warming: waiting for EDS")
                    }
                }
                continue;
            }
            configs.push(cfg);
        }
        // Most updates (RDS, EDS, a CDS response that re-sends the same clusters) change no
        // cluster: keep the current manager instead of rebuilding the map and its stats.
        let clusters_unchanged = configs.len() == previous.clusters.len()
            && configs
                .iter()
                .all(|c| previous.get(&c.name).is_some_and(|p| p.config == **c));

        // Listeners.
        let mut plans: Vec<(String, Arc<Listener>, ListenerPlan)> = vec![];
        for (name, l) in &r.listeners {
            let chain_rds: Vec<Option<String>> = l
                .value
                .filter_chains
                .iter()
                .map(|c| {
                    c.filters.iter().find_map(|f| match &f.config {
                        NetworkFilterConfig::HttpConnectionManager(h) => {
                            h.rds.as_ref().map(|r| r.route_config_name.clone())
                        }
                        _ => None,
                    })
                })
                .collect();
            let routes: Option<Vec<Option<Arc<RouteConfiguration>>>> = chain_rds
                .iter()
                .map(|n| match n {
                    Some(n) => r.route_configs.get(n).map(|rc| Some(rc.value.clone())),
                    None => Some(None),
                })
                .collect();
            let active = applied.listeners.get(name);
            let Some(routes) = routes else {
                if active.is_none() {
                    warming = true;
                    tracing::info!(listener = %name, "listener warming: waiting for RDS");
                }
                continue;
            };
            if let Some(a) = active.filter(|a| Arc::ptr_eq(&a.cfg, &l.value)) {
                let mut changed = vec![];
                let gen = a.current.load();
                for (i, (new, old)) in routes.iter().zip(&a.routes).enumerate() {
                    if let (Some(new), Some(old)) = (new, old) {
                        if !Arc::ptr_eq(new, old) {
                            // The table serving `old` now: its unchanged virtual hosts are reused.
                            let current = match gen.runtime.chains.get(i).map(|c| &c.terminal) {
                                Some(Terminal::Http(hcm)) => Some(hcm.routes.load_full()),
                                _ => None,
                            };
                            let previous = current.as_deref().map(|t| (&**old, t));
                            match self.compile_routes(&l.value, i, new, previous) {
                                Ok(t) => changed.push((i, new.clone(), t)),
                                Err(e) => errors.extend(e),
                            }
                        }
                    }
                }
                let plan = if changed.is_empty() {
                    ListenerPlan::Keep
                } else {
                    ListenerPlan::Routes(changed)
                };
                plans.push((name.clone(), l.value.clone(), plan));
                continue;
            }
            let runtime = match self.build_listener(&l.value, &routes) {
                Ok(rt) => rt,
                Err(e) => {
                    errors.extend(e);
                    continue;
                }
            };
            let plan = match active {
                Some(a) if a.addr == runtime.address || runtime.address.port() == 0 => {
                    ListenerPlan::Replace(runtime, routes)
                }
                _ => match listener::bind(runtime.address, runtime.ipv4_compat).and_then(|t| {
                    let addr = t.local_addr()?;
                    Ok((t, addr))
                }) {
                    Ok((tcp, addr)) => ListenerPlan::Bind(runtime, routes, tcp, addr),
                    Err(e) => {
                        errors.push(format!(
                            "Listener \"{name}\": cannot bind {}: {e}",
                            runtime.address
                        ));
                        continue;
                    }
                },
            };
            plans.push((name.clone(), l.value.clone(), plan));
        }
        if !errors.is_empty() {
            return Err(errors.join("\n"));
        }

        // Everything is built: swap clusters first so new routes find their clusters.
        let cm = if clusters_unchanged {
            previous.clone()
        } else {
            let configs: Vec<ClusterConfig> = configs.into_iter().cloned().collect();
            Arc::new(ClusterManager::new(&configs, &ctx.stats, Some(&previous)))
        };
        let mut eds = HashMap::new();
        for c in cm.clusters.values() {
            if c.config.discovery_type != DiscoveryType::EDS {
                continue;
            }
            let Some(cla) = r.endpoints.get(mecha_config::eds_service_name(&c.config)) else {
                continue;
            };
            let key = Arc::as_ptr(c) as usize;
            let unchanged = applied
                .eds
                .get(&c.name)
                .is_some_and(|(k, old)| *k == key && Arc::ptr_eq(old, &cla.value));
            if !unchanged {
                c.update_hosts(crate::cluster::assignment_hosts(&cla.value));
            }
            eds.insert(c.name.clone(), (key, cla.value.clone()));
        }
        applied.eds = eds;
        for (name, c) in &cm.clusters {
            if !previous.get(name).is_some_and(|p| Arc::ptr_eq(p, c)) {
                c.start_discovery();
            }
        }
        if !clusters_unchanged {
            ctx.clusters.store(cm);
        }

        let drain_time = self.state.options.drain_timeout;
        let mut next: HashMap<String, ActiveListener> = HashMap::new();
        for (name, cfg, plan) in plans {
            let old = applied.listeners.remove(&name);
            match (plan, old) {
                (ListenerPlan::Keep, Some(a)) => {
                    next.insert(name, a);
                }
                (ListenerPlan::Routes(changed), Some(mut a)) => {
                    let gen = a.current.load();
                    for (i, rc, table) in changed {
                        if let Some(Terminal::Http(hcm)) =
                            gen.runtime.chains.get(i).map(|c| &c.terminal)
                        {
                            hcm.routes.store(Arc::new(table));
                        }
                        a.routes[i] = Some(rc);
                    }
                    drop(gen);
                    next.insert(name, a);
                }
                (ListenerPlan::Replace(rt, routes), Some(mut a)) => {
                    tracing::info!(listener = %name, "listener updated; draining the old connections");
                    let gen = Generation {
                        runtime: rt.clone(),
                        drain: self.state.drain.child(),
                    };
                    let old_gen = a.current.swap(Arc::new(gen));
                    a.admin.store(rt);
                    a.cfg = cfg;
                    a.routes = routes;
                    tokio::spawn(async move { old_gen.drain.drain(drain_time).await });
                    next.insert(name, a);
                }
                (ListenerPlan::Bind(rt, routes, tcp, addr), old) => {
                    if let Some(old) = old {
                        stop_listener(old, drain_time);
                    }
                    tracing::info!(listener = %name, %addr, "listening (xDS)");
                    let gen = Arc::new(ArcSwap::from_pointee(Generation {
                        runtime: rt.clone(),
                        drain: self.state.drain.child(),
                    }));
                    let stop = self.state.drain.child();
                    tokio::spawn(accept_loop(tcp, gen.clone(), stop.clone()));
                    next.insert(
                        name,
                        ActiveListener {
                            cfg,
                            routes,
                            addr,
                            admin: Arc::new(ArcSwap::new(rt)),
                            current: gen,
                            stop,
                        },
                    );
                }
                (_, None) => {}
            }
        }
        // Listeners still warming keep their previous version; the rest were removed.
        for (name, a) in applied.listeners.drain() {
            if r.listeners.contains_key(&name) {
                next.insert(name, a);
            } else {
                tracing::info!(listener = %name, "listener removed; draining");
                stop_listener(a, drain_time);
            }
        }
        applied.listeners = next;
        let mut all = self.static_listeners.clone();
        let mut dynamic: Vec<_> = applied
            .listeners
            .iter()
            .map(|(n, a)| (n.clone(), (a.admin.clone(), a.addr)))
            .collect();
        dynamic.sort_by(|a, b| a.0.cmp(&b.0));
        all.extend(dynamic.into_iter().map(|(_, x)| x));
        self.state.listeners.store(Arc::new(all));
        self.state.xds.store(Some(Arc::new(r.clone())));
        self.state
            .last_updated
            .store(Arc::new(std::time::SystemTime::now()));
        if !warming && self.initial_responses_received(r) {
            self.state.mark_initialized();
        }
        Ok(())
    }

    /// Whether the first response of each dynamic type the bootstrap configures (LDS, CDS) was
    /// accepted.
    fn initial_responses_received(&self, r: &XdsResources) -> bool {
        let b = self.state.bootstrap.load();
        let Some(d) = &b.dynamic_resources else {
            return true;
        };
        let got = |configured: bool, t: &str| !configured || r.received.contains(t);
        got(d.lds_config.is_some(), mecha_config::type_url::LISTENER)
            && got(d.cds_config.is_some(), mecha_config::type_url::CLUSTER)
    }

    /// Builds one listener with its RDS route configurations inlined, through the same code as
    /// static config.
    fn build_listener(
        &self,
        l: &Listener,
        routes: &[Option<Arc<RouteConfiguration>>],
    ) -> Result<Arc<ListenerRuntime>, Vec<String>> {
        let mut l = l.clone();
        for (chain, rc) in l.filter_chains.iter_mut().zip(routes) {
            for f in &mut chain.filters {
                if let NetworkFilterConfig::HttpConnectionManager(h) = &mut f.config {
                    if let Some(rc) = rc {
                        h.route_config = Some((**rc).clone());
                        h.rds = None;
                    }
                }
            }
        }
        let name = l.name.clone();
        let b = Bootstrap {
            static_resources: mecha_config::StaticResources {
                listeners: vec![l],
                clusters: vec![],
            },
            ..Default::default()
        };
        // `build` only reads the live cluster manager (routers keep a handle to it); the empty
        // manager it makes for this cluster-less bootstrap is dropped, never stored.
        let mut snap = build(&b, &self.state.ctx).map_err(|e| {
            e.0.iter()
                .map(|e| resource_error(&name, e))
                .collect::<Vec<_>>()
        })?;
        let rt = snap
            .listeners
            .pop()
            .ok_or_else(|| vec![format!("Listener \"{name}\": not built")])?;
        Ok(rt)
    }

    /// Compiles an RDS route configuration for the connection manager of `chain` of `l`, reusing
    /// what `previous` (the configuration it replaces and its compiled table) has unchanged.
    fn compile_routes(
        &self,
        l: &Listener,
        chain: usize,
        rc: &RouteConfiguration,
        previous: Option<(&RouteConfiguration, &RouteTable)>,
    ) -> Result<RouteTable, Vec<String>> {
        let hcm = l.filter_chains.get(chain).and_then(|c| {
            c.filters.iter().find_map(|f| match &f.config {
                NetworkFilterConfig::HttpConnectionManager(h) => Some(h),
                _ => None,
            })
        });
        let registry = self.state.ctx.registry.clone();
        let by_name: HashMap<String, Arc<dyn HttpFilterFactory>> = hcm
            .map(|h| {
                h.http_filters
                    .iter()
                    .filter_map(|f| {
                        registry
                            .http_factory(&f.name, f.typed_config.as_ref())
                            .map(|fac| (f.name.clone(), fac.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let parser = move |name: &str, tc: &TypedConfig, p: &str| {
            let factory = by_name
                .get(name)
                .cloned()
                .or_else(|| registry.http_factory(name, Some(tc)).cloned());
            match factory {
                Some(f) => f.per_route(tc, p),
                None => Err(ConfigError::new(
                    p,
                    format!("no HTTP filter named \"{name}\" in this connection manager"),
                )),
            }
        };
        RouteTable::compile_reusing(rc, "", &parser, previous).map_err(|e| {
            e.iter()
                .map(|e| format!("RouteConfiguration \"{}\": {e}", rc.name))
                .collect()
        })
    }
}

/// `Listener "name": <path below the listener>: message`.
fn resource_error(name: &str, e: &ConfigError) -> String {
    let path = e
        .path
        .strip_prefix("static_resources.listeners[0]")
        .map(|p| p.trim_start_matches('.'))
        .unwrap_or(&e.path);
    if path.is_empty() {
        format!("Listener \"{name}\": {}", e.message)
    } else {
        format!("Listener \"{name}\": {path}: {}", e.message)
    }
}

fn stop_listener(a: ActiveListener, drain_time: Duration) {
    let stop = a.stop;
    let gen = a.current.load_full();
    tokio::spawn(async move {
        stop.drain(Duration::ZERO).await;
        gen.drain.drain(drain_time).await;
    });
}

/// The accept loop of an xDS listener: each connection is served by the generation current when
/// it was accepted and is tracked in that generation's drain scope.
async fn accept_loop(tcp: TcpListener, current: Arc<ArcSwap<Generation>>, stop: Drain) {
    let mut stopped = stop.accept_stopped();
    loop {
        let (stream, remote) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        let gen = current.load_full();
        tokio::spawn(crate::clock::Fresh::new(async move {
            let _tracker = gen.drain.track();
            listener::serve_connection(gen.runtime.clone(), stream, remote, gen.drain.clone())
                .await;
        }));
    }
}
