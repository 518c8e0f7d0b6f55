//! Service invocation: the local app, the `dapr-app-id` header form, and app A -> sidecar A ->
//! sidecar B -> app B over loopback through a cluster named after the app id (no route matches
//! `Host: <app-id>`), and through a route whose virtual host's domains contain the app id (its
//! retry policy applies).

use crate::common::{Handler, Resp, TempDir, Upstream};
use crate::{req, Sidecar};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;

/// Echoes method, path, query, a header and the body as JSON; `/status/N` answers N.
pub async fn echo_app(name: &'static str) -> Upstream {
    let h: Handler = Arc::new(move |r: http::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let method = r.method().to_string();
            let path = r.uri().path().to_string();
            let query = r.uri().query().unwrap_or("").to_string();
            let hdr = r
                .headers()
                .get("x-test")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let has_dapr_hdr = r.headers().keys().any(|k| k.as_str() == "dapr-app-id");
            let body = r
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let status = path
                .strip_prefix("/status/")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200u16);
            let v = serde_json::json!({"app": name, "method": method, "path": path, "query": query,
                "x_test": hdr, "body": String::from_utf8_lossy(&body), "dapr_app_id_header": has_dapr_hdr});
            let mut resp: Resp = http::Response::new(Full::new(Bytes::from(v.to_string())));
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            resp.headers_mut()
                .insert("x-from-app", name.parse().unwrap());
            resp.headers_mut()
                .insert("server", format!("app-{name}").parse().unwrap());
            resp
        })
    });
    Upstream::start(h).await
}

#[tokio::test]
async fn invoke_local_app_and_header_form() {
    let app = echo_app("a").await;
    let data = TempDir::new();
    let m = Sidecar::start(
        "appa",
        &["--app-port", &app.addr.port().to_string()],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    let r = req(
        "PUT",
        &format!("{}/v1.0/invoke/appa/method/orders/7?x=1&y=2", m.url()),
        "payload",
        &[("x-test", "v")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/orders/7");
    assert_eq!(v["query"], "x=1&y=2");
    assert_eq!(v["x_test"], "v");
    assert_eq!(v["body"], "payload");
    assert_eq!(r.header("x-from-app"), Some("a"));
    // The app's own Server header too: like Dapr, the zero-config sidecar neither replaces it
    // nor adds one to its own answers (`server_header_transformation: PASS_THROUGH`).
    assert_eq!(r.header("server"), Some("app-a"));
    // Status codes pass through unchanged.
    let r = req(
        "GET",
        &format!("{}/v1.0/invoke/appa/method/status/418", m.url()),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 418);
    // Header form: any path, dapr-app-id names the target; the header is not sent to the app.
    let r = req(
        "POST",
        &format!("{}/hello?q=1", m.url()),
        "b",
        &[("dapr-app-id", "appa")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/hello");
    assert_eq!(r.json()["query"], "q=1");
    assert_eq!(r.json()["dapr_app_id_header"], false);
    // Unknown app id: ERR_DIRECT_INVOKE.
    let r = req(
        "GET",
        &format!("{}/v1.0/invoke/nobody/method/x", m.url()),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["errorCode"], "ERR_DIRECT_INVOKE");
    assert_eq!(r.header("server"), None);
}

#[tokio::test]
async fn two_sidecars_on_loopback() {
    let app_b = echo_app("b").await;
    let data = TempDir::new();
    let dd = data.0.display().to_string();
    let b = Sidecar::start(
        "appb",
        &["--app-port", &app_b.addr.port().to_string()],
        &[("MECHA_DATA_DIR", &dd)],
    )
    .await;
    // Sidecar A's bootstrap: the runtime API filter on its HTTP port, and a cluster named after
    // app B's id whose endpoint is B's sidecar.
    let a_port = crate::common::free_port();
    let cfg = format!(
        r#"static_resources:
  listeners:
  - name: dapr_http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {a_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: dapr_http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: []
          http_filters:
          - name: mecha.filters.http.runtime_api
            typed_config:
              "@type": type.googleapis.com/mecha.filters.http.runtime_api
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: appb
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: appb
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {bp} }} }} }}
"#,
        bp = b.http_port
    );
    std::fs::write(data.0.join("a.yaml"), cfg).unwrap();
    let grpc = crate::common::free_port();
    let mut child = std::process::Command::new(crate::common::mecha_bin())
        .args([
            "run",
            "--app-id",
            "appa",
            "--dapr-grpc-port",
            &grpc.to_string(),
            "--dapr-listen-address",
            "127.0.0.1",
            "-c",
        ])
        .arg(data.0.join("a.yaml"))
        .env("MECHA_DATA_DIR", &dd)
        .spawn()
        .unwrap();
    let a_url = format!("http://127.0.0.1:{a_port}");
    let mut ok = false;
    for _ in 0..200 {
        if let Ok(r) = crate::common::get(&format!("{a_url}/v1.0/healthz")).await {
            if r.status == 204 {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    assert!(ok, "sidecar A did not start");
    let r = req(
        "POST",
        &format!("{a_url}/v1.0/invoke/appb/method/api/do?z=9"),
        "hi",
        &[("x-test", "t")],
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["app"], "b");
    assert_eq!(v["path"], "/api/do");
    assert_eq!(v["query"], "z=9");
    assert_eq!(v["body"], "hi");
    assert_eq!(v["x_test"], "t");
}

/// Sidecar A's bootstrap has a virtual host `domains: ["appb"]` whose route goes to the cluster
/// of B's sidecar with `retry_on: 5xx`: app B answers 503 twice then 200, the caller of A gets 200,
/// app B saw 3 requests and A counted 2 retries on the cluster.
/// Two sidecars for the route retry tests: app B answers 503 to the first two of every three
/// `/api/…` requests; sidecar A (`-c` bootstrap, admin on `admin`) routes `Host: appb` to B's
/// sidecar with `retry_on: 5xx`. Returns (A, B, app B, B's hit count, A's admin port, data dir).
async fn retry_pair() -> (
    Sidecar,
    Sidecar,
    Upstream,
    Arc<std::sync::atomic::AtomicUsize>,
    u16,
    TempDir,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let h: Handler = Arc::new(move |r: http::Request<hyper::body::Incoming>| {
        let hits = h2.clone();
        Box::pin(async move {
            let path = r.uri().path().to_string();
            // Sidecar B's own start-up calls (`GET /dapr/subscribe`) are not invocations.
            if !path.starts_with("/api/") {
                let mut resp: Resp = http::Response::new(Full::new(Bytes::from("[]")));
                *resp.status_mut() = http::StatusCode::NOT_FOUND;
                return resp;
            }
            let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
            let r_query = r.uri().query().unwrap_or("").to_string();
            let x_test = r
                .headers()
                .get("x-test")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = r
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let query = r_query;
            let v = serde_json::json!({"n": n, "path": path, "query": query,
                "x_test": x_test, "body": String::from_utf8_lossy(&body)});
            let mut resp: Resp = http::Response::new(Full::new(Bytes::from(v.to_string())));
            if !n.is_multiple_of(3) {
                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        })
    });
    let app_b = Upstream::start(h).await;
    let data = TempDir::new();
    let dd = data.0.display().to_string();
    let b = Sidecar::start(
        "appb",
        &["--app-port", &app_b.addr.port().to_string()],
        &[("MECHA_DATA_DIR", &dd)],
    )
    .await;
    let a_port = crate::common::free_port();
    let admin = crate::common::free_port();
    let cfg = format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: dapr_http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {a_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: dapr_http
          route_config:
            virtual_hosts:
            - name: app_b
              domains: ["appb"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: sidecar_b
                  timeout: 5s
                  retry_policy: {{ retry_on: "5xx", num_retries: 3 }}
            - name: all
              domains: ["*"]
              routes: []
          http_filters:
          - name: mecha.filters.http.runtime_api
            typed_config:
              "@type": type.googleapis.com/mecha.filters.http.runtime_api
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: sidecar_b
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: sidecar_b
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {bp} }} }} }}
"#,
        bp = b.http_port
    );
    std::fs::write(data.0.join("a.yaml"), cfg).unwrap();
    let grpc = crate::common::free_port();
    let args: Vec<String> = [
        "run",
        "--app-id",
        "appa",
        "--dapr-grpc-port",
        &grpc.to_string(),
        "--dapr-listen-address",
        "127.0.0.1",
        "-c",
        &data.0.join("a.yaml").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let a = Sidecar::spawn(
        args,
        vec![("MECHA_DATA_DIR".into(), dd.clone())],
        a_port,
        grpc,
    )
    .await;
    (a, b, app_b, hits, admin, data)
}

/// Sidecar A's bootstrap has a virtual host `domains: ["appb"]` whose route goes to the cluster
/// of B's sidecar with `retry_on: 5xx`: app B answers 503 twice then 200, the caller of A gets 200,
/// app B saw 3 requests and A counted 2 retries on the cluster.
#[tokio::test]
async fn two_sidecars_route_retry_policy() {
    use std::sync::atomic::Ordering;
    let (a, _b, _app_b, hits, admin, _data) = retry_pair().await;
    let r = req(
        "POST",
        &format!("{}/v1.0/invoke/appb/method/api/do", a.url()),
        "hi",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["n"], 3);
    assert_eq!(r.json()["path"], "/api/do");
    assert_eq!(r.json()["body"], "hi");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(
        admin_stat(admin, "cluster.sidecar_b.upstream_rq_retry").await,
        Some(2)
    );
    // An app id that no route names and no cluster reaches is still ERR_DIRECT_INVOKE.
    let r = req(
        "GET",
        &format!("{}/v1.0/invoke/nobody/method/x", a.url()),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_DIRECT_INVOKE");
}

/// A counter or gauge from the admin `/stats` text.
async fn admin_stat(admin: u16, name: &str) -> Option<i64> {
    let stats = crate::common::get(&format!("http://127.0.0.1:{admin}/stats"))
        .await
        .unwrap()
        .text();
    stats.lines().find_map(|l| {
        let (k, v) = l.split_once(": ")?;
        (k == name).then(|| v.trim().parse::<i64>().ok()).flatten()
    })
}

/// gRPC `InvokeService` for another app id goes through the mesh as HTTP invocation does: on
/// sidecar A's Dapr gRPC port (a listener whose chain is a copy of the `-c` bootstrap's runtime
/// API connection manager), the call to `appb` takes the route of the `appb` virtual host, whose
/// retry policy hides app B's two 503s; verb, query string, metadata and body reach app B.
#[tokio::test]
async fn grpc_invoke_service_through_route_retry_policy() {
    use dapr::dapr::proto::common::v1 as common_v1;
    use dapr::dapr::proto::runtime::v1 as rtv1;
    use std::sync::atomic::Ordering;
    let (a, _b, _app_b, hits, admin, _data) = retry_pair().await;
    let mut c = rtv1::dapr_client::DaprClient::connect(format!("http://127.0.0.1:{}", a.grpc_port))
        .await
        .expect("connect to A's gRPC port");
    let invoke = |id: &str, method: &str| {
        let mut r = tonic::Request::new(rtv1::InvokeServiceRequest {
            id: id.into(),
            message: Some(common_v1::InvokeRequest {
                method: method.into(),
                data: Some(prost_types::Any {
                    type_url: String::new(),
                    value: b"hi".to_vec(),
                }),
                content_type: "text/plain".into(),
                http_extension: Some(common_v1::HttpExtension {
                    verb: common_v1::http_extension::Verb::Put as i32,
                    querystring: "q=1".into(),
                }),
            }),
        });
        r.metadata_mut()
            .insert("x-test", "from-grpc".parse().unwrap());
        r
    };
    let resp = c
        .invoke_service(invoke("appb", "api/grpc"))
        .await
        .expect("InvokeService through the route")
        .into_inner();
    let v: serde_json::Value =
        serde_json::from_slice(&resp.data.expect("data").value).expect("JSON from app B");
    assert_eq!(v["n"], 3, "{v}");
    assert_eq!(v["path"], "/api/grpc");
    assert_eq!(v["query"], "q=1");
    assert_eq!(v["x_test"], "from-grpc");
    assert_eq!(v["body"], "hi");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(
        admin_stat(admin, "cluster.sidecar_b.upstream_rq_retry").await,
        Some(2)
    );
    // The gRPC listener's own connection manager stats count the calls.
    assert!(
        admin_stat(admin, "http.dapr_grpc.downstream_rq_total")
            .await
            .unwrap_or(0)
            >= 1
    );
    // No route, no cluster, no DNS name: an error status, never a hang.
    let err = c
        .invoke_service(invoke("nobody", "x"))
        .await
        .expect_err("unknown app id");
    assert!(err.message().contains("ERR_DIRECT_INVOKE"), "{err:?}");
}

/// An app id with neither a route nor a cluster is found by DNS, on the peer sidecars' HTTP port
/// (this sidecar's own `--dapr-http-port`, Dapr's convention). App id `localhost` resolves to
/// 127.0.0.1, where sidecar B listens; sidecar A listens on 127.0.0.2 with the same port.
#[tokio::test]
async fn dns_fallback_for_app_ids_without_a_cluster() {
    let app_b = echo_app("b").await;
    let data = TempDir::new();
    let dd = data.0.display().to_string();
    let port = crate::common::free_port();
    let start = |id: &'static str, addr: &'static str, app_port: Option<u16>| {
        let mut cmd = std::process::Command::new(crate::common::mecha_bin());
        cmd.args([
            "run",
            "--app-id",
            id,
            "--dapr-http-port",
            &port.to_string(),
            "--dapr-grpc-port",
            &crate::common::free_port().to_string(),
            "--dapr-listen-address",
            addr,
            "--concurrency",
            "1",
        ])
        // Two sidecars stand for two pods: each has its own data directory (embedded sqlite).
        .env("MECHA_DATA_DIR", format!("{dd}/{id}"))
        .env_remove("DAPR_API_TOKEN");
        if let Some(p) = app_port {
            cmd.args(["--app-port", &p.to_string()]);
        }
        KillOnDrop(cmd.spawn().unwrap())
    };
    let _b = start("localhost", "127.0.0.1", Some(app_b.addr.port()));
    let _a = start("appa", "127.0.0.2", None);
    for addr in ["127.0.0.1", "127.0.0.2"] {
        let mut ok = false;
        for _ in 0..300 {
            if let Ok(r) = crate::common::get(&format!("http://{addr}:{port}/v1.0/healthz")).await {
                if r.status == 204 {
                    ok = true;
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        assert!(ok, "sidecar on {addr} did not start");
    }
    let r = req(
        "POST",
        &format!("http://127.0.0.2:{port}/v1.0/invoke/localhost/method/dns?v=1"),
        "by-dns",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["app"], "b");
    assert_eq!(v["path"], "/dns");
    assert_eq!(v["query"], "v=1");
    assert_eq!(v["body"], "by-dns");
    // A name DNS does not know: ERR_DIRECT_INVOKE naming the DNS failure.
    let r = req(
        "GET",
        &format!("http://127.0.0.2:{port}/v1.0/invoke/no-such-app.invalid/method/x"),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["errorCode"], "ERR_DIRECT_INVOKE");
    assert!(r.text().contains("DNS"), "{}", r.text());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
