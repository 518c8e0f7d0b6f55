//! Test harness: real upstream servers on loopback, the real `mecha` binary, and HTTP clients.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type Resp = http::Response<Full<Bytes>>;
pub type Handler = Arc<
    dyn Fn(http::Request<Incoming>) -> Pin<Box<dyn Future<Output = Resp> + Send>> + Send + Sync,
>;

/// A free loopback TCP port for a process a test starts later (bound to check, then released).
///
/// Not `bind(0)`: that hands out ports from the kernel's ephemeral range, where every outgoing
/// connection of every test running in parallel also takes its source port, so one of them could
/// take the port before mecha binds it ("Address already in use" in CI). Ports are drawn at
/// random from below that range instead, where only other `free_port` calls pick.
pub fn free_port() -> u16 {
    use std::hash::BuildHasher;
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u64, ephemeral_lo.min(65_536));
    if hi > lo + 1_000 {
        // A random start per process (parallel test processes diverge), then a prime stride, so
        // one process never hands out the same port twice.
        let seed = *SEED.get_or_init(|| {
            std::collections::hash_map::RandomState::new().hash_one(std::process::id())
        });
        for _ in 0..200 {
            let i = CALLS.fetch_add(1, Ordering::Relaxed);
            let port = (lo + seed.wrapping_add(i.wrapping_mul(7_919)) % (hi - lo)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real HTTP/1.1 + HTTP/2 upstream server with a custom handler.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(handler: Handler) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), handler).await
    }

    pub async fn start_on(addr: SocketAddr, handler: Handler) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let hits = h.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let f = handler(req);
                        async move { Ok::<_, Infallible>(f.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, hits, task }
    }

    /// An upstream that answers every request with a JSON echo and `x-upstream-name: <name>`.
    pub async fn echo(name: &str) -> Self {
        Self::start(echo_handler(name)).await
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

pub fn echo_handler(name: &str) -> Handler {
    let name = name.to_string();
    Arc::new(move |req: http::Request<Incoming>| {
        let name = name.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut headers = BTreeMap::new();
            for (k, v) in parts.headers.iter() {
                headers
                    .entry(k.to_string())
                    .or_insert_with(Vec::new)
                    .push(v.to_str().unwrap_or("").to_string());
            }
            let json = serde_json::json!({
                "name": name,
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "path": parts.uri.path(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body_len": body.len(),
            });
            http::Response::builder()
                .header("x-upstream-name", name.as_str())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(json.to_string())))
                .unwrap()
        })
    })
}

/// A running `mecha` process, killed when dropped.
pub struct Mecha {
    pub child: Child,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    _dir: TempDir,
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "mecha-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Mecha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn mecha_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mecha")
}

/// The admin section every test config uses.
pub fn admin_yaml(port: u16) -> String {
    format!(
        "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
    )
}

impl Mecha {
    /// Starts `mecha run` with `config` (which must contain an admin block on `admin_port`) and
    /// waits until `/ready` answers 200.
    pub async fn start(config: &str, admin_port: u16) -> Self {
        Self::start_args(config, admin_port, &["--concurrency", "2"]).await
    }

    pub async fn start_args(config: &str, admin_port: u16, extra: &[&str]) -> Self {
        Self::spawn(config, admin_port, extra, 200).await
    }

    /// Starts `mecha run` and waits until `/ready` answers at all (e.g. 503 while initializing).
    pub async fn start_unready(config: &str, admin_port: u16) -> Self {
        Self::spawn(config, admin_port, &["--concurrency", "2"], 0).await
    }

    /// Spawns mecha and waits for `/ready` to answer `ready_status` (0: any status).
    async fn spawn(config: &str, admin_port: u16, extra: &[&str], ready_status: u16) -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("mecha.yaml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(mecha_bin())
            .arg("run")
            .arg("-c")
            .arg(&path)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mecha");
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let mut m = Mecha {
            child,
            admin,
            config_path: path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = m.child.try_wait().unwrap() {
                panic!("mecha exited early: {status}");
            }
            if let Ok(r) = get(&format!("http://{}/ready", m.admin)).await {
                if r.status == ready_status || ready_status == 0 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "mecha did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        m
    }

    pub async fn stat(&self, name: &str) -> Option<i64> {
        let r = get(&format!("http://{}/stats", self.admin)).await.ok()?;
        r.text().lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
    }

    pub async fn admin_get(&self, path: &str) -> Response {
        get(&format!("http://{}{path}", self.admin)).await.unwrap()
    }

    pub fn sigterm(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn send(
    client: &Client,
    req: http::Request<Full<Bytes>>,
) -> Result<Response, hyper_util::client::legacy::Error> {
    let resp = client.request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        version: parts.version,
    })
}

pub async fn get(url: &str) -> Result<Response, hyper_util::client::legacy::Error> {
    send(
        &client(),
        http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

/// GET with extra headers.
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Response {
    let mut b = http::Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

/// A bootstrap with one HTTP listener whose HCM body (route_config, http_filters, extra fields)
/// is given as indented YAML, plus clusters YAML.
pub fn http_bootstrap(
    admin_port: u16,
    listener_port: u16,
    hcm_extra: &str,
    route_config: &str,
    clusters: &str,
) -> String {
    format!(
        r#"{admin}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
{hcm_extra}
          route_config:
{route_config}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{clusters}
"#,
        admin = admin_yaml(admin_port),
    )
}

/// A STATIC cluster YAML block (indented for `clusters:`).
pub fn static_cluster(name: &str, addrs: &[SocketAddr], lb_policy: &str, extra: &str) -> String {
    let endpoints: String = addrs
        .iter()
        .map(|a| {
            format!(
                "        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {} }}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    lb_policy: {lb_policy}\n{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{endpoints}"
    )
}
