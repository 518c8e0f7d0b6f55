//! Route timeout, per-try timeout and their header overrides; timed-out streams are cancelled.

use crate::*;

#[tokio::test]
async fn route_timeout_answers_504_and_cancels_the_upstream() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    ctl.set_default("a", Act::Hang);
    let (admin, port) = (free_port(), free_port());
    let route = "              - match: { prefix: \"/t\" }\n                route: { cluster: a, timeout: 0.3s }\n              - match: { prefix: \"/off\" }\n                route: { cluster: a, timeout: 0s }\n              - match: { prefix: \"/grpc\" }\n                route: { cluster: a, timeout: 0s, max_stream_duration: { grpc_timeout_header_max: 0s } }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes("", route),
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    let t0 = std::time::Instant::now();
    let r = request(port, "GET", "/t", &[], vec![]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        eventually(5, || async { ctl.cancelled.load(Ordering::SeqCst) == 1 }).await,
        "the upstream request was not cancelled"
    );
    assert_eq!(m.stat("cluster.a.upstream_rq_timeout").await, Some(1));

    // x-envoy-upstream-rq-timeout-ms sets a timeout on a route that has none.
    let r = request(
        port,
        "GET",
        "/off",
        &[("x-envoy-upstream-rq-timeout-ms", "200")],
        vec![],
    )
    .await;
    assert_eq!(r.status, 504);
    assert!(eventually(5, || async { ctl.cancelled.load(Ordering::SeqCst) == 2 }).await);

    // gRPC: grpc-timeout is honoured (grpc_timeout_header_max 0 = uncapped); the reply is gRPC.
    let h = [
        ("content-type", "application/grpc"),
        ("grpc-timeout", "200m"),
    ];
    let r = request(port, "POST", "/grpc", &h, vec![0, 0, 0, 0, 0]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("4"));
    assert_eq!(r.header("grpc-message"), Some("upstream request timeout"));
    assert!(eventually(5, || async { ctl.cancelled.load(Ordering::SeqCst) == 3 }).await);
    assert_eq!(m.stat("cluster.a.upstream_rq_timeout").await, Some(3));
    assert_eq!(ctl.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn per_try_timeout_is_retried_on_another_attempt() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    let (admin, port) = (free_port(), free_port());
    let route = "              - match: { prefix: \"/\" }\n                route:\n                  cluster: a\n                  timeout: 5s\n                  retry_policy: { retry_on: \"5xx\", num_retries: 2, per_try_timeout: 0.2s, retry_back_off: { base_interval: 0.001s } }\n";
    let vh = "              include_request_attempt_count: true\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes(vh, route),
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    ctl.script(
        "a",
        vec![Act::Hang, Act::Slow(Duration::from_secs(3)), Act::Ok],
    );
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let attempts: Vec<Option<u32>> = ctl.take_log().iter().map(|s| s.attempt).collect();
    assert_eq!(attempts, vec![Some(1), Some(2), Some(3)]);
    assert!(eventually(5, || async { ctl.cancelled.load(Ordering::SeqCst) == 2 }).await);
    assert_eq!(
        m.stat("cluster.a.upstream_rq_per_try_timeout").await,
        Some(2)
    );
    assert_eq!(m.stat("cluster.a.upstream_rq_retry").await, Some(2));
    assert_eq!(m.stat("cluster.a.upstream_rq_timeout").await, Some(0));

    // Every try times out: 504 after 1 + 2 attempts.
    ctl.set_default("a", Act::Hang);
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert_eq!(ctl.take_log().len(), 3);
    assert_eq!(
        m.stat("cluster.a.upstream_rq_per_try_timeout").await,
        Some(5)
    );
}
