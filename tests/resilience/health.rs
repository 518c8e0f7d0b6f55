//! Active health checks: HTTP transitions by thresholds, TCP connect, gRPC health protocol.

use crate::*;
use std::sync::atomic::AtomicU16;

/// An upstream whose `/healthz` answers the status in `health`, everything else 200 `<name>`.
async fn with_health(name: &'static str, health: Arc<AtomicU16>) -> Upstream {
    Upstream::start(Arc::new(
        move |req: http::Request<hyper::body::Incoming>| {
            let health = health.clone();
            Box::pin(async move {
                let status = if req.uri().path() == "/healthz" {
                    health.load(Ordering::SeqCst)
                } else {
                    200
                };
                http::Response::builder()
                    .status(status)
                    .header("x-upstream-name", name)
                    .body(Full::new(Bytes::from(name)))
                    .unwrap()
            })
        },
    ))
    .await
}

async fn flags(m: &Mecha, cluster: &str, addr: SocketAddr) -> String {
    let text = m.admin_get("/clusters").await.text();
    let key = format!("{cluster}::{addr}::health_flags::");
    text.lines()
        .find_map(|l| l.strip_prefix(&key).map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test]
async fn http_health_check_transitions_follow_thresholds() {
    let (ha, hb) = (Arc::new(AtomicU16::new(200)), Arc::new(AtomicU16::new(200)));
    let a = with_health("a", ha.clone()).await;
    let b = with_health("b", hb.clone()).await;
    let dead = refused_addr();
    let (admin, port) = (free_port(), free_port());
    let hc = "    health_checks:\n    - timeout: 0.5s\n      interval: 0.1s\n      no_traffic_interval: 0.1s\n      unhealthy_threshold: 3\n      healthy_threshold: 2\n      http_health_check: { path: /healthz }\n    common_lb_config: { healthy_panic_threshold: { value: 0 } }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes(
            "",
            "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        ),
        &static_cluster("c", &[a.addr, b.addr, dead], "ROUND_ROBIN", hc),
    );
    let m = Mecha::start(&cfg, admin).await;
    assert!(
        eventually(5, || async {
            flags(&m, "c", a.addr).await == "healthy" && flags(&m, "c", b.addr).await == "healthy"
        })
        .await
    );
    assert_eq!(
        flags(&m, "c", dead).await,
        "/failed_active_hc",
        "new hosts start unhealthy"
    );
    for _ in 0..6 {
        let r = request(port, "GET", "/", &[], vec![]).await;
        assert_eq!(r.status, 200, "the refused host gets no traffic");
    }
    // An unexpected status is an active failure: unhealthy at once, whatever the threshold.
    ha.store(503, Ordering::SeqCst);
    assert!(
        eventually(5, || async {
            flags(&m, "c", a.addr).await == "/failed_active_hc"
        })
        .await
    );
    for _ in 0..6 {
        let r = request(port, "GET", "/", &[], vec![]).await;
        assert_eq!(r.header("x-upstream-name"), Some("b"));
    }
    assert_eq!(m.stat("cluster.c.membership_healthy").await, Some(1));
    assert_eq!(m.stat("cluster.c.health_check.healthy").await, Some(1));
    // Back to 200: healthy only after healthy_threshold (2) consecutive passes.
    let attempts_before = m.stat("cluster.c.health_check.attempt").await.unwrap();
    ha.store(200, Ordering::SeqCst);
    assert!(eventually(5, || async { flags(&m, "c", a.addr).await == "healthy" }).await);
    let rounds = (m.stat("cluster.c.health_check.attempt").await.unwrap() - attempts_before) / 3;
    assert!(rounds >= 2, "healthy after {rounds} round(s)");
    assert!(m.stat("cluster.c.health_check.network_failure").await >= Some(3));
    assert!(
        m.stat("cluster.c.health_check.failure").await
            > m.stat("cluster.c.health_check.network_failure").await
    );
    assert!(m.stat("cluster.c.health_check.success").await >= Some(4));
    // Network failures need unhealthy_threshold in a row: stop b's listener.
    drop(b);
    assert!(
        eventually(5, || async {
            m.stat("cluster.c.membership_healthy").await == Some(1)
        })
        .await
    );
}

/// A minimal gRPC health server: SERVING for "", NOT_SERVING for anything else.
async fn grpc_health_server(serving: Arc<AtomicU16>) -> Upstream {
    Upstream::start(Arc::new(
        move |req: http::Request<hyper::body::Incoming>| {
            let serving = serving.clone();
            Box::pin(async move {
                assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                let status = serving.load(Ordering::SeqCst) as u8;
                // A full-body response stands in for headers+data+trailers: grpc-status in headers.
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Full::new(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status])))
                    .unwrap()
            })
        },
    ))
    .await
}

#[tokio::test]
async fn tcp_and_grpc_health_checks() {
    let tcp_up = Upstream::echo("t").await;
    let serving = Arc::new(AtomicU16::new(1));
    let grpc_up = grpc_health_server(serving.clone()).await;
    let dead = refused_addr();
    let (admin, port) = (free_port(), free_port());
    let tcp_hc = "    health_checks:\n    - { timeout: 0.5s, interval: 0.1s, no_traffic_interval: 0.1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {} }\n";
    let grpc_hc = "    http2_protocol_options: {}\n    health_checks:\n    - { timeout: 0.5s, interval: 0.1s, no_traffic_interval: 0.1s, unhealthy_threshold: 1, healthy_threshold: 1, grpc_health_check: {} }\n";
    let clusters = [
        static_cluster("tcp", &[tcp_up.addr, dead], "ROUND_ROBIN", tcp_hc),
        static_cluster("grpc", &[grpc_up.addr], "ROUND_ROBIN", grpc_hc),
    ]
    .concat();
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes(
            "",
            "              - match: { prefix: \"/\" }\n                route: { cluster: tcp }\n",
        ),
        &clusters,
    );
    let m = Mecha::start(&cfg, admin).await;
    assert!(
        eventually(5, || async {
            flags(&m, "tcp", tcp_up.addr).await == "healthy"
        })
        .await
    );
    assert!(
        eventually(5, || async {
            flags(&m, "grpc", grpc_up.addr).await == "healthy"
        })
        .await
    );
    assert_eq!(flags(&m, "tcp", dead).await, "/failed_active_hc");
    serving.store(2, Ordering::SeqCst);
    assert!(
        eventually(5, || async {
            flags(&m, "grpc", grpc_up.addr).await == "/failed_active_hc"
        })
        .await
    );
    serving.store(1, Ordering::SeqCst);
    assert!(
        eventually(5, || async {
            flags(&m, "grpc", grpc_up.addr).await == "healthy"
        })
        .await
    );
}

#[tokio::test]
async fn http_health_check_headers_and_unhealthy_interval() {
    // `/healthz` passes only with the configured header and without the removed one.
    let (fail, checks) = (Arc::new(AtomicU16::new(0)), Arc::new(AtomicU16::new(0)));
    let (f, c) = (fail.clone(), checks.clone());
    let up = Upstream::start(Arc::new(
        move |req: http::Request<hyper::body::Incoming>| {
            let (f, c) = (f.clone(), c.clone());
            Box::pin(async move {
                let mut status = 200;
                if req.uri().path() == "/healthz" {
                    c.fetch_add(1, Ordering::SeqCst);
                    let h = req.headers();
                    let ok = h.get("x-hc-token").is_some_and(|v| v == "s3cret")
                        && h.get("user-agent").is_none()
                        && f.load(Ordering::SeqCst) == 0;
                    status = if ok { 200 } else { 503 };
                }
                http::Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(b"ok")))
                    .unwrap()
            })
        },
    ))
    .await;
    let (admin, port) = (free_port(), free_port());
    let hc = "    health_checks:\n    - timeout: 0.5s\n      interval: 0.1s\n      no_traffic_interval: 0.1s\n      unhealthy_interval: 1s\n      unhealthy_threshold: 1\n      healthy_threshold: 1\n      http_health_check:\n        path: /healthz\n        request_headers_to_add: [{ header: { key: x-hc-token, value: s3cret } }]\n        request_headers_to_remove: [user-agent]\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes(
            "",
            "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        ),
        &static_cluster("c", &[up.addr], "ROUND_ROBIN", hc),
    );
    let m = Mecha::start(&cfg, admin).await;
    assert!(eventually(5, || async { flags(&m, "c", up.addr).await == "healthy" }).await);
    // Traffic ends the no-traffic intervals (Envoy: once the cluster has made a connection).
    assert_eq!(request(port, "GET", "/", &[], vec![]).await.status, 200);
    fail.store(1, Ordering::SeqCst);
    assert!(
        eventually(5, || async {
            flags(&m, "c", up.addr).await == "/failed_active_hc"
        })
        .await
    );
    // While unhealthy the host is checked every unhealthy_interval (1 s), not every 0.1 s.
    let before = checks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = checks.load(Ordering::SeqCst) - before;
    assert!((1..=3).contains(&during), "{during} checks in 1.5 s");
}
