//! `mecha run --app-id …`: the Dapr-compatible sidecar mode. Builds the runtime (components from
//! `--resources-path`, or the embedded `statestore` / `pubsub`), puts the runtime API filter in
//! front of the router on the Dapr HTTP port (or uses the `-c` bootstrap as given, adding the
//! local app's cluster), serves the gRPC API on the Dapr gRPC port, and starts subscriptions.

use mecha_runtime_api::app_channel::AppProtocol;
use mecha_runtime_api::component::{ComponentSpecParsed, Metadata, Resources};
use mecha_runtime_api::{Runtime, RuntimeApiFactory, RuntimeOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The cluster that reaches the local app (`--app-port`).
pub const APP_CLUSTER: &str = "local_app";

/// The listener serving the Dapr gRPC API on `--dapr-grpc-port`.
pub const GRPC_LISTENER: &str = "dapr_grpc";

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RuntimeArgs {
    /// The app id (Dapr's `--app-id`); enables the runtime API.
    #[arg(long = "app-id", env = "APP_ID")]
    pub app_id: Option<String>,
    /// The port the app listens on (for pub/sub delivery and invocation of this app).
    #[arg(long = "app-port", env = "APP_PORT")]
    pub app_port: Option<u16>,
    /// How mecha talks to the app: http (requests to the app's routes) or grpc (Dapr's
    /// `dapr.proto.runtime.v1.AppCallback` service over HTTP/2).
    #[arg(long = "app-protocol", env = "APP_PROTOCOL", default_value = "http")]
    pub app_protocol: String,
    /// The Dapr HTTP API port.
    #[arg(
        long = "dapr-http-port",
        env = "DAPR_HTTP_PORT",
        default_value_t = 3500
    )]
    pub dapr_http_port: u16,
    /// The Dapr gRPC API port.
    #[arg(
        long = "dapr-grpc-port",
        env = "DAPR_GRPC_PORT",
        default_value_t = 50001
    )]
    pub dapr_grpc_port: u16,
    /// Directory of Dapr Component / Subscription YAML files (replaces the embedded defaults).
    #[arg(long = "resources-path")]
    pub resources_path: Option<PathBuf>,
    /// Address the Dapr APIs listen on.
    #[arg(long = "dapr-listen-address", default_value = "0.0.0.0")]
    pub listen_address: String,
    /// Probe the app's health; while it is unhealthy, subscriptions pause and invocations of
    /// this app are refused (Dapr's app health checks).
    #[arg(long = "enable-app-health-check")]
    pub enable_app_health_check: bool,
    /// Path probed on an HTTP app (gRPC apps get `AppCallbackHealthCheck/HealthCheck`).
    #[arg(long = "app-health-check-path", default_value = "/healthz")]
    pub app_health_check_path: String,
    /// Seconds between probes.
    #[arg(long = "app-health-probe-interval", default_value_t = 5)]
    pub app_health_probe_interval: u64,
    /// Milliseconds a probe may take.
    #[arg(long = "app-health-probe-timeout", default_value_t = 500)]
    pub app_health_probe_timeout: u64,
    /// Consecutive failed probes before the app is unhealthy.
    #[arg(long = "app-health-threshold", default_value_t = 3)]
    pub app_health_threshold: u32,
}

impl RuntimeArgs {
    /// The app health check settings, validated as daprd does; `None` when disabled.
    fn app_health(&self) -> Result<Option<mecha_runtime_api::app_health::AppHealthConfig>, String> {
        if !self.enable_app_health_check {
            return Ok(None);
        }
        let cfg = mecha_runtime_api::app_health::AppHealthConfig {
            path: self.app_health_check_path.clone(),
            interval: Duration::from_secs(self.app_health_probe_interval),
            timeout: Duration::from_millis(self.app_health_probe_timeout),
            threshold: self.app_health_threshold,
        };
        cfg.validate()?;
        if self.app_port.is_none() {
            tracing::warn!("--enable-app-health-check without --app-port: nothing to probe");
        }
        Ok(Some(cfg))
    }
}

fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MECHA_DATA_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".mecha"),
        None => PathBuf::from(".mecha"),
    }
}

/// The embedded defaults: `statestore` (state.sqlite, durable) and `pubsub` (pubsub.in-memory).
fn embedded(dir: &Path) -> Resources {
    let md = |pairs: &[(&str, String)]| {
        Metadata(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    };
    Resources {
        components: vec![
            ComponentSpecParsed {
                name: "statestore".into(),
                type_: "state.sqlite".into(),
                version: "v1".into(),
                ignore_errors: false,
                metadata: md(&[(
                    "connectionString",
                    dir.join("state.db").display().to_string(),
                )]),
                scopes: vec![],
                source: "(embedded default)".into(),
            },
            ComponentSpecParsed {
                name: "pubsub".into(),
                type_: "pubsub.in-memory".into(),
                version: "v1".into(),
                ignore_errors: false,
                metadata: Metadata::default(),
                scopes: vec![],
                source: "(embedded default)".into(),
            },
        ],
        subscriptions: vec![],
    }
}

/// The generated bootstrap of zero-config mode: listeners on the Dapr HTTP port and on the Dapr
/// gRPC port (HTTP/2) whose chains are [runtime_api, router], and the local app's cluster. The gRPC
/// API is a listener of the proxy rather than a separate server so that `InvokeService` to
/// another app id has the rest of the chain (the routes) exactly as HTTP invocation has. Like
/// Dapr's API servers, they add no `Server` header and pass an app's own through unchanged
/// (`server_header_transformation: PASS_THROUGH`).
fn generated_bootstrap(a: &RuntimeArgs) -> String {
    // A gRPC app is reached over HTTP/2 (prior knowledge, as Dapr's gRPC app channel).
    let h2 = if a.app_protocol == "grpc" {
        "\n    http2_protocol_options: {}"
    } else {
        ""
    };
    let app_cluster = match a.app_port {
        Some(p) => format!(
            r#"
  clusters:
  - name: {APP_CLUSTER}
    type: STATIC
    connect_timeout: 5s{h2}
    load_assignment:
      cluster_name: {APP_CLUSTER}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}
"#
        ),
        None => String::new(),
    };
    format!(
        r#"
static_resources:
  listeners:
  - name: dapr_http
    address: {{ socket_address: {{ address: "{addr}", port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: dapr_http
          codec_type: AUTO
          server_header_transformation: PASS_THROUGH
          route_config:
            name: dapr
            virtual_hosts:
            - name: dapr
              domains: ["*"]
              routes: []
          http_filters:
          - name: {filter}
            typed_config:
              "@type": type.googleapis.com/{filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: {GRPC_LISTENER}
    address: {{ socket_address: {{ address: "{addr}", port_value: {grpc_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {GRPC_LISTENER}
          codec_type: HTTP2
          server_header_transformation: PASS_THROUGH
          route_config:
            name: dapr
            virtual_hosts:
            - name: dapr
              domains: ["*"]
              routes: []
          http_filters:
          - name: {filter}
            typed_config:
              "@type": type.googleapis.com/{filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{app_cluster}"#,
        addr = a.listen_address,
        port = a.dapr_http_port,
        grpc_port = a.dapr_grpc_port,
        filter = mecha_runtime_api::TYPE_NAME,
    )
}

/// Adds the local app's cluster to a user bootstrap when it has none of that name.
fn add_app_cluster(b: &mut mecha_config::Bootstrap, a: &RuntimeArgs) -> Result<(), String> {
    let Some(_) = a.app_port else { return Ok(()) };
    if b.static_resources
        .clusters
        .iter()
        .any(|c| c.name == APP_CLUSTER)
    {
        return Ok(());
    }
    let text = generated_bootstrap(a);
    let generated = mecha_config::parse_bootstrap(&text).map_err(|e| e.to_string())?;
    b.static_resources
        .clusters
        .extend(generated.static_resources.clusters);
    Ok(())
}

/// Whether an HTTP connection manager's chain holds the runtime API filter.
fn has_runtime_filter(hcm: &mecha_config::HttpConnectionManager) -> bool {
    hcm.http_filters.iter().any(|f| {
        f.name == mecha_runtime_api::TYPE_NAME
            || f.typed_config
                .as_ref()
                .is_some_and(|t| t.type_url.ends_with(mecha_runtime_api::TYPE_NAME))
    })
}

/// Adds the Dapr gRPC port's listener to a user bootstrap that has no listener on that port: a
/// copy of the first connection manager that holds the runtime API filter (so gRPC invocation
/// sees the same routes, retry policies and clusters as HTTP invocation on that listener), over
/// HTTP/2; without such a connection manager, the generated one (no routes).
fn add_grpc_listener(b: &mut mecha_config::Bootstrap, a: &RuntimeArgs) -> Result<(), String> {
    use mecha_config::NetworkFilterConfig;
    let listeners = &mut b.static_resources.listeners;
    if listeners
        .iter()
        .any(|l| l.address.socket_address.port_value == a.dapr_grpc_port)
    {
        return Ok(());
    }
    let generated = mecha_config::parse_bootstrap(&generated_bootstrap(a))
        .map_err(|e| format!("generated bootstrap is invalid: {e}"))?;
    let Some(mut grpc) = generated
        .static_resources
        .listeners
        .into_iter()
        .find(|l| l.name == GRPC_LISTENER)
    else {
        return Err("generated bootstrap has no gRPC listener".into());
    };
    let user_chain = listeners
        .iter()
        .flat_map(|l| l.filter_chains.iter().chain(l.default_filter_chain.iter()))
        .find_map(|fc| {
            fc.filters.iter().find_map(|f| match &f.config {
                NetworkFilterConfig::HttpConnectionManager(h) if has_runtime_filter(h) => {
                    Some((f.name.clone(), h.clone()))
                }
                _ => None,
            })
        });
    if let (Some((name, mut hcm)), Some(chain)) = (user_chain, grpc.filter_chains.first_mut()) {
        hcm.stat_prefix = GRPC_LISTENER.to_string();
        hcm.codec_type = mecha_config::CodecType::HTTP2;
        chain.filters = vec![mecha_config::NetworkFilter {
            name,
            config: NetworkFilterConfig::HttpConnectionManager(hcm),
        }];
    }
    if listeners.iter().any(|l| l.name == GRPC_LISTENER) {
        grpc.name = format!("{GRPC_LISTENER}_{}", a.dapr_grpc_port);
    }
    listeners.push(grpc);
    Ok(())
}

pub(crate) fn run(
    config: Option<&Path>,
    a: &RuntimeArgs,
    concurrency: usize,
    drain_timeout: Duration,
) -> i32 {
    let Some(app_id) = a.app_id.clone() else {
        eprintln!("mecha run: -c <bootstrap> or --app-id <id> is required");
        return 1;
    };
    let app_protocol = match AppProtocol::parse(&a.app_protocol) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mecha run: {e}");
            return 1;
        }
    };
    if let Err(e) = a.app_health() {
        eprintln!("mecha run: {e}");
        return 1;
    }
    let Some(runtime) = crate::cli::tokio_runtime(concurrency) else {
        return 1;
    };
    runtime.block_on(serve(
        config,
        a,
        app_id,
        app_protocol,
        concurrency,
        drain_timeout,
    ))
}

async fn serve(
    config: Option<&Path>,
    a: &RuntimeArgs,
    app_id: String,
    app_protocol: AppProtocol,
    concurrency: usize,
    drain_timeout: Duration,
) -> i32 {
    let dir = data_dir();
    let resources = match &a.resources_path {
        Some(p) => match mecha_runtime_api::component::load_dir(p) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("mecha: {e}");
                return 1;
            }
        },
        None if config.is_none() => embedded(&dir),
        None => Resources::default(),
    };
    let bootstrap = match config {
        Some(path) => match mecha_config::load_bootstrap(path) {
            Ok(mut b) => {
                match add_app_cluster(&mut b, a).and_then(|()| add_grpc_listener(&mut b, a)) {
                    Ok(()) => b,
                    Err(e) => {
                        eprintln!("mecha: {e}");
                        return 1;
                    }
                }
            }
            Err(errors) => {
                eprintln!("{}: {} error(s)", path.display(), errors.0.len());
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                return 1;
            }
        },
        None => match mecha_config::parse_bootstrap(&generated_bootstrap(a)) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("mecha: generated bootstrap is invalid: {e}");
                return 1;
            }
        },
    };
    let opts = RuntimeOptions {
        app_id,
        app_cluster: a.app_port.map(|_| APP_CLUSTER.to_string()),
        api_token: std::env::var("DAPR_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        app_api_token: std::env::var("APP_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        resources,
        data_dir: Some(dir),
        max_body_bytes: 4 << 20,
        app_protocol,
        peer_http_port: a.dapr_http_port,
        // Validated in `run`.
        app_health: a.app_health().unwrap_or_default(),
    };
    let rt = match Runtime::new(opts).await {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("mecha: {e}");
            return 1;
        }
    };
    let mut registry = crate::cli::registry();
    registry.register_http(Arc::new(RuntimeApiFactory::new(rt.clone())));
    let ctx = mecha_proxy::BuildContext::new(registry);
    // Pub/sub delivery and invocation need the upstream even when no listener uses the filter.
    rt.set_upstream(Arc::new(ctx.upstream()));
    let options = mecha_proxy::ServerOptions {
        concurrency,
        config_path: config.map(|p| p.display().to_string()),
        drain_timeout,
        log_control: None,
    };
    let server = match mecha_proxy::Server::start_with(bootstrap, ctx, options).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("mecha: {e}");
            return 1;
        }
    };
    // xDS (dynamic_resources in a -c bootstrap) works in runtime mode too.
    if let Err(e) = crate::xds_cmd::start(&server) {
        eprintln!("mecha: {e}");
        return 1;
    }
    if let Err(e) = rt.start_subscriptions().await {
        eprintln!("mecha: {e}");
        return 1;
    }
    if config.is_none() {
        tracing::info!(app_id = %rt.app_id(), http_port = a.dapr_http_port, grpc_port = a.dapr_grpc_port, "runtime API started");
    } else {
        tracing::info!(app_id = %rt.app_id(), grpc_port = a.dapr_grpc_port, "runtime API started (HTTP on the bootstrap's listeners)");
    }
    wait_for_shutdown(&rt).await;
    tracing::info!("draining");
    rt.stop();
    let clean = server.drain().await;
    tracing::info!(clean, "stopped");
    0
}

async fn wait_for_shutdown(rt: &Runtime) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        rt.shutdown.notified().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        _ = rt.shutdown.notified() => {},
    }
}
