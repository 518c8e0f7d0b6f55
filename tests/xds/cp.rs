//! A scriptable xDS control plane: a real tonic server on envoy-types' AggregatedDiscoveryService
//! (SotW and delta). Tests set resources per type; every connected stream is pushed the changes,
//! and every request mecha sends is recorded (ACKs, NACKs with error_detail, subscriptions).

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::Stream;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

pub use mecha_xds::translate::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

#[derive(Default, Clone)]
struct TypeSnap {
    version: u64,
    resources: BTreeMap<String, Arc<Encoded>>,
}

/// A resource encoded once when it is set (pushes only copy bytes, so a control plane pushing
/// often costs little CPU next to the proxy under test).
pub struct Encoded {
    name: String,
    any: Any,
    /// The delta version: a hash of the content.
    version: String,
}

/// Encodes resources (Envoy JSON) of `type_url` for [`ControlPlane::set_encoded`].
pub fn encode(type_url: &str, resources: Vec<serde_json::Value>) -> Vec<Arc<Encoded>> {
    resources
        .into_iter()
        .map(|r| {
            let name = r
                .get("name")
                .or_else(|| r.get("cluster_name"))
                .and_then(|n| n.as_str())
                .unwrap()
                .to_string();
            Arc::new(Encoded {
                name,
                any: to_any(type_url, &r),
                version: format!("{:x}", fxhash(&r.to_string())),
            })
        })
        .collect()
}

#[derive(Default)]
pub struct Shared {
    snap: Mutex<HashMap<&'static str, TypeSnap>>,
    pub requests: Mutex<Vec<DiscoveryRequest>>,
    pub delta_requests: Mutex<Vec<DeltaDiscoveryRequest>>,
    changed: watch::Sender<u64>,
}

#[derive(Clone)]
pub struct ControlPlane {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    stop: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

fn to_any(type_url: &str, v: &serde_json::Value) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: mecha_xds::translate::value_to_bytes(type_url, v)
            .unwrap_or_else(|e| panic!("bad test resource {v}: {e}")),
    }
}

impl ControlPlane {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), Arc::new(Shared::default())).await
    }

    /// Serves `shared` (its resources survive a restart) on `addr`.
    pub async fn start_on(addr: SocketAddr, shared: Arc<Shared>) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (kill_tx, kill_rx) = watch::channel(false);
        let svc = AggregatedDiscoveryServiceServer::new(Svc(shared.clone(), kill_rx));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = rx.await;
                        // End the open streams too, like a control plane going away.
                        let _ = kill_tx.send(true);
                    },
                )
                .await;
        });
        Self {
            shared,
            addr,
            stop: Arc::new(Mutex::new(Some(tx))),
        }
    }

    /// Stops serving; open streams end.
    pub fn stop(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    /// Replaces every resource of `type_url` (bumps its version).
    pub fn set(&self, type_url: &'static str, resources: Vec<serde_json::Value>) {
        self.set_encoded(type_url, encode(type_url, resources));
    }

    /// Like [`ControlPlane::set`] with resources encoded beforehand ([`encode`]).
    pub fn set_encoded(&self, type_url: &'static str, resources: Vec<Arc<Encoded>>) {
        let mut snap = self.shared.snap.lock().unwrap();
        let e = snap.entry(type_url).or_default();
        e.version += 1;
        e.resources = resources.into_iter().map(|r| (r.name.clone(), r)).collect();
        drop(snap);
        self.shared.changed.send_modify(|v| *v += 1);
    }

    pub fn requests(&self) -> Vec<DiscoveryRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn delta_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.shared.delta_requests.lock().unwrap().clone()
    }
}

struct Svc(Arc<Shared>, watch::Receiver<bool>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Svc {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut incoming = req.into_inner();
        let shared = self.0.clone();
        let mut kill = self.1.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            // Per type: the names the client asked for and the (version, names) last sent.
            let mut asked: HashMap<&'static str, Vec<String>> = HashMap::new();
            let mut sent: HashMap<&'static str, (u64, Vec<String>)> = HashMap::new();
            let mut changed = shared.changed.subscribe();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    m = incoming.message() => match m {
                        Ok(Some(r)) => {
                            shared.requests.lock().unwrap().push(r.clone());
                            let t = static_type(&r.type_url);
                            asked.insert(t, r.resource_names.clone());
                        }
                        _ => return,
                    },
                    c = changed.changed() => if c.is_err() { return },
                    _ = async { let _ = kill.wait_for(|k| *k).await; } => {
                        let _ = tx.send(Err(Status::unavailable("control plane stopping"))).await;
                        return;
                    }
                }
                let snap = shared.snap.lock().unwrap().clone();
                // Make-before-break, as real control planes push: clusters and endpoints before
                // the listeners and routes that may reference them.
                for (t, names) in ORDER.iter().filter_map(|t| asked.get_key_value(t)) {
                    let s = snap.get(t).cloned().unwrap_or_default();
                    if s.version == 0 {
                        continue;
                    }
                    let key = (s.version, names.clone());
                    if sent.get(t) == Some(&key) {
                        continue;
                    }
                    let wildcard = *t == LISTENER_TYPE || *t == CLUSTER_TYPE;
                    let resources: Vec<Any> = s
                        .resources
                        .iter()
                        .filter(|(n, _)| wildcard || names.contains(n))
                        .map(|(_, v)| v.any.clone())
                        .collect();
                    nonce += 1;
                    let resp = DiscoveryResponse {
                        version_info: s.version.to_string(),
                        resources,
                        type_url: t.to_string(),
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    sent.insert(t, key);
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut incoming = req.into_inner();
        let shared = self.0.clone();
        let mut kill = self.1.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            // Per type: subscribed names (None = wildcard) and resource versions the client has.
            let mut subs: HashMap<&'static str, Option<BTreeSet<String>>> = HashMap::new();
            let mut has: HashMap<&'static str, BTreeMap<String, String>> = HashMap::new();
            let mut changed = shared.changed.subscribe();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    m = incoming.message() => match m {
                        Ok(Some(r)) => {
                            shared.delta_requests.lock().unwrap().push(r.clone());
                            let t = static_type(&r.type_url);
                            let wildcard = t == LISTENER_TYPE || t == CLUSTER_TYPE;
                            let e = subs.entry(t).or_insert_with(|| (!wildcard).then(BTreeSet::new));
                            if let Some(set) = e {
                                set.extend(r.resource_names_subscribe.iter().cloned());
                                for n in &r.resource_names_unsubscribe {
                                    set.remove(n);
                                    has.entry(t).or_default().remove(n);
                                }
                            }
                            for (n, v) in &r.initial_resource_versions {
                                has.entry(t).or_default().insert(n.clone(), v.clone());
                            }
                        }
                        _ => return,
                    },
                    c = changed.changed() => if c.is_err() { return },
                    _ = async { let _ = kill.wait_for(|k| *k).await; } => {
                        let _ = tx.send(Err(Status::unavailable("control plane stopping"))).await;
                        return;
                    }
                }
                let snap = shared.snap.lock().unwrap().clone();
                for (t, sub) in ORDER.iter().filter_map(|t| subs.get_key_value(t)) {
                    let s = snap.get(t).cloned().unwrap_or_default();
                    let have = has.entry(t).or_default();
                    let mut resources = vec![];
                    for (n, v) in &s.resources {
                        if sub.as_ref().is_some_and(|set| !set.contains(n)) {
                            continue;
                        }
                        // A resource's version is its content, so unchanged ones are not resent.
                        let version = v.version.clone();
                        if have.get(n) != Some(&version) {
                            have.insert(n.clone(), version.clone());
                            resources.push(Resource {
                                name: n.clone(),
                                version,
                                resource: Some(v.any.clone()),
                                ..Default::default()
                            });
                        }
                    }
                    let removed: Vec<String> = have
                        .keys()
                        .filter(|n| !s.resources.contains_key(*n))
                        .cloned()
                        .collect();
                    for n in &removed {
                        have.remove(n);
                    }
                    if resources.is_empty() && removed.is_empty() {
                        continue;
                    }
                    nonce += 1;
                    let resp = DeltaDiscoveryResponse {
                        system_version_info: s.version.to_string(),
                        resources,
                        type_url: t.to_string(),
                        removed_resources: removed,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The order responses go out in when several types changed at once.
const ORDER: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

fn static_type(t: &str) -> &'static str {
    [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]
        .into_iter()
        .find(|x| *x == t)
        .unwrap_or("")
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

// ---- resource builders (Envoy JSON, as a control plane would send) ----

pub fn listener(name: &str, port: u16, rds: &str, stat_prefix: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": stat_prefix,
                "rds": {"route_config_name": rds, "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }
        }]}]
    })
}

pub fn eds_cluster(name: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name, "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
    })
}

pub fn xds_static_cluster(name: &str, addrs: &[SocketAddr]) -> serde_json::Value {
    serde_json::json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": cla(name, addrs),
    })
}

pub fn cla(name: &str, addrs: &[SocketAddr]) -> serde_json::Value {
    let eps: Vec<_> = addrs
        .iter()
        .map(|a| serde_json::json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}}))
        .collect();
    serde_json::json!({"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]})
}

pub fn route(name: &str, cluster: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}
        ]}]
    })
}

/// mecha's bootstrap: admin, node, ADS over the static `xds` cluster.
pub fn bootstrap(admin_port: u16, cp: SocketAddr, api_type: &str) -> String {
    format!(
        r#"{admin}node: {{ id: test-node, cluster: test }}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{ cluster_name: xds }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
"#,
        admin = crate::common::admin_yaml(admin_port),
        ip = cp.ip(),
        port = cp.port(),
    )
}
