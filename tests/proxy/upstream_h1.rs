//! mecha's own HTTP/1.1 upstream codec against upstreams that answer in every framing HTTP/1.1
//! allows, written byte by byte: chunked with trailers, close-delimited HTTP/1.0, interim 1xx,
//! HEAD, `Connection: close`, and a kept-alive connection the server closes while it is idle.

use crate::common::*;
use crate::routing::vhost_routes;
use bytes::Bytes;
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the scripted upstream does with one request.
struct Reply {
    bytes: Vec<u8>,
    /// Close the connection after writing.
    close: bool,
}

/// A raw TCP upstream: for each request (head + content-length body) it writes what `script`
/// returns for (request head, request body, index of the request on its connection).
struct RawUpstream {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawUpstream {
    async fn start(script: fn(&str, &[u8], usize) -> Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (accepts.clone(), bodies.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let bodies = b.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut n = 0;
                    loop {
                        let Some(end) = find(&buf, b"\r\n\r\n") else {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let body = buf[end + 4..end + 4 + len].to_vec();
                        buf.drain(..end + 4 + len);
                        bodies.lock().unwrap().push(body.clone());
                        let reply = script(&head, &body, n);
                        n += 1;
                        if s.write_all(&reply.bytes).await.is_err() || reply.close {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepts,
            bodies,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn start_mecha(up: &RawUpstream) -> (Mecha, u16) {
    let (admin, port) = (free_port(), free_port());
    let routes = "              - match: { prefix: \"/rw/\" }\n                route: { cluster: raw, prefix_rewrite: \"/\" }\n              - match: { prefix: \"/\" }\n                route: { cluster: raw }\n";
    let m = Mecha::start(
        &http_bootstrap(
            admin,
            port,
            "",
            &vhost_routes(routes),
            &static_cluster("raw", &[up.addr], "ROUND_ROBIN", ""),
        ),
        admin,
    )
    .await;
    (m, port)
}

fn keep(bytes: &[u8]) -> Reply {
    Reply {
        bytes: bytes.to_vec(),
        close: false,
    }
}

#[tokio::test]
async fn chunked_response_with_trailers_and_connection_reuse() {
    let up = RawUpstream::start(|_, _, _| {
        keep(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-up: 1\r\n\r\n5\r\nhello\r\n7;ext\r\n, world\r\n0\r\nx-checksum: 7\r\n\r\n")
    })
    .await;
    let (_m, port) = start_mecha(&up).await;
    for _ in 0..3 {
        let r = get(&format!("http://127.0.0.1:{port}/c")).await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello, world"));
        assert_eq!(r.header("x-up"), Some("1"));
    }
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
}

#[tokio::test]
async fn close_delimited_http10_response_is_read_to_the_end_and_not_reused() {
    let up = RawUpstream::start(|_, _, _| Reply {
        bytes: b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec(),
        close: true,
    })
    .await;
    let (_m, port) = start_mecha(&up).await;
    for _ in 0..2 {
        let r = get(&format!("http://127.0.0.1:{port}/")).await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "until the end"));
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn interim_1xx_is_skipped_and_head_has_no_body() {
    let up = RawUpstream::start(|head, _, _| {
        if head.starts_with("head ") {
            keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        } else {
            keep(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await;
    let (_m, port) = start_mecha(&up).await;
    let r = send(
        &client(),
        http::Request::post(format!("http://127.0.0.1:{port}/p"))
            .header("expect", "100-continue")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (201, "ok"));
    let r = send(
        &client(),
        http::Request::head(format!("http://127.0.0.1:{port}/h"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("5")));
    assert!(r.body.is_empty());
    // The HEAD response's connection was reused for the next request.
    let r = get(&format!("http://127.0.0.1:{port}/again"))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(up.bodies.lock().unwrap()[0], b"payload");
}

#[tokio::test]
async fn connection_close_response_is_not_reused() {
    let up = RawUpstream::start(|_, _, _| Reply {
        bytes: b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye".to_vec(),
        close: true,
    })
    .await;
    let (m, port) = start_mecha(&up).await;
    for _ in 0..3 {
        let r = get(&format!("http://127.0.0.1:{port}/")).await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "bye"));
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 3);
    assert_eq!(m.stat("cluster.raw.upstream_cx_total").await, Some(3));
}

#[tokio::test]
async fn idle_connection_closed_by_the_server_is_not_an_error() {
    // The server answers with keep-alive framing and then closes the connection anyway, as a
    // server whose keep-alive timer fired would.
    let up = RawUpstream::start(|_, _, _| Reply {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        close: true,
    })
    .await;
    let (m, port) = start_mecha(&up).await;
    for i in 0..5 {
        let r = get(&format!("http://127.0.0.1:{port}/{i}")).await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "request {i}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 5);
    assert_eq!(m.stat("cluster.raw.upstream_rq_503").await.unwrap_or(0), 0);
}

#[tokio::test]
async fn request_body_of_known_length_is_forwarded_exactly() {
    let up = RawUpstream::start(|_, body, _| {
        let mut out =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        out.extend_from_slice(body);
        keep(&out)
    })
    .await;
    let (_m, port) = start_mecha(&up).await;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for body in [Bytes::from_static(b"small"), Bytes::from(big.clone())] {
        let r = send(
            &client(),
            http::Request::put(format!("http://127.0.0.1:{port}/b"))
                .body(Full::new(body.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, body);
    }
    // An empty POST says so with content-length: 0, as hyper's client would.
    let r = send(
        &client(),
        http::Request::post(format!("http://127.0.0.1:{port}/e"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn malformed_upstream_response_is_a_503_not_a_hang() {
    let up = RawUpstream::start(|_, _, _| Reply {
        bytes: b"HTTP/1.1 2x0 Nope\r\n\r\n".to_vec(),
        close: true,
    })
    .await;
    let (_m, port) = start_mecha(&up).await;
    let r = get(&format!("http://127.0.0.1:{port}/")).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.text()
            .contains("upstream connect error or disconnect/reset before headers"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn http2_request_reaches_an_http1_upstream_with_a_host_header() {
    // HTTP/2 carries the authority as `:authority`, not as a Host header; HTTP/1.1 needs one.
    let up = RawUpstream::start(|head, _, _| {
        let host = head
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .unwrap_or("<none>")
            .trim()
            .to_string();
        let body = format!("host={host}");
        let mut bytes =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        Reply {
            bytes,
            close: false,
        }
    })
    .await;
    let (_m, port) = start_mecha(&up).await;
    let req = http::Request::get(format!("http://127.0.0.1:{port}/h"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(&h2_client(), req).await.unwrap();
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("host=127.0.0.1:{port}"));
    // A path rewrite replaces the URI; the authority must still become the Host header.
    let req = http::Request::get(format!("http://127.0.0.1:{port}/rw/h"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(&h2_client(), req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("host=127.0.0.1:{port}"));
}

#[tokio::test]
async fn early_response_is_forwarded_before_the_body_is_sent() {
    // An upstream that answers 413 as soon as it has the head and never reads the body; it
    // keeps the connection open. Every other request gets a 200.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let a = accepts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while find(&buf, b"\r\n\r\n").is_none() {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                if buf.starts_with(b"POST") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!",
                        )
                        .await;
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                }
            });
        }
    });
    let up = RawUpstream {
        addr,
        accepts: accepts.clone(),
        bodies: Arc::default(),
    };
    let (_m, port) = start_mecha(&up).await;

    let started = std::time::Instant::now();
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    const LEN: usize = 20 << 20;
    let writer = tokio::spawn(async move {
        let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {LEN}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..LEN / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let mut out = Vec::new();
    let read = async {
        while !out.ends_with(b"too big!") {
            let mut chunk = [0u8; 4096];
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(k) => out.extend_from_slice(&chunk[..k]),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), read).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.ends_with("too big!"), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "held for {:?}",
        started.elapsed()
    );
    writer.abort();

    // The connection the early response came on is not reused: the next request gets a new
    // one (the old one would never answer).
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        get(&format!("http://127.0.0.1:{port}/next")),
    )
    .await
    .expect("reused the early response's connection")
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
}
