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
    let (admin, port) = (free_port(), free_port());
    let m = Mecha::start(
        &tcp_bootstrap(
            admin,
            port,
            &static_cluster("echo", &[echo], "ROUND_ROBIN", ""),
            "",
        ),
        admin,
    )
    .await;
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
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.unwrap_or(0);
        closed_tx.send(n).await.unwrap();
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
        Some(0)
    );
    assert_eq!(m.stat("tcp.tcp_stats.idle_timeout").await, Some(1));
}

#[tokio::test]
async fn tcp_proxy_upstream_refused_closes_downstream() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (admin, port) = (free_port(), free_port());
    let m = Mecha::start(
        &tcp_bootstrap(
            admin,
            port,
            &static_cluster("echo", &[dead], "ROUND_ROBIN", ""),
            "",
        ),
        admin,
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        m.stat("cluster.echo.upstream_cx_connect_fail").await,
        Some(1)
    );
}
