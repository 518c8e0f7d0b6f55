//! The runtime core shared by the HTTP filter and the gRPC service: the app's identity, its
//! components, subscriptions and delivery, and service invocation. Built once at start-up (not per
//! config snapshot), so config swaps never reopen stores or restart consumers.

use crate::app_channel::{self, AppProtocol, UpstreamChannel};
use crate::cloudevents;
use crate::component::{ComponentSpecParsed, Resources, Subscription};
use crate::delivery::{BulkDelivery, CompiledSub, Delivery};
use crate::error::ApiError;
use crate::matcher::Expr;
use crate::pubsub::{self, MessageHandler, PubSub};
use crate::state::{self, KeyPrefix, StateStore};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use mecha_filters::{full, Body, ClearRouteCache, HandBackIfNoRoute, Next, Unrouted, Upstream};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The runtime version reported by the metadata API.
pub const RUNTIME_VERSION: &str = concat!("mecha-", env!("CARGO_PKG_VERSION"));

/// What the runtime is started with.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    pub app_id: String,
    /// The cluster that reaches the local app (`--app-port`), if there is an app.
    pub app_cluster: Option<String>,
    /// `DAPR_API_TOKEN`: required on every API call except health.
    pub api_token: Option<String>,
    /// `APP_API_TOKEN`: sent to the app as `dapr-api-token`.
    pub app_api_token: Option<String>,
    pub resources: Resources,
    /// Directory for embedded stores' relative paths.
    pub data_dir: Option<PathBuf>,
    /// Largest request body the API accepts (Dapr's `--max-body-size`, default 4 MiB).
    pub max_body_bytes: usize,
    /// How the app is called (`--app-protocol`): HTTP requests or the gRPC `AppCallback`.
    pub app_protocol: AppProtocol,
    /// The port of other sidecars' HTTP API for app ids found by DNS (Dapr's convention: every
    /// sidecar on the same port; mecha uses its own `--dapr-http-port`).
    pub peer_http_port: u16,
    /// App health checks (`--enable-app-health-check` and its settings); `None` = disabled.
    pub app_health: Option<crate::app_health::AppHealthConfig>,
}

pub struct StoreEntry {
    pub store: Arc<dyn StateStore>,
    pub prefix: KeyPrefix,
    pub type_: String,
    pub version: String,
}

pub struct PubSubEntry {
    pub pubsub: Arc<dyn PubSub>,
    pub type_: String,
    pub version: String,
    pub retry: RetryPolicy,
}

/// Redelivery to the app after RETRY or an error, from the pub/sub component's Dapr metadata
/// `backOffPolicy` (constant|exponential), `backOffDuration`, `backOffMaxInterval`,
/// `backOffMaxRetries` (-1 = until it succeeds).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub exponential: bool,
    pub duration: Duration,
    pub max_interval: Duration,
    pub max_retries: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            exponential: false,
            duration: Duration::from_millis(500),
            max_interval: Duration::from_secs(60),
            max_retries: 3,
        }
    }
}

impl RetryPolicy {
    fn from_metadata(m: &crate::component::Metadata) -> Result<Self, String> {
        let mut p = Self::default();
        if let Some(v) = m.get("backOffPolicy") {
            p.exponential = match v {
                "exponential" => true,
                "constant" => false,
                other => {
                    return Err(format!(
                        "backOffPolicy \"{other}\": expected constant or exponential"
                    ))
                }
            };
        }
        if let Some(d) = m.get_duration("backOffDuration", Duration::from_millis(1))? {
            p.duration = d;
        }
        if let Some(d) = m.get_duration("backOffMaxInterval", Duration::from_millis(1))? {
            p.max_interval = d;
        }
        if let Some(n) = m.get_i64("backOffMaxRetries")? {
            p.max_retries = n;
        }
        Ok(p)
    }

    /// Whether `attempt` retries (0-based) used up the policy.
    pub(crate) fn exhausted(&self, attempt: u32) -> bool {
        self.max_retries >= 0 && attempt as i64 >= self.max_retries
    }

    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        if self.exponential {
            self.duration
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(self.max_interval)
        } else {
            self.duration
        }
    }
}

/// A component that failed to start: names the resource file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("component \"{name}\" ({type_}) from {source_file}: {message}")]
pub struct InitError {
    pub name: String,
    pub type_: String,
    pub source_file: String,
    pub message: String,
}

/// The W3C trace context (`traceparent`, `tracestate`) a publish carries into its CloudEvent.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContext<'a> {
    pub parent: Option<&'a str>,
    pub state: Option<&'a str>,
}

pub struct Runtime {
    pub opts: RuntimeOptions,
    pub stores: HashMap<String, StoreEntry>,
    pub pubsubs: HashMap<String, PubSubEntry>,
    upstream: OnceLock<Arc<dyn Upstream>>,
    subscriptions: Mutex<Vec<Subscription>>,
    extended: Mutex<BTreeMap<String, String>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    /// Fired by `POST /v1.0/shutdown`.
    pub shutdown: tokio::sync::Notify,
    component_list: Vec<(String, String, String, Vec<String>)>,
    /// The client for app ids reached by DNS (no cluster), created on first use.
    dns_client: OnceLock<DnsClient>,
    /// Whether the app is healthy (always true without app health checks). Subscriptions watch
    /// it to pause and resume pulling.
    app_healthy: tokio::sync::watch::Sender<bool>,
    /// `dapr-caller-app-id` for outgoing invocations, built once (an app id that is not a valid
    /// header value is sent as an empty value).
    caller_id: http::HeaderValue,
}

type DnsClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

impl Runtime {
    /// Initialises every component. A component that fails is an error naming its file, unless
    /// it has `ignoreErrors: true` (then a warning).
    pub async fn new(opts: RuntimeOptions) -> Result<Arc<Runtime>, InitError> {
        let mut stores = HashMap::new();
        let mut pubsubs = HashMap::new();
        let mut component_list = vec![];
        for c in &opts.resources.components {
            if !c.scopes.is_empty() && !c.scopes.iter().any(|s| s == &opts.app_id) {
                continue;
            }
            let err = |message: String| InitError {
                name: c.name.clone(),
                type_: c.type_.clone(),
                source_file: c.source.clone(),
                message,
            };
            let result = Self::init_component(c, &opts).await;
            match result {
                Ok(Component::State(store)) => {
                    let features = store.features().iter().map(|s| s.to_string()).collect();
                    stores.insert(
                        c.name.clone(),
                        StoreEntry {
                            store,
                            prefix: KeyPrefix::parse(c.metadata.get("keyPrefix")),
                            type_: c.type_.clone(),
                            version: c.version.clone(),
                        },
                    );
                    component_list.push((
                        c.name.clone(),
                        c.type_.clone(),
                        c.version.clone(),
                        features,
                    ));
                }
                Ok(Component::PubSub(ps)) => {
                    let retry = RetryPolicy::from_metadata(&c.metadata).map_err(err)?;
                    let features = ps.features().iter().map(|s| s.to_string()).collect();
                    pubsubs.insert(
                        c.name.clone(),
                        PubSubEntry {
                            pubsub: ps,
                            type_: c.type_.clone(),
                            version: c.version.clone(),
                            retry,
                        },
                    );
                    component_list.push((
                        c.name.clone(),
                        c.type_.clone(),
                        c.version.clone(),
                        features,
                    ));
                }
                Err(e) if c.ignore_errors => {
                    tracing::warn!(component = %c.name, file = %c.source, error = %e, "component failed to initialise; ignored (ignoreErrors)");
                }
                Err(e) => return Err(err(e)),
            }
        }
        let (stop_tx, _) = tokio::sync::watch::channel(false);
        // With health checks the app is unhealthy until the first probe succeeds (as Dapr).
        let checked = opts.app_health.is_some() && opts.app_cluster.is_some();
        let (app_healthy, _) = tokio::sync::watch::channel(!checked);
        let opts_app_id = opts.app_id.clone();
        Ok(Arc::new(Runtime {
            opts,
            stores,
            pubsubs,
            upstream: OnceLock::new(),
            subscriptions: Mutex::new(vec![]),
            extended: Mutex::new(BTreeMap::new()),
            stop_tx,
            shutdown: tokio::sync::Notify::new(),
            component_list,
            dns_client: OnceLock::new(),
            app_healthy,
            caller_id: http::HeaderValue::from_str(&opts_app_id)
                .unwrap_or(http::HeaderValue::from_static("")),
        }))
    }

    async fn init_component(
        c: &ComponentSpecParsed,
        opts: &RuntimeOptions,
    ) -> Result<Component, String> {
        let m = &c.metadata;
        match c.type_.as_str() {
            "state.in-memory" => Ok(Component::State(Arc::new(state::memory::MemoryStore::new()))),
            "state.sqlite" => {
                let cs = m
                    .get("connectionString")
                    .ok_or("metadata connectionString is required")?;
                // Dapr accepts a path or a `file:` URI; relative paths live in the data dir.
                let path = cs.strip_prefix("file:").unwrap_or(cs);
                let path = path.split('?').next().unwrap_or(path);
                let mut p = PathBuf::from(path);
                if p.is_relative() {
                    if let Some(d) = &opts.data_dir {
                        p = d.join(p);
                    }
                }
                let cleanup = m.get_duration("cleanupInterval", Duration::from_secs(1))?
                    .or(Some(Duration::from_secs(3600)));
                let table = m.get("tableName").unwrap_or("state");
                state::sqlite::SqliteStore::open(&p, table, cleanup)
                    .map(|s| Component::State(Arc::new(s)))
                    .map_err(|e| e.to_string())
            }
            "state.redis" => state::redis::RedisStore::new(m)
                .await
                .map(|s| Component::State(Arc::new(s)))
                .map_err(|e| e.to_string()),
            "pubsub.in-memory" => Ok(Component::PubSub(Arc::new(pubsub::memory::MemoryPubSub::new(
                m.get_i64("concurrency")?.filter(|n| *n > 0).unwrap_or(100) as usize,
            )))),
            "pubsub.redis" => pubsub::redis::RedisPubSub::new(m, &opts.app_id)
                .await
                .map(|p| Component::PubSub(Arc::new(p)))
                .map_err(|e| e.to_string()),
            other => Err(format!(
                "unknown component type \"{other}\" (supported: state.in-memory, state.sqlite, state.redis, pubsub.in-memory, pubsub.redis)"
            )),
        }
    }

    /// Sets the upstream handle (the proxy's cluster manager) once; later calls are ignored.
    pub fn set_upstream(&self, up: Arc<dyn Upstream>) {
        let _ = self.upstream.set(up);
    }

    pub fn upstream(&self) -> Option<&Arc<dyn Upstream>> {
        self.upstream.get()
    }

    pub fn app_id(&self) -> &str {
        &self.opts.app_id
    }

    /// Whether the app is healthy (true without app health checks).
    pub fn app_healthy(&self) -> bool {
        *self.app_healthy.borrow()
    }

    /// Set by the app health checker on a change; subscriptions pause or resume.
    pub fn set_app_healthy(&self, healthy: bool) {
        self.app_healthy.send_replace(healthy);
    }

    /// Dapr's refusal of work for an unhealthy app.
    fn unhealthy_error(&self) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_DIRECT_INVOKE",
            format!(
                "fail to invoke, id: {}, err: app is not in a healthy state",
                self.opts.app_id
            ),
        )
    }

    pub fn store(&self, name: &str) -> Result<&StoreEntry, ApiError> {
        if self.stores.is_empty() {
            return Err(ApiError::state_stores_not_configured());
        }
        self.stores
            .get(name)
            .ok_or_else(|| ApiError::state_store_not_found(name))
    }

    pub fn pubsub(&self, name: &str) -> Result<&PubSubEntry, ApiError> {
        if self.pubsubs.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ERR_PUBSUB_NOT_CONFIGURED",
                "no pubsub is configured",
            ));
        }
        self.pubsubs
            .get(name)
            .ok_or_else(|| ApiError::pubsub_not_found(name))
    }

    pub fn key(&self, store: &str, e: &StoreEntry, key: &str) -> String {
        e.prefix.apply(&self.opts.app_id, store, key)
    }

    /// Publishes `data` (wrapped as a CloudEvent unless `rawPayload=true`).
    pub async fn publish(
        &self,
        pubsub: &str,
        topic: &str,
        data: &[u8],
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        trace: TraceContext<'_>,
    ) -> Result<(), ApiError> {
        if pubsub.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "ERR_PUBSUB_EMPTY",
                "pubsub name is empty",
            ));
        }
        let entry = self.pubsub(pubsub)?;
        if topic.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "ERR_TOPIC_NAME_EMPTY",
                "topic is empty in pubsub ".to_string() + pubsub,
            ));
        }
        let raw = metadata.get("rawPayload").is_some_and(|v| v == "true");
        let payload = if raw {
            Bytes::copy_from_slice(data)
        } else {
            cloudevents::wrap(
                data,
                content_type,
                &cloudevents::Envelope {
                    source: &self.opts.app_id,
                    topic,
                    pubsub,
                    traceparent: trace.parent,
                    tracestate: trace.state,
                },
            )
            .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "ERR_PUBSUB_CLOUD_EVENTS_SER", m))?
        };
        entry
            .pubsub
            .publish(topic, payload, metadata)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_PUBSUB_PUBLISH_MESSAGE",
                    format!("error when publish to topic {topic} in pubsub {pubsub}: {e}"),
                )
            })
    }

    /// The subscriptions in effect (for the metadata API).
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.subscriptions.lock().clone()
    }

    pub fn components(&self) -> &[(String, String, String, Vec<String>)] {
        &self.component_list
    }

    pub fn extended_metadata(&self) -> BTreeMap<String, String> {
        self.extended.lock().clone()
    }

    pub fn set_extended(&self, k: String, v: String) {
        self.extended.lock().insert(k, v);
    }

    /// Starts the declarative subscriptions, then (in the background, once the app answers)
    /// the app's programmatic ones from `GET /dapr/subscribe`.
    pub async fn start_subscriptions(self: &Arc<Self>) -> Result<(), ApiError> {
        let declarative: Vec<Subscription> = self
            .opts
            .resources
            .subscriptions
            .iter()
            .filter(|s| s.scopes.is_empty() || s.scopes.iter().any(|a| a == &self.opts.app_id))
            .cloned()
            .collect();
        for s in declarative {
            self.subscribe(s).await?;
        }
        if let (Some(cfg), Some(_)) = (&self.opts.app_health, &self.opts.app_cluster) {
            tokio::spawn(crate::app_health::run(
                Arc::downgrade(self),
                cfg.clone(),
                self.stop_tx.subscribe(),
            ));
        }
        if self.opts.app_cluster.is_some() {
            let rt = self.clone();
            tokio::spawn(async move { rt.load_programmatic().await });
        }
        Ok(())
    }

    async fn load_programmatic(self: Arc<Self>) {
        if self.opts.app_protocol == AppProtocol::Grpc {
            return self.load_programmatic_grpc().await;
        }
        let mut stop = self.stop_tx.subscribe();
        let mut warned = false;
        loop {
            match self
                .app_request(http::Method::GET, "/dapr/subscribe", Bytes::new(), None)
                .await
            {
                Ok((status, body)) if status.is_success() => {
                    match parse_programmatic(&body) {
                        Ok(subs) => {
                            for s in subs {
                                if let Err(e) = self.subscribe(s).await {
                                    tracing::error!(error = %e, "subscription failed");
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the app's /dapr/subscribe answer is not valid")
                        }
                    }
                    return;
                }
                Ok((status, _)) => {
                    tracing::debug!(%status, "app has no programmatic subscriptions");
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::info!(error = %e, "waiting for the app to answer /dapr/subscribe");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {},
                _ = stop.changed() => return,
            }
        }
    }

    /// A gRPC app's subscriptions: `AppCallback.ListTopicSubscriptions`, retried until the app
    /// answers; `UNIMPLEMENTED` means the app has none.
    async fn load_programmatic_grpc(self: Arc<Self>) {
        let mut stop = self.stop_tx.subscribe();
        let mut warned = false;
        loop {
            let client = self.app_callback();
            let result = match client {
                Ok(mut c) => c.list_topic_subscriptions(self.grpc_request(())).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot ask the app for its subscriptions");
                    return;
                }
            };
            match result {
                Ok(resp) => {
                    for s in resp.into_inner().subscriptions {
                        let sub = app_channel::subscription_from_grpc(s);
                        if let Err(e) = self.subscribe(sub).await {
                            tracing::error!(error = %e, "subscription failed");
                        }
                    }
                    return;
                }
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    tracing::debug!("app does not implement ListTopicSubscriptions");
                    return;
                }
                Err(s)
                    if app_channel::is_transport_error(&s)
                        || s.code() == tonic::Code::Unavailable =>
                {
                    if !warned {
                        tracing::info!(error = %s, "waiting for the app to answer ListTopicSubscriptions");
                        warned = true;
                    }
                }
                Err(s) => {
                    tracing::error!(error = %s, "the app's ListTopicSubscriptions failed");
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {},
                _ = stop.changed() => return,
            }
        }
    }

    async fn subscribe(self: &Arc<Self>, sub: Subscription) -> Result<(), ApiError> {
        let entry = self.pubsub(&sub.pubsub)?;
        let mut rules = vec![];
        for r in &sub.routes.rules {
            let e = Expr::parse(&r.match_).map_err(|e| {
                ApiError::malformed(format!(
                    "subscription {}/{}: match \"{}\": {e}",
                    sub.pubsub, sub.topic, r.match_
                ))
            })?;
            rules.push((e, r.path.clone()));
        }
        let compiled = Arc::new(CompiledSub {
            raw: cloudevents::is_raw_payload(&sub.metadata),
            sub: sub.clone(),
            rules,
        });
        let handler: Arc<dyn MessageHandler> =
            if sub.bulk_subscribe.as_ref().is_some_and(|b| b.enabled) {
                Arc::new(BulkDelivery::start(
                    Arc::downgrade(self),
                    compiled,
                    entry.retry.clone(),
                    self.stop_tx.subscribe(),
                ))
            } else {
                Arc::new(Delivery {
                    rt: Arc::downgrade(self),
                    sub: compiled,
                    retry: entry.retry.clone(),
                })
            };
        entry
            .pubsub
            .subscribe(
                &sub.topic,
                handler,
                pubsub::SubscribeControl {
                    stop: self.stop_tx.subscribe(),
                    active: self.app_healthy.subscribe(),
                },
            )
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_PUBSUB_SUBSCRIBE",
                    e.to_string(),
                )
            })?;
        tracing::info!(pubsub = %sub.pubsub, topic = %sub.topic, kind = sub.kind, "subscribed");
        self.subscriptions.lock().push(sub);
        Ok(())
    }

    /// Stops every consumer.
    pub fn stop(&self) {
        let _ = self.stop_tx.send(true);
    }

    fn app_headers(&self, req: &mut Request<Body>) {
        if let Some(t) = &self.opts.app_api_token {
            if let Ok(v) = http::HeaderValue::from_str(t) {
                req.headers_mut().insert("dapr-api-token", v);
            }
        }
    }

    /// The gRPC channel to the local app: the proxy's app cluster (HTTP/2).
    pub(crate) fn app_channel(&self) -> Result<UpstreamChannel, String> {
        let cluster = self
            .opts
            .app_cluster
            .as_deref()
            .ok_or("no app port configured")?;
        let up = self.upstream().ok_or("the proxy is not started")?;
        Ok(UpstreamChannel::new(up.clone(), cluster))
    }

    pub(crate) fn app_callback(&self) -> Result<app_channel::AppCallbackClient, String> {
        self.app_channel().map(app_channel::callback_client)
    }

    /// A request to the app's gRPC callback service, with `dapr-api-token` when
    /// `APP_API_TOKEN` is set.
    pub(crate) fn grpc_request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.opts.app_api_token {
            if let Ok(v) = tonic::metadata::MetadataValue::try_from(t.as_str()) {
                r.metadata_mut().insert("dapr-api-token", v);
            }
        }
        r
    }

    /// Invokes a method of a gRPC app (`AppCallback.OnInvoke`), for the gRPC API's
    /// `InvokeService` addressed to this app id. The app's own error status is passed through.
    pub async fn app_on_invoke(
        &self,
        msg: dapr::dapr::proto::common::v1::InvokeRequest,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<dapr::dapr::proto::common::v1::InvokeResponse, tonic::Status> {
        if !self.app_healthy() {
            return Err(tonic::Status::internal(
                "ERR_DIRECT_INVOKE: app is not in a healthy state",
            ));
        }
        let mut client = self.app_callback().map_err(|e| {
            tonic::Status::internal(format!(
                "ERR_DIRECT_INVOKE: fail to invoke, id: {}, err: {e}",
                self.opts.app_id
            ))
        })?;
        let mut req = self.grpc_request(msg);
        for kv in metadata.iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                let name = k.as_str();
                if name.starts_with("grpc-")
                    || name == "dapr-api-token"
                    || name == "te"
                    || name == "content-type"
                    || name == "user-agent"
                {
                    continue;
                }
                req.metadata_mut().append(k.clone(), v.clone());
            }
        }
        match client.on_invoke(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if app_channel::is_transport_error(&s) => Err(tonic::Status::internal(format!(
                "ERR_DIRECT_INVOKE: fail to invoke, id: {}, err: {}",
                self.opts.app_id,
                s.message()
            ))),
            Err(s) => Err(s),
        }
    }

    /// An HTTP invocation of this app when the app speaks gRPC: the request becomes an
    /// `InvokeRequest` (verb and query string in `http_extension`, headers as metadata), the
    /// `InvokeResponse` a 200 with its content type; an error status from the app becomes the
    /// HTTP status Dapr maps it to, with the status as JSON.
    async fn invoke_grpc_app(
        &self,
        method_and_query: &str,
        req: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let (method, query) = method_and_query
            .split_once('?')
            .unwrap_or((method_and_query, ""));
        let (parts, body) = req.into_parts();
        let body = crate::http_api::read_body(Request::new(body), self.opts.max_body_bytes).await?;
        let ct = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ir = app_channel::invoke_request(method, query, &parts.method, ct, body);
        let direct = |e: String| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_DIRECT_INVOKE",
                format!("fail to invoke, id: {}, err: {e}", self.opts.app_id),
            )
        };
        let mut client = self.app_callback().map_err(direct)?;
        let mut greq = self.grpc_request(ir);
        app_channel::headers_to_metadata(&parts.headers, greq.metadata_mut());
        match client.on_invoke(greq).await {
            Ok(r) => {
                let r = r.into_inner();
                let mut resp = Response::new(full(r.data.map(|a| a.value).unwrap_or_default()));
                if let Ok(v) = http::HeaderValue::from_str(&r.content_type) {
                    if !r.content_type.is_empty() {
                        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
                    }
                }
                Ok(resp)
            }
            Err(s) if app_channel::is_transport_error(&s) => Err(direct(s.message().to_string())),
            Err(s) => {
                let status = app_channel::http_status_from_code(s.code());
                let body = serde_json::json!({
                    "code": status.as_u16(),
                    "message": s.message(),
                    "details": [],
                });
                let mut resp = Response::new(full(Bytes::from(body.to_string())));
                *resp.status_mut() = status;
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok(resp)
            }
        }
    }

    /// The last resort for a remote app id with neither a route nor a cluster: DNS name
    /// resolution of the app id (as Dapr's DNS-based name resolution), to the other sidecar's
    /// HTTP API on `peer_http_port`. No cluster exists for such a target, so this is a plain
    /// pooled HTTP/1.1 client: no cluster policies or stats apply (configure a cluster named
    /// after the app id for those).
    async fn invoke_by_dns(
        &self,
        app_id: &str,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let fail = |e: String| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_DIRECT_INVOKE",
                format!("failed to invoke, id: {app_id}, err: no route for host \"{app_id}\", no cluster named \"{app_id}\", and DNS: {e}"),
            )
        };
        let port = self.opts.peer_http_port;
        // Resolve first so an unknown name is a clear error rather than a connect failure.
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((app_id, port))
            .await
            .map_err(|e| fail(format!("cannot resolve \"{app_id}\": {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(fail(format!("\"{app_id}\" has no address")));
        }
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = format!("http://{app_id}:{port}{path}")
            .parse()
            .map_err(|e| fail(format!("\"{app_id}\" is not a host name: {e}")))?;
        if let Ok(v) = http::HeaderValue::from_str(&format!("{app_id}:{port}")) {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let client = self.dns_client.get_or_init(|| {
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http()
        });
        let resp = client.request(req).await.map_err(|e| fail(e.to_string()))?;
        Ok(resp.map(|b| {
            b.map_err(|e| Box::new(e) as mecha_filters::BoxError)
                .boxed_unsync()
        }))
    }

    /// A buffered request to the local app through the proxy's app cluster.
    pub async fn app_request(
        &self,
        method: http::Method,
        path: &str,
        body: Bytes,
        content_type: Option<&str>,
    ) -> Result<(StatusCode, Bytes), String> {
        let cluster = self
            .opts
            .app_cluster
            .as_deref()
            .ok_or("no app port configured")?;
        let up = self.upstream().ok_or("the proxy is not started")?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .body(full(body))
            .map_err(|e| e.to_string())?;
        if let Some(ct) = content_type.and_then(|c| http::HeaderValue::from_str(c).ok()) {
            req.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        }
        self.app_headers(&mut req);
        let resp = up.call(cluster, req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// Service invocation: `app_id` is this app (call it) or another (through the mesh, to the
    /// cluster of that name, whose endpoints are the other app's sidecar HTTP API).
    /// `method_and_query` is what follows `/method/`. No route selection: see [`Self::invoke_with`].
    pub async fn invoke(
        &self,
        app_id: &str,
        method_and_query: &str,
        req: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        self.invoke_with(app_id, method_and_query, req, None).await
    }

    /// Service invocation from the HTTP filter. With `next` (the rest of the filter chain), a
    /// remote app id is first tried through the connection manager's routes: the request gets
    /// `Host: <app-id>` and the path `/v1.0/invoke/<app-id>/method/<method>`, `ClearRouteCache`
    /// makes the router select a route again, so a virtual host whose `domains` contain the app id
    /// applies its route's cluster, retry policy, timeout and stats. When no route matches, the
    /// router answers its no-route 404 (marked `NoRoute`, request body untouched); then the call
    /// falls back to the cluster named after the app id, as without `next`.
    pub async fn invoke_with(
        &self,
        app_id: &str,
        method_and_query: &str,
        req: Request<Body>,
        next: Option<Next<'_>>,
    ) -> Result<Response<Body>, ApiError> {
        self.invoke_target(app_id, InvokeUri::Method(method_and_query), req, next)
            .await
    }

    /// As [`Self::invoke_with`] for a request whose URI is already
    /// `/v1.0/invoke/{app-id}/method/{method}[?query]` (the HTTP API's own form), with the
    /// method starting at byte `method_start` of its path-and-query: a remote invocation keeps
    /// that URI as is, a local one is cut from it, so neither formats nor re-parses a path.
    pub async fn invoke_api(
        &self,
        app_id: &str,
        method_start: usize,
        req: Request<Body>,
        next: Option<Next<'_>>,
    ) -> Result<Response<Body>, ApiError> {
        self.invoke_target(app_id, InvokeUri::Api { method_start }, req, next)
            .await
    }

    async fn invoke_target(
        &self,
        app_id: &str,
        target: InvokeUri<'_>,
        mut req: Request<Body>,
        next: Option<Next<'_>>,
    ) -> Result<Response<Body>, ApiError> {
        let Some(up) = self.upstream() else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_DIRECT_INVOKE",
                "the proxy is not started",
            ));
        };
        strip_hop_by_hop(req.headers_mut());
        let local = app_id == self.opts.app_id || app_id.is_empty();
        if local && !self.app_healthy() {
            return Err(self.unhealthy_error());
        }
        let bad_path = |e: http::Error| ApiError::malformed(format!("invalid method path: {e}"));
        if local {
            if self.opts.app_protocol == AppProtocol::Grpc {
                let method = match target {
                    InvokeUri::Method(mq) => mq.to_string(),
                    InvokeUri::Api { method_start } => {
                        let pq = req.uri().path_and_query().map_or("", |p| p.as_str());
                        pq.get(method_start..).unwrap_or("").to_string()
                    }
                };
                return self.invoke_grpc_app(&method, req).await;
            }
            // What follows `/method/` becomes the app's path. In the API form it is the tail of
            // the request's own (already valid) path, slash included, so nothing is formatted.
            let uri = match target {
                InvokeUri::Method(mq) => http::Uri::try_from(format!("/{mq}")),
                InvokeUri::Api { method_start } => {
                    let pq = req.uri().path_and_query().map_or("", |p| p.as_str());
                    match method_start.checked_sub(1).and_then(|s| pq.get(s..)) {
                        Some(tail) if tail.starts_with('/') => http::Uri::try_from(tail),
                        _ => http::Uri::try_from(format!(
                            "/{}",
                            pq.get(method_start..).unwrap_or("")
                        )),
                    }
                }
            }
            .map_err(|e| bad_path(e.into()))?;
            let Some(cluster) = self.opts.app_cluster.as_deref() else {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_DIRECT_INVOKE",
                    format!("app {app_id} has no app port configured"),
                ));
            };
            *req.uri_mut() = uri;
            // Dapr's own headers are for the sidecar, not the app. Removed one name at a time:
            // usually there is one (`dapr-caller-app-id`) or none, so no list is allocated.
            while let Some(n) = req
                .headers()
                .keys()
                .find(|k| k.as_str().starts_with("dapr-"))
                .cloned()
            {
                req.headers_mut().remove(&n);
            }
            self.app_headers(&mut req);
            return up.call(cluster, req).await.map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_DIRECT_INVOKE",
                    format!("failed to invoke, id: {app_id}, err: {e}"),
                )
            });
        }
        req.headers_mut().remove(&DAPR_APP_ID);
        req.headers_mut()
            .insert(DAPR_CALLER_APP_ID.clone(), self.caller_id.clone());
        if let InvokeUri::Method(mq) = target {
            *req.uri_mut() = http::Uri::try_from(format!("/v1.0/invoke/{app_id}/method/{mq}"))
                .map_err(|e| bad_path(e.into()))?;
        }
        if let Some(next) = next {
            // Asking the router's table first spares the usual case (no route for the app id:
            // straight to its cluster) a whole pass through the rest of the chain.
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let routed = next.would_route(req.method(), app_id, pq, req.headers()) != Some(false);
            let host = || http::HeaderValue::from_str(app_id).ok();
            if let Some(host) = routed.then(host).flatten() {
                match route_invoke(next, req, host).await {
                    Ok(resp) => return Ok(resp),
                    Err(back) => req = back,
                }
            }
        }
        if !up.has_cluster(app_id) {
            return self.invoke_by_dns(app_id, req).await;
        }
        up.call(app_id, req).await.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_DIRECT_INVOKE",
                format!("failed to invoke, id: {app_id}, err: {e}"),
            )
        })
    }
}

/// Where an invocation's URI comes from.
#[derive(Clone, Copy)]
enum InvokeUri<'a> {
    /// What follows `/method/` (method and query string); the URI is built from it.
    Method(&'a str),
    /// The request's URI is the API form; the method starts at this byte offset.
    Api { method_start: usize },
}

/// Sends a remote invocation through the rest of the chain with `Host: <app-id>` and a route
/// re-selection. `Err` gives the request back (with its own `Host` again) when the router found
/// no route ([`HandBackIfNoRoute`]), so the caller can use the direct cluster path.
async fn route_invoke(
    next: Next<'_>,
    mut req: Request<Body>,
    host: http::HeaderValue,
) -> Result<Response<Body>, Request<Body>> {
    let own_host = req.headers_mut().insert(http::header::HOST, host);
    req.extensions_mut().insert(ClearRouteCache);
    req.extensions_mut().insert(HandBackIfNoRoute);
    let resp = next.run(req).await;
    let Some(mut back) = resp.extensions().get::<Unrouted>().and_then(Unrouted::take) else {
        return Ok(resp);
    };
    match own_host {
        Some(h) => back.headers_mut().insert(http::header::HOST, h),
        None => back.headers_mut().remove(http::header::HOST),
    };
    Err(back)
}

enum Component {
    State(Arc<dyn StateStore>),
    PubSub(Arc<dyn PubSub>),
}

static KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");
static DAPR_APP_ID: http::HeaderName = http::HeaderName::from_static("dapr-app-id");
static DAPR_CALLER_APP_ID: http::HeaderName = http::HeaderName::from_static("dapr-caller-app-id");

/// Removes hop-by-hop headers. Static names: a `&str` key is parsed and validated on every
/// call, which cost more than the rest of this function on the invocation path. The body passes
/// through unchanged, so `content-length` stays valid and is kept (the upstream then needs no
/// chunked encoding).
fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    for n in [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TRANSFER_ENCODING,
        &TE,
        &TRAILER,
        &UPGRADE,
    ] {
        if h.contains_key(n) {
            h.remove(n);
        }
    }
}

/// Parses the app's `GET /dapr/subscribe` answer: v1 items with `route`, v2 items with
/// `routes: {rules, default}`.
pub fn parse_programmatic(body: &[u8]) -> Result<Vec<Subscription>, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Item {
        pubsubname: String,
        topic: String,
        #[serde(default)]
        route: Option<String>,
        #[serde(default)]
        routes: Option<crate::component::Routes>,
        #[serde(default)]
        dead_letter_topic: Option<String>,
        #[serde(default)]
        bulk_subscribe: Option<crate::component::BulkSubscribe>,
        #[serde(default)]
        metadata: BTreeMap<String, String>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(vec![]);
    }
    let items: Vec<Item> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok(items
        .into_iter()
        .map(|i| {
            let mut routes = i.routes.unwrap_or_default();
            if routes.default.is_none() {
                routes.default = i.route.or_else(|| Some(format!("/{}", i.topic)));
            }
            Subscription {
                pubsub: i.pubsubname,
                topic: i.topic,
                routes,
                dead_letter_topic: i.dead_letter_topic,
                bulk_subscribe: i.bulk_subscribe,
                metadata: i.metadata,
                scopes: vec![],
                kind: "programmatic",
            }
        })
        .collect())
}
