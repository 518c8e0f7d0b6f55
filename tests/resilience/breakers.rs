//! Circuit breakers (exact overflow under concurrency, gauges) and outlier ejection.

use crate::*;

/// mecha with one listener whose routes are `route_lines` (under a `*` virtual host) in front of
/// `cluster` (a cluster's YAML).
async fn start(route_lines: &str, cluster: &str) -> (Mecha, u16) {
    let (admin, port) = (free_port(), free_port());
    let cfg = http_bootstrap(admin, port, "", &routes("", route_lines), cluster);
    (Mecha::start(&cfg, admin).await, port)
}

#[tokio::test]
async fn max_requests_overflows_at_exactly_the_threshold() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    ctl.set_default("a", Act::Gate);
    let cb = "    circuit_breakers:\n      thresholds:\n      - { priority: DEFAULT, max_requests: 5, track_remaining: true }\n";
    let (m, port) = start(
        "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", cb),
    )
    .await;
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.remaining_rq")
            .await,
        Some(5)
    );
    let tasks: Vec<_> = (0..12)
        .map(|_| tokio::spawn(async move { request(port, "GET", "/", &[], vec![]).await }))
        .collect();
    // Admitted requests wait at the gate; the rest must come back overloaded meanwhile.
    assert!(eventually(10, || async { ctl.in_flight.load(Ordering::SeqCst) == 5 }).await);
    assert!(
        eventually(10, || async {
            m.stat("cluster.a.upstream_rq_pending_overflow").await == Some(7)
        })
        .await
    );
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.rq_open").await,
        Some(1)
    );
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.remaining_rq")
            .await,
        Some(0)
    );
    ctl.open_gate();
    let mut statuses = vec![];
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 503 {
            assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
            assert!(r.text().contains("overflow"), "{}", r.text());
        }
        statuses.push(r.status);
    }
    statuses.sort();
    assert_eq!(statuses, [vec![200; 5], vec![503; 7]].concat());
    assert_eq!(up.hits(), 5);
    assert!(
        eventually(5, || async {
            m.stat("cluster.a.circuit_breakers.default.rq_open").await == Some(0)
                && m.stat("cluster.a.circuit_breakers.default.remaining_rq")
                    .await
                    == Some(5)
        })
        .await
    );
}

#[tokio::test]
async fn max_retries_overflow_returns_the_upstream_response() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    let cb = "    circuit_breakers:\n      thresholds:\n      - { max_retries: 1 }\n";
    let route = "              - match: { prefix: \"/\" }\n                route:\n                  cluster: a\n                  retry_policy: { retry_on: \"5xx\", num_retries: 1, retry_back_off: { base_interval: 0.001s } }\n";
    let (m, port) = start(route, &static_cluster("a", &[up.addr], "ROUND_ROBIN", cb)).await;
    // The first attempts fail; the one admitted retry waits at the gate while holding the slot.
    ctl.script("a", vec![Act::Status(503), Act::Gate]);
    let first = tokio::spawn(async move { request(port, "GET", "/", &[], vec![]).await });
    assert!(
        eventually(10, || async {
            ctl.in_flight.load(Ordering::SeqCst) == 1 && ctl.log.lock().unwrap().len() == 2
        })
        .await
    );
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.rq_retry_open")
            .await,
        Some(1)
    );
    ctl.script("a", vec![Act::Status(503), Act::Status(503)]);
    for _ in 0..2 {
        let r = request(port, "GET", "/", &[], vec![]).await;
        assert_eq!((r.status, r.text()), (503, "a:503".to_string()));
    }
    assert_eq!(
        m.stat("cluster.a.upstream_rq_retry_overflow").await,
        Some(2)
    );
    ctl.open_gate();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(m.stat("cluster.a.upstream_rq_retry").await, Some(1));
    assert_eq!(up.hits(), 4);
    assert!(
        eventually(5, || async {
            m.stat("cluster.a.circuit_breakers.default.rq_retry_open")
                .await
                == Some(0)
        })
        .await
    );
}

#[tokio::test]
async fn consecutive_5xx_ejects_and_the_host_returns() {
    let ctl = Ctl::new();
    let (bad, good) = (scripted("bad", &ctl).await, scripted("good", &ctl).await);
    ctl.set_default("bad", Act::Status(503));
    let od = "    outlier_detection:\n      consecutive_5xx: 3\n      interval: 0.1s\n      base_ejection_time: 0.6s\n      max_ejection_percent: 50\n";
    let (m, port) = start(
        "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        &static_cluster("c", &[bad.addr, good.addr], "ROUND_ROBIN", od),
    )
    .await;
    for _ in 0..6 {
        request(port, "GET", "/", &[], vec![]).await;
    }
    assert_eq!(bad.hits(), 3);
    let p = "cluster.c.outlier_detection.";
    assert_eq!(m.stat(&format!("{p}ejections_active")).await, Some(1));
    assert_eq!(
        m.stat(&format!("{p}ejections_enforced_total")).await,
        Some(1)
    );
    assert_eq!(
        m.stat(&format!("{p}ejections_enforced_consecutive_5xx"))
            .await,
        Some(1)
    );
    assert_eq!(
        m.stat(&format!("{p}ejections_detected_consecutive_5xx"))
            .await,
        Some(1)
    );
    assert_eq!(m.stat("cluster.c.membership_healthy").await, Some(1));
    let clusters = m.admin_get("/clusters").await.text();
    assert!(
        clusters.contains(&format!(
            "c::{}::health_flags::/failed_outlier_check",
            bad.addr
        )),
        "{clusters}"
    );
    for _ in 0..10 {
        let r = request(port, "GET", "/", &[], vec![]).await;
        assert_eq!(r.header("x-upstream-name"), Some("good"));
    }
    assert_eq!(bad.hits(), 3, "an ejected host gets no traffic");
    // base_ejection_time × 1 later (plus an interval), the host is back.
    assert!(
        eventually(5, || async {
            m.stat("cluster.c.outlier_detection.ejections_active").await == Some(0)
        })
        .await
    );
    ctl.set_default("bad", Act::Ok);
    for _ in 0..4 {
        assert_eq!(request(port, "GET", "/", &[], vec![]).await.status, 200);
    }
    assert!(bad.hits() >= 4, "the host came back");
    assert_eq!(m.stat("cluster.c.membership_healthy").await, Some(2));
}

#[tokio::test]
async fn max_connections_queue_pending_requests_and_overflow_past_max_pending() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    ctl.set_default("a", Act::Gate);
    let cb = "    circuit_breakers:\n      thresholds:\n      - { priority: DEFAULT, max_connections: 2, max_pending_requests: 3 }\n";
    let (m, port) = start(
        "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", cb)
            .replace("connect_timeout: 1s", "connect_timeout: 5s"),
    )
    .await;
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { request(port, "GET", "/", &[], vec![]).await }))
        .collect();
    // Two connections carry two requests; three requests wait for a connection; five overflow.
    assert!(eventually(10, || async { ctl.in_flight.load(Ordering::SeqCst) == 2 }).await);
    assert!(
        eventually(10, || async {
            m.stat("cluster.a.upstream_rq_pending_overflow").await == Some(5)
        })
        .await
    );
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.cx_open").await,
        Some(1)
    );
    assert!(m.stat("cluster.a.upstream_cx_overflow").await.unwrap() >= 8);
    ctl.open_gate();
    let mut statuses = vec![];
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 503 {
            assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
        }
        statuses.push(r.status);
    }
    statuses.sort();
    assert_eq!(statuses, [vec![200; 5], vec![503; 5]].concat());
    // The pending requests reused the two connections: the limit held.
    assert_eq!(m.stat("cluster.a.upstream_cx_total").await, Some(2));
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn a_request_never_competes_with_its_own_previous_retry_for_max_retries() {
    // Envoy gives back a retry's slot once that retry's outcome is known, before admitting the
    // next one (RetryStateImpl::shouldRetry → resetRetry → canCreate). With max_retries: 1 a
    // single request can therefore still use all of its num_retries, one at a time.
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    let cb = "    circuit_breakers:\n      thresholds:\n      - { max_retries: 1 }\n";
    let route = "              - match: { prefix: \"/\" }\n                route:\n                  cluster: a\n                  retry_policy: { retry_on: \"5xx\", num_retries: 3, retry_back_off: { base_interval: 0.001s } }\n";
    let (m, port) = start(route, &static_cluster("a", &[up.addr], "ROUND_ROBIN", cb)).await;
    ctl.script(
        "a",
        vec![
            Act::Status(503),
            Act::Status(503),
            Act::Status(503),
            Act::Ok,
        ],
    );
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits(), 4);
    assert_eq!(m.stat("cluster.a.upstream_rq_retry").await, Some(3));
    assert_eq!(
        m.stat("cluster.a.upstream_rq_retry_overflow").await,
        Some(0)
    );
    assert_eq!(m.stat("cluster.a.upstream_rq_retry_success").await, Some(1));
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.rq_retry_open")
            .await,
        Some(0)
    );
}

#[tokio::test]
async fn tcp_proxy_connections_count_against_max_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo upstream that counts the connections it accepted.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (admin, port) = (free_port(), free_port());
    let cb = "    circuit_breakers:\n      thresholds:\n      - { max_connections: 1 }\n";
    let cfg = format!(
        r#"{admin_yaml}
static_resources:
  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp_stats
          cluster: echo
  clusters:
{cluster}
"#,
        admin_yaml = admin_yaml(admin),
        cluster = static_cluster("echo", &[addr], "ROUND_ROBIN", cb),
    );
    let m = Mecha::start(&cfg, admin).await;
    let connect = || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap()
    };
    let echo = |mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            s.write_all(b"ping").await?;
            s.read_exact(&mut buf).await
        })
        .await
        .expect("neither echoed nor closed");
        (r.is_ok() && &buf == b"ping", s)
    };
    // The first connection holds the cluster's only connection unit.
    let (ok, first) = echo(connect().await).await;
    assert!(ok);
    assert_eq!(
        m.stat("cluster.echo.circuit_breakers.default.cx_open")
            .await,
        Some(1)
    );
    // The second overflows: closed without reaching the upstream.
    let (ok, _second) = echo(connect().await).await;
    assert!(!ok, "the second connection should have been refused");
    assert_eq!(m.stat("cluster.echo.upstream_cx_overflow").await, Some(1));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Once the first closes, its unit is back.
    drop(first);
    assert!(
        eventually(5, || async {
            m.stat("cluster.echo.circuit_breakers.default.cx_open")
                .await
                == Some(0)
        })
        .await
    );
    let (ok, _third) = echo(connect().await).await;
    assert!(ok);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn route_priority_high_uses_the_high_thresholds() {
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    let cb = "    circuit_breakers:\n      thresholds:\n      - { priority: DEFAULT, max_requests: 1 }\n      - { priority: HIGH, max_requests: 2, max_retries: 0 }\n";
    let retry = "retry_policy: { retry_on: \"5xx\", num_retries: 1, retry_back_off: { base_interval: 0.001s } }";
    let route = format!(
        "              - match: {{ prefix: \"/hi\" }}\n                route: {{ cluster: a, priority: HIGH, {retry} }}\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: a, {retry} }}\n"
    );
    let (m, port) = start(&route, &static_cluster("a", &[up.addr], "ROUND_ROBIN", cb)).await;
    ctl.set_default("a", Act::Gate);
    let spawn = |path: &'static str| {
        tokio::spawn(async move { request(port, "GET", path, &[], vec![]).await })
    };
    // One DEFAULT and two HIGH requests are in flight at once: each priority has its own limit.
    let held = vec![spawn("/"), spawn("/hi"), spawn("/hi")];
    assert!(eventually(10, || async { ctl.in_flight.load(Ordering::SeqCst) == 3 }).await);
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.rq_open").await,
        Some(1)
    );
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.high.rq_open").await,
        Some(1)
    );
    for path in ["/", "/hi"] {
        let r = request(port, "GET", path, &[], vec![]).await;
        assert_eq!(r.status, 503, "{path}");
        assert_eq!(r.header("x-envoy-overloaded"), Some("true"), "{path}");
    }
    assert_eq!(
        m.stat("cluster.a.upstream_rq_pending_overflow").await,
        Some(2)
    );
    ctl.open_gate();
    for t in held {
        assert_eq!(t.await.unwrap().status, 200);
    }
    // HIGH's max_retries is 0: its 503 is not retried, while DEFAULT (3) retries.
    ctl.set_default("a", Act::Ok);
    ctl.script("a", vec![Act::Status(503)]);
    let r = request(port, "GET", "/hi", &[], vec![]).await;
    assert_eq!((r.status, r.text()), (503, "a:503".to_string()));
    assert_eq!(
        m.stat("cluster.a.upstream_rq_retry_overflow").await,
        Some(1)
    );
    ctl.script("a", vec![Act::Status(503)]);
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!(r.status, 200);
    assert_eq!(m.stat("cluster.a.upstream_rq_retry").await, Some(1));
}

#[tokio::test]
async fn max_connection_pools_limits_the_hosts_with_connections() {
    // Two hosts, one pool allowed: the first host's pool keeps its kept-alive connection (and
    // so the unit); requests the balancer sends to the other host overflow.
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let cb = "    circuit_breakers:\n      thresholds:\n      - { max_connection_pools: 1, track_remaining: true }\n";
    let (m, port) = start(
        "              - match: { prefix: \"/\" }\n                route: { cluster: p }\n",
        &static_cluster("p", &[a.addr, b.addr], "ROUND_ROBIN", cb),
    )
    .await;
    assert_eq!(
        m.stat("cluster.p.circuit_breakers.default.remaining_cx_pools")
            .await,
        Some(1)
    );
    let mut overloaded = 0;
    for _ in 0..6 {
        let r = request(port, "GET", "/", &[], vec![]).await;
        match r.status {
            200 => {}
            503 => {
                assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
                assert!(r.text().contains("overflow"), "{}", r.text());
                overloaded += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(overloaded, 3, "every request to the second host");
    let mut hits = [a.hits(), b.hits()];
    hits.sort();
    assert_eq!(hits, [0, 3], "all answered by the host whose pool exists");
    assert_eq!(m.stat("cluster.p.upstream_cx_pool_overflow").await, Some(3));
    assert_eq!(
        m.stat("cluster.p.circuit_breakers.default.cx_pool_open")
            .await,
        Some(1)
    );
    assert_eq!(
        m.stat("cluster.p.circuit_breakers.default.remaining_cx_pools")
            .await,
        Some(0)
    );
    assert_eq!(m.stat("cluster.p.upstream_cx_total").await, Some(1));
}

#[tokio::test]
async fn each_priority_has_its_own_connection_pools_and_limits() {
    // DEFAULT and HIGH allow one connection and one pending request each. With one pool per
    // priority (as Envoy), a DEFAULT and a HIGH request are in flight at once, and each
    // priority queues and overflows on its own thresholds.
    let ctl = Ctl::new();
    let up = scripted("a", &ctl).await;
    ctl.set_default("a", Act::Gate);
    let cb = "    circuit_breakers:\n      thresholds:\n      - { priority: DEFAULT, max_connections: 1, max_pending_requests: 1 }\n      - { priority: HIGH, max_connections: 1, max_pending_requests: 1 }\n";
    let (m, port) = start("              - match: { prefix: \"/hi\" }\n                route: { cluster: a, priority: HIGH }\n              - match: { prefix: \"/\" }\n                route: { cluster: a }\n", &static_cluster("a", &[up.addr], "ROUND_ROBIN", cb)
            .replace("connect_timeout: 1s", "connect_timeout: 5s")).await;
    let send = |path: &'static str| {
        tokio::spawn(async move { request(port, "GET", path, &[], vec![]).await })
    };
    let mut tasks = vec![send("/"), send("/hi")];
    assert!(eventually(10, || async { ctl.in_flight.load(Ordering::SeqCst) == 2 }).await);
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.default.cx_open").await,
        Some(1)
    );
    assert_eq!(
        m.stat("cluster.a.circuit_breakers.high.cx_open").await,
        Some(1)
    );
    // One more of each waits for its priority's connection; a third of each overflows.
    tasks.push(send("/"));
    tasks.push(send("/hi"));
    assert!(
        eventually(10, || async {
            m.stat("cluster.a.upstream_cx_overflow").await == Some(2)
        })
        .await
    );
    tasks.push(send("/"));
    tasks.push(send("/hi"));
    assert!(
        eventually(10, || async {
            m.stat("cluster.a.upstream_rq_pending_overflow").await == Some(2)
        })
        .await
    );
    ctl.open_gate();
    let mut statuses = vec![];
    for t in tasks {
        statuses.push(t.await.unwrap().status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 503, 503]);
    assert_eq!(m.stat("cluster.a.upstream_cx_total").await, Some(2));
    assert_eq!(up.hits(), 4);
}
