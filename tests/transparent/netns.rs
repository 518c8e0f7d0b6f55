//! Network-namespace harness: two namespaces (client, server) joined by a veth pair, code run
//! inside a namespace on a dedicated thread (`setns` affects only the calling thread), and the
//! real `mecha` binary started inside a namespace as the proxy uid. Everything is removed on
//! drop — processes killed, namespaces deleted (which deletes their veths and iptables rules) —
//! also when a test panics. Names and subnets are unique per test process and topology.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const PROXY_UID: u32 = 1337;

/// Runs a command and panics with its output when it fails (missing tools fail loudly).
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (is it installed? scripts/test.sh installs iproute2 and iptables)"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn require_tools() {
    for tool in ["ip", "iptables", "iptables-save", "setpriv"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` is required by the transparent tests (scripts/test.sh installs iptables and iproute2)"
        );
    }
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the transparent tests create network namespaces and need root"
    );
}

/// One network namespace with a thread running a current-thread Tokio runtime inside it.
pub struct Netns {
    pub name: String,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Netns {
    fn create(name: &str) -> Netns {
        sh(&["ip", "netns", "add", name]);
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let path = format!("/var/run/netns/{name}");
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            tx.send(rt.handle().clone()).expect("send handle");
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        });
        let handle = rx.recv().expect("netns thread started");
        Netns {
            name: name.to_string(),
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Runs `fut` inside the namespace and waits for its result.
    pub fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("task in namespace panicked or took over 60 s")
    }

    /// Starts a background task inside the namespace (a server); it ends with the namespace.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(fut);
    }

    /// `ip netns exec <ns> args...`
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        Command::new(full[0])
            .args(&full[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {full:?}: {e}"))
    }

    /// Like [`Netns::exec`], panicking on failure.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `iptables-save` of the namespace without comments and packet counters.
    pub fn iptables_rules(&self) -> String {
        self.exec_ok(&["iptables-save", "-c"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                // Chain policy lines carry counters: `:OUTPUT ACCEPT [12:720]`.
                match l.find(" [") {
                    Some(i) if l.starts_with(':') => l[..i].to_string(),
                    _ if l.starts_with('[') => {
                        l.split_once(' ').map(|x| x.1).unwrap_or(l).to_string()
                    }
                    _ => l.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Client and server namespaces over a veth pair (`client_ip` <-> `server_ip`, a /30).
pub struct Topology {
    // Field order: processes die before the namespaces are deleted.
    pub procs: Vec<MechaProc>,
    pub client: Netns,
    pub server: Netns,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Topology {
    pub fn new() -> Topology {
        require_tools();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        // Unique per process and topology: names fit IFNAMSIZ (15), subnets do not overlap.
        let tag = format!("{:x}{}", pid & 0xfffff, seq);
        let id = (pid.wrapping_mul(31).wrapping_add(seq)) % (250 * 64);
        let (b, c) = ((id / 64) as u8 + 1, ((id % 64) * 4) as u8);
        let client_ip = Ipv4Addr::new(10, 200u8.wrapping_add(b % 50), b, c + 1);
        let server_ip = Ipv4Addr::new(10, 200u8.wrapping_add(b % 50), b, c + 2);
        let client = Netns::create(&format!("mtc{tag}"));
        let server = Netns::create(&format!("mts{tag}"));
        let (vc, vs) = (format!("mc{tag}"), format!("ms{tag}"));
        sh(&[
            "ip",
            "link",
            "add",
            &vc,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            &vs,
            "netns",
            &server.name,
        ]);
        sh(&[
            "ip",
            "-n",
            &client.name,
            "addr",
            "add",
            &format!("{client_ip}/30"),
            "dev",
            &vc,
        ]);
        sh(&[
            "ip",
            "-n",
            &server.name,
            "addr",
            "add",
            &format!("{server_ip}/30"),
            "dev",
            &vs,
        ]);
        sh(&["ip", "-n", &client.name, "link", "set", &vc, "up"]);
        sh(&["ip", "-n", &server.name, "link", "set", &vs, "up"]);
        Topology {
            procs: vec![],
            client,
            server,
            client_ip,
            server_ip,
        }
    }
}

pub fn mecha_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mecha")
}

/// The real `mecha` binary running in a namespace as the proxy uid/gid.
pub struct MechaProc {
    child: Child,
    pub log: PathBuf,
    _config: PathBuf,
}

impl MechaProc {
    /// Starts `mecha run` in `ns` as uid/gid 1337 and waits until its admin `/ready` answers.
    pub fn start(ns: &Netns, config: &str) -> MechaProc {
        let dir = std::env::temp_dir();
        let stem = format!(
            "mecha-transparent-{}-{}",
            ns.name,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let cfg = dir.join(format!("{stem}.yaml"));
        let log = dir.join(format!("{stem}.log"));
        std::fs::write(&cfg, config).expect("write config");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "setpriv"])
            .args([
                "--reuid",
                &PROXY_UID.to_string(),
                "--regid",
                &PROXY_UID.to_string(),
            ])
            .arg("--clear-groups")
            .arg(mecha_bin())
            .args(["run", "--concurrency", "1", "-l", "debug", "-c"])
            .arg(&cfg)
            .stdout(Stdio::from(log_file.try_clone().expect("log")))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn mecha");
        let proc = MechaProc {
            child,
            log,
            _config: cfg,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ns.run(admin_get("/ready")).is_some_and(|(s, _)| s == 200) {
                return proc;
            }
            assert!(
                Instant::now() < deadline,
                "mecha did not become ready: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MechaProc {
    fn drop(&mut self) {
        // `ip netns exec` execs setpriv, which execs mecha: the child pid is mecha itself.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- mecha log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// GET on the admin endpoint (127.0.0.1:15000) from inside the namespace: (status, body).
pub async fn admin_get(path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect("127.0.0.1:15000")
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
}

/// The value of one stat from `/stats` (0 when absent).
pub fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}
