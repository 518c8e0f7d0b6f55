//! Admin endpoints and stat values after known traffic.

use crate::common::*;
use crate::routing::vhost_routes;

#[tokio::test]
async fn admin_endpoints_after_known_traffic() {
    let up = Upstream::echo("a").await;
    let (admin, port) = (free_port(), free_port());
    let routes = "              - match: { prefix: \"/missing\" }\n                direct_response: { status: 404 }\n              - match: { prefix: \"/\" }\n                route: { cluster: backend }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(routes),
        &static_cluster("backend", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    let c = client();
    for _ in 0..7 {
        assert_eq!(
            send(
                &c,
                http::Request::get(format!("http://127.0.0.1:{port}/ok"))
                    .body(Default::default())
                    .unwrap()
            )
            .await
            .unwrap()
            .status,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            send(
                &c,
                http::Request::get(format!("http://127.0.0.1:{port}/missing"))
                    .body(Default::default())
                    .unwrap()
            )
            .await
            .unwrap()
            .status,
            404
        );
    }

    let r = m.admin_get("/ready").await;
    assert_eq!((r.status, r.text().as_str()), (200, "LIVE\n"));

    let stats = m.admin_get("/stats").await.text();
    for (name, value) in [
        ("cluster.backend.upstream_rq_total", 7),
        ("cluster.backend.upstream_rq_2xx", 7),
        ("cluster.backend.upstream_cx_total", 1),
        ("cluster.backend.upstream_cx_active", 1),
        ("cluster.backend.upstream_rq_active", 0),
        ("cluster.backend.membership_healthy", 1),
        ("cluster.backend.membership_total", 1),
        ("http.ingress_http.downstream_rq_total", 10),
        ("http.ingress_http.downstream_rq_2xx", 7),
        ("http.ingress_http.downstream_rq_4xx", 3),
        ("http.ingress_http.downstream_rq_5xx", 0),
        ("http.ingress_http.downstream_cx_total", 1),
        ("http.ingress_http.downstream_cx_active", 1),
    ] {
        assert!(
            stats.contains(&format!("{name}: {value}\n")),
            "expected {name}: {value} in\n{stats}"
        );
    }
    assert!(stats.contains("http.ingress_http.downstream_rq_time: P0("));
    assert!(stats.contains("cluster.backend.upstream_rq_time: P0("));

    let filtered = m
        .admin_get("/stats?filter=%5Ecluster%5C.backend%5C.upstream_rq_(total%7C2xx)%24")
        .await
        .text();
    assert_eq!(
        filtered,
        "cluster.backend.upstream_rq_2xx: 7\ncluster.backend.upstream_rq_total: 7\n"
    );
    let used = m
        .admin_get("/stats?usedonly&filter=http%5C.ingress_http%5C.downstream_rq_5xx")
        .await
        .text();
    assert_eq!(used, "", "usedonly hides zero counters");
    assert_eq!(m.admin_get("/stats?filter=(").await.status, 400);

    let prom = m.admin_get("/stats/prometheus").await;
    assert!(prom
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let prom = prom.text();
    assert!(prom.contains("# TYPE envoy_cluster_upstream_rq_total counter"));
    assert!(
        prom.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"backend\"} 7"),
        "{prom}"
    );
    assert!(prom.contains(
        "envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix=\"ingress_http\"} 10"
    ));
    assert!(prom.contains("envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix=\"ingress_http\",le=\"+Inf\"} 10"));
    // Envoy's default tag extractors: the class and the code become labels.
    for line in [
        "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"backend\"} 7",
        "envoy_http_downstream_rq_xx{envoy_response_code_class=\"2\",envoy_http_conn_manager_prefix=\"ingress_http\"} 7",
        "envoy_http_downstream_rq_xx{envoy_response_code_class=\"4\",envoy_http_conn_manager_prefix=\"ingress_http\"} 3",
    ] {
        assert!(prom.contains(&format!("{line}\n")), "{line} in\n{prom}");
    }
    assert!(!prom.contains("envoy_cluster_upstream_rq_2xx"), "{prom}");
    let same = m.admin_get("/stats?format=prometheus").await;
    assert!(same
        .text()
        .contains("# TYPE envoy_cluster_upstream_rq_xx counter"));
    let only = m
        .admin_get(
            "/stats/prometheus?usedonly&filter=%5Ehttp%5C.ingress_http%5C.downstream_rq_%5Cdxx%24",
        )
        .await
        .text();
    assert_eq!(
        only,
        "# TYPE envoy_http_downstream_rq_xx counter\n\
         envoy_http_downstream_rq_xx{envoy_response_code_class=\"2\",envoy_http_conn_manager_prefix=\"ingress_http\"} 7\n\
         envoy_http_downstream_rq_xx{envoy_response_code_class=\"4\",envoy_http_conn_manager_prefix=\"ingress_http\"} 3\n",
        "filter and usedonly on /stats/prometheus"
    );
    assert_eq!(m.admin_get("/stats/prometheus?filter=(").await.status, 400);

    let clusters = m.admin_get("/clusters").await.text();
    let host = format!("backend::{}", up.addr);
    assert!(
        clusters.contains(&format!("{host}::rq_total::7")),
        "{clusters}"
    );
    assert!(clusters.contains(&format!("{host}::cx_active::1")));
    assert!(clusters.contains(&format!("{host}::health_flags::healthy")));
    assert!(clusters.contains(&format!("{host}::weight::1")));
    let cj = m.admin_get("/clusters?format=json").await.json();
    assert_eq!(cj["cluster_statuses"][0]["name"], "backend");

    let listeners = m.admin_get("/listeners").await.text();
    assert_eq!(listeners, format!("ingress::127.0.0.1:{port}\n"));

    let dump = m.admin_get("/config_dump").await.json();
    let types: Vec<&str> = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["@type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"type.googleapis.com/envoy.admin.v3.ClustersConfigDump"));
    let clusters = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["static_clusters"].is_array())
        .unwrap();
    assert_eq!(clusters["static_clusters"][0]["cluster"]["name"], "backend");

    let info = m.admin_get("/server_info").await.json();
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["command_line_options"]["concurrency"], 2);

    assert_eq!(m.admin_get("/nope").await.status, 404);
}

/// An upstream answering `/s/<code>` with that status, sleeping 2 s on `/slow` and `<ms>` on
/// `/sleep/<ms>`.
fn status_upstream() -> Handler {
    std::sync::Arc::new(|req: http::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let path = req.uri().path().to_string();
            if path == "/slow" {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            if let Some(ms) = path.strip_prefix("/sleep/").and_then(|m| m.parse().ok()) {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let code = path
                .strip_prefix("/s/")
                .and_then(|c| c.parse().ok())
                .unwrap_or(200);
            http::Response::builder()
                .status(code)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap()
        })
    })
}

#[tokio::test]
async fn host_stats_and_per_code_cluster_stats() {
    let up = Upstream::start(status_upstream()).await;
    let (admin, port) = (free_port(), free_port());
    let routes = "              - match: { prefix: \"/\" }\n                route: { cluster: backend, timeout: 0.3s }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(routes),
        &static_cluster("backend", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    for (path, n, want) in [
        ("/s/200", 3, 200),
        ("/s/404", 2, 404),
        ("/s/503", 4, 503),
        ("/slow", 1, 504),
    ] {
        for _ in 0..n {
            let r = get(&format!("http://127.0.0.1:{port}{path}"))
                .await
                .unwrap();
            assert_eq!(r.status, want, "{path}");
        }
    }
    let clusters = m.admin_get("/clusters").await.text();
    let host = format!("backend::{}", up.addr);
    for (k, v) in [
        ("rq_total", 10),
        ("rq_success", 5),
        // Four 503 responses and the timed-out request (answered 504).
        ("rq_error", 5),
        ("rq_timeout", 1),
    ] {
        assert!(
            clusters.contains(&format!("{host}::{k}::{v}\n")),
            "{host}::{k}::{v} in\n{clusters}"
        );
    }
    let cj = m.admin_get("/clusters?format=json").await.json();
    let stats = &cj["cluster_statuses"][0]["host_statuses"][0]["stats"];
    let stat = |name: &str| {
        stats
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["value"].as_u64().unwrap())
    };
    assert_eq!((stat("rq_success"), stat("rq_error")), (Some(5), Some(5)));

    for (name, v) in [
        ("cluster.backend.upstream_rq_200", Some(3)),
        ("cluster.backend.upstream_rq_404", Some(2)),
        ("cluster.backend.upstream_rq_503", Some(4)),
        // The timed-out request counts as an upstream 504, as Envoy charges it.
        ("cluster.backend.upstream_rq_504", Some(1)),
        ("cluster.backend.upstream_rq_5xx", Some(5)),
        // Listed once used, as Envoy creates them.
        ("cluster.backend.upstream_rq_201", None),
    ] {
        assert_eq!(m.stat(name).await, v, "{name}");
    }
    let prom = m.admin_get("/stats/prometheus").await.text();
    for line in [
        "envoy_cluster_upstream_rq{envoy_response_code=\"503\",envoy_cluster_name=\"backend\"} 4\n",
        "envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"backend\"} 3\n",
    ] {
        assert!(prom.contains(line), "{line} in\n{prom}");
    }
    assert_eq!(
        prom.matches("# TYPE envoy_cluster_upstream_rq counter")
            .count(),
        1
    );
}

/// The `P<q>(interval,cumulative)` pairs of one `/stats` histogram line.
fn quantile_pairs(line: &str) -> Vec<(String, String, String)> {
    line.split_once(": ")
        .unwrap()
        .1
        .split(' ')
        .map(|p| {
            let (q, rest) = p.split_once('(').unwrap();
            let (i, c) = rest.trim_end_matches(')').split_once(',').unwrap();
            (q.to_string(), i.to_string(), c.to_string())
        })
        .collect()
}

#[tokio::test]
async fn histograms_interpolate_and_report_the_flush_interval() {
    let up = Upstream::start(status_upstream()).await;
    let (admin, port) = (free_port(), free_port());
    let routes =
        "              - match: { prefix: \"/\" }\n                route: { cluster: backend }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(routes),
        &static_cluster("backend", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    for path in ["/s/200", "/sleep/30"] {
        assert_eq!(
            get(&format!("http://127.0.0.1:{port}{path}"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    let filter = "/stats?filter=%5Ecluster%5C.backend%5C.upstream_rq_time%24";
    let line = m.admin_get(filter).await.text();
    let pairs = quantile_pairs(line.trim_end());
    let names: Vec<&str> = pairs.iter().map(|(q, _, _)| q.as_str()).collect();
    assert_eq!(
        names,
        ["P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9", "P100"],
        "{line}"
    );
    // No flush yet (every 5 s): the interval is empty.
    assert!(pairs.iter().all(|(_, i, _)| i == "nan"), "{line}");
    let cum: Vec<f64> = pairs.iter().map(|(_, _, c)| c.parse().unwrap()).collect();
    assert!(cum.windows(2).all(|w| w[0] <= w[1]), "{line}");
    // The slowest request took a little over 30 ms: P100 is it, not its bucket's bound (50).
    assert!((30.0..50.0).contains(&cum[9]), "{line}");
    assert!(cum[0] < 30.0, "{line}");

    let json = m.admin_get("/stats?format=json").await.json();
    let hist = json["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s.get("histograms"))
        .expect("a histograms element");
    assert_eq!(
        hist["supported_quantiles"],
        serde_json::json!([0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0])
    );
    let computed = |json: &serde_json::Value| {
        json["stats"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|s| s.get("histograms"))
            .unwrap()["computed_quantiles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == "cluster.backend.upstream_rq_time")
            .unwrap()["values"]
            .clone()
    };
    let values = computed(&json);
    assert_eq!(values.as_array().unwrap().len(), 10);
    assert!(values[0]["interval"].is_null(), "{values}");
    // serde_json's float parsing may be one ulp off the text's (no `float_roundtrip`).
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(
        close(values[9]["cumulative"].as_f64().unwrap(), cum[9]),
        "{values}"
    );

    // After the next flush the interval holds both requests.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    loop {
        let values = computed(&m.admin_get("/stats?format=json").await.json());
        if let Some(p100) = values[9]["interval"].as_f64() {
            assert!(close(p100, cum[9]), "{values}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no flush: {values}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let line = m.admin_get(filter).await.text();
    assert!(line.contains(&format!(" P100({0},{0})", cum[9])), "{line}");
}

async fn admin_post(m: &Mecha, path: &str) -> Response {
    send(
        &client(),
        http::Request::post(format!("http://{}{path}", m.admin))
            .body(Default::default())
            .unwrap(),
    )
    .await
    .unwrap()
}

/// Whether a new TCP connection to `port` is refused, within 2 s.
async fn refuses_connections(port: u16) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn admin_actions_healthcheck_reset_logging_drain_quit() {
    let up = Upstream::echo("a").await;
    let (admin, port) = (free_port(), free_port());
    let routes =
        "              - match: { prefix: \"/\" }\n                route: { cluster: backend }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(routes),
        &static_cluster("backend", &[up.addr], "ROUND_ROBIN", ""),
    );
    let mut m = Mecha::start(&cfg, admin).await;

    // Mutating endpoints need POST, as Envoy.
    for path in [
        "/healthcheck/fail",
        "/quitquitquit",
        "/reset_counters",
        "/drain_listeners",
        "/logging",
    ] {
        let r = m.admin_get(path).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (405, "Method GET not allowed, POST required.\n"),
            "{path}"
        );
    }
    assert_eq!(m.stat("server.live").await, Some(1));
    assert_eq!(m.stat("server.state").await, Some(0));
    assert_eq!(m.stat("server.concurrency").await, Some(2));
    assert!(m.stat("server.uptime").await.is_some());

    assert_eq!(admin_post(&m, "/healthcheck/fail").await.status, 200);
    let r = m.admin_get("/ready").await;
    assert_eq!((r.status, r.text().as_str()), (503, "DRAINING\n"));
    assert_eq!(
        m.admin_get("/server_info").await.json()["state"],
        "DRAINING"
    );
    assert_eq!(m.stat("server.live").await, Some(0));
    assert_eq!(m.stat("server.state").await, Some(1));
    assert_eq!(admin_post(&m, "/healthcheck/ok").await.status, 200);
    let r = m.admin_get("/ready").await;
    assert_eq!((r.status, r.text().as_str()), (200, "LIVE\n"));
    assert_eq!(m.stat("server.live").await, Some(1));

    // Traffic on a keep-alive connection, then counters zeroed while gauges keep their values.
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    for _ in 0..2 {
        let r = send(
            &c,
            http::Request::get(&url).body(Default::default()).unwrap(),
        )
        .await;
        assert_eq!(r.unwrap().status, 200);
    }
    assert_eq!(m.stat("cluster.backend.upstream_rq_total").await, Some(2));
    assert!(m.stat("server.total_connections").await >= Some(1));
    assert_eq!(admin_post(&m, "/reset_counters").await.text(), "OK\n");
    assert_eq!(m.stat("cluster.backend.upstream_rq_total").await, Some(0));
    assert_eq!(m.stat("cluster.backend.upstream_rq_200").await, Some(0));
    assert_eq!(m.stat("cluster.backend.membership_total").await, Some(1));

    let r = admin_post(&m, "/logging").await;
    assert!(
        r.text().starts_with("active loggers:\n  mecha: info"),
        "{}",
        r.text()
    );
    let r = admin_post(&m, "/logging?level=debug").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("mecha: debug"), "{}", r.text());
    assert_eq!(admin_post(&m, "/logging?level=loud").await.status, 400);
    assert!(admin_post(&m, "/logging")
        .await
        .text()
        .contains("mecha: debug"));

    assert_eq!(
        admin_post(&m, "/drain_listeners?inboundonly").await.status,
        400
    );
    assert_eq!(admin_post(&m, "/drain_listeners").await.text(), "OK\n");
    assert!(
        refuses_connections(port).await,
        "the listener still accepts"
    );
    // Without `graceful`, connections already accepted carry on.
    let r = send(
        &c,
        http::Request::get(&url).body(Default::default()).unwrap(),
    )
    .await;
    assert_eq!(r.unwrap().status, 200);
    assert_eq!(m.admin_get("/ready").await.status, 200);

    let r = admin_post(&m, "/quitquitquit").await;
    assert_eq!((r.status, r.text().as_str()), (200, "OK\n"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn graceful_drain_listeners_reports_draining() {
    let up = Upstream::echo("a").await;
    let (admin, port) = (free_port(), free_port());
    let routes =
        "              - match: { prefix: \"/\" }\n                route: { cluster: backend }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(routes),
        &static_cluster("backend", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    assert_eq!(
        admin_post(&m, "/drain_listeners?graceful").await.status,
        200
    );
    assert!(
        refuses_connections(port).await,
        "the listener still accepts"
    );
    let r = m.admin_get("/ready").await;
    assert_eq!((r.status, r.text().as_str()), (503, "DRAINING\n"));
    assert_eq!(m.stat("server.live").await, Some(0));
}

fn has_null(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(m) => m.values().any(has_null),
        serde_json::Value::Array(a) => a.iter().any(has_null),
        _ => false,
    }
}

#[tokio::test]
async fn config_dump_static_resources_validate_again() {
    let up = Upstream::echo("a").await;
    let (admin, port, tcp_port) = (free_port(), free_port(), free_port());
    let routes = "              - match: { prefix: \"/\" }\n                route: { cluster: backend, timeout: 0.25s }\n";
    let mut cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(routes),
        &static_cluster("backend", &[up.addr], "ROUND_ROBIN", ""),
    );
    // A second listener with a TCP proxy, inserted before `clusters:`.
    let tcp = format!(
        "  - name: tcp\n    address:\n      socket_address: {{ address: 127.0.0.1, port_value: {tcp_port} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: tcp_stats\n          cluster: backend\n  clusters:\n"
    );
    cfg = cfg.replacen("  clusters:\n", &tcp, 1);
    let m = Mecha::start(&cfg, admin).await;
    let dump = m.admin_get("/config_dump").await.json();
    assert!(!has_null(&dump), "nulls in the dump");
    let sr = dump["configs"][0]["bootstrap"]["static_resources"].clone();
    let l = &sr["listeners"][0];
    assert!(l.get("capture").is_none(), "{l}");
    assert_eq!(l["bind_to_port"], true, "capture fields at Envoy's place");
    let f = &l["filter_chains"][0]["filters"][0];
    assert!(f.get("config").is_none(), "{f}");
    assert_eq!(
        f["typed_config"]["@type"],
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    assert_eq!(f["typed_config"]["stat_prefix"], "ingress_http");
    assert_eq!(
        sr["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]["@type"],
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    );

    // Round trip: the dumped static_resources are a bootstrap `mecha validate` accepts.
    let path = m.config_path.with_file_name("dumped.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({ "static_resources": sr })).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(mecha_bin())
        .args(["validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
