//! mecha's own downstream HTTP/1.1 codec, driven byte by byte by a raw TCP client: pipelining,
//! heads split across reads, `Connection: close`, HEAD, chunked re-encoding of a response of
//! unknown length, a client that hangs up mid-request, and the hand-off to hyper in the middle of
//! a kept-alive connection (a chunked upload between two ordinary requests).

use crate::common::*;
use crate::routing::vhost_routes;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response as the client saw it.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

/// Reads one response off `s` (content-length, chunked, or none for HEAD/204/304).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> Raw {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        fill(s, buf).await;
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("utf-8 head");
    buf.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status: u16 = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("field");
            (k.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let mut raw = Raw {
        status,
        headers,
        body: Vec::new(),
    };
    if head_request || status == 204 || status == 304 {
        return raw;
    }
    if raw.header("transfer-encoding") == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(s, buf).await;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap().trim(), 16)
                    .expect("chunk size");
            buf.drain(..line_end + 2);
            if size == 0 {
                // No trailers were asked for: the empty line ends the message.
                while buf.len() < 2 {
                    fill(s, buf).await;
                }
                assert_eq!(&buf[..2], b"\r\n", "end of chunked body");
                buf.drain(..2);
                return raw;
            }
            while buf.len() < size + 2 {
                fill(s, buf).await;
            }
            raw.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let len: usize = raw
        .header("content-length")
        .expect("content-length or chunked")
        .parse()
        .unwrap();
    while buf.len() < len {
        fill(s, buf).await;
    }
    raw.body = buf.drain(..len).collect();
    raw
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        n > 0,
        "connection closed early; have {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// True when the server closed the connection (EOF) within a few seconds.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn start(up: &Upstream) -> (Mecha, u16) {
    start_at(up.addr).await
}

/// mecha with one route to the upstream at `addr`.
async fn start_at(addr: std::net::SocketAddr) -> (Mecha, u16) {
    start_with(addr, "").await
}

/// mecha with one route to the upstream at `addr`, and more connection manager fields.
async fn start_with(addr: std::net::SocketAddr, hcm_extra: &str) -> (Mecha, u16) {
    let (admin, port) = (free_port(), free_port());
    let m = Mecha::start(
        &http_bootstrap(
            admin,
            port,
            hcm_extra,
            &vhost_routes("              - match: { prefix: \"/\" }\n                route: { cluster: up }\n"),
            &static_cluster("up", &[addr], "ROUND_ROBIN", ""),
        ),
        admin,
    )
    .await;
    (m, port)
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        b"GET /one HTTP/1.1\r\nhost: x\r\n\r\nPOST /two HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET /three?q=1 HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for (path, body_len) in [("/one", 0), ("/two", 5), ("/three", 0)] {
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200);
        let j = r.json();
        assert_eq!(j["path"], path);
        assert_eq!(j["body_len"], body_len);
        assert_eq!(r.header("server"), Some("mecha"));
        assert!(r.header("date").is_some(), "date header");
        assert_eq!(r.header("connection"), None);
    }
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_request_written_one_byte_at_a_time() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    // The head arrives a byte at a time; the body (which must come with the end of the head
    // for the codec to keep the request) in the last write.
    let req = b"PUT /slow HTTP/1.1\r\nHost: x\r\nX-Long: abcdefghijklmnopqrstuvwxyz\r\nContent-Length: 10\r\n\r\n0123456789";
    let (head, tail) = req.split_at(req.len() - 12);
    for b in head.iter() {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.write_all(tail).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    let j = r.json();
    assert_eq!(
        (r.status, j["method"].as_str(), j["body_len"].as_u64()),
        (200, Some("PUT"), Some(10))
    );
    assert_eq!(j["headers"]["x-long"][0], "abcdefghijklmnopqrstuvwxyz");
}

#[tokio::test]
async fn connection_close_is_honoured_and_announced() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(
        closed(&mut s).await,
        "the connection closes after the response"
    );
}

#[tokio::test]
async fn head_has_no_body_and_the_connection_goes_on() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, true).await;
    assert_eq!(r.status, 200);
    let len: usize = r.header("content-length").unwrap().parse().unwrap();
    assert!(len > 0, "HEAD keeps the representation's length");
    s.write_all(b"GET /after HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.json()["path"], "/after");
}

/// A raw upstream that answers every request on a connection with a chunked body.
async fn chunked_upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while let Some(i) = find(&buf, b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\npart0;\r\n6\r\npart1;\r\n6\r\npart2;\r\n0\r\nx-trailer: t\r\n\r\n";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_response_of_unknown_length_is_sent_chunked() {
    let (_m, port) = start_at(chunked_upstream().await).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.body, b"part0;part1;part2;");
    }
    // With `te: trailers` the client gets the upstream's trailers.
    s.write_all(b"GET /s HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n")
        .await
        .unwrap();
    while find(&buf, b"0\r\nx-trailer").is_none() || !buf.ends_with(b"\r\n\r\n") {
        fill(&mut s, &mut buf).await;
    }
    let text = String::from_utf8_lossy(&buf);
    assert!(text.ends_with("0\r\nx-trailer: t\r\n\r\n"), "{text}");
}

#[tokio::test]
async fn unusual_requests_are_handed_to_hyper_mid_connection() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut s, &mut buf, false).await.json()["path"],
        "/first"
    );
    // A chunked upload (not ours), pipelined with an ordinary request behind it.
    s.write_all(
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\nGET /last HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    let j = r.json();
    assert_eq!(
        (j["path"].as_str(), j["body_len"].as_u64()),
        (Some("/upload"), Some(7))
    );
    assert_eq!(
        read_response(&mut s, &mut buf, false).await.json()["path"],
        "/last"
    );
    // A body larger than the codec reads up front streams through too.
    let big = vec![b'z'; 200 * 1024];
    s.write_all(
        format!(
            "POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&big).await.unwrap();
    let j = read_response(&mut s, &mut buf, false).await.json();
    assert_eq!(j["body_len"].as_u64(), Some(big.len() as u64));
}

#[tokio::test]
async fn a_client_hanging_up_cancels_its_request_upstream() {
    let dropped = Arc::new(AtomicU64::new(0));
    let d = dropped.clone();
    let up = Upstream::start(Arc::new(move |_req| {
        struct OnDrop(Arc<AtomicU64>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = OnDrop(d.clone());
        Box::pin(async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(30)).await;
            http::Response::new(http_body_util::Full::new(Bytes::new()))
        })
    }))
    .await;
    let (m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Wait until the request reached the upstream, then hang up.
    for _ in 0..100 {
        if up.hits() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.hits(), 1);
    drop(s);
    // The upstream request was reset: the upstream's handler future was dropped, and mecha has
    // no request left active.
    let mut ok = false;
    for _ in 0..100 {
        let active = m.stat("cluster.up.upstream_rq_active").await;
        if dropped.load(Ordering::SeqCst) == 1 && active == Some(0) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the upstream request was not cancelled");
}

/// Everything the server writes until it closes the connection.
async fn until_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("closed in time")
        .ok();
    String::from_utf8_lossy(&all).into_owned()
}

/// Sends `req` on a new connection and returns all the server wrote before closing.
async fn exchange(port: u16, req: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(req).await.unwrap();
    until_close(&mut s).await
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn codec_type_http1_refuses_http2_prior_knowledge() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start_with(up.addr, "          codec_type: HTTP1\n").await;
    let text = exchange(port, H2_PREFACE).await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text:?}");
    let r = send(
        &h2_client(),
        http::Request::get(format!("http://127.0.0.1:{port}/"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert!(r.is_err(), "served as h2: {r:?}");
    assert_eq!(up.hits(), 0);
    // HTTP/1.1 is served.
    let r = get(&format!("http://127.0.0.1:{port}/")).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn codec_type_http2_refuses_http1() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start_with(up.addr, "          codec_type: HTTP2\n").await;
    let text = exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        !text.starts_with("HTTP/1.1"),
        "served as HTTP/1.1: {text:?}"
    );
    assert!(get(&format!("http://127.0.0.1:{port}/")).await.is_err());
    assert_eq!(up.hits(), 0);
    let r = send(
        &h2_client(),
        http::Request::get(format!("http://127.0.0.1:{port}/"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_2));
}

#[tokio::test]
async fn heads_over_a_small_max_request_headers_kb_get_431_on_every_path() {
    let up = Upstream::echo("up").await;
    let (m, port) = start_with(up.addr, "          max_request_headers_kb: 2\n").await;
    let big = "b".repeat(3000);
    // Our codec: a complete head, and one that never ends.
    let text = exchange(
        port,
        format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text:?}");
    assert!(text.contains("server: mecha\r\n"), "{text:?}");
    let text = exchange(
        port,
        format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}").as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text:?}");
    // hyper, after a hand-off (a chunked upload), on the same connection.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    s.write_all(format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 431);
    // HTTP/2 (prior knowledge, under AUTO).
    let r = send(
        &h2_client(),
        http::Request::get(format!("http://127.0.0.1:{port}/"))
            .header("x-big", big.as_str())
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert!(
        r.as_ref().map_or(true, |r| r.status == 431),
        "h2 served: {r:?}"
    );
    assert_eq!(up.hits(), 1, "only the upload reached the upstream");
    // Codec-level replies are counted as requests.
    assert!(m.stat("http.ingress_http.downstream_rq_4xx").await >= Some(3));
    // Small heads still pass.
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn missing_host_and_http_10_are_refused_as_envoy_does() {
    let up = Upstream::echo("up").await;
    let (m, port) = start(&up).await;
    // No Host: our codec, and hyper (a chunked upload is handed off).
    let text = exchange(port, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text:?}");
    assert!(text.contains("server: mecha\r\n"), "{text:?}");
    let text = exchange(
        port,
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text:?}");
    // HTTP/1.0 by default (accept_http_10: false): 426.
    let text = exchange(port, b"GET /old HTTP/1.0\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.0 426 "), "{text:?}");
    assert_eq!(up.hits(), 0);
    assert_eq!(m.stat("http.ingress_http.downstream_rq_4xx").await, Some(3));
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_total").await,
        Some(3)
    );
    drop(m);

    let (_m, port) = start_with(
        up.addr,
        "          http_protocol_options: { accept_http_10: true, default_host_for_http_10: dflt }\n",
    )
    .await;
    let text = exchange(port, b"GET /old HTTP/1.0\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.contains("\"path\":\"/old\""), "{text}");
    let text = exchange(port, b"GET /nohost HTTP/1.0\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.contains("\"host\":[\"dflt\"]"), "{text}");
}

#[tokio::test]
async fn active_requests_are_uncounted_when_the_client_hangs_up() {
    let up = Upstream::start(Arc::new(
        move |req: http::Request<hyper::body::Incoming>| {
            Box::pin(async move {
                // Reads the body (which never completes), or hangs.
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                http::Response::new(http_body_util::Full::new(Bytes::new()))
            })
        },
    ))
    .await;
    let (m, port) = start(&up).await;
    let active = "http.ingress_http.downstream_rq_active";
    for (i, req) in [
        // Part of a body (hyper's), then nothing.
        &b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc"[..],
        // An ordinary request (our codec) to an upstream that never answers.
        &b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n"[..],
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(req).await.unwrap();
        for _ in 0..100 {
            if up.hits() == i as u64 + 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(up.hits(), i as u64 + 1);
        assert_eq!(m.stat(active).await, Some(1));
        drop(s);
        let mut n = None;
        for _ in 0..100 {
            n = m.stat(active).await;
            if n == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(n, Some(0), "request {i} still counted active");
    }
    // HTTP/2: a stream whose body never ends, then the connection goes away.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(1);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let conn_task = tokio::spawn(conn);
    let req = http::Request::post(format!("http://127.0.0.1:{port}/h2"))
        .body(body)
        .unwrap();
    let resp = tokio::spawn(sender.send_request(req));
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"abc"))))
        .await
        .unwrap();
    for _ in 0..100 {
        if up.hits() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.hits(), 3);
    assert_eq!(m.stat(active).await, Some(1));
    resp.abort();
    conn_task.abort();
    drop(tx);
    let mut n = None;
    for _ in 0..100 {
        n = m.stat(active).await;
        if n == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n, Some(0), "the h2 request is still counted active");
}

#[tokio::test]
async fn an_h2c_upgrade_request_is_served_as_http_11() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /up HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["path"], "/up");
    for h in ["upgrade", "http2-settings", "connection"] {
        assert!(j["headers"][h].is_null(), "{h} forwarded: {j}");
    }
    // The connection goes on in HTTP/1.1.
    s.write_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut s, &mut buf, false).await.json()["path"],
        "/next"
    );
}

#[tokio::test]
async fn ambiguous_request_lengths_are_refused() {
    let up = Upstream::echo("up").await;
    let (m, port) = start(&up).await;
    for req in [
        &b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
        &b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
        &b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc"[..],
    ] {
        let text = exchange(port, req).await;
        assert!(text.starts_with("HTTP/1.1 400 "), "{text:?}");
        assert!(text.contains("server: mecha\r\n"), "{text:?}");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(m.stat("http.ingress_http.downstream_rq_4xx").await, Some(3));
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_total").await,
        Some(3)
    );
}

#[tokio::test]
async fn via_goes_upstream_too() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start_with(up.addr, "          via: mecha-via\n").await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.header("via"), Some("mecha-via"));
    assert_eq!(r.json()["headers"]["via"][0], "mecha-via");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nvia: 1.1 edge\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.json()["headers"]["via"][0], "1.1 edge, mecha-via");
}

#[tokio::test]
async fn expect_100_continue_is_answered_here_and_not_forwarded() {
    let up = Upstream::echo("up").await;
    let (_m, port) = start(&up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(
        b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    while find(&buf, b"\r\n\r\n").is_none() {
        fill(&mut s, &mut buf).await;
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    let end = find(&buf, b"\r\n\r\n").unwrap();
    buf.drain(..end + 4);
    s.write_all(b"hello").await.unwrap();
    let j = read_response(&mut s, &mut buf, false).await.json();
    assert_eq!(j["body_len"], 5);
    assert!(j["headers"]["expect"].is_null(), "expect forwarded: {j}");
}
