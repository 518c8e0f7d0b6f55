//! Envoy's local replies for failures, and that none of them leaks or hangs.

use crate::common::*;
use crate::routing::vhost_routes;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(routes: &str, clusters: &str, hcm: &str) -> (Mecha, u16) {
    let (admin, port) = (free_port(), free_port());
    let cfg = http_bootstrap(admin, port, hcm, &vhost_routes(routes), clusters);
    (Mecha::start(&cfg, admin).await, port)
}

#[tokio::test]
async fn envoy_failure_responses() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let slow = Upstream::start(std::sync::Arc::new(|_req| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            http::Response::new(Default::default())
        })
    }))
    .await;
    let dns_empty = "  - name: empty\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: { cluster_name: empty, endpoints: [] }\n";
    let routes = r#"              - match: { prefix: "/dead" }
                route: { cluster: dead }
              - match: { prefix: "/empty" }
                route: { cluster: empty }
              - match: { prefix: "/slow" }
                route: { cluster: slow, timeout: 0.3s }
              - match: { prefix: "/byheader" }
                route: { cluster_header: x-cluster }
"#;
    let clusters = format!(
        "{}{}{}",
        static_cluster("dead", &[dead], "ROUND_ROBIN", ""),
        static_cluster("slow", &[slow.addr], "ROUND_ROBIN", ""),
        dns_empty
    );
    let (m, port) = start(routes, &clusters, "").await;
    let base = format!("http://127.0.0.1:{port}");

    let r = get(&format!("{base}/nothing-here")).await.unwrap();
    assert_eq!(r.status, 404);
    let r = get_with(
        &format!("{base}/byheader"),
        &[("x-cluster", "no-such-cluster")],
    )
    .await;
    assert_eq!(r.status, 503);
    let r = get(&format!("{base}/empty")).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (503, "no healthy upstream"));
    let r = get(&format!("{base}/dead")).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.text()
            .starts_with("upstream connect error or disconnect/reset before headers"),
        "{}",
        r.text()
    );
    let started = std::time::Instant::now();
    let r = get(&format!("{base}/slow")).await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "upstream request timeout")
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    assert_eq!(m.stat("http.ingress_http.no_route").await, Some(1));
    assert_eq!(m.stat("http.ingress_http.no_cluster").await, Some(1));
    assert_eq!(
        m.stat("cluster.empty.upstream_cx_none_healthy").await,
        Some(1)
    );
    assert_eq!(
        m.stat("cluster.dead.upstream_cx_connect_fail").await,
        Some(1)
    );
    assert_eq!(m.stat("cluster.slow.upstream_rq_timeout").await, Some(1));
    // The timed-out upstream request was cancelled: nothing stays active.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(m.stat("cluster.slow.upstream_rq_active").await, Some(0));
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_active").await,
        Some(0)
    );
}

async fn raw_exchange(port: u16, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("server hung");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_oversized_requests() {
    let up = Upstream::echo("a").await;
    let (m, port) = start(
        "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
        "          max_request_headers_kb: 8\n          codec_type: HTTP1\n",
    )
    .await;
    let resp = raw_exchange(port, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let resp = raw_exchange(port, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // The proxy is still healthy and nothing leaked.
    let r = get(&format!("http://127.0.0.1:{port}/ok")).await.unwrap();
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        m.stat("http.ingress_http.downstream_cx_active").await,
        Some(0)
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn keep_alive_and_pipelining() {
    let up = Upstream::echo("a").await;
    let (m, port) = start(
        "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
        "",
    )
    .await;
    // Three pipelined requests on one connection, the last one closing it.
    let req = "GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET /2 HTTP/1.1\r\nhost: x\r\n\r\nGET /3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let resp = raw_exchange(port, req.as_bytes()).await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 3, "{resp}");
    let p1 = resp.find("\"/1\"").unwrap();
    let p3 = resp.find("\"/3\"").unwrap();
    assert!(p1 < p3, "responses out of order");
    // A chunked request body is forwarded intact.
    let chunked = "POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let resp = raw_exchange(port, chunked.as_bytes()).await;
    assert!(resp.contains("\"body_len\":11"), "{resp}");
    assert_eq!(
        m.stat("http.ingress_http.downstream_cx_total").await,
        Some(2)
    );
    // Upstream connections were reused across requests.
    assert_eq!(m.stat("cluster.a.upstream_cx_total").await, Some(1));
}

/// Sends `request` and reads until the response's status line is in (the connection may stay
/// open afterwards).
async fn status_line(port: u16, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = vec![];
    let read = async {
        while !out.windows(2).any(|w| w == b"\r\n") {
            let mut buf = [0u8; 1024];
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no response");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_request_body_is_the_downstreams_fault() {
    let up = Upstream::echo("a").await;
    let od = "    outlier_detection: { consecutive_5xx: 1, interval: 0.1s, base_ejection_time: 30s, max_ejection_percent: 100 }\n";
    let (m, port) = start(
        "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", od),
        "",
    )
    .await;
    // An invalid chunk size from the client: 400 (as Envoy answers a downstream codec error),
    // not a 503 blamed on the upstream.
    let req = b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n\r\n";
    let resp = status_line(port, req).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // The same with a content-length body the client cuts short (mecha's own upstream codec).
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"POST /l HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut out = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(!out.contains(" 503 "), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No upstream failure accounting, and the healthy host is not ejected.
    for stat in ["upstream_rq_5xx", "upstream_rq_rx_reset"] {
        let v = m.stat(&format!("cluster.a.{stat}")).await.unwrap_or(0);
        assert_eq!(v, 0, "cluster.a.{stat}");
    }
    let ejected = m
        .stat("cluster.a.outlier_detection.ejections_enforced_total")
        .await
        .unwrap_or(0);
    assert_eq!(ejected, 0);
    let r = get(&format!("http://127.0.0.1:{port}/ok")).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn grpc_requests_get_grpc_local_replies() {
    let routes = r#"              - match: { prefix: "/empty" }
                route: { cluster: empty }
              - match: { prefix: "/byheader" }
                route: { cluster_header: x-cluster }
              - match: { prefix: "/denied" }
                direct_response: { status: 403, body: { inline_string: "denied" } }
              - match: { prefix: "/limited" }
                direct_response: { status: 429, body: { inline_string: "100% used\nüber" } }
"#;
    let empty = "  - name: empty\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: { cluster_name: empty, endpoints: [] }\n";
    let (_m, port) = start(routes, empty, "").await;
    let base = format!("http://127.0.0.1:{port}");
    let grpc = ("content-type", "application/grpc");
    // (path, extra header, grpc-status, grpc-message) per Envoy's httpToGrpcStatus.
    let cases = [
        ("/nothing-here", None, "12", None),
        ("/byheader", Some(("x-cluster", "nope")), "14", None),
        ("/empty", None, "14", Some("no healthy upstream")),
        ("/denied", None, "7", Some("denied")),
        // grpc-message is percent-encoded (`%`, control and non-ASCII bytes).
        ("/limited", None, "14", Some("100%25 used%0A%C3%BCber")),
    ];
    for (path, extra, status, message) in cases {
        let mut h = vec![grpc];
        h.extend(extra);
        let r = get_with(&format!("{base}{path}"), &h).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/grpc"), "{path}");
        assert_eq!(r.header("grpc-status"), Some(status), "{path}");
        assert_eq!(r.header("grpc-message"), message, "{path}");
        assert!(r.body.is_empty(), "{path}: trailers-only");
    }
    // Not gRPC: plain HTTP local replies as before.
    let r = get(&format!("{base}/nothing-here")).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("grpc-status"), None);
}
