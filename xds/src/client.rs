//! The ADS client: one gRPC stream to the control plane carrying CDS, EDS, LDS and RDS, in
//! state-of-the-world (`StreamAggregatedResources`) or delta (`DeltaAggregatedResources`) form.
//!
//! Per response: decode and validate every resource (any failure NACKs the whole response), build
//! the candidate resource set, hand it to the [`XdsSink`] (which builds and swaps a new snapshot, or
//! refuses), then ACK and commit — or NACK with `error_detail` and keep the last good config.
//! After each commit the RDS and EDS subscriptions follow what the listeners and clusters
//! reference. Disconnects reconnect with jittered exponential backoff; the accepted resources stay
//! in service meanwhile and their versions are sent again on the new stream.

use crate::file::{FileError, FileUpdate};
use crate::translate::{
    decode_resource, Decoded, ResourceError, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE,
};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf as pbw;
use envoy_types::pb::google::rpc::Status;
use mecha_config::{
    ApiType, Bootstrap, ClusterLoadAssignment, ConfigSource, DiscoveryType, PathConfigSource,
    RouteConfiguration, Versioned, XdsResources,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Where accepted resources go. Implemented by the binary on top of the proxy.
pub trait XdsSink: Send + Sync + 'static {
    /// Builds the proxy state for `resources` and swaps it in, or returns why it cannot (the
    /// response is then NACKed with this text and nothing changes).
    fn apply(&self, resources: &XdsResources) -> Result<(), String>;
    /// Progress for stats (`control_plane.connected_state`, `*.update_attempt|success|rejected`).
    fn event(&self, _event: &XdsEvent) {}
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Attempt,
    Success,
    Rejected,
    /// The update could not be fetched (an unreadable config file): Envoy's `update_failure`.
    Failure,
}

#[derive(Debug, Clone)]
pub enum XdsEvent {
    Connected(bool),
    /// A response of `type_url` carrying `names`.
    Update {
        type_url: &'static str,
        names: Vec<String>,
        outcome: Outcome,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("dynamic_resources.ads_config: {0}")]
    Config(String),
}

/// The order Envoy subscribes in: clusters (and their endpoints) before listeners (and routes).
const TYPES: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

fn static_type(t: &str) -> &'static str {
    TYPES.iter().find(|x| **x == t).copied().unwrap_or("")
}

/// The xDS client built from the bootstrap's `dynamic_resources`: the ADS stream, and the files
/// of `lds_config` / `cds_config` sources that are a `path_config_source`.
pub struct AdsClient {
    /// `None` when every source is a file (no `ads_config`).
    ads: Option<Ads>,
    /// Watched files: the resource type each one carries and where it is.
    files: Vec<(&'static str, PathConfigSource)>,
    static_clusters: Vec<String>,
    sink: Arc<dyn XdsSink>,
    backoff_base: Duration,
    backoff_max: Duration,
    /// How often watched files are checked for a replacement.
    file_poll: Duration,
}

/// The ADS stream's settings.
struct Ads {
    endpoint: String,
    connect_timeout: Duration,
    delta: bool,
    node: core::Node,
    node_first_only: bool,
    /// The types subscribed to on the stream: EDS and RDS always (their config sources must be
    /// `ads: {}`), CDS and LDS when their source is `ads: {}`.
    types: Vec<&'static str>,
}

#[derive(Default)]
struct Sub {
    /// Subscribed names (RDS/EDS); LDS/CDS are wildcard.
    names: BTreeSet<String>,
    /// Last accepted version_info (SotW).
    version: String,
    /// Nonce of the last response of this type on the current stream.
    nonce: String,
}

#[derive(Default)]
struct State {
    resources: XdsResources,
    subs: HashMap<&'static str, Sub>,
    /// RDS/EDS names waiting for their first response, with the deadline after which they are
    /// treated as empty (`initial_fetch_timeout`).
    warming: HashMap<(&'static str, String), Option<Instant>>,
}

/// A request on either protocol variant.
enum Outbound {
    Sotw(DiscoveryRequest),
    Delta(DeltaDiscoveryRequest),
}

/// A response on either protocol variant.
enum Inbound {
    Sotw(DiscoveryResponse),
    Delta(DeltaDiscoveryResponse),
}

type InboundStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Inbound, tonic::Status>> + Send>>;

impl AdsClient {
    /// `Ok(None)` when the bootstrap has no `dynamic_resources` source (no `ads_config`, no
    /// `path_config_source`).
    pub fn from_bootstrap(b: &Bootstrap, sink: Arc<dyn XdsSink>) -> Result<Option<Self>, XdsError> {
        let Some(d) = b.dynamic_resources.as_ref() else {
            return Ok(None);
        };
        let files: Vec<(&'static str, PathConfigSource)> = [
            (CLUSTER_TYPE, &d.cds_config),
            (LISTENER_TYPE, &d.lds_config),
        ]
        .into_iter()
        .filter_map(|(t, src)| Some((t, src.as_ref()?.path_config_source.clone()?)))
        .collect();
        let ads = match &d.ads_config {
            Some(ads) => Some(Self::ads(b, ads, d)?),
            None => None,
        };
        if ads.is_none() && files.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            ads,
            files,
            static_clusters: b
                .static_resources
                .clusters
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            sink,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            file_poll: Duration::from_millis(100),
        }))
    }

    fn ads(
        b: &Bootstrap,
        ads: &mecha_config::ApiConfigSource,
        d: &mecha_config::DynamicResources,
    ) -> Result<Ads, XdsError> {
        let service = ads
            .grpc_services
            .first()
            .ok_or_else(|| XdsError::Config("grpc_services is empty".into()))?;
        let cluster_name = &service.envoy_grpc.cluster_name;
        let cluster = b
            .static_resources
            .clusters
            .iter()
            .find(|c| &c.name == cluster_name)
            .ok_or_else(|| XdsError::Config(format!("unknown cluster \"{cluster_name}\"")))?;
        let ep = cluster
            .load_assignment
            .iter()
            .flat_map(|la| &la.endpoints)
            .flat_map(|l| &l.lb_endpoints)
            .next()
            .ok_or_else(|| {
                XdsError::Config(format!("cluster \"{cluster_name}\" has no endpoint"))
            })?;
        let sa = &ep.endpoint.address.socket_address;
        let host = if sa.address.contains(':') {
            format!("[{}]", sa.address)
        } else {
            sa.address.clone()
        };
        let n = b.node.clone().unwrap_or_default();
        let node = core::Node {
            id: n.id,
            cluster: n.cluster,
            metadata: n.metadata.as_ref().map(yaml_struct),
            locality: n.locality.map(|l| core::Locality {
                region: l.region,
                zone: l.zone,
                sub_zone: l.sub_zone,
            }),
            user_agent_name: "mecha".into(),
            user_agent_version_type: Some(core::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            )),
            client_features: vec!["envoy.lb.does_not_support_overprovisioning".into()],
            ..Default::default()
        };
        let over_ads = |src: &Option<ConfigSource>| src.as_ref().is_some_and(|s| s.ads.is_some());
        let types = TYPES
            .into_iter()
            .filter(|t| match *t {
                CLUSTER_TYPE => over_ads(&d.cds_config),
                LISTENER_TYPE => over_ads(&d.lds_config),
                _ => true,
            })
            .collect();
        Ok(Ads {
            endpoint: format!("http://{host}:{}", sa.port_value),
            connect_timeout: cluster.connect_timeout(),
            delta: ads.api_type == ApiType::DELTA_GRPC,
            node,
            node_first_only: ads.set_node_on_first_message_only,
            types,
        })
    }

    /// Runs the client forever on its own task.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    /// Watches the files, connects the ADS stream and reconnects it with jittered exponential
    /// backoff. File updates are applied whenever they come, connected or not: both feed the
    /// same resource set.
    pub async fn run(self) {
        let this = Arc::new(self);
        let mut state = State {
            resources: XdsResources::default(),
            subs: TYPES.iter().map(|t| (*t, Sub::default())).collect(),
            warming: HashMap::new(),
        };
        let (file_tx, mut files) = mpsc::channel::<FileUpdate>(8);
        if !this.files.is_empty() {
            tokio::spawn(crate::file::watch(
                this.files.clone(),
                this.file_poll,
                file_tx.clone(),
            ));
        }
        // Held so that `files.recv()` pends (instead of ending) when no file is configured.
        let _keep = file_tx;
        let Some(ads) = &this.ads else {
            loop {
                let deadline = next_deadline(&state);
                tokio::select! {
                    Some(f) = files.recv() => this.on_file(&mut state, f, None).await,
                    _ = sleep_until(deadline), if deadline.is_some() => {
                        this.expire_warming(&mut state, None).await;
                    }
                }
            }
        };
        let mut attempt: u32 = 0;
        loop {
            let progressed = match this.session(ads, &mut state, &mut files).await {
                Ok(p) => {
                    tracing::warn!(endpoint = %ads.endpoint, "xDS stream closed by the control plane");
                    p
                }
                Err((p, e)) => {
                    tracing::warn!(endpoint = %ads.endpoint, error = %e, "xDS stream failed");
                    p
                }
            };
            this.sink.event(&XdsEvent::Connected(false));
            if progressed {
                attempt = 0;
            }
            let ceiling = this
                .backoff_base
                .saturating_mul(1u32 << attempt.min(16))
                .min(this.backoff_max);
            attempt = attempt.saturating_add(1);
            let ms = rand::random_range(
                this.backoff_base.as_millis()
                    ..=ceiling.as_millis().max(this.backoff_base.as_millis()),
            );
            // Disconnected: the last good config keeps serving, files keep being applied.
            let backoff = tokio::time::sleep(Duration::from_millis(ms as u64));
            tokio::pin!(backoff);
            loop {
                let deadline = next_deadline(&state);
                tokio::select! {
                    _ = &mut backoff => break,
                    Some(f) = files.recv() => this.on_file(&mut state, f, None).await,
                    _ = sleep_until(deadline), if deadline.is_some() => {
                        this.expire_warming(&mut state, None).await;
                    }
                }
            }
        }
    }

    /// One stream, state-of-the-world or delta. Returns whether any response was received
    /// (resets the backoff).
    async fn session(
        self: &Arc<Self>,
        ads: &Ads,
        state: &mut State,
        files: &mut mpsc::Receiver<FileUpdate>,
    ) -> Result<bool, (bool, String)> {
        use tokio_stream::StreamExt;
        let channel = tonic::transport::Endpoint::from_shared(ads.endpoint.clone())
            .map_err(|e| (false, e.to_string()))?
            .connect_timeout(ads.connect_timeout)
            .connect()
            .await
            .map_err(|e| (false, format!("connect: {e}")))?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let (tx, rx) = mpsc::channel::<Outbound>(64);
        let mut out = Sender {
            tx,
            node: ads.node.clone(),
            first: true,
            node_first_only: ads.node_first_only,
        };
        for t in TYPES {
            state.subs.entry(t).or_default().nonce.clear();
        }
        // Queued before the stream opens, so they are its first messages.
        self.initial_requests(ads, state, &mut out).await;
        let requests = ReceiverStream::new(rx);
        let opened =
            if ads.delta {
                let requests = requests.filter_map(|o| match o {
                    Outbound::Delta(r) => Some(r),
                    Outbound::Sotw(_) => None,
                });
                client.delta_aggregated_resources(requests).await.map(|s| {
                    Box::pin(s.into_inner().map(|r| r.map(Inbound::Delta))) as InboundStream
                })
            } else {
                let requests = requests.filter_map(|o| match o {
                    Outbound::Sotw(r) => Some(r),
                    Outbound::Delta(_) => None,
                });
                client.stream_aggregated_resources(requests).await.map(|s| {
                    Box::pin(s.into_inner().map(|r| r.map(Inbound::Sotw))) as InboundStream
                })
            };
        let mut stream = opened.map_err(|e| (false, e.to_string()))?;
        self.sink.event(&XdsEvent::Connected(true));
        tracing::info!(endpoint = %ads.endpoint, delta = ads.delta, "xDS stream established");
        let mut progressed = false;
        loop {
            let deadline = next_deadline(state);
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(r)) => {
                        progressed = true;
                        self.on_response(state, r, &mut out).await;
                    }
                    None => return Ok(progressed),
                    Some(Err(e)) => return Err((progressed, e.to_string())),
                },
                Some(f) = files.recv() => self.on_file(state, f, Some(&mut out)).await,
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.expire_warming(state, Some(&mut out)).await;
                }
            }
        }
    }

    /// The first request of each subscribed type on a new stream: what was accepted before (SotW
    /// `version_info`, delta `initial_resource_versions`, so the server can skip what did not
    /// change) and the RDS/EDS names wanted.
    async fn initial_requests(&self, ads: &Ads, state: &State, out: &mut Sender) {
        for t in ads.types.iter().copied() {
            let sub = &state.subs[t];
            let wildcard = t == CLUSTER_TYPE || t == LISTENER_TYPE;
            if !wildcard && sub.names.is_empty() {
                continue;
            }
            if ads.delta {
                out.delta(DeltaDiscoveryRequest {
                    type_url: t.into(),
                    resource_names_subscribe: sub.names.iter().cloned().collect(),
                    initial_resource_versions: versions_of(&state.resources, t),
                    ..Default::default()
                })
                .await;
            } else {
                out.sotw(DiscoveryRequest {
                    version_info: sub.version.clone(),
                    resource_names: sub.names.iter().cloned().collect(),
                    type_url: t.into(),
                    ..Default::default()
                })
                .await;
            }
        }
    }

    /// One response: decode, validate and apply it off the runtime's threads, then ACK or NACK it
    /// and follow the subscriptions it changed.
    async fn on_response(self: &Arc<Self>, state: &mut State, r: Inbound, out: &mut Sender) {
        let type_url = match &r {
            Inbound::Sotw(r) => &r.type_url,
            Inbound::Delta(r) => &r.type_url,
        };
        let t = static_type(type_url);
        if t.is_empty() {
            tracing::warn!(%type_url, "ignoring a response of an unsupported type");
            return;
        }
        match r {
            Inbound::Sotw(r) => {
                let nonce = r.nonce.clone();
                let error_detail = self
                    .offload(state, move |this, state| this.process_sotw(state, t, r))
                    .await
                    .unwrap_or_else(Some);
                let sub = &state.subs[t];
                out.sotw(DiscoveryRequest {
                    version_info: sub.version.clone(),
                    resource_names: sub.names.iter().cloned().collect(),
                    type_url: t.into(),
                    response_nonce: nonce,
                    error_detail,
                    ..Default::default()
                })
                .await;
            }
            Inbound::Delta(r) => {
                let nonce = r.nonce.clone();
                let error_detail = self
                    .offload(state, move |this, state| this.process_delta(state, t, r))
                    .await
                    .unwrap_or_else(Some);
                out.delta(DeltaDiscoveryRequest {
                    type_url: t.into(),
                    response_nonce: nonce,
                    error_detail,
                    ..Default::default()
                })
                .await;
            }
        }
        self.update_subscriptions(state, Some(out)).await;
    }

    /// A new reading of a watched file: applied as a state-of-the-world response of its type
    /// (same validation, same stats), without an ACK to send.
    async fn on_file(self: &Arc<Self>, state: &mut State, f: FileUpdate, out: Option<&mut Sender>) {
        let t = f.type_url;
        match f.result {
            Ok(r) => {
                let rejected = self
                    .offload(state, move |this, state| this.process_sotw(state, t, r))
                    .await
                    .unwrap_or_else(Some);
                if rejected.is_some() {
                    tracing::warn!(path = %f.path, "the previous configuration keeps serving");
                }
            }
            Err(FileError::Read(e)) => {
                // Envoy's `update_failure`: nothing to validate, the previous config stays.
                tracing::warn!(path = %f.path, error = %e, type_url = t, "cannot read the config file");
                self.sink.event(&XdsEvent::Update {
                    type_url: t,
                    names: vec![],
                    outcome: Outcome::Failure,
                });
            }
            Err(FileError::Invalid(e)) => {
                self.sink.event(&XdsEvent::Update {
                    type_url: t,
                    names: vec![],
                    outcome: Outcome::Attempt,
                });
                self.finish(t, vec![], Err(format!("{}: {e}", f.path)), "");
            }
        }
        self.update_subscriptions(state, out).await;
    }

    /// Decodes, validates and applies one SotW response (CPU work, run off the runtime's
    /// threads); returns the NACK's error, if any.
    fn process_sotw(
        &self,
        state: &mut State,
        t: &'static str,
        r: DiscoveryResponse,
    ) -> Option<Status> {
        let result = {
            let known = self.known_clusters(&state.resources);
            decode_all(
                t,
                r.resources
                    .iter()
                    .map(|a| (a.type_url.as_str(), a.value.as_slice())),
                &known,
            )
        };
        let names: Vec<String> = match &result {
            Ok(d) => d.iter().map(|d| d.name().to_string()).collect(),
            // Undecodable: attribute the attempt to what was asked for (RDS/EDS stats).
            Err(_) => state.subs[t].names.iter().cloned().collect(),
        };
        self.sink.event(&XdsEvent::Update {
            type_url: t,
            names: names.clone(),
            outcome: Outcome::Attempt,
        });
        let outcome = result.and_then(|decoded| {
            let upserts = decoded
                .into_iter()
                .map(|d| (r.version_info.clone(), d))
                .collect();
            // SotW: an LDS/CDS response is the complete set; RDS/EDS carry what was asked for.
            let replace = t == LISTENER_TYPE || t == CLUSTER_TYPE;
            self.commit(state, t, upserts, &[], replace, &r.version_info)
        });
        let sub = state.subs.entry(t).or_default();
        sub.nonce = r.nonce;
        if outcome.is_ok() {
            sub.version = r.version_info.clone();
        }
        self.finish(t, names, outcome, &r.version_info)
    }

    /// Decodes, validates and applies one delta response (CPU work, run off the runtime's
    /// threads); returns the NACK's error, if any.
    fn process_delta(
        &self,
        state: &mut State,
        t: &'static str,
        r: DeltaDiscoveryResponse,
    ) -> Option<Status> {
        let result = {
            let known = self.known_clusters(&state.resources);
            let mut versions = vec![];
            let anys = r.resources.iter().filter_map(|res| {
                versions.push(res.version.clone());
                res.resource
                    .as_ref()
                    .map(|a| (a.type_url.as_str(), a.value.as_slice()))
            });
            let decoded = decode_all(t, anys, &known);
            decoded.map(|d| versions.into_iter().zip(d).collect::<Vec<_>>())
        };
        let mut names: Vec<String> = match &result {
            Ok(d) => d.iter().map(|(_, d)| d.name().to_string()).collect(),
            Err(_) => vec![],
        };
        names.extend(r.removed_resources.iter().cloned());
        self.sink.event(&XdsEvent::Update {
            type_url: t,
            names: names.clone(),
            outcome: Outcome::Attempt,
        });
        let outcome = result.and_then(|upserts| {
            self.commit(
                state,
                t,
                upserts,
                &r.removed_resources,
                false,
                &r.system_version_info,
            )
        });
        self.finish(t, names, outcome, &r.system_version_info)
    }

    /// Logs and counts the outcome of an update; returns the NACK's error, if any.
    fn finish(
        &self,
        t: &'static str,
        names: Vec<String>,
        outcome: Result<(), String>,
        version: &str,
    ) -> Option<Status> {
        match outcome {
            Ok(()) => {
                tracing::info!(
                    type_url = t,
                    version,
                    resources = names.len(),
                    "xDS update accepted"
                );
                self.sink.event(&XdsEvent::Update {
                    type_url: t,
                    names,
                    outcome: Outcome::Success,
                });
                None
            }
            Err(detail) => {
                tracing::warn!(type_url = t, version, error = %detail, "xDS update rejected");
                self.sink.event(&XdsEvent::Update {
                    type_url: t,
                    names,
                    outcome: Outcome::Rejected,
                });
                Some(Status {
                    code: tonic::Code::InvalidArgument as i32,
                    message: detail,
                    details: vec![],
                })
            }
        }
    }

    /// Runs `f` on Tokio's blocking pool: decoding and applying a large response takes tens of
    /// milliseconds of CPU, which on a worker thread (with one worker, the only one) would stall
    /// every connection of the data plane. The state moves to the blocking thread and back. A
    /// panic in `f` (a bug) becomes a NACK instead of ending the client.
    async fn offload<R: Send + 'static>(
        self: &Arc<Self>,
        state: &mut State,
        f: impl FnOnce(&AdsClient, &mut State) -> R + Send + 'static,
    ) -> Result<R, Status> {
        let this = self.clone();
        let mut st = std::mem::take(state);
        let joined = tokio::task::spawn_blocking(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&this, &mut st)));
            (st, r)
        })
        .await;
        match joined {
            Ok((st, r)) => {
                *state = st;
                r.map_err(|_| Status {
                    code: tonic::Code::Internal as i32,
                    message: "internal error while applying the response".into(),
                    details: vec![],
                })
            }
            // Only when the runtime shuts down; the state is gone with it.
            Err(e) => Err(Status {
                code: tonic::Code::Internal as i32,
                message: format!("apply task failed: {e}"),
                details: vec![],
            }),
        }
    }

    fn known_clusters<'a>(&'a self, r: &'a XdsResources) -> HashSet<&'a str> {
        self.static_clusters
            .iter()
            .map(|s| s.as_str())
            .chain(r.clusters.keys().map(|s| s.as_str()))
            .collect()
    }

    /// Builds the candidate set, lets the sink apply it, and commits it on success.
    fn commit(
        &self,
        state: &mut State,
        t: &'static str,
        upserts: Vec<(String, Decoded)>,
        removed: &[String],
        replace: bool,
        version_info: &str,
    ) -> Result<(), String> {
        let mut next = state.resources.clone();
        let now = SystemTime::now();
        macro_rules! patch {
            ($map:ident, $variant:ident) => {{
                if replace {
                    // Keep the accepted-at time of resources that did not change version.
                    let old = std::mem::take(&mut next.$map);
                    for (v, d) in upserts {
                        if let Decoded::$variant(x) = d {
                            let prev = old.get(&*x.name_key());
                            let last_updated = prev
                                .filter(|o| o.version == v)
                                .map(|o| o.last_updated)
                                .unwrap_or(now);
                            let value = same_or_new(prev, x);
                            next.$map.insert(
                                value.name_key().to_string(),
                                Versioned {
                                    version: v,
                                    value,
                                    last_updated,
                                },
                            );
                        }
                    }
                } else {
                    for (v, d) in upserts {
                        if let Decoded::$variant(x) = d {
                            let value = same_or_new(next.$map.get(x.name_key()), x);
                            next.$map.insert(
                                value.name_key().to_string(),
                                Versioned {
                                    version: v,
                                    value,
                                    last_updated: now,
                                },
                            );
                        }
                    }
                }
                for n in removed {
                    next.$map.remove(n);
                }
            }};
        }
        match t {
            LISTENER_TYPE => patch!(listeners, Listener),
            CLUSTER_TYPE => patch!(clusters, Cluster),
            ROUTE_TYPE => patch!(route_configs, Route),
            _ => patch!(endpoints, Endpoints),
        }
        // Route configurations and endpoints nothing references any more are dropped.
        let wanted_rds = next.wanted_route_configs();
        let wanted_eds = next.wanted_endpoints();
        next.route_configs.retain(|k, _| wanted_rds.contains(k));
        next.endpoints.retain(|k, _| wanted_eds.contains(k));
        next.received.insert(t.to_string());
        if !version_info.is_empty() {
            next.versions
                .insert(t.to_string(), version_info.to_string());
        }
        self.sink.apply(&next)?;
        state.resources = next;
        Ok(())
    }

    /// Follows the RDS/EDS names the listeners and clusters reference.
    /// The new names are sent on the stream when connected; otherwise they go out with the
    /// initial requests of the next stream.
    async fn update_subscriptions(&self, state: &mut State, out: Option<&mut Sender>) {
        let mut out = out;
        for (t, wanted) in [
            (ROUTE_TYPE, state.resources.wanted_route_configs()),
            (ENDPOINT_TYPE, state.resources.wanted_endpoints()),
        ] {
            // Start the initial-fetch clock of names that are newly wanted and not here yet, and
            // stop it for those that arrived: an expired clock serves its name as *empty*, which
            // must never replace a resource that came in time (it used to, 15 s after the
            // subscription, emptying the route table under load until the next RDS push).
            for name in &wanted {
                let key = (t, name.clone());
                if have_resource(&state.resources, t, name) {
                    state.warming.remove(&key);
                } else if !state.warming.contains_key(&key) {
                    let timeout = self.fetch_timeout(&state.resources, t, name);
                    state
                        .warming
                        .insert(key, timeout.map(|d| Instant::now() + d));
                }
            }
            state
                .warming
                .retain(|(wt, n), _| *wt != t || wanted.contains(n));
            let sub = state.subs.entry(t).or_default();
            if sub.names == wanted {
                continue;
            }
            let added: Vec<String> = wanted.difference(&sub.names).cloned().collect();
            let gone: Vec<String> = sub.names.difference(&wanted).cloned().collect();
            sub.names = wanted;
            tracing::debug!(type_url = t, ?added, ?gone, "xDS subscription changed");
            let (Some(ads), Some(out)) = (&self.ads, out.as_deref_mut()) else {
                continue;
            };
            if ads.delta {
                out.delta(DeltaDiscoveryRequest {
                    type_url: t.into(),
                    resource_names_subscribe: added,
                    resource_names_unsubscribe: gone,
                    ..Default::default()
                })
                .await;
            } else {
                out.sotw(DiscoveryRequest {
                    version_info: sub.version.clone(),
                    resource_names: sub.names.iter().cloned().collect(),
                    type_url: t.into(),
                    response_nonce: sub.nonce.clone(),
                    ..Default::default()
                })
                .await;
            }
        }
    }

    /// The `initial_fetch_timeout` of the config source that references `name`.
    fn fetch_timeout(&self, r: &XdsResources, t: &str, name: &str) -> Option<Duration> {
        let source = if t == ROUTE_TYPE {
            r.listeners
                .values()
                .flat_map(|l| &l.value.filter_chains)
                .flat_map(|c| &c.filters)
                .find_map(|f| match &f.config {
                    mecha_config::NetworkFilterConfig::HttpConnectionManager(h) => h
                        .rds
                        .as_ref()
                        .filter(|rds| rds.route_config_name == name)
                        .and_then(|rds| rds.config_source.clone()),
                    _ => None,
                })
        } else {
            r.clusters
                .values()
                .filter(|c| c.value.discovery_type == DiscoveryType::EDS)
                .find(|c| mecha_config::eds_service_name(&c.value) == name)
                .and_then(|c| c.value.eds_cluster_config.as_ref())
                .and_then(|e| e.eds_config.clone())
        };
        source
            .and_then(|v| serde_yaml::from_value::<ConfigSource>(v).ok())
            .unwrap_or_default()
            .initial_fetch_timeout()
    }

    /// `initial_fetch_timeout` passed for some RDS/EDS names: serve them as empty (no routes, no
    /// endpoints), as Envoy does, so the listeners and clusters that wait for them stop warming.
    async fn expire_warming(self: &Arc<Self>, state: &mut State, out: Option<&mut Sender>) {
        // Applying is CPU work: off the runtime's threads, as for responses.
        let applied = self
            .offload(state, |this, state| this.expire_warming_now(state))
            .await;
        if let Err(e) = applied {
            tracing::warn!(error = %e.message, "cannot apply the expired resources");
        }
        self.update_subscriptions(state, out).await;
    }

    fn expire_warming_now(&self, state: &mut State) {
        let now = Instant::now();
        let expired: Vec<(&'static str, String)> = state
            .warming
            .iter()
            .filter(|(_, d)| d.is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for (t, name) in expired {
            state.warming.remove(&(t, name.clone()));
            if have_resource(&state.resources, t, &name) {
                continue;
            }
            tracing::warn!(type_url = t, %name, "initial_fetch_timeout: serving without it");
            let decoded = if t == ROUTE_TYPE {
                Decoded::Route(RouteConfiguration {
                    name: name.clone(),
                    ..Default::default()
                })
            } else {
                Decoded::Endpoints(ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    ..Default::default()
                })
            };
            if let Err(e) = self.commit(state, t, vec![(String::new(), decoded)], &[], false, "") {
                tracing::warn!(type_url = t, %name, error = %e, "cannot apply the empty resource");
            }
        }
    }
}

/// The accepted value when the new one is equal to it, so the proxy sees an unchanged resource as
/// the same `Arc` and keeps what it built from it (a listener and its connections, a route table,
/// a cluster and its pools) — a SotW response re-sends every resource, changed or not.
fn same_or_new<T: PartialEq>(prev: Option<&Versioned<T>>, x: T) -> Arc<T> {
    match prev {
        Some(p) if *p.value == x => p.value.clone(),
        _ => Arc::new(x),
    }
}

trait NameKey {
    fn name_key(&self) -> &str;
}
impl NameKey for mecha_config::Listener {
    fn name_key(&self) -> &str {
        &self.name
    }
}
impl NameKey for mecha_config::Cluster {
    fn name_key(&self) -> &str {
        &self.name
    }
}
impl NameKey for RouteConfiguration {
    fn name_key(&self) -> &str {
        &self.name
    }
}
impl NameKey for ClusterLoadAssignment {
    fn name_key(&self) -> &str {
        &self.cluster_name
    }
}

/// Decodes every resource of a response; all errors are collected into one NACK detail.
fn decode_all<'a>(
    t: &'static str,
    anys: impl Iterator<Item = (&'a str, &'a [u8])>,
    known: &HashSet<&str>,
) -> Result<Vec<Decoded>, String> {
    let mut out = vec![];
    let mut errors: Vec<String> = vec![];
    let mut seen = HashSet::new();
    for (type_url, bytes) in anys {
        if type_url != t {
            errors.push(format!(
                "resource of type \"{type_url}\" in a response of type \"{t}\""
            ));
            continue;
        }
        match decode_resource(t, bytes, known) {
            Ok(d) => {
                if !seen.insert(d.name().to_string()) {
                    errors.push(format!("duplicate resource name \"{}\"", d.name()));
                }
                out.push(d)
            }
            Err(e) => errors.push(ResourceError::to_string(&e)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}

fn versions_of(r: &XdsResources, t: &str) -> HashMap<String, String> {
    fn v<T>(m: &BTreeMap<String, Versioned<T>>) -> HashMap<String, String> {
        m.iter()
            .filter(|(_, x)| !x.version.is_empty())
            .map(|(k, x)| (k.clone(), x.version.clone()))
            .collect()
    }
    match t {
        LISTENER_TYPE => v(&r.listeners),
        CLUSTER_TYPE => v(&r.clusters),
        ROUTE_TYPE => v(&r.route_configs),
        _ => v(&r.endpoints),
    }
}

/// Whether the RDS/EDS resource `name` has been received (or served empty after its timeout).
fn have_resource(r: &XdsResources, t: &str, name: &str) -> bool {
    match t {
        ROUTE_TYPE => r.route_configs.contains_key(name),
        _ => r.endpoints.contains_key(name),
    }
}

fn next_deadline(state: &State) -> Option<Instant> {
    state.warming.values().flatten().min().copied()
}

async fn sleep_until(d: Option<Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Adds the node to requests (to every one, or only the first with `set_node_on_first_message_only`).
struct Sender {
    tx: mpsc::Sender<Outbound>,
    node: core::Node,
    first: bool,
    node_first_only: bool,
}

impl Sender {
    fn node(&mut self) -> Option<core::Node> {
        let include = self.first || !self.node_first_only;
        self.first = false;
        include.then(|| self.node.clone())
    }
    async fn sotw(&mut self, mut r: DiscoveryRequest) {
        r.node = self.node();
        let _ = self.tx.send(Outbound::Sotw(r)).await;
    }
    async fn delta(&mut self, mut r: DeltaDiscoveryRequest) {
        r.node = self.node();
        let _ = self.tx.send(Outbound::Delta(r)).await;
    }
}

/// Node metadata (YAML) → `google.protobuf.Struct`.
fn yaml_struct(m: &serde_yaml::Mapping) -> pbw::Struct {
    pbw::Struct {
        fields: m
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), yaml_value(v))))
            .collect(),
    }
}

fn yaml_value(v: &serde_yaml::Value) -> pbw::Value {
    use pbw::value::Kind;
    let kind = match v {
        serde_yaml::Value::Null => Kind::NullValue(0),
        serde_yaml::Value::Bool(b) => Kind::BoolValue(*b),
        serde_yaml::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_yaml::Value::String(s) => Kind::StringValue(s.clone()),
        serde_yaml::Value::Sequence(s) => Kind::ListValue(pbw::ListValue {
            values: s.iter().map(yaml_value).collect(),
        }),
        serde_yaml::Value::Mapping(m) => Kind::StructValue(yaml_struct(m)),
        serde_yaml::Value::Tagged(t) => return yaml_value(&t.value),
    };
    pbw::Value { kind: Some(kind) }
}
