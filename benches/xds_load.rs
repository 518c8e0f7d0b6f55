//! xDS: request throughput during a stream of updates vs without (issue 6, Benchmarks; target
//! >= 95 %).
//!
//! One run hosts, in this process, an HTTP/1.1 upstream and the scripted ADS control plane of the
//! xDS tests (`tests/xds/cp.rs`), and starts the real `mecha` binary (bench profile,
//! `--concurrency 1`, pinned to CPU 0) configured only through xDS: CLUSTERS STATIC clusters, one
//! listener with RDS, one route configuration with ROUTES routes. `wrk` (pinned to CPU 1 with this
//! process) loads `/r0/x` with keep-alive connections. Rounds alternate:
//!
//! - `quiet`: no updates;
//! - `updates`: every UPDATE_MS the control plane pushes, alternately, an RDS response (all
//!   routes; the target of the route under load flips between two clusters) and a SotW CDS
//!   response (all clusters; one cluster's connect_timeout flips).
//!
//! Printed: req/s per round, the median per mode, the updates/quiet ratio, the number of updates
//! mecha accepted (its `update_success` stats), non-2xx responses, and the CPU used by mecha and by
//! this process (upstream + control plane) during the round.
//!
//! `cargo bench --bench xds_load`
//! (env: DURATION=10 ROUNDS=3 CONNS=32 CLUSTERS=100 ROUTES=1000 UPDATE_MS=100)

#[allow(dead_code)]
mod common {
    pub fn admin_yaml(port: u16) -> String {
        format!(
            "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
        )
    }
}
#[allow(dead_code)]
#[path = "../tests/xds/cp.rs"]
mod cp;

use bytes::Bytes;
use cp::{ControlPlane, CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn clusters(n: usize, up: SocketAddr, flip: bool) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let timeout = if flip && i == n - 1 { "2s" } else { "1s" };
            let mut c = cp::xds_static_cluster(&format!("c{i}"), &[up]);
            c["connect_timeout"] = json!(timeout);
            c
        })
        .collect()
}

/// `routes` prefix routes in one virtual host; `/r0/` goes to c0 or c1.
fn route_config(routes: usize, clusters: usize, flip: bool) -> serde_json::Value {
    let rs: Vec<_> = (0..routes)
        .map(|k| {
            let c = if k == 0 { flip as usize } else { k % clusters };
            json!({"match": {"prefix": format!("/r{k}/")}, "route": {"cluster": format!("c{c}")}})
        })
        .collect();
    json!({"name": "routes", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": rs}]})
}

fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

async fn stat(admin: u16, name: &str) -> Option<i64> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{admin}/stats")])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (k, v) = l.split_once(": ")?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

/// (downstream, upstream) connections opened so far: the connection manager's and those of the
/// two clusters the route under load alternates between.
async fn connections(admin: u16) -> (i64, i64) {
    let down = stat(admin, "http.ingress.downstream_cx_total").await;
    let c0 = stat(admin, "cluster.c0.upstream_cx_total").await;
    let c1 = stat(admin, "cluster.c1.upstream_cx_total").await;
    (down.unwrap_or(0), c0.unwrap_or(0) + c1.unwrap_or(0))
}

struct Wrk {
    rps: f64,
    non2xx: u64,
    errors: String,
}

async fn wrk(port: u16, secs: u64, conns: u64) -> Wrk {
    let out = tokio::process::Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg(format!("http://127.0.0.1:{port}/r0/x"))
        .output()
        .await
        .expect("wrk (apt-get install -y wrk)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| v.trim().to_string()))
    };
    Wrk {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        non2xx: field("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        errors: field("Socket errors:").unwrap_or_default(),
    }
}

/// CPU time (user + system) of a process, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / tick
}

/// Kills the mecha process even if the run panics.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // cargo bench passes `--bench`; nothing to filter here.
    let secs = env("DURATION", 10);
    let rounds = env("ROUNDS", 3);
    let conns = env("CONNS", 32);
    let n_clusters = env("CLUSTERS", 100).max(2) as usize;
    let n_routes = env("ROUTES", 1000).max(1) as usize;
    let every = Duration::from_millis(env("UPDATE_MS", 100));
    pin_self(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let up = upstream().await;
        let cp = ControlPlane::start().await;
        let (admin, port) = (free_port(), free_port());
        cp.set(CLUSTER_TYPE, clusters(n_clusters, up, false));
        cp.set(
            LISTENER_TYPE,
            vec![cp::listener("ingress", port, "routes", "ingress")],
        );
        cp.set(ROUTE_TYPE, vec![route_config(n_routes, n_clusters, false)]);
        let dir = std::env::temp_dir().join(format!("mecha-xds-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let cfg = dir.join("bootstrap.yaml");
        std::fs::write(&cfg, cp::bootstrap(admin, cp.addr, "GRPC")).expect("write config");
        let mecha = KillOnDrop(Command::new("taskset")
            .args(["-c", "0", env!("CARGO_BIN_EXE_mecha"), "run", "-c"])
            .arg(&cfg)
            .args(["--concurrency", "1", "-l", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mecha"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = tokio::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://127.0.0.1:{port}/r0/x"))
                .output()
                .await
                .map(|o| o.stdout == b"200")
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "mecha did not serve via xDS");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "xds_load: {n_clusters} clusters, {n_routes} routes, wrk -t1 -c{conns} -d{secs}s, \
             updates every {} ms (RDS and CDS alternately)",
            every.as_millis()
        );
        wrk(port, 2, conns).await; // warm-up
        let (mut quiet, mut busy) = (vec![], vec![]);
        for round in 0..rounds {
            for updating in [false, true] {
                let cx0 = connections(admin).await;
                let rds0 = stat(admin, "http.ingress.rds.routes.update_success").await;
                let cds0 = stat(admin, "cluster_manager.cds.update_success").await;
                let (m0, s0, t0) = (cpu_s(mecha.0.id()), cpu_s(std::process::id()), Instant::now());
                let pusher = updating.then(|| {
                    let cp = cp.clone();
                    // Encoded once: the control plane shares wrk's CPU, so pushes must be cheap.
                    let rds = [false, true].map(|f| {
                        cp::encode(ROUTE_TYPE, vec![route_config(n_routes, n_clusters, f)])
                    });
                    let cds = [false, true]
                        .map(|f| cp::encode(CLUSTER_TYPE, clusters(n_clusters, up, f)));
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(every);
                        let mut n = 0u64;
                        loop {
                            tick.tick().await;
                            n += 1;
                            let flip = (n / 2) % 2 == 1;
                            if n % 2 == 1 {
                                cp.set_encoded(ROUTE_TYPE, rds[flip as usize].clone());
                            } else {
                                cp.set_encoded(CLUSTER_TYPE, cds[flip as usize].clone());
                            }
                        }
                    })
                });
                let w = wrk(port, secs, conns).await;
                if let Some(p) = pusher {
                    p.abort();
                }
                let wall = t0.elapsed().as_secs_f64();
                let mecha_cpu = 100.0 * (cpu_s(mecha.0.id()) - m0) / wall;
                let self_cpu = 100.0 * (cpu_s(std::process::id()) - s0) / wall;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let rds = stat(admin, "http.ingress.rds.routes.update_success").await;
                let cds = stat(admin, "cluster_manager.cds.update_success").await;
                let cx = connections(admin).await;
                let applied = rds.unwrap_or(0) - rds0.unwrap_or(0) + cds.unwrap_or(0)
                    - cds0.unwrap_or(0);
                println!(
                    "round {round} {:<8} {:>10.0} req/s  updates accepted: {applied:>4}  non-2xx: {}  socket errors: {}  new connections: downstream {}, upstream {}  CPU: mecha {mecha_cpu:.0} %, upstream+control plane {self_cpu:.0} %",
                    if updating { "updates" } else { "quiet" },
                    w.rps,
                    w.non2xx,
                    if w.errors.is_empty() { "none" } else { &w.errors },
                    cx.0 - cx0.0,
                    cx.1 - cx0.1,
                );
                if updating {
                    busy.push(w.rps);
                } else {
                    quiet.push(w.rps);
                }
            }
        }
        let (q, b) = (median(quiet), median(busy));
        println!(
            "median: quiet {q:.0} req/s, updates {b:.0} req/s, ratio {:.1} % (target >= 95 %)",
            100.0 * b / q
        );
        drop(mecha);
        cp.stop();
        let _ = std::fs::remove_dir_all(&dir);
    });
}
