//! Runtime API integration tests: the real `mecha` binary in `--app-id` mode, real test apps on
//! loopback, a real `redis-server` spawned on a free port, and the official Dapr Rust SDK.

#[path = "../common/mod.rs"]
mod common;

mod grpc;
mod grpc_app;
mod health;
mod invoke;
mod pubsub;
mod state;

use bytes::Bytes;
use common::{free_port, TempDir};
use http_body_util::Full;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `mecha run --app-id …` process, killed when dropped.
pub struct Sidecar {
    pub child: Child,
    pub http_port: u16,
    pub grpc_port: u16,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    /// Starts mecha with `--app-id app_id` plus `extra` args and env, on free Dapr ports, and
    /// waits until `/v1.0/healthz` answers 204.
    pub async fn start(app_id: &str, extra: &[&str], envs: &[(&str, &str)]) -> Sidecar {
        let http_port = free_port();
        let grpc_port = free_port();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--app-id".into(),
            app_id.into(),
            "--dapr-http-port".into(),
            http_port.to_string(),
            "--dapr-grpc-port".into(),
            grpc_port.to_string(),
            "--dapr-listen-address".into(),
            "127.0.0.1".into(),
            "--concurrency".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(args, envs, http_port, grpc_port).await
    }

    async fn spawn(
        args: Vec<String>,
        envs: Vec<(String, String)>,
        http_port: u16,
        grpc_port: u16,
    ) -> Sidecar {
        let mut cmd = Command::new(common::mecha_bin());
        cmd.args(&args)
            .env_remove("DAPR_API_TOKEN")
            .env_remove("APP_API_TOKEN")
            .env_remove("APP_ID")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn mecha");
        let mut s = Sidecar {
            child,
            http_port,
            grpc_port,
            args,
            envs,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("mecha exited early: {status}");
            }
            if let Ok(r) = common::get(&format!("{}/v1.0/healthz", s.url())).await {
                if r.status == 204 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "mecha did not become healthy");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        s
    }

    /// Stops this process (SIGKILL when `kill`, else SIGTERM and wait) and starts it again with
    /// the same arguments and ports.
    pub async fn restart(mut self, kill: bool) -> Sidecar {
        if kill {
            let _ = self.child.kill();
        } else {
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
        }
        let _ = self.child.wait();
        let args = std::mem::take(&mut self.args);
        let envs = std::mem::take(&mut self.envs);
        let (h, g) = (self.http_port, self.grpc_port);
        drop(self);
        Self::spawn(args, envs, h, g).await
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}

/// Sends a request with a body and headers.
pub async fn req(
    method: &str,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> common::Response {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    common::send(
        &common::client(),
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    )
    .await
    .unwrap()
}

pub async fn post_json(url: &str, body: &str) -> common::Response {
    req("POST", url, body, &[("content-type", "application/json")]).await
}

/// A real `redis-server` on a free port, without persistence, killed when dropped. Fails loudly
/// when redis-server is not installed (scripts/test.sh installs it).
pub struct Redis {
    pub child: Child,
    pub port: u16,
    /// The `requirepass` it was started with, for `cli`.
    password: Option<String>,
    _dir: TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    pub async fn start() -> Redis {
        Self::start_with(&[]).await
    }

    /// A redis-server with extra configuration, e.g. `["--requirepass", "pw"]`.
    pub async fn start_with(extra: &[&str]) -> Redis {
        let port = free_port();
        let dir = TempDir::new();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(&dir.0)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server is required for these tests (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let password = extra
            .iter()
            .position(|a| *a == "--requirepass")
            .and_then(|i| extra.get(i + 1))
            .map(|p| p.to_string());
        Redis {
            child,
            port,
            password,
            _dir: dir,
        }
    }

    /// Runs a command with `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(
                self.password
                    .iter()
                    .flat_map(|p| ["--no-auth-warning", "-a", p.as_str()]),
            )
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Writes Dapr resource files into a new directory.
pub fn resources(files: &[(&str, String)]) -> TempDir {
    let d = TempDir::new();
    for (name, text) in files {
        std::fs::write(d.0.join(name), text).unwrap();
    }
    d
}

pub fn component(name: &str, type_: &str, metadata: &[(&str, &str)]) -> String {
    let mut s = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {type_}\n  version: v1\n  metadata:{}\n",
        if metadata.is_empty() { " []" } else { "" }
    );
    for (k, v) in metadata {
        s.push_str(&format!("  - name: {k}\n    value: \"{v}\"\n"));
    }
    s
}
