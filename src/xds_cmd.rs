//! Wires the xDS client (mecha-xds) to the running proxy (mecha-proxy): accepted resources go to
//! the proxy's [`XdsApplier`], client progress goes to Envoy-named stats.

use mecha_config::{NetworkFilterConfig, XdsResources};
use mecha_filters::stats::{Scope, Store};
use mecha_proxy::xds_apply::XdsApplier;
use mecha_xds::client::Outcome;
use mecha_xds::translate::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use mecha_xds::{AdsClient, XdsEvent, XdsSink};
use std::sync::Arc;

struct ProxySink {
    applier: XdsApplier,
    stats: Arc<Store>,
    /// Route configuration name -> the stat prefixes of the connection managers that use it.
    rds_prefixes: std::sync::Mutex<Vec<(String, String)>>,
}

impl XdsSink for ProxySink {
    fn apply(&self, resources: &XdsResources) -> Result<(), String> {
        self.applier.apply(resources)?;
        let mut prefixes = vec![];
        for l in resources.listeners.values() {
            for f in l.value.filter_chains.iter().flat_map(|c| &c.filters) {
                if let NetworkFilterConfig::HttpConnectionManager(h) = &f.config {
                    if let Some(r) = &h.rds {
                        prefixes.push((r.route_config_name.clone(), h.stat_prefix.clone()));
                    }
                }
            }
        }
        *self.rds_prefixes.lock().unwrap_or_else(|e| e.into_inner()) = prefixes;
        Ok(())
    }

    fn event(&self, event: &XdsEvent) {
        match event {
            XdsEvent::Connected(up) => self
                .stats
                .gauge(&Scope::plain("control_plane"), "connected_state")
                .set(*up as i64),
            XdsEvent::Update {
                type_url,
                names,
                outcome,
            } => {
                let stat = match outcome {
                    Outcome::Attempt => "update_attempt",
                    Outcome::Success => "update_success",
                    Outcome::Rejected => "update_rejected",
                    Outcome::Failure => "update_failure",
                };
                let scopes: Vec<Scope> = match *type_url {
                    LISTENER_TYPE => vec![Scope::plain("listener_manager.lds")],
                    CLUSTER_TYPE => vec![Scope::plain("cluster_manager.cds")],
                    ROUTE_TYPE => {
                        let prefixes = self.rds_prefixes.lock().unwrap_or_else(|e| e.into_inner());
                        names
                            .iter()
                            .flat_map(|n| {
                                prefixes.iter().filter(move |(r, _)| r == n).map(|(r, p)| {
                                    Scope::http(p).sub_tagged("rds", "envoy_rds_route_config", r)
                                })
                            })
                            .collect()
                    }
                    ENDPOINT_TYPE => names.iter().map(|n| Scope::cluster(n)).collect(),
                    _ => vec![],
                };
                for s in scopes {
                    self.stats.counter(&s, stat).inc();
                }
            }
        }
    }
}

/// Starts the ADS client when the bootstrap has `dynamic_resources.ads_config`.
pub fn start(server: &mecha_proxy::Server) -> Result<(), mecha_xds::XdsError> {
    let bootstrap = server.state.bootstrap.load_full();
    let sink = Arc::new(ProxySink {
        applier: XdsApplier::new(server.state.clone()),
        stats: server.stats().clone(),
        rds_prefixes: Default::default(),
    });
    sink.stats
        .gauge(&Scope::plain("control_plane"), "connected_state")
        .set(0);
    if let Some(client) = AdsClient::from_bootstrap(&bootstrap, sink)? {
        tracing::info!("starting the ADS client");
        client.spawn();
    }
    // As Envoy: when the first LDS/CDS response does not come within the config source's
    // `initial_fetch_timeout` (default 15 s, 0 = wait forever), initialization goes on without it.
    if let Some(d) = &bootstrap.dynamic_resources {
        let timeouts: Option<Vec<std::time::Duration>> = [&d.lds_config, &d.cds_config]
            .into_iter()
            .flatten()
            .map(|c| c.initial_fetch_timeout())
            .collect();
        if let Some(wait) = timeouts.and_then(|t| t.into_iter().max()) {
            let state = server.state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if state.initializing.load(std::sync::atomic::Ordering::SeqCst) {
                    tracing::warn!(
                        "initial_fetch_timeout: no complete LDS/CDS config yet, going LIVE"
                    );
                    state.mark_initialized();
                }
            });
        }
    }
    Ok(())
}
