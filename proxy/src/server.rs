//! The running proxy: binds listeners and the admin endpoint for a snapshot, and drains on stop.

use crate::build::{build, BuildContext, Snapshot};
use crate::drain::Drain;
use crate::listener::{self, ListenerRuntime};
use crate::stats::ServerStats;
use crate::ProxyError;
use arc_swap::ArcSwap;
use mecha_config::Bootstrap;
use mecha_filters::stats::{Scope, Store};
use mecha_filters::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub concurrency: usize,
    pub config_path: Option<String>,
    /// How long in-flight requests may take to finish after a drain starts.
    pub drain_timeout: Duration,
    /// The process's log filter, for `/logging`; `None` when the embedder owns logging.
    pub log_control: Option<LogControl>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            concurrency: 1,
            config_path: None,
            drain_timeout: Duration::from_secs(10),
            log_control: None,
        }
    }
}

/// Reads and replaces the process's log level at runtime (the binary owns the subscriber, so it
/// hands in closures over its reload handle).
#[derive(Clone)]
pub struct LogControl {
    /// The current level (e.g. `info`).
    pub get: Arc<dyn Fn() -> String + Send + Sync>,
    /// Sets every logger's level.
    pub set: SetLogLevel,
}

pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), LogLevelError> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("unknown logger level: {0}")]
    Unknown(String),
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogControl")
    }
}

/// State the admin endpoint reads.
pub struct ServerState {
    pub ctx: BuildContext,
    pub bootstrap: ArcSwap<Bootstrap>,
    pub listeners: ArcSwap<Vec<(Arc<ArcSwap<ListenerRuntime>>, SocketAddr)>>,
    pub ready: AtomicBool,
    /// With `lds_config`/`cds_config`: not yet LIVE because the first LDS/CDS responses (and
    /// the warming of what they brought) are awaited (Envoy's INITIALIZING).
    pub initializing: AtomicBool,
    pub started: Instant,
    pub options: ServerOptions,
    pub drain: Drain,
    pub last_updated: ArcSwap<std::time::SystemTime>,
    /// The xDS resources last applied (`/config_dump`'s dynamic sections); `None` without xDS.
    pub xds: arc_swap::ArcSwapOption<mecha_config::XdsResources>,
    /// `/healthcheck/fail` was called (and not undone by `/healthcheck/ok`): the server reports
    /// DRAINING, as Envoy.
    pub healthcheck_failed: AtomicBool,
    /// Woken by `/quitquitquit`; see [`Server::quit_requested`].
    pub quit: Arc<tokio::sync::Notify>,
    pub server_stats: ServerStats,
}

pub struct Server {
    pub state: Arc<ServerState>,
    pub admin_addr: Option<SocketAddr>,
}

/// Envoy's `ServerInfo.State`, with its `server.state` gauge value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerLifecycle {
    Live = 0,
    Draining = 1,
    PreInitializing = 2,
    Initializing = 3,
}

impl ServerLifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "LIVE",
            Self::Draining => "DRAINING",
            Self::PreInitializing => "PRE_INITIALIZING",
            Self::Initializing => "INITIALIZING",
        }
    }
}

impl ServerState {
    pub fn lifecycle(&self) -> ServerLifecycle {
        if self.drain.is_draining() {
            ServerLifecycle::Draining
        } else if self.ready.load(Ordering::SeqCst) {
            if self.healthcheck_failed.load(Ordering::SeqCst) {
                ServerLifecycle::Draining
            } else {
                ServerLifecycle::Live
            }
        } else if self.initializing.load(Ordering::SeqCst) {
            ServerLifecycle::Initializing
        } else {
            ServerLifecycle::PreInitializing
        }
    }

    /// Brings the `server.*` gauges up to date (they are derived, not counted on any path).
    pub fn refresh_server_stats(&self) {
        let s = &self.server_stats;
        // Envoy's `server.live`: 0 once health checks are failed (or the server drains).
        s.live.set(i64::from(
            !self.healthcheck_failed.load(Ordering::SeqCst) && !self.drain.is_draining(),
        ));
        s.state.set(self.lifecycle() as i64);
        s.uptime
            .set(i64::try_from(self.started.elapsed().as_secs()).unwrap_or(i64::MAX));
        s.concurrency
            .set(i64::try_from(self.options.concurrency).unwrap_or(i64::MAX));
        s.total_connections
            .set(i64::try_from(self.drain.open_connections()).unwrap_or(i64::MAX));
    }

    /// Initialization is over (first dynamic config applied, or given up waiting for it): the
    /// server is LIVE unless it is already draining.
    pub fn mark_initialized(&self) {
        if self.initializing.swap(false, Ordering::SeqCst) && !self.drain.is_draining() {
            tracing::info!("initialized: server is LIVE");
            self.ready.store(true, Ordering::SeqCst);
        }
    }
}

/// Envoy's default `stats_flush_interval`: histograms' interval quantiles cover one of these.
pub const STATS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Ends a stats flush interval every [`STATS_FLUSH_INTERVAL`], off the request path.
async fn flush_stats(state: Arc<ServerState>) {
    let mut tick = tokio::time::interval(STATS_FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        state.refresh_server_stats();
        state.ctx.stats.flush_histograms();
    }
}

impl Server {
    /// Builds the snapshot, binds every listener (and the admin listener), and starts serving.
    pub async fn start(
        bootstrap: Bootstrap,
        registry: Registry,
        options: ServerOptions,
    ) -> Result<Server, ProxyError> {
        let ctx = BuildContext::new(registry);
        Self::start_with(bootstrap, ctx, options).await
    }

    /// Like [`Server::start`], with a context the caller prepared (e.g. to hand the upstream
    /// handle to filters registered before the build).
    pub async fn start_with(
        bootstrap: Bootstrap,
        ctx: BuildContext,
        options: ServerOptions,
    ) -> Result<Server, ProxyError> {
        let snapshot: Snapshot = build(&bootstrap, &ctx)?;
        ctx.clusters.store(snapshot.clusters.clone());
        snapshot.clusters.start_discovery();
        let drain = Drain::new();
        let mut bound = vec![];
        // `bind_to_port: false` listeners only receive connections handed off by a
        // `use_original_dst` listener.
        for l in snapshot.listeners.iter().filter(|l| l.capture.bind_to_port) {
            let tcp =
                listener::bind(l.address, l.ipv4_compat).map_err(|source| ProxyError::Bind {
                    name: l.name.clone(),
                    addr: l.address,
                    source,
                })?;
            let addr = tcp
                .local_addr()
                .map_err(|e| ProxyError::Other(e.to_string()))?;
            bound.push((tcp, l.clone(), addr));
        }
        let admin = match &bootstrap.admin {
            Some(a) => {
                let sa = &a.address.socket_address;
                let ip = sa.address.parse().map_err(|_| {
                    ProxyError::Other(format!(
                        "admin.address.socket_address.address: \"{}\" is not an IP address",
                        sa.address
                    ))
                })?;
                let addr = SocketAddr::new(ip, sa.port_value);
                let tcp =
                    listener::bind(addr, sa.ipv4_compat).map_err(|source| ProxyError::Bind {
                        name: "admin".into(),
                        addr,
                        source,
                    })?;
                Some(tcp)
            }
            None => None,
        };
        tokio::spawn(crate::timer_anchor::run());
        let mut listeners = vec![];
        for (tcp, rt, addr) in bound {
            tracing::info!(listener = %rt.name, %addr, "listening");
            let swap = Arc::new(ArcSwap::new(rt));
            listeners.push((swap.clone(), addr));
            tokio::spawn(listener::run(tcp, swap, drain.clone()));
        }
        // Envoy serves `/ready` 503 until its init manager is done: with dynamic listeners or
        // clusters, that is after the first LDS/CDS responses were applied (see `xds_apply`).
        let waits_for_xds = bootstrap
            .dynamic_resources
            .as_ref()
            .is_some_and(|d| d.lds_config.is_some() || d.cds_config.is_some());
        let ctx_stats = ctx.stats.clone();
        let state = Arc::new(ServerState {
            ctx,
            bootstrap: ArcSwap::from_pointee(bootstrap),
            listeners: ArcSwap::from_pointee(listeners),
            ready: AtomicBool::new(false),
            initializing: AtomicBool::new(waits_for_xds),
            started: Instant::now(),
            options,
            drain,
            last_updated: ArcSwap::from_pointee(std::time::SystemTime::now()),
            xds: Default::default(),
            healthcheck_failed: AtomicBool::new(false),
            quit: Arc::new(tokio::sync::Notify::new()),
            server_stats: ServerStats::new(&ctx_stats, &Scope::plain("server")),
        });
        state.refresh_server_stats();
        tokio::spawn(flush_stats(state.clone()));
        let admin_addr = match admin {
            Some(tcp) => {
                let addr = tcp.local_addr().ok();
                tracing::info!(admin = ?addr, "admin listening");
                tokio::spawn(crate::admin::serve(tcp, state.clone()));
                addr
            }
            None => None,
        };
        if !waits_for_xds {
            state.ready.store(true, Ordering::SeqCst);
        }
        Ok(Server { state, admin_addr })
    }

    pub fn stats(&self) -> &Arc<Store> {
        &self.state.ctx.stats
    }

    /// The bound address of each listener, by name (useful with `port_value: 0`).
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.state
            .listeners
            .load()
            .iter()
            .map(|(rt, addr)| (rt.load().name.clone(), *addr))
            .collect()
    }

    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listener_addrs()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// Resolves when `/quitquitquit` asks the process to exit.
    pub async fn quit_requested(&self) {
        self.state.quit.notified().await;
    }

    /// Stops accepting and waits (up to the drain timeout) for in-flight requests to finish.
    pub async fn drain(&self) -> bool {
        self.state.ready.store(false, Ordering::SeqCst);
        self.state
            .drain
            .drain(self.state.options.drain_timeout)
            .await
    }
}
