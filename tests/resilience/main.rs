//! Resilience integration tests (issue 4): the real `mecha` binary against upstreams that
//! misbehave on command — scripted statuses, resets, hangs, refused connections — asserting
//! exact attempt counts, which host each attempt reached, statuses, bodies and Envoy's stats.

#[path = "../common/mod.rs"]
mod common;

mod breakers;
mod filters;
mod health;
mod retries;
mod timeouts;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a scripted upstream does with one request.
#[derive(Clone, Debug)]
pub enum Act {
    /// 200 with body `<name>` (or the echo of the request body length for POSTs).
    Ok,
    /// This status, body `<name>:<status>`.
    Status(u16),
    /// 200 with these extra response headers.
    Headers(Vec<(&'static str, &'static str)>),
    /// A trailers-only gRPC response with this grpc-status.
    Grpc(u32),
    /// Never answer (until the request is cancelled).
    Hang,
    /// Answer 200 after this delay.
    Slow(Duration),
    /// Wait for the gate to open, then answer 200.
    Gate,
}

/// One attempt as an upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub upstream: String,
    pub attempt: Option<u32>,
    pub body_len: usize,
    pub path: String,
}

/// Shared control of a set of scripted upstreams.
pub struct Ctl {
    scripts: Mutex<std::collections::HashMap<String, VecDeque<Act>>>,
    defaults: Mutex<std::collections::HashMap<String, Act>>,
    pub log: Mutex<Vec<Seen>>,
    /// Handlers dropped before they answered (the proxy reset the stream).
    pub cancelled: AtomicU64,
    pub in_flight: AtomicU64,
    pub gate: tokio::sync::Semaphore,
}

impl Ctl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            scripts: Default::default(),
            defaults: Default::default(),
            log: Default::default(),
            cancelled: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            gate: tokio::sync::Semaphore::new(0),
        })
    }
    pub fn script(&self, name: &str, acts: Vec<Act>) {
        self.scripts
            .lock()
            .unwrap()
            .insert(name.into(), acts.into());
    }
    pub fn set_default(&self, name: &str, act: Act) {
        self.defaults.lock().unwrap().insert(name.into(), act);
    }
    pub fn take_log(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    pub fn open_gate(&self) {
        self.gate.add_permits(1 << 20);
    }
    fn next(&self, name: &str) -> Act {
        if let Some(a) = self
            .scripts
            .lock()
            .unwrap()
            .get_mut(name)
            .and_then(|q| q.pop_front())
        {
            return a;
        }
        self.defaults
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or(Act::Ok)
    }
}

struct CancelGuard {
    ctl: Arc<Ctl>,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.ctl.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.done {
            self.ctl.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Starts a scripted upstream named `name`.
pub async fn scripted(name: &str, ctl: &Arc<Ctl>) -> Upstream {
    let name = name.to_string();
    let ctl = ctl.clone();
    Upstream::start(Arc::new(
        move |req: http::Request<hyper::body::Incoming>| {
            let name = name.clone();
            let ctl = ctl.clone();
            Box::pin(async move {
                ctl.in_flight.fetch_add(1, Ordering::SeqCst);
                let mut guard = CancelGuard {
                    ctl: ctl.clone(),
                    done: false,
                };
                let attempt = req
                    .headers()
                    .get("x-envoy-attempt-count")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let path = req.uri().path().to_string();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                ctl.log.lock().unwrap().push(Seen {
                    upstream: name.clone(),
                    attempt,
                    body_len: body.len(),
                    path,
                });
                let act = ctl.next(&name);
                let ok = |text: String| {
                    http::Response::builder()
                        .header("x-upstream-name", name.as_str())
                        .body(Full::new(Bytes::from(text)))
                        .unwrap()
                };
                let resp = match act {
                    Act::Ok => ok(format!("{name} body_len={}", body.len())),
                    Act::Status(s) => http::Response::builder()
                        .status(s)
                        .header("x-upstream-name", name.as_str())
                        .body(Full::new(Bytes::from(format!("{name}:{s}"))))
                        .unwrap(),
                    Act::Headers(hs) => {
                        let mut r = ok(name.clone());
                        for (k, v) in hs {
                            r.headers_mut().insert(k, http::HeaderValue::from_static(v));
                        }
                        r
                    }
                    Act::Grpc(code) => http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", code.to_string())
                        .header("x-upstream-name", name.as_str())
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                    Act::Hang => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    Act::Slow(d) => {
                        tokio::time::sleep(d).await;
                        ok(name.clone())
                    }
                    Act::Gate => {
                        let _permit = ctl.gate.acquire().await;
                        ok(name.clone())
                    }
                };
                guard.done = true;
                resp
            })
        },
    ))
    .await
}

/// An upstream that accepts, reads the request head and closes the connection without answering.
pub async fn resetting() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        h.fetch_add(1, Ordering::SeqCst);
                        // Drop without answering: the proxy sees a reset before headers.
                        return;
                    }
                }
            });
        }
    });
    (addr, hits, task)
}

/// A loopback address nobody listens on (connections are refused).
pub fn refused_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// Route-config YAML with the given routes (indented for `route_config:`), optionally with
/// virtual-host level extras.
pub fn routes(vhost_extra: &str, routes: &str) -> String {
    format!(
        "            name: local\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n{vhost_extra}              routes:\n{routes}"
    )
}

/// Sends a request and returns the response (panics on transport errors).
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Response {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap()
}

/// Polls `f` until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
