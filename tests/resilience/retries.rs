//! Retry policy: conditions, attempt counts, hosts, bodies, request headers and stats.

use crate::*;

const RETRY_5XX: &str = "                route:\n                  cluster: a\n                  retry_policy: { retry_on: \"5xx\", num_retries: 3, retry_back_off: { base_interval: 0.005s } }\n";

#[tokio::test]
async fn fail_twice_then_succeed_counts_attempts_and_stats() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    ctl.script("a", vec![Act::Status(503), Act::Status(500), Act::Ok]);
    let (admin, port) = (free_port(), free_port());
    let vh = "              include_request_attempt_count: true\n              include_attempt_count_in_response: true\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes(
            vh,
            &format!("              - match: {{ prefix: \"/\" }}\n{RETRY_5XX}"),
        ),
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    let r = request(port, "GET", "/x", &[], vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "a body_len=0");
    assert_eq!(r.header("x-envoy-attempt-count"), Some("3"));
    let attempts: Vec<Option<u32>> = ctl.take_log().iter().map(|s| s.attempt).collect();
    assert_eq!(attempts, vec![Some(1), Some(2), Some(3)]);
    assert_eq!(up.hits(), 3);
    assert_eq!(m.stat("cluster.a.upstream_rq_retry").await, Some(2));
    assert_eq!(m.stat("cluster.a.upstream_rq_retry_success").await, Some(1));
    assert_eq!(
        m.stat("cluster.a.upstream_rq_retry_limit_exceeded").await,
        Some(0)
    );
    assert_eq!(
        m.stat("cluster.a.upstream_rq_retry_backoff_exponential")
            .await,
        Some(2)
    );
    assert_eq!(m.stat("cluster.a.upstream_rq_total").await, Some(3));
    assert_eq!(m.stat("cluster.a.upstream_rq_5xx").await, Some(2));
    assert_eq!(m.stat("http.ingress_http.downstream_rq_2xx").await, Some(1));

    // Exhausted: the last upstream response (status and body) reaches the client.
    ctl.set_default("a", Act::Status(503));
    let r = request(port, "GET", "/x", &[], vec![]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "a:503");
    assert_eq!(r.header("x-envoy-attempt-count"), Some("4"));
    assert_eq!(ctl.take_log().len(), 4, "1 try + num_retries 3");
    assert_eq!(m.stat("cluster.a.upstream_rq_retry").await, Some(5));
    assert_eq!(
        m.stat("cluster.a.upstream_rq_retry_limit_exceeded").await,
        Some(1)
    );
    assert_eq!(m.stat("cluster.a.upstream_rq_retry_success").await, Some(1));

    // x-envoy-max-retries from an internal client (one internal XFF address) overrides
    // num_retries and is not forwarded.
    let internal = ("x-forwarded-for", "10.0.0.1");
    let r = request(
        port,
        "GET",
        "/x",
        &[("x-envoy-max-retries", "1"), internal],
        vec![],
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(ctl.take_log().len(), 2);
    // From an external client (no XFF, or an external address) Envoy strips it: num_retries
    // (3) applies.
    for xff in [None, Some("203.0.113.7"), Some("10.0.0.1, 10.0.0.2")] {
        let mut h = vec![("x-envoy-max-retries", "1")];
        h.extend(xff.map(|x| ("x-forwarded-for", x)));
        let r = request(port, "GET", "/x", &h, vec![]).await;
        assert_eq!(r.status, 503);
        assert_eq!(ctl.take_log().len(), 4, "xff {xff:?}");
    }
}

#[tokio::test]
async fn previous_hosts_predicate_never_repeats_a_host() {
    let ctl = Ctl::new();
    let (a, b, c) = (
        scripted("a", &ctl).await,
        scripted("b", &ctl).await,
        scripted("c", &ctl).await,
    );
    ctl.set_default("a", Act::Status(503));
    ctl.set_default("b", Act::Status(503));
    let (admin, port) = (free_port(), free_port());
    let route = "              - match: { prefix: \"/\" }\n                route:\n                  cluster: abc\n                  retry_policy:\n                    retry_on: gateway-error\n                    num_retries: 2\n                    retry_back_off: { base_interval: 0.001s }\n                    host_selection_retry_max_attempts: 200\n                    retry_host_predicate:\n                    - name: envoy.retry_host_predicates.previous_hosts\n                      typed_config:\n                        \"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes("", route),
        &static_cluster("abc", &[a.addr, b.addr, c.addr], "RANDOM", ""),
    );
    let _m = Mecha::start(&cfg, admin).await;
    for _ in 0..15 {
        let r = request(port, "GET", "/", &[], vec![]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-upstream-name"), Some("c"));
        let hosts: Vec<String> = ctl.take_log().into_iter().map(|s| s.upstream).collect();
        let mut dedup = hosts.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(
            dedup.len(),
            hosts.len(),
            "a host was retried twice: {hosts:?}"
        );
        assert_eq!(hosts.last().map(String::as_str), Some("c"), "{hosts:?}");
    }
}

#[tokio::test]
async fn reset_and_connect_failure_conditions() {
    let ctl = Ctl::new();
    let ok = scripted("ok", &ctl).await;
    let (reset_addr, reset_hits, _t) = resetting().await;
    let refused = refused_addr();
    let (admin, port) = (free_port(), free_port());
    let r = |prefix: &str, cluster: &str, on: &str| {
        format!("              - match: {{ prefix: \"{prefix}\" }}\n                route:\n                  cluster: {cluster}\n                  retry_policy: {{ retry_on: \"{on}\", num_retries: 1, retry_back_off: {{ base_interval: 0.001s }} }}\n")
    };
    let route_cfg = routes(
        "",
        &[
            r("/cf", "refused_ok", "connect-failure"),
            r("/reset", "reset_ok", "reset"),
            r("/noretry", "reset_only", "retriable-4xx,connect-failure"),
        ]
        .concat(),
    );
    let clusters = [
        static_cluster("refused_ok", &[refused, ok.addr], "ROUND_ROBIN", ""),
        static_cluster("reset_ok", &[reset_addr, ok.addr], "ROUND_ROBIN", ""),
        static_cluster("reset_only", &[reset_addr], "ROUND_ROBIN", ""),
    ]
    .concat();
    let m = Mecha::start(
        &http_bootstrap(admin, port, "", &route_cfg, &clusters),
        admin,
    )
    .await;
    for _ in 0..4 {
        let r = request(port, "GET", "/cf", &[], vec![]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(m.stat("cluster.refused_ok.upstream_cx_connect_fail").await >= Some(2));
    assert!(m.stat("cluster.refused_ok.upstream_rq_retry").await >= Some(2));
    for _ in 0..4 {
        let r = request(port, "GET", "/reset", &[], vec![]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(reset_hits.load(Ordering::SeqCst) >= 2);
    let before = reset_hits.load(Ordering::SeqCst);
    let r = request(port, "GET", "/noretry", &[], vec![]).await;
    assert_eq!(r.status, 503);
    assert!(
        r.text()
            .starts_with("upstream connect error or disconnect/reset before headers."),
        "{}",
        r.text()
    );
    assert_eq!(
        reset_hits.load(Ordering::SeqCst),
        before + 1,
        "a reset is not a connect failure"
    );
    assert_eq!(
        m.stat("cluster.reset_only.upstream_rq_retry").await,
        Some(0)
    );
}

#[tokio::test]
async fn status_code_header_and_grpc_conditions() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    let (admin, port) = (free_port(), free_port());
    let route = "              - match: { prefix: \"/codes\" }\n                route:\n                  cluster: a\n                  retry_policy:\n                    retry_on: retriable-status-codes,retriable-headers\n                    retriable_status_codes: [418]\n                    retriable_headers: [{ name: x-retry-me, exact_match: \"yes\" }]\n                    num_retries: 2\n                    retry_back_off: { base_interval: 0.001s }\n              - match: { prefix: \"/grpc\" }\n                route:\n                  cluster: a\n                  retry_policy: { retry_on: \"unavailable,resource-exhausted\", num_retries: 2, retry_back_off: { base_interval: 0.001s } }\n              - match: { prefix: \"/plain\" }\n                route: { cluster: a }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes("", route),
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;

    ctl.script(
        "a",
        vec![
            Act::Status(418),
            Act::Headers(vec![("x-retry-me", "yes")]),
            Act::Ok,
        ],
    );
    let r = request(port, "GET", "/codes", &[], vec![]).await;
    assert_eq!((r.status, r.text()), (200, "a body_len=0".to_string()));
    assert_eq!(ctl.take_log().len(), 3);

    // A status not in the list is not retried.
    ctl.script("a", vec![Act::Status(500)]);
    let r = request(port, "GET", "/codes", &[], vec![]).await;
    assert_eq!(r.status, 500);
    assert_eq!(ctl.take_log().len(), 1);

    // gRPC: grpc-status 14 and 8 are retried, 3 (INVALID_ARGUMENT) is not.
    ctl.script("a", vec![Act::Grpc(14), Act::Grpc(8), Act::Grpc(0)]);
    let grpc = [("content-type", "application/grpc")];
    let r = request(port, "POST", "/grpc", &grpc, vec![0, 0, 0, 0, 0]).await;
    assert_eq!(r.header("grpc-status"), Some("0"));
    assert_eq!(ctl.take_log().len(), 3);
    ctl.script("a", vec![Act::Grpc(3)]);
    let r = request(port, "POST", "/grpc", &grpc, vec![0, 0, 0, 0, 0]).await;
    assert_eq!(r.header("grpc-status"), Some("3"));
    assert_eq!(ctl.take_log().len(), 1);

    // Request headers turn retries on for a route without a policy and are not forwarded.
    ctl.script("a", vec![Act::Status(418), Act::Ok]);
    let h = [
        ("x-envoy-retry-on", "retriable-status-codes"),
        ("x-envoy-retriable-status-codes", "418"),
        ("x-forwarded-for", "192.168.1.2"),
    ];
    let r = request(port, "GET", "/plain", &h, vec![]).await;
    assert_eq!(r.status, 200);
    assert_eq!(ctl.take_log().len(), 2);
    ctl.script("a", vec![Act::Grpc(14), Act::Grpc(0)]);
    let h = [
        ("x-envoy-retry-grpc-on", "unavailable"),
        ("content-type", "application/grpc"),
        ("x-forwarded-for", "127.0.0.1"),
    ];
    let r = request(port, "POST", "/plain", &h, vec![0, 0, 0, 0, 0]).await;
    assert_eq!(r.header("grpc-status"), Some("0"));
    assert_eq!(ctl.take_log().len(), 2);
    assert_eq!(m.stat("cluster.a.upstream_rq_retry").await, Some(6));
}

#[tokio::test]
async fn request_body_is_replayed_and_over_limit_is_not_retried() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    let (admin, port) = (free_port(), free_port());
    let route = format!(
        "              - match: {{ prefix: \"/small\" }}\n                per_request_buffer_limit_bytes: 100\n{RETRY_5XX}              - match: {{ prefix: \"/\" }}\n{RETRY_5XX}"
    );
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes(
            "              include_request_attempt_count: true\n",
            &route,
        ),
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
    );
    let _m = Mecha::start(&cfg, admin).await;
    let body: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    ctl.script("a", vec![Act::Status(503), Act::Status(503), Act::Ok]);
    let r = request(port, "POST", "/big", &[], body.clone()).await;
    assert_eq!((r.status, r.text()), (200, "a body_len=70000".to_string()));
    let lens: Vec<usize> = ctl.take_log().iter().map(|s| s.body_len).collect();
    assert_eq!(
        lens,
        vec![70_000, 70_000, 70_000],
        "every attempt got the whole body"
    );

    // A chunked upload (no length: it takes hyper's upstream path rather than our codec) is
    // replayed with the same headers on every attempt.
    ctl.script("a", vec![Act::Status(503), Act::Status(503), Act::Ok]);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let chunked = "POST /chunked HTTP/1.1\r\nhost: x\r\nx-keep: 1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut s, chunked.as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut raw)
        .await
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("a body_len=11"), "{raw}");
    let log = ctl.take_log();
    let lens: Vec<usize> = log.iter().map(|s| s.body_len).collect();
    assert_eq!(
        lens,
        vec![11, 11, 11],
        "every chunked attempt got the whole body"
    );
    let attempts: Vec<Option<u32>> = log.iter().map(|s| s.attempt).collect();
    assert_eq!(
        attempts,
        vec![Some(1), Some(2), Some(3)],
        "and the request's headers"
    );

    ctl.script("a", vec![Act::Status(503), Act::Ok]);
    let r = request(port, "POST", "/small", &[], vec![7u8; 1000]).await;
    assert_eq!(
        r.status, 503,
        "over per_request_buffer_limit_bytes: not retried"
    );
    assert_eq!(ctl.take_log().len(), 1);
    ctl.take_log();
}
