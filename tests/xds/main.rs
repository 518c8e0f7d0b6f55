//! xDS integration tests: the real `mecha` binary driven by a scripted control plane (a tonic
//! server on envoy-types' AggregatedDiscoveryService, in `cp.rs`).

#[path = "../common/mod.rs"]
mod common;
mod cp;

use common::*;
use cp::*;
use std::time::{Duration, Instant};

/// Polls `f` until it returns true (generous bound: this is a correctness test, not a timing one).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn upstream_name(port: u16) -> Option<String> {
    let r = get(&format!("http://127.0.0.1:{port}/")).await.ok()?;
    (r.status == 200).then(|| r.header("x-upstream-name").map(str::to_string))?
}

async fn serves(port: u16, name: &str) -> bool {
    upstream_name(port).await.as_deref() == Some(name)
}

/// CDS (an EDS cluster) + EDS + LDS (a listener with RDS) + RDS: traffic flows; EDS changes shift
/// load; an RDS update moves traffic to a new cluster; stats and config_dump follow.
#[tokio::test]
async fn sotw_routes_clusters_endpoints_and_updates() {
    let (a1, a2, b) = (
        Upstream::echo("a1").await,
        Upstream::echo("a2").await,
        Upstream::echo("b").await,
    );
    let cp = ControlPlane::start().await;
    let (admin, port) = (free_port(), free_port());
    cp.set(CLUSTER_TYPE, vec![eds_cluster("a")]);
    cp.set(ENDPOINT_TYPE, vec![cla("a", &[a1.addr])]);
    cp.set(
        LISTENER_TYPE,
        vec![listener("ingress", port, "r1", "ingress_http")],
    );
    cp.set(ROUTE_TYPE, vec![route("r1", "a")]);
    let m = Mecha::start(&bootstrap(admin, cp.addr, "GRPC"), admin).await;
    eventually("traffic via xDS to a1", || serves(port, "a1")).await;
    assert_eq!(m.stat("control_plane.connected_state").await, Some(1));
    assert!(m.stat("listener_manager.lds.update_success").await >= Some(1));
    assert!(m.stat("cluster_manager.cds.update_success").await >= Some(1));
    assert!(m.stat("http.ingress_http.rds.r1.update_success").await >= Some(1));

    // The client subscribed to exactly what the listener and cluster reference, and ACKed.
    let reqs = cp.requests();
    assert!(reqs
        .iter()
        .any(|r| r.type_url == ROUTE_TYPE && r.resource_names == ["r1"]));
    assert!(reqs
        .iter()
        .any(|r| r.type_url == ENDPOINT_TYPE && r.resource_names == ["a"]));
    assert!(reqs.iter().any(|r| r.type_url == LISTENER_TYPE
        && r.version_info == "1"
        && !r.response_nonce.is_empty()));
    assert_eq!(
        reqs[0].node.as_ref().map(|n| n.id.as_str()),
        Some("test-node")
    );

    // EDS: a second endpoint takes a share of the load.
    cp.set(ENDPOINT_TYPE, vec![cla("a", &[a1.addr, a2.addr])]);
    eventually("load shared by a1 and a2", || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            if let Some(n) = upstream_name(port).await {
                seen.insert(n);
            }
        }
        seen.contains("a1") && seen.contains("a2")
    })
    .await;

    // A new cluster plus a route update moves traffic to it.
    cp.set(
        CLUSTER_TYPE,
        vec![eds_cluster("a"), xds_static_cluster("b", &[b.addr])],
    );
    cp.set(ROUTE_TYPE, vec![route("r1", "b")]);
    eventually("traffic moved to b", || serves(port, "b")).await;

    let dump = m.admin_get("/config_dump").await.json();
    let text = dump.to_string();
    assert!(text.contains("dynamic_listeners"), "{text}");
    assert!(text.contains("dynamic_active_clusters"), "{text}");
    assert!(text.contains("dynamic_route_configs"), "{text}");
    assert!(text.contains("last_updated"), "{text}");
}

/// An invalid resource is NACKed whole with an error_detail naming it and the field; the old config
/// keeps serving.
#[tokio::test]
async fn invalid_resource_is_nacked_and_old_config_keeps_serving() {
    let a = Upstream::echo("a").await;
    let cp = ControlPlane::start().await;
    let (admin, port) = (free_port(), free_port());
    cp.set(CLUSTER_TYPE, vec![xds_static_cluster("a", &[a.addr])]);
    cp.set(
        LISTENER_TYPE,
        vec![listener("ingress", port, "r1", "ingress_http")],
    );
    cp.set(ROUTE_TYPE, vec![route("r1", "a")]);
    let m = Mecha::start(&bootstrap(admin, cp.addr, "GRPC"), admin).await;
    eventually("traffic to a", || serves(port, "a")).await;

    // A real Envoy field mecha does not implement: rejected, not ignored.
    let mut bad = xds_static_cluster("c", &[a.addr]);
    bad["dns_jitter"] = serde_json::json!("1s");
    cp.set(CLUSTER_TYPE, vec![xds_static_cluster("a", &[a.addr]), bad]);
    // A broken regex in a route.
    let mut bad_route = route("r1", "a");
    bad_route["virtual_hosts"][0]["routes"][0]["match"] =
        serde_json::json!({"safe_regex": {"regex": "(unclosed"}});
    cp.set(ROUTE_TYPE, vec![bad_route]);
    eventually("both NACKs", || async {
        let reqs = cp.requests();
        let nack = |t: &str| {
            reqs.iter()
                .any(|r| r.type_url == t && r.error_detail.is_some())
        };
        nack(CLUSTER_TYPE) && nack(ROUTE_TYPE)
    })
    .await;
    let reqs = cp.requests();
    let cds = reqs
        .iter()
        .find(|r| r.type_url == CLUSTER_TYPE && r.error_detail.is_some())
        .unwrap();
    let detail = &cds.error_detail.as_ref().unwrap().message;
    assert!(
        detail.contains("Cluster \"c\"") && detail.contains("dns_jitter"),
        "{detail}"
    );
    // A NACK carries the previous accepted version.
    assert_eq!(cds.version_info, "1");
    let rds = reqs
        .iter()
        .find(|r| r.type_url == ROUTE_TYPE && r.error_detail.is_some())
        .unwrap();
    let detail = &rds.error_detail.as_ref().unwrap().message;
    assert!(
        detail.contains("RouteConfiguration \"r1\"") && detail.contains("safe_regex.regex"),
        "{detail}"
    );
    assert!(m.stat("cluster_manager.cds.update_rejected").await >= Some(1));
    assert!(m.stat("http.ingress_http.rds.r1.update_rejected").await >= Some(1));
    for _ in 0..5 {
        assert!(serves(port, "a").await, "old config stopped serving");
    }
}

/// The control plane goes away (traffic keeps flowing on the last good config) and comes back on
/// the same address with new config: mecha reconnects, re-subscribes and resumes.
#[tokio::test]
async fn reconnect_resubscribe_resume() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let cp = ControlPlane::start().await;
    let (admin, port) = (free_port(), free_port());
    cp.set(
        CLUSTER_TYPE,
        vec![
            xds_static_cluster("a", &[a.addr]),
            xds_static_cluster("b", &[b.addr]),
        ],
    );
    cp.set(
        LISTENER_TYPE,
        vec![listener("ingress", port, "r1", "ingress_http")],
    );
    cp.set(ROUTE_TYPE, vec![route("r1", "a")]);
    let m = Mecha::start(&bootstrap(admin, cp.addr, "GRPC"), admin).await;
    eventually("traffic to a", || serves(port, "a")).await;

    cp.stop();
    eventually("disconnected", || async {
        m.stat("control_plane.connected_state").await == Some(0)
    })
    .await;
    for _ in 0..5 {
        assert!(
            serves(port, "a").await,
            "last good config must keep serving"
        );
    }
    let before = cp.requests().len();
    cp.set(ROUTE_TYPE, vec![route("r1", "b")]);
    let cp2 = ControlPlane::start_on(cp.addr, cp.shared.clone()).await;
    eventually("traffic to b after reconnect", || serves(port, "b")).await;
    assert_eq!(m.stat("control_plane.connected_state").await, Some(1));
    // On the new stream the client sent its accepted versions and its RDS subscription again.
    let reqs = cp2.requests();
    let again = &reqs[before..];
    assert!(again.iter().any(|r| r.type_url == LISTENER_TYPE
        && r.version_info == "1"
        && r.response_nonce.is_empty()));
    assert!(again
        .iter()
        .any(|r| r.type_url == ROUTE_TYPE && r.resource_names == ["r1"]));
}

/// Delta xDS: add resources, change them, remove a listener (its port stops accepting).
#[tokio::test]
async fn delta_add_change_remove() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let cp = ControlPlane::start().await;
    let (admin, p1, p2) = (free_port(), free_port(), free_port());
    cp.set(
        CLUSTER_TYPE,
        vec![eds_cluster("a"), xds_static_cluster("b", &[b.addr])],
    );
    cp.set(ENDPOINT_TYPE, vec![cla("a", &[a.addr])]);
    cp.set(
        LISTENER_TYPE,
        vec![
            listener("one", p1, "r1", "one"),
            listener("two", p2, "r2", "two"),
        ],
    );
    cp.set(ROUTE_TYPE, vec![route("r1", "a"), route("r2", "a")]);
    let _m = Mecha::start(&bootstrap(admin, cp.addr, "DELTA_GRPC"), admin).await;
    eventually("listener one", || serves(p1, "a")).await;
    eventually("listener two", || serves(p2, "a")).await;
    let reqs = cp.delta_requests();
    assert!(reqs.iter().any(
        |r| r.type_url == ROUTE_TYPE && r.resource_names_subscribe.contains(&"r1".to_string())
    ));
    assert!(reqs
        .iter()
        .any(|r| !r.response_nonce.is_empty() && r.error_detail.is_none()));

    // Change one route; remove listener two (its route is then unsubscribed).
    cp.set(ROUTE_TYPE, vec![route("r1", "b"), route("r2", "a")]);
    cp.set(LISTENER_TYPE, vec![listener("one", p1, "r1", "one")]);
    eventually("route r1 changed", || serves(p1, "b")).await;
    eventually("listener two removed", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", p2))
            .await
            .is_err()
    })
    .await;
    eventually("r2 unsubscribed", || async {
        cp.delta_requests().iter().any(|r| {
            r.type_url == ROUTE_TYPE && r.resource_names_unsubscribe.contains(&"r2".to_string())
        })
    })
    .await;
}

/// A listener replaced while a slow request is in flight: the request completes on the old
/// listener, new requests are served by the new one.
#[tokio::test]
async fn listener_replace_drains_without_resetting_in_flight() {
    let slow = Upstream::start(std::sync::Arc::new(|_req| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            http::Response::builder()
                .header("x-upstream-name", "slow")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"done",
                )))
                .unwrap()
        })
    }))
    .await;
    let b = Upstream::echo("b").await;
    let cp = ControlPlane::start().await;
    let (admin, port) = (free_port(), free_port());
    cp.set(
        CLUSTER_TYPE,
        vec![
            xds_static_cluster("slow", &[slow.addr]),
            xds_static_cluster("b", &[b.addr]),
        ],
    );
    cp.set(LISTENER_TYPE, vec![listener("ingress", port, "r1", "v1")]);
    cp.set(ROUTE_TYPE, vec![route("r1", "slow"), route("r2", "b")]);
    let m = Mecha::start(&bootstrap(admin, cp.addr, "GRPC"), admin).await;
    eventually("listener up", || async {
        m.stat("listener_manager.lds.update_success").await >= Some(1)
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
    })
    .await;
    let in_flight = tokio::spawn(async move { get(&format!("http://127.0.0.1:{port}/")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Same address, different connection manager (new stat prefix and route config).
    cp.set(LISTENER_TYPE, vec![listener("ingress", port, "r2", "v2")]);
    eventually("new listener serves b", || serves(port, "b")).await;
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request was reset");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "done");
}

/// Continuous load while the control plane pushes 100 route/cluster/endpoint updates: zero failed
/// requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_100_updates_zero_failed_requests() {
    let ups = [
        Upstream::echo("a").await,
        Upstream::echo("b").await,
        Upstream::echo("c").await,
    ];
    let cp = ControlPlane::start().await;
    let (admin, port) = (free_port(), free_port());
    cp.set(
        CLUSTER_TYPE,
        vec![eds_cluster("a"), xds_static_cluster("b", &[ups[1].addr])],
    );
    cp.set(ENDPOINT_TYPE, vec![cla("a", &[ups[0].addr])]);
    cp.set(
        LISTENER_TYPE,
        vec![listener("ingress", port, "r1", "ingress_http")],
    );
    cp.set(ROUTE_TYPE, vec![route("r1", "a")]);
    let m = Mecha::start(&bootstrap(admin, cp.addr, "GRPC"), admin).await;
    eventually("traffic to a", || serves(port, "a")).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = vec![];
    for _ in 0..4 {
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u64, vec![]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = http::Request::get(format!("http://127.0.0.1:{port}/"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match send(&c, req).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    for i in 0..100u32 {
        match i % 4 {
            0 => cp.set(ROUTE_TYPE, vec![route("r1", "b")]),
            1 => cp.set(ENDPOINT_TYPE, vec![cla("a", &[ups[0].addr, ups[2].addr])]),
            2 => cp.set(ROUTE_TYPE, vec![route("r1", "a")]),
            _ => {
                let extra = format!("extra{i}");
                cp.set(
                    CLUSTER_TYPE,
                    vec![
                        eds_cluster("a"),
                        xds_static_cluster("b", &[ups[1].addr]),
                        xds_static_cluster(&extra, &[ups[2].addr]),
                    ],
                );
                cp.set(ENDPOINT_TYPE, vec![cla("a", &[ups[0].addr])]);
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    eventually("all updates applied", || async {
        m.stat("http.ingress_http.rds.r1.update_success").await >= Some(40)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, vec![]);
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(ok > 100, "too little load: {ok}");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        m.stat("cluster_manager.cds.update_rejected")
            .await
            .unwrap_or(0),
        0
    );
}

/// `/ready` is 503 INITIALIZING until the first CDS and LDS responses are applied and what they
/// brought has warmed (the EDS cluster's endpoints, the listener's route configuration), then 200
/// LIVE — Envoy's init manager.
#[tokio::test]
async fn ready_only_after_initial_lds_cds_and_warming() {
    let a = Upstream::echo("a").await;
    let cp = ControlPlane::start().await;
    let (admin, port) = (free_port(), free_port());
    cp.set(CLUSTER_TYPE, vec![eds_cluster("a")]);
    let m = Mecha::start_unready(&bootstrap(admin, cp.addr, "GRPC"), admin).await;
    let ready = || async {
        let r = m.admin_get("/ready").await;
        (r.status, r.text().trim().to_string())
    };
    let not_ready = (503, "INITIALIZING".to_string());

    // CDS applied, but the EDS cluster is warming and no LDS response came.
    eventually("CDS applied", || async {
        m.stat("cluster_manager.cds.update_success").await >= Some(1)
    })
    .await;
    assert_eq!(ready().await, not_ready);
    let info = m.admin_get("/server_info").await.json();
    assert_eq!(info["state"], "INITIALIZING", "{info}");

    // The cluster warmed; still no listeners.
    cp.set(ENDPOINT_TYPE, vec![cla("a", &[a.addr])]);
    eventually("EDS applied", || async {
        m.stat("cluster.a.update_success").await >= Some(1)
    })
    .await;
    assert_eq!(ready().await, not_ready);

    // LDS applied, but its listener waits for RDS.
    cp.set(
        LISTENER_TYPE,
        vec![listener("ingress", port, "r1", "ingress_http")],
    );
    eventually("LDS applied", || async {
        m.stat("listener_manager.lds.update_success").await >= Some(1)
    })
    .await;
    assert_eq!(ready().await, not_ready);

    // RDS completes initialization: LIVE, and traffic flows.
    cp.set(ROUTE_TYPE, vec![route("r1", "a")]);
    eventually("LIVE", || async { ready().await == (200, "LIVE".into()) }).await;
    assert!(serves(port, "a").await);
    let info = m.admin_get("/server_info").await.json();
    assert_eq!(info["state"], "LIVE", "{info}");
}

/// Continuous load from 32 connections (xds_load's round 0, which saw ~1,600 non-2xx): past the
/// `initial_fetch_timeout` of the RDS and EDS subscriptions (the route table and the endpoints
/// must not be replaced by the empty resources an expired fetch serves), then RDS moves the route
/// to a cluster whose upstream was never connected (one that existed all along, then one CDS adds
/// right before): every request must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_to_cold_cluster_under_load_zero_failed_requests() {
    let ups = [
        Upstream::echo("a").await,
        Upstream::echo("b").await,
        Upstream::echo("c").await,
    ];
    let cp = ControlPlane::start().await;
    let (admin, port) = (free_port(), free_port());
    let fetch_timeout =
        serde_json::json!({"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "1s"});
    let mut a = eds_cluster("a");
    a["eds_cluster_config"]["eds_config"] = fetch_timeout.clone();
    let ab = vec![a, xds_static_cluster("b", &[ups[1].addr])];
    cp.set(CLUSTER_TYPE, ab.clone());
    cp.set(ENDPOINT_TYPE, vec![cla("a", &[ups[0].addr])]);
    let mut l = listener("ingress", port, "r1", "ingress_http");
    l["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["config_source"] = fetch_timeout;
    cp.set(LISTENER_TYPE, vec![l]);
    cp.set(ROUTE_TYPE, vec![route("r1", "a")]);
    let m = Mecha::start(&bootstrap(admin, cp.addr, "GRPC"), admin).await;
    eventually("traffic to a", || serves(port, "a")).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut workers = vec![];
    for _ in 0..32 {
        let (stop, seen) = (stop.clone(), seen.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u64, vec![]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = http::Request::get(format!("http://127.0.0.1:{port}/"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match send(&c, req).await {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        if let Some(n) = r.header("x-upstream-name") {
                            seen.lock().unwrap().insert(n.to_string());
                        }
                    }
                    Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let moved_to = |name: &'static str| {
        let seen = seen.clone();
        move || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().contains(name) }
        }
    };
    // Past the 1 s initial_fetch_timeout of r1 and of a's endpoints.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // An existing cluster no request has used yet (the bench's case).
    cp.set(ROUTE_TYPE, vec![route("r1", "b")]);
    eventually("load moved to b", moved_to("b")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A cluster added by CDS right before the route that uses it (a control plane that pushes
    // CDS and RDS back to back).
    let mut abc = ab.clone();
    abc.push(xds_static_cluster("c", &[ups[2].addr]));
    cp.set(CLUSTER_TYPE, abc);
    cp.set(ROUTE_TYPE, vec![route("r1", "c")]);
    eventually("load moved to c", moved_to("c")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, vec![]);
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    let mut stats = vec![];
    for s in [
        "http.ingress_http.no_route",
        "http.ingress_http.no_cluster",
        "cluster.a.upstream_cx_none_healthy",
        "cluster.b.upstream_cx_overflow",
        "cluster.b.upstream_rq_pending_overflow",
        "cluster.b.upstream_cx_connect_fail",
        "cluster.c.upstream_cx_overflow",
        "cluster.c.upstream_rq_pending_overflow",
        "cluster.c.upstream_cx_connect_fail",
    ] {
        stats.push(format!("{s}={:?}", m.stat(s).await));
    }
    assert!(ok > 100, "too little load: {ok}");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\nstats: {stats:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
}

/// Writes `text` next to `path` and renames it into place (how Envoy expects config files to be
/// replaced: never half-written).
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A DiscoveryResponse file: resources get their `@type`.
fn discovery_file(
    version: &str,
    type_url: &str,
    resources: Vec<serde_json::Value>,
) -> serde_json::Value {
    let resources: Vec<_> = resources
        .into_iter()
        .map(|mut r| {
            r["@type"] = serde_json::json!(type_url);
            r
        })
        .collect();
    serde_json::json!({"version_info": version, "resources": resources})
}

/// A CDS DiscoveryResponse file in block YAML: STATIC clusters (name, upstream).
fn cds_yaml(version: &str, clusters: &[(&str, std::net::SocketAddr)]) -> String {
    let mut out = format!("version_info: {version}\nresources:\n");
    for (name, addr) in clusters {
        out += &format!(
            "- \"@type\": {CLUSTER_TYPE}
  name: {name}
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:
      - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
",
            ip = addr.ip(),
            port = addr.port()
        );
    }
    out
}

/// A listener with an inline route table to `cluster` (no RDS: there is no ADS stream).
fn file_listener(port: u16, cluster: &str) -> serde_json::Value {
    let mut l = listener("ingress", port, "unused", "ingress_http");
    let hcm = &mut l["filter_chains"][0]["filters"][0]["typed_config"];
    hcm.as_object_mut().unwrap().remove("rds");
    hcm["route_config"] = route("local", cluster);
    l
}

/// `lds_config` / `cds_config` with `path_config_source` and no ADS at all: the files are served;
/// a replacement renamed into place is applied; an invalid one (an unknown field, broken YAML)
/// is rejected with `update_rejected` and the previous config keeps serving; a missing file counts
/// `update_failure`; `watched_directory` triggers a reload on a move into the directory.
#[tokio::test]
async fn path_config_source_files_are_watched() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let dir = TempDir::new();
    let (admin, port) = (free_port(), free_port());
    let (cds, lds) = (dir.0.join("cds.yaml"), dir.0.join("lds.json"));
    // CDS as YAML, LDS as JSON: both are accepted.
    replace_file(&cds, &cds_yaml("c1", &[("a", a.addr), ("b", b.addr)]));
    let lds_v = |v: &str, c: &str| discovery_file(v, LISTENER_TYPE, vec![file_listener(port, c)]);
    replace_file(&lds, &lds_v("l1", "a").to_string());
    let config = format!(
        "{admin_yaml}dynamic_resources:
  lds_config: {{ path_config_source: {{ path: {lds} }}, resource_api_version: V3 }}
  cds_config:
    path_config_source: {{ path: {cds}, watched_directory: {{ path: {dir} }} }}
    resource_api_version: V3
",
        admin_yaml = admin_yaml(admin),
        lds = lds.display(),
        cds = cds.display(),
        dir = dir.0.display(),
    );
    let m = Mecha::start(&config, admin).await;
    eventually("served from the files", || serves(port, "a")).await;
    assert_eq!(m.stat("listener_manager.lds.update_success").await, Some(1));
    assert_eq!(m.stat("cluster_manager.cds.update_success").await, Some(1));

    // A replacement moved into place.
    replace_file(&lds, &lds_v("l2", "b").to_string());
    eventually("new listener file applied", || serves(port, "b")).await;
    let dump = m.admin_get("/config_dump").await.json().to_string();
    assert!(dump.contains("\"l2\""), "{dump}");

    // Invalid replacements: rejected, the previous config keeps serving.
    let mut bad = file_listener(port, "a");
    bad["bogus_field"] = serde_json::json!(1);
    replace_file(
        &lds,
        &discovery_file("l3", LISTENER_TYPE, vec![bad]).to_string(),
    );
    eventually("unknown field rejected", || async {
        m.stat("listener_manager.lds.update_rejected").await == Some(1)
    })
    .await;
    replace_file(&lds, "resources: [ {");
    eventually("broken YAML rejected", || async {
        m.stat("listener_manager.lds.update_rejected").await == Some(2)
    })
    .await;
    // A listener routing to a cluster the cluster file does not have.
    replace_file(&lds, &lds_v("l4", "nope").to_string());
    eventually("unknown cluster rejected", || async {
        m.stat("listener_manager.lds.update_rejected").await == Some(3)
    })
    .await;
    for _ in 0..5 {
        assert!(serves(port, "b").await, "previous config stopped serving");
    }

    // The cluster file, through a move into the watched directory: cluster b now points at a's
    // upstream.
    replace_file(&cds, &cds_yaml("c2", &[("a", a.addr), ("b", a.addr)]));
    eventually("new cluster file applied", || serves(port, "a")).await;
    // (Every move into the watched directory re-reads the cluster file, the listener file's too.)
    assert!(m.stat("cluster_manager.cds.update_success").await >= Some(2));

    // Gone: counted as a failure, nothing changes.
    std::fs::remove_file(&cds).unwrap();
    eventually("missing file counted", || async {
        m.stat("cluster_manager.cds.update_failure").await >= Some(1)
    })
    .await;
    assert!(serves(port, "a").await);
}
