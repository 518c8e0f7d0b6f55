//! The TCP proxy: byte-exact bidirectional streaming, half-close, idle timeout, stats.

use crate::common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tcp_bootstrap(admin: u16, port: u16, cluster: &str, idle: &str) -> String {
    format!(
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
{idle}
  clusters:
{cluster}
"#,
        admin_yaml = admin_yaml(admin)
    )
}

/// Starts mecha with a TCP proxy listener in front of cluster `echo` (round robin over `hosts`);
/// `extra` is more TcpProxy YAML. Returns mecha and the listener port.
async fn start_tcp(hosts: &[std::net::SocketAddr], extra: &str) -> (Mecha, u16) {
    let (admin, port) = (free_port(), free_port());
    let cfg = tcp_bootstrap(
        admin,
        port,
        &static_cluster("echo", hosts, "ROUND_ROBIN", ""),
        extra,
    );
    (Mecha::start(&cfg, admin).await, port)
}

/// Connects and expects mecha to close the connection without sending anything.
async fn expect_closed(port: u16) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// An echo server that reads until EOF, then writes everything back and closes (needs half-close).
async fn eof_echo() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![];
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(&buf).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_proxy_half_close_and_byte_exact() {
    let echo = eof_echo().await;
    let (m, port) = start_tcp(&[echo], "").await;
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&payload).await.unwrap();
        // Half-close: the server only answers after seeing EOF.
        w.shutdown().await.unwrap();
    };
    let mut got = vec![];
    let read = async { r.read_to_end(&mut got).await.unwrap() };
    tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
        .await
        .unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echoed bytes differ");
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(m.stat("tcp.tcp_stats.downstream_cx_total").await, Some(1));
    assert_eq!(
        m.stat("tcp.tcp_stats.downstream_cx_rx_bytes_total").await,
        Some(payload.len() as i64)
    );
    assert_eq!(
        m.stat("tcp.tcp_stats.downstream_cx_tx_bytes_total").await,
        Some(payload.len() as i64)
    );
    assert_eq!(m.stat("cluster.echo.upstream_cx_total").await, Some(1));
    // As Envoy's TCP connection pool, the proxied connection is one upstream request.
    assert_eq!(m.stat("cluster.echo.upstream_rq_total").await, Some(1));
    assert_eq!(m.stat("cluster.echo.upstream_rq_active").await, Some(0));
    let clusters = m.admin_get("/clusters").await.text();
    assert!(
        clusters.contains(&format!("echo::{echo}::rq_total::1\n")),
        "{clusters}"
    );
}

#[tokio::test]
async fn tcp_proxy_idle_timeout_closes_both_sides() {
    // An upstream that accepts and never sends.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        // Reads until mecha closes the connection, then reports how many bytes came.
        let (mut buf, mut total) = ([0u8; 16], 0);
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            total += n;
        }
        closed_tx.send(total).await.unwrap();
    });
    let (admin, port) = (free_port(), free_port());
    let cfg = tcp_bootstrap(
        admin,
        port,
        &static_cluster("echo", &[addr], "ROUND_ROBIN", ""),
        "          idle_timeout: 0.5s",
    );
    let m = Mecha::start(&cfg, admin).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"abcd").await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("idle timeout did not close")
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
            .await
            .unwrap(),
        Some(4)
    );
    assert_eq!(m.stat("tcp.tcp_stats.idle_timeout").await, Some(1));
    // A session cut by the idle timeout still counts the bytes it moved.
    assert_eq!(
        m.stat("tcp.tcp_stats.downstream_cx_rx_bytes_total").await,
        Some(4)
    );
}

#[tokio::test]
async fn tcp_proxy_upstream_refused_closes_downstream() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (m, port) = start_tcp(&[dead], "").await;
    expect_closed(port).await;
    assert_eq!(
        m.stat("cluster.echo.upstream_cx_connect_fail").await,
        Some(1)
    );
}

#[tokio::test]
async fn tcp_proxy_max_connect_attempts_tries_other_hosts() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let live = eof_echo().await;
    // Round robin over [dead, live]: with 2 attempts every connection gets through.
    let (m, port) = start_tcp(&[dead, live], "          max_connect_attempts: 2").await;
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"ping");
    }
    assert_eq!(
        m.stat("tcp.tcp_stats.upstream_cx_connect_attempts_exceeded")
            .await,
        Some(0)
    );
    assert!(m.stat("cluster.echo.upstream_cx_connect_fail").await >= Some(2));
}

#[tokio::test]
async fn tcp_proxy_gives_up_after_max_connect_attempts() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (m, port) = start_tcp(&[dead], "          max_connect_attempts: 3").await;
    expect_closed(port).await;
    assert_eq!(
        m.stat("cluster.echo.upstream_cx_connect_fail").await,
        Some(3)
    );
    assert_eq!(
        m.stat("tcp.tcp_stats.upstream_cx_connect_attempts_exceeded")
            .await,
        Some(1)
    );
}

/// An IPv6 wildcard listener is IPv6-only unless `ipv4_compat`, as in Envoy.
#[tokio::test]
async fn ipv6_listener_takes_ipv4_only_with_ipv4_compat() {
    let echo = eof_echo().await;
    for compat in [false, true] {
        let (admin, port) = (free_port(), free_port());
        let cfg = tcp_bootstrap(
            admin,
            port,
            &static_cluster("echo", &[echo], "ROUND_ROBIN", ""),
            "",
        )
        .replace(
            &format!("socket_address: {{ address: 127.0.0.1, port_value: {port} }}"),
            &format!(
                "socket_address: {{ address: \"::\", port_value: {port}, ipv4_compat: {compat} }}"
            ),
        );
        assert!(cfg.contains("ipv4_compat"), "{cfg}");
        let _m = Mecha::start(&cfg, admin).await;
        let v6 = tokio::net::TcpStream::connect(("::1", port)).await;
        assert!(v6.is_ok(), "IPv6 connect with ipv4_compat {compat}");
        let v4 = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        assert_eq!(v4.is_ok(), compat, "IPv4 connect with ipv4_compat {compat}");
    }
}
