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
    // As Envoy's chargeUpstreamAbort: the timed-out attempt counts as an upstream 504.
    assert_eq!(m.stat("cluster.a.upstream_rq_504").await, Some(1));
    assert_eq!(m.stat("cluster.a.upstream_rq_5xx").await, Some(1));

    // x-envoy-upstream-rq-timeout-ms sets a timeout on a route that has none.
    let r = request(
        port,
        "GET",
        "/off",
        &[
            ("x-envoy-upstream-rq-timeout-ms", "200"),
            ("x-forwarded-for", "10.1.2.3"),
        ],
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
    // Envoy's router replies with httpToGrpcStatus(504): 14 UNAVAILABLE (DEADLINE_EXCEEDED is
    // only the connection manager's max_stream_duration reply).
    assert_eq!(r.header("grpc-status"), Some("14"));
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
    let route = "              - match: { prefix: \"/short\" }\n                route:\n                  cluster: a\n                  timeout: 0.5s\n                  retry_policy: { retry_on: \"5xx\", num_retries: 5, per_try_timeout: 0.2s, retry_back_off: { base_interval: 0.001s } }\n              - match: { prefix: \"/\" }\n                route:\n                  cluster: a\n                  timeout: 5s\n                  retry_policy: { retry_on: \"5xx\", num_retries: 2, per_try_timeout: 0.2s, retry_back_off: { base_interval: 0.001s } }\n";
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
    assert_eq!(m.stat("cluster.a.upstream_rq_timeout").await, Some(0));

    // The route timeout (0.5 s) bounds all the tries together: it cuts the third 0.2 s try short
    // and answers 504 as a route timeout, not a per-try one, with retries left unused.
    let started = std::time::Instant::now();
    let r = request(port, "GET", "/short", &[], vec![]).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(ctl.take_log().len(), 3);
    assert_eq!(m.stat("cluster.a.upstream_rq_timeout").await, Some(1));
    assert_eq!(
        m.stat("cluster.a.upstream_rq_per_try_timeout").await,
        Some(7)
    );
}

/// What the raw upstream does with one request.
#[derive(Clone, Copy, Debug)]
enum Raw {
    /// Never send response headers.
    NoHeaders,
    /// Send headers and one chunk, then nothing.
    Stall,
    /// Send headers, then `n` one-byte chunks `gap` apart, then end the body.
    Chunks(u32, Duration),
}

/// A raw HTTP/1.1 upstream that can stall before or inside a response body, and counts the
/// requests it saw and the ones whose connection the proxy closed while it was stalling.
struct RawUpstream {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    cancelled: Arc<AtomicU64>,
    script: Arc<Mutex<VecDeque<Raw>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (hits, cancelled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let script: Arc<Mutex<VecDeque<Raw>>> = Default::default();
        let (h, c, sc) = (hits.clone(), cancelled.clone(), script.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let (h, c, sc) = (h.clone(), c.clone(), sc.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let act = sc
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(Raw::Chunks(1, Duration::ZERO));
                    let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\nx-upstream-name: raw\r\n\r\n";
                    let wait_for_close = |mut s: tokio::net::TcpStream| async move {
                        let mut b = [0u8; 64];
                        while let Ok(n) = s.read(&mut b).await {
                            if n == 0 {
                                break;
                            }
                        }
                        c.fetch_add(1, Ordering::SeqCst);
                    };
                    match act {
                        Raw::NoHeaders => wait_for_close(s).await,
                        Raw::Stall => {
                            let _ = s.write_all(head).await;
                            let _ = s.write_all(b"5\r\nfirst\r\n").await;
                            wait_for_close(s).await;
                        }
                        Raw::Chunks(n, gap) => {
                            let _ = s.write_all(head).await;
                            for _ in 0..n {
                                tokio::time::sleep(gap).await;
                                let _ = s.write_all(b"1\r\nx\r\n").await;
                            }
                            let _ = s.write_all(b"0\r\n\r\n").await;
                        }
                    }
                });
            }
        });
        RawUpstream {
            addr,
            hits,
            cancelled,
            script,
            task,
        }
    }

    fn script(&self, acts: Vec<Raw>) {
        *self.script.lock().unwrap() = acts.into();
    }
}

/// Sends a GET and returns the status and whether the response body arrived whole (`Ok`) or
/// was cut off (`Err`, the proxy reset the stream).
async fn get_body(c: &Client, port: u16, path: &str) -> (u16, Result<String, String>) {
    let req = http::Request::get(format!("http://127.0.0.1:{port}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("no response headers")
        .unwrap();
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body neither ended nor failed");
    (
        status,
        body.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .map_err(|e| e.to_string()),
    )
}

/// Writes `head` (request head and part of its body) on a raw connection, then `trickle` more
/// body bytes one by one `gap` apart, and returns the response's status and body.
async fn raw_request(port: u16, head: &str, trickle: u32, gap: Duration) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..trickle {
            tokio::time::sleep(gap).await;
            if wr.write_all(b"z").await.is_err() {
                return;
            }
        }
        // Keep the write side open (an incomplete request) until the test is done.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(wr);
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no response");
    writer.abort();
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// Whether the scripted upstream saw one request whose body was cut off (read as empty).
async fn upstream_body_aborted(ctl: &Ctl) -> bool {
    let ok = eventually(5, || async { !ctl.log.lock().unwrap().is_empty() }).await;
    let log = ctl.take_log();
    ok && log.len() == 1 && log[0].body_len == 0
}

#[tokio::test]
async fn per_try_idle_timeout_retries_before_headers_and_resets_after() {
    let up = RawUpstream::start().await;
    let (admin, port) = (free_port(), free_port());
    let route = "              - match: { prefix: \"/\" }\n                route:\n                  cluster: raw\n                  timeout: 10s\n                  retry_policy: { retry_on: \"5xx\", num_retries: 1, per_try_idle_timeout: 0.3s, retry_back_off: { base_interval: 0.001s } }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &routes("", route),
        &static_cluster("raw", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    let c = client();

    // No headers within the idle period: the attempt is cancelled and retried.
    up.script(vec![Raw::NoHeaders, Raw::Chunks(2, Duration::ZERO)]);
    let t0 = std::time::Instant::now();
    let (status, body) = get_body(&c, port, "/").await;
    assert_eq!((status, body), (200, Ok("xx".to_string())));
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
    assert!(eventually(5, || async { up.cancelled.load(Ordering::SeqCst) == 1 }).await);
    assert_eq!(
        m.stat("cluster.raw.upstream_rq_per_try_idle_timeout").await,
        Some(1)
    );
    assert_eq!(m.stat("cluster.raw.upstream_rq_retry").await, Some(1));

    // A slow body that keeps moving is not idle: 5 chunks 150 ms apart (750 ms in all).
    up.script(vec![Raw::Chunks(5, Duration::from_millis(150))]);
    let (status, body) = get_body(&c, port, "/").await;
    assert_eq!((status, body), (200, Ok("xxxxx".to_string())));
    assert_eq!(
        m.stat("cluster.raw.upstream_rq_per_try_idle_timeout").await,
        Some(1)
    );

    // The body stalls after the headers went downstream: no retry is possible, so the
    // downstream stream is reset and the upstream one cancelled.
    up.script(vec![Raw::Stall]);
    let (status, body) = get_body(&c, port, "/").await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "the body should have been cut off: {body:?}");
    assert!(eventually(5, || async { up.cancelled.load(Ordering::SeqCst) == 2 }).await);
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        4,
        "not retried after headers"
    );
    assert_eq!(
        m.stat("cluster.raw.upstream_rq_per_try_idle_timeout").await,
        Some(2)
    );

    // Every attempt idles before headers: 504 after 1 + 1 attempts, like a per-try timeout.
    up.script(vec![Raw::NoHeaders, Raw::NoHeaders]);
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "upstream request timeout")
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 6);
    assert!(eventually(5, || async { up.cancelled.load(Ordering::SeqCst) == 4 }).await);
    assert_eq!(
        m.stat("cluster.raw.upstream_rq_per_try_idle_timeout").await,
        Some(4)
    );
    assert_eq!(m.stat("cluster.raw.upstream_rq_timeout").await, Some(0));
}

#[tokio::test]
async fn stream_idle_timeout_408_504_reset_and_route_override() {
    let ctl = Ctl::new();
    let a = scripted("a", &ctl).await;
    let up = RawUpstream::start().await;
    let (admin, port) = (free_port(), free_port());
    let hcm = "          stream_idle_timeout: 0.3s\n";
    let route = "              - match: { prefix: \"/raw\" }\n                route: { cluster: raw, timeout: 0s }\n              - match: { prefix: \"/long\" }\n                route: { cluster: a, timeout: 0s, idle_timeout: 5s }\n              - match: { prefix: \"/off\" }\n                route: { cluster: a, timeout: 0s, idle_timeout: 0s }\n              - match: { prefix: \"/\" }\n                route: { cluster: a, timeout: 0s }\n";
    let clusters = format!(
        "{}{}",
        static_cluster("a", &[a.addr], "ROUND_ROBIN", ""),
        static_cluster("raw", &[up.addr], "ROUND_ROBIN", "")
    );
    let cfg = http_bootstrap(admin, port, hcm, &routes("", route), &clusters);
    let m = Mecha::start(&cfg, admin).await;
    let stat = "http.ingress_http.downstream_rq_idle_timeout";

    // The request is complete and the upstream is silent: 504, upstream stream cancelled.
    ctl.script("a", vec![Act::Hang]);
    let t0 = std::time::Instant::now();
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!((r.status, r.text().as_str()), (504, "stream timeout"));
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    assert!(eventually(5, || async { ctl.cancelled.load(Ordering::SeqCst) == 1 }).await);
    assert_eq!(m.stat(stat).await, Some(1));
    ctl.take_log();

    // The downstream request stalls half-way through its body: 408.
    let head = "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc";
    let (status, body) = raw_request(port, head, 0, Duration::ZERO).await;
    assert_eq!((status, body.as_str()), (408, "stream timeout"));
    assert_eq!(m.stat(stat).await, Some(2));
    // The upstream request was given up: its body ended early (the handler reads an error as
    // an empty body) instead of waiting for bytes the client will never send.
    assert!(upstream_body_aborted(&ctl).await);

    // Body bytes trickling in 100 ms apart keep the stream alive (7 × 100 ms > 300 ms).
    let (status, body) = raw_request(port, head, 7, Duration::from_millis(100)).await;
    assert_eq!((status, body.as_str()), (200, "a body_len=10"));

    // Response headers went out, then the body stalls: the downstream stream is reset.
    up.script(vec![Raw::Stall]);
    let (status, body) = get_body(&client(), port, "/raw").await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "the body should have been cut off: {body:?}");
    assert!(eventually(5, || async { up.cancelled.load(Ordering::SeqCst) == 1 }).await);
    assert_eq!(m.stat(stat).await, Some(3));
    // Over HTTP/2 the same stall resets only the stream (RST_STREAM).
    up.script(vec![Raw::Stall]);
    let (status, body) = get_body(&h2_client(), port, "/raw").await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "the body should have been cut off: {body:?}");
    assert_eq!(m.stat(stat).await, Some(4));

    // A body that keeps moving is not idle.
    up.script(vec![Raw::Chunks(5, Duration::from_millis(150))]);
    let (status, body) = get_body(&client(), port, "/raw").await;
    assert_eq!((status, body), (200, Ok("xxxxx".to_string())));

    // The route's idle_timeout replaces the connection manager's: 5 s, or 0s (off).
    for path in ["/long", "/off"] {
        ctl.script("a", vec![Act::Slow(Duration::from_millis(700))]);
        let r = request(port, "GET", path, &[], vec![]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!(m.stat(stat).await, Some(4));
}

#[tokio::test]
async fn route_idle_timeout_alone_and_grpc_stream_timeout_reply() {
    let ctl = Ctl::new();
    let a = scripted("a", &ctl).await;
    ctl.set_default("a", Act::Hang);
    let (admin, port) = (free_port(), free_port());
    // The connection manager's timer is off; only the route sets one.
    let hcm = "          stream_idle_timeout: 0s\n";
    let route = "              - match: { prefix: \"/\" }\n                route: { cluster: a, timeout: 0s, idle_timeout: 0.3s }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        hcm,
        &routes("", route),
        &static_cluster("a", &[a.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    let r = request(port, "POST", "/", &[], b"hello".to_vec()).await;
    assert_eq!((r.status, r.text().as_str()), (504, "stream timeout"));
    assert_eq!(
        ctl.take_log()[0].body_len,
        5,
        "the body was forwarded whole"
    );
    let h = [("content-type", "application/grpc")];
    let r = request(port, "POST", "/", &h, vec![0, 0, 0, 0, 0]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("14"));
    assert_eq!(r.header("grpc-message"), Some("stream timeout"));
    assert!(eventually(5, || async { ctl.cancelled.load(Ordering::SeqCst) == 2 }).await);
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_idle_timeout").await,
        Some(2)
    );
}

#[tokio::test]
async fn request_timeout_bounds_receiving_the_whole_request() {
    let ctl = Ctl::new();
    let a = scripted("a", &ctl).await;
    let (admin, port) = (free_port(), free_port());
    let hcm = "          request_timeout: 0.4s\n";
    let route = "              - match: { prefix: \"/h2\" }\n                route: { cluster: a2, timeout: 0s }\n              - match: { prefix: \"/\" }\n                route: { cluster: a, timeout: 0s }\n";
    // The same upstream again, spoken to over HTTP/2.
    let h2 = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n";
    let clusters = format!(
        "{}{}",
        static_cluster("a", &[a.addr], "ROUND_ROBIN", ""),
        static_cluster("a2", &[a.addr], "ROUND_ROBIN", h2)
    );
    let cfg = http_bootstrap(admin, port, hcm, &routes("", route), &clusters);
    let m = Mecha::start(&cfg, admin).await;
    // The body keeps trickling (never idle) but is not complete within 400 ms: 408.
    let head = "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc";
    let t0 = std::time::Instant::now();
    let (status, body) = raw_request(port, head, 50, Duration::from_millis(50)).await;
    assert_eq!((status, body.as_str()), (408, "request timeout"));
    assert!(
        t0.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2400),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_timeout").await,
        Some(1)
    );
    assert!(upstream_body_aborted(&ctl).await);
    // Over HTTP/2 the upstream stream is reset too, not left waiting for the rest of the body.
    let head = head.replace("POST /", "POST /h2");
    let (status, _) = raw_request(port, &head, 0, Duration::ZERO).await;
    assert_eq!(status, 408);
    assert!(upstream_body_aborted(&ctl).await);
    // Once the request is complete the timer is off: a slow upstream is not a request timeout.
    ctl.script("a", vec![Act::Slow(Duration::from_millis(700))]);
    let r = request(port, "POST", "/", &[], b"whole".to_vec()).await;
    assert_eq!((r.status, r.text().as_str()), (200, "a"));
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_timeout").await,
        Some(2)
    );
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_idle_timeout").await,
        Some(0)
    );
}
