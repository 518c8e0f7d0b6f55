//! The admin endpoint (Envoy's admin API subset): `/ready`, `/server_info`, `/listeners`,
//! `/clusters`, `/config_dump`, `/stats`, `/stats/prometheus` (see docs/configuration.md, Admin API).

use crate::server::{ServerLifecycle, ServerState};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, state: Arc<ServerState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The admin paths that need POST (Envoy's `mutates_server_state` handlers).
const MUTATING: [&str; 6] = [
    "/quitquitquit",
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/drain_listeners",
    "/reset_counters",
    "/logging",
];

fn ok() -> Response<Full<Bytes>> {
    text(StatusCode::OK, "OK\n".into(), "text/plain")
}

fn state_quit_later(state: &ServerState) -> impl std::future::Future<Output = ()> + Send + 'static {
    let quit = state.quit.clone();
    async move {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        quit.notify_one();
    }
}

/// `/logging`: without a query it lists the level; `?level=<level>` sets it for every logger.
fn logging(state: &ServerState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(ctl) = &state.options.log_control else {
        return text(
            StatusCode::NOT_FOUND,
            "logging is not controlled by this server\n".into(),
            "text/plain",
        );
    };
    if let Some(level) = query_param(req, "level") {
        if let Err(e) = (ctl.set)(&percent_decode(level)) {
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"), "text/plain");
        }
    } else if req.uri().query().is_some_and(|q| !q.is_empty()) {
        return text(
            StatusCode::BAD_REQUEST,
            "usage: /logging?level=<trace|debug|info|warning|error|critical|off>\n".into(),
            "text/plain",
        );
    }
    text(
        StatusCode::OK,
        format!("active loggers:\n  mecha: {}\n", (ctl.get)()),
        "text/plain",
    )
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn json_resp(v: Value) -> Response<Full<Bytes>> {
    text(
        StatusCode::OK,
        serde_json::to_string_pretty(&v).unwrap_or_default(),
        "application/json",
    )
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

pub fn handle(state: &ServerState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let json_format = query_param(&req, "format") == Some("json");
    let path = req.uri().path();
    // As Envoy, endpoints that change the server's state only answer POST.
    if MUTATING.contains(&path) && req.method() != http::Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {} not allowed, POST required.\n", req.method()),
            "text/plain",
        );
    }
    if path.starts_with("/stats") {
        // The `server.*` gauges are derived: bring them up to date for this render.
        state.refresh_server_stats();
    }
    match path {
        "/ready" => {
            let l = state.lifecycle();
            let status = if l == ServerLifecycle::Live {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{}\n", l.as_str()), "text/plain")
        }
        "/quitquitquit" => {
            // notify_one keeps the wake-up if the binary is not waiting yet; the short delay
            // lets this reply reach the client before the runtime shuts down.
            let quit = state_quit_later(state);
            tokio::spawn(quit);
            ok()
        }
        "/healthcheck/fail" => {
            state.healthcheck_failed.store(true, Ordering::SeqCst);
            state.refresh_server_stats();
            ok()
        }
        "/healthcheck/ok" => {
            state.healthcheck_failed.store(false, Ordering::SeqCst);
            state.refresh_server_stats();
            ok()
        }
        "/drain_listeners" => {
            if query_param(&req, "inboundonly").is_some() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "inboundonly is not supported: mecha does not tell inbound from outbound listeners\n".into(),
                    "text/plain",
                );
            }
            if query_param(&req, "graceful").is_some() {
                // Stop accepting and let in-flight requests finish (up to --drain-time-s).
                let (drain, timeout) = (state.drain.clone(), state.options.drain_timeout);
                tokio::spawn(async move {
                    drain.drain(timeout).await;
                });
            } else {
                state.drain.stop_accepting();
            }
            ok()
        }
        "/reset_counters" => {
            state.ctx.stats.reset_counters();
            ok()
        }
        "/logging" => logging(state, &req),
        "/server_info" => json_resp(server_info(state)),
        "/listeners" => listeners(state, json_format),
        "/clusters" => clusters(state, json_format),
        "/config_dump" => json_resp(config_dump(state)),
        "/stats" if query_param(&req, "format") == Some("prometheus") => prometheus(state, &req),
        "/stats/prometheus" => prometheus(state, &req),
        "/stats" => {
            let (filter, used_only) = match stats_filter(&req) {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let keep = |name: &str| filter.as_ref().is_none_or(|re| re.is_match(name));
            let body: String = state
                .ctx
                .stats
                .render_text(None)
                .lines()
                .filter(|l| {
                    let (name, value) = l.split_once(": ").unwrap_or((l, ""));
                    keep(name) && !(used_only && (value == "0" || value == "No recorded values"))
                })
                .flat_map(|l| [l, "\n"])
                .collect();
            if json_format {
                let mut stats: Vec<Value> = body
                    .lines()
                    .filter_map(|l| l.split_once(": "))
                    .filter_map(|(k, v)| Some(json!({"name": k, "value": v.parse::<i64>().ok()?})))
                    .collect();
                let computed: Vec<Value> = state
                    .ctx
                    .stats
                    .histograms()
                    .into_iter()
                    .filter(|(name, _, count)| keep(name) && !(used_only && *count == 0))
                    .map(|(name, s, _)| {
                        // Envoy's JSON has null where its text has nan.
                        let num = |v: f64| if v.is_nan() { Value::Null } else { json!(v) };
                        let values: Vec<Value> = s
                            .interval
                            .iter()
                            .zip(s.cumulative.iter())
                            .map(|(i, c)| json!({"interval": num(*i), "cumulative": num(*c)}))
                            .collect();
                        json!({"name": name, "values": values})
                    })
                    .collect();
                if !computed.is_empty() {
                    let supported: Vec<f64> = mecha_filters::stats::SUPPORTED_QUANTILES
                        .iter()
                        .map(|q| (q * 1000.0).round() / 10.0)
                        .collect();
                    stats.push(json!({"histograms": {"supported_quantiles": supported, "computed_quantiles": computed}}));
                }
                json_resp(json!({ "stats": stats }))
            } else {
                text(StatusCode::OK, body, "text/plain")
            }
        }
        "/" | "/help" => text(
            StatusCode::OK,
            "admin commands are:\n  /clusters\n  /config_dump\n  /drain_listeners (POST)\n  /healthcheck/fail (POST)\n  /healthcheck/ok (POST)\n  /listeners\n  /logging (POST)\n  /quitquitquit (POST)\n  /ready\n  /reset_counters (POST)\n  /server_info\n  /stats\n  /stats/prometheus\n".into(),
            "text/plain",
        ),
        _ => text(StatusCode::NOT_FOUND, "invalid path. admin commands are listed at /help\n".into(), "text/plain"),
    }
}

/// Envoy's `filter` (a regular expression over the dotted stat names) and `usedonly` (hide what
/// was never used); a bad regex is a 400.
#[allow(clippy::result_large_err)]
fn stats_filter(
    req: &Request<Incoming>,
) -> Result<(Option<regex::Regex>, bool), Response<Full<Bytes>>> {
    let filter = match query_param(req, "filter").map(|f| regex::Regex::new(&percent_decode(f))) {
        Some(Err(e)) => {
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!("invalid regex: {e}\n"),
                "text/plain",
            ))
        }
        Some(Ok(re)) => Some(re),
        None => None,
    };
    Ok((filter, query_param(req, "usedonly").is_some()))
}

/// `/stats/prometheus` and `/stats?format=prometheus`.
fn prometheus(state: &ServerState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (filter, used_only) = match stats_filter(req) {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let keep = |name: &str| filter.as_ref().is_none_or(|re| re.is_match(name));
    text(
        StatusCode::OK,
        state.ctx.stats.render_prometheus_filtered(&keep, used_only),
        "text/plain; version=0.0.4",
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn server_info(state: &ServerState) -> Value {
    let uptime = state.started.elapsed().as_secs();
    let st = state.lifecycle().as_str();
    let b = state.bootstrap.load();
    json!({
        "version": format!("mecha/{}", env!("CARGO_PKG_VERSION")),
        "state": st,
        "uptime_current_epoch": format!("{uptime}s"),
        "uptime_all_epochs": format!("{uptime}s"),
        "hot_restart_version": "disabled",
        "command_line_options": {
            "concurrency": state.options.concurrency,
            "config_path": state.options.config_path.clone().unwrap_or_default(),
        },
        "node": b.node,
    })
}

fn listeners(state: &ServerState, json_format: bool) -> Response<Full<Bytes>> {
    let ls = state.listeners.load();
    if json_format {
        let statuses: Vec<Value> = ls
            .iter()
            .map(|(rt, addr)| {
                json!({"name": rt.load().name, "local_address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}})
            })
            .collect();
        json_resp(json!({ "listener_statuses": statuses }))
    } else {
        let body: String = ls
            .iter()
            .map(|(rt, addr)| format!("{}::{}\n", rt.load().name, addr))
            .collect();
        text(StatusCode::OK, body, "text/plain")
    }
}

fn clusters(state: &ServerState, json_format: bool) -> Response<Full<Bytes>> {
    let cm = state.ctx.clusters.load();
    let mut names: Vec<&String> = cm.clusters.keys().collect();
    names.sort();
    if json_format {
        let statuses: Vec<Value> = names
            .iter()
            .map(|n| {
                let c = &cm.clusters[*n];
                let hosts: Vec<Value> = c
                    .hosts
                    .load()
                    .all
                    .iter()
                    .map(|h| {
                        json!({
                            "address": {"socket_address": {"address": h.addr.ip().to_string(), "port_value": h.addr.port()}},
                            "stats": [
                                {"name": "cx_active", "type": "GAUGE", "value": h.cx.cx_active.load(Ordering::Relaxed)},
                                {"name": "cx_total", "value": h.cx.cx_total.load(Ordering::Relaxed)},
                                {"name": "cx_connect_fail", "value": h.cx.cx_connect_fail.load(Ordering::Relaxed)},
                                {"name": "rq_active", "type": "GAUGE", "value": h.rq_active.load(Ordering::Relaxed)},
                                {"name": "rq_total", "value": h.rq_total.load(Ordering::Relaxed)},
                                {"name": "rq_error", "value": h.rq_error.load(Ordering::Relaxed)},
                                {"name": "rq_success", "value": h.rq_success.load(Ordering::Relaxed)},
                                {"name": "rq_timeout", "value": h.rq_timeout.load(Ordering::Relaxed)},
                            ],
                            "health_status": {"eds_health_status": if h.is_healthy() { "HEALTHY" } else { "UNHEALTHY" }, "flags": h.health_text()},
                            "weight": h.weight,
                            "priority": h.priority,
                            "hostname": &*h.hostname,
                            "locality": h.locality,
                        })
                    })
                    .collect();
                json!({"name": n, "observability_name": n, "host_statuses": hosts})
            })
            .collect();
        return json_resp(json!({ "cluster_statuses": statuses }));
    }
    let mut out = String::new();
    for n in names {
        let c = &cm.clusters[n];
        out.push_str(&format!("{n}::observability_name::{n}\n"));
        for h in c.hosts.load().all.iter() {
            let p = format!("{n}::{}", h.addr);
            let loc = h.locality.clone().unwrap_or_default();
            for (k, v) in [
                (
                    "cx_active",
                    h.cx.cx_active.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "cx_connect_fail",
                    h.cx.cx_connect_fail.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "cx_total",
                    h.cx.cx_total.load(Ordering::Relaxed).to_string(),
                ),
                ("rq_active", h.rq_active.load(Ordering::Relaxed).to_string()),
                ("rq_error", h.rq_error.load(Ordering::Relaxed).to_string()),
                (
                    "rq_success",
                    h.rq_success.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "rq_timeout",
                    h.rq_timeout.load(Ordering::Relaxed).to_string(),
                ),
                ("rq_total", h.rq_total.load(Ordering::Relaxed).to_string()),
                ("hostname", h.hostname.to_string()),
                ("health_flags", h.health_text()),
                ("weight", h.weight.to_string()),
                ("region", loc.region),
                ("zone", loc.zone),
                ("sub_zone", loc.sub_zone),
                ("canary", "false".into()),
                ("priority", h.priority.to_string()),
                ("success_rate", "-1".into()),
            ] {
                out.push_str(&format!("{p}::{k}::{v}\n"));
            }
        }
    }
    text(StatusCode::OK, out, "text/plain")
}

fn config_dump(state: &ServerState) -> Value {
    let b = state.bootstrap.load();
    let updated = rfc3339(*state.last_updated.load_full());
    let bootstrap = serde_json::to_value(&**b).unwrap_or(Value::Null);
    let listeners: Vec<Value> = b
        .static_resources
        .listeners
        .iter()
        .map(|l| json!({"listener": serde_json::to_value(l).unwrap_or(Value::Null), "last_updated": updated}))
        .collect();
    let clusters: Vec<Value> = b
        .static_resources
        .clusters
        .iter()
        .map(|c| json!({"cluster": serde_json::to_value(c).unwrap_or(Value::Null), "last_updated": updated}))
        .collect();
    let mut dump = json!({
        "configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": bootstrap, "last_updated": updated},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "static_clusters": clusters},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "static_listeners": listeners},
        ]
    });
    if let Some(x) = state.xds.load_full() {
        xds_config_dump(&x, &mut dump);
    }
    // Unset fields are absent from Envoy's dump (proto3 JSON), and `null` is not a value any
    // field accepts when the dump is read back as a bootstrap.
    strip_nulls(&mut dump);
    dump
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The dynamic sections (xDS): each resource with its `version_info` and `last_updated`.
fn xds_config_dump(x: &mecha_config::XdsResources, dump: &mut Value) {
    fn entries<T: serde::Serialize>(
        m: &std::collections::BTreeMap<String, mecha_config::Versioned<T>>,
        key: &str,
    ) -> Vec<Value> {
        m.values()
            .map(|v| json!({"version_info": v.version, key: serde_json::to_value(&*v.value).unwrap_or(Value::Null), "last_updated": rfc3339(v.last_updated)}))
            .collect()
    }
    let version = |t: &str| x.versions.get(t).cloned().unwrap_or_default();
    let Some(configs) = dump.get_mut("configs").and_then(|c| c.as_array_mut()) else {
        return;
    };
    for c in configs.iter_mut() {
        match c.get("@type").and_then(|t| t.as_str()) {
            Some("type.googleapis.com/envoy.admin.v3.ClustersConfigDump") => {
                c["version_info"] = json!(version(
                    "type.googleapis.com/envoy.config.cluster.v3.Cluster"
                ));
                c["dynamic_active_clusters"] = json!(entries(&x.clusters, "cluster"));
            }
            Some("type.googleapis.com/envoy.admin.v3.ListenersConfigDump") => {
                c["version_info"] = json!(version(
                    "type.googleapis.com/envoy.config.listener.v3.Listener"
                ));
                c["dynamic_listeners"] = json!(x
                    .listeners
                    .iter()
                    .map(|(n, v)| json!({"name": n, "active_state": {"version_info": v.version, "listener": serde_json::to_value(&*v.value).unwrap_or(Value::Null), "last_updated": rfc3339(v.last_updated)}}))
                    .collect::<Vec<_>>());
            }
            _ => {}
        }
    }
    configs.push(json!({"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": entries(&x.route_configs, "route_config")}));
    configs.push(json!({"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": entries(&x.endpoints, "endpoint_config")}));
}

/// RFC 3339 UTC timestamp, as Envoy's config dump prints `last_updated`.
fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
