//! Transparent sidecar tests in real network namespaces: `mecha iptables` rules, SO_ORIGINAL_DST,
//! ORIGINAL_DST/passthrough clusters, filter_chain_match with the TLS/HTTP inspectors, inbound
//! capture, and exact uninstall. Needs root, `ip`, `iptables` and `setpriv`.

mod netns;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use netns::{mecha_bin, stat, MechaProc, Netns, Topology};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OUTBOUND: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 15000}}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}
    - name: envoy.filters.listener.http_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}
    listener_filters_timeout: 1s
    continue_on_listener_filters_timeout: true
    filter_chains:
    - name: http
      filter_chain_match: {destination_port: 80, application_protocols: [http/1.1, h2c]}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: outbound_http}
              response_headers_to_add:
              - header: {key: x-mecha-route, value: outbound-http}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
    - name: tls-sni
      filter_chain_match: {transport_protocol: tls, server_names: [secure.example.com]}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tls_sni
          cluster: PassthroughCluster
    default_filter_chain:
      name: passthrough
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: passthrough
          cluster: PassthroughCluster
  clusters:
  - name: outbound_http
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
"#;

const INBOUND: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 15000}}
static_resources:
  listeners:
  - name: virtualInbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15006}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
    filter_chains:
    - name: inbound-8080
      filter_chain_match: {destination_port: 8080}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_8080
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: "inbound|8080||"}
              response_headers_to_add:
              - header: {key: x-mecha-inbound, value: "8080"}
          http_filters:
          - name: envoy.filters.http.router
  clusters:
  - name: "inbound|8080||"
    connect_timeout: 2s
    load_assignment:
      cluster_name: "inbound|8080||"
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
"#;

/// An HTTP/1.1 server answering `server:<path>` with `x-served-by: <name>`.
fn http_server(ns: &Netns, addr: SocketAddr, name: &'static str) {
    let listener = ns.run(async move { tokio::net::TcpListener::bind(addr).await });
    let listener = listener.expect("bind http server");
    ns.spawn(async move {
        loop {
            let Ok((s, peer)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| async move {
                    let body = format!("{name}:{}:{}", req.uri().path(), peer.ip());
                    let resp = http::Response::builder()
                        .header("x-served-by", name)
                        .body(Full::new(Bytes::from(body)))
                        .expect("response");
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

/// An HTTP/1.1 server that answers 503 to its first `failures` requests, then 200; it counts
/// every request it sees in `hits`.
fn flaky_http_server(
    ns: &Netns,
    addr: SocketAddr,
    failures: usize,
    hits: Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    let listener = ns
        .run(async move { tokio::net::TcpListener::bind(addr).await })
        .expect("bind flaky server");
    ns.spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<_>| {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let status = if n < failures { 503 } else { 200 };
                        let resp = http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(format!("attempt {}", n + 1))))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

fn echo_server(ns: &Netns, addr: SocketAddr) {
    let listener = ns
        .run(async move { tokio::net::TcpListener::bind(addr).await })
        .expect("bind echo");
    ns.spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// GET http://addr/path from the current namespace: (status, x-mecha-* headers, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, http::HeaderMap, String), String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

fn stats(ns: &Netns) -> String {
    ns.run(netns::admin_get("/stats")).expect("admin /stats").1
}

fn install(ns: &Netns, extra: &[&str]) {
    let mut args = vec![mecha_bin(), "iptables", "install"];
    args.extend_from_slice(extra);
    ns.exec_ok(&args);
}

struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// The server's (self-signed) certificate, the only root the client trusts.
    cert: rustls::pki_types::CertificateDer<'static>,
}

/// A self-signed certificate for both names, trusted by the client config.
fn tls_configs() -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec![
        "secure.example.com".to_string(),
        "other.example.com".to_string(),
    ])
    .expect("certificate");
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        ck.key_pair.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        server: Arc::new(server),
        client: Arc::new(client),
        cert: ck.cert.der().clone(),
    }
}

/// A TLS server that answers one line with `tls:<sni>:<line>`.
fn tls_server(ns: &Netns, addr: SocketAddr, cfg: Arc<rustls::ServerConfig>) {
    let listener = ns
        .run(async move { tokio::net::TcpListener::bind(addr).await })
        .expect("bind tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    ns.spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
                let mut buf = vec![0u8; 256];
                let Ok(n) = tls.read(&mut buf).await else {
                    return;
                };
                let reply = format!("tls:{sni}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
}

/// A TLS exchange with `sni` through whatever is at `addr` (10 s at most): the reply and the
/// certificate the peer presented in the handshake.
async fn tls_call(
    addr: SocketAddr,
    sni: &'static str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(String, Vec<u8>), String> {
    let call = async move {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(sni).map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, s)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or("no peer certificate")?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        Ok((String::from_utf8_lossy(&out).into_owned(), peer_cert))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[test]
fn outbound_capture_http_and_raw_tcp() {
    let mut t = Topology::new();
    let server_ip = t.server_ip;
    http_server(&t.server, (server_ip, 80).into(), "server");
    echo_server(&t.server, (server_ip, 7000).into());
    install(&t.client, &[]);
    t.procs.push(MechaProc::start(&t.client, OUTBOUND));

    // Plain HTTP to the server's IP goes through mecha's route (its response header) and the
    // ORIGINAL_DST cluster delivers it to the original destination.
    let (status, headers, body) = t
        .client
        .run(http_get((server_ip, 80).into(), "/hello"))
        .expect("http through mecha");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("x-mecha-route").map(|v| v.as_bytes()),
        Some(&b"outbound-http"[..])
    );
    assert_eq!(
        headers.get("x-served-by").map(|v| v.as_bytes()),
        Some(&b"server"[..])
    );
    assert!(body.starts_with("server:/hello:"), "{body}");
    let s = stats(&t.client);
    assert_eq!(stat(&s, "http.outbound_http.downstream_rq_total"), 1, "{s}");
    assert_eq!(
        stat(&s, "cluster.outbound_http.upstream_rq_total"),
        1,
        "{s}"
    );
    assert_eq!(stat(&s, "http_inspector.http11_found"), 1, "{s}");

    // Raw TCP (not HTTP, not TLS) passes through byte-exact via the default chain.
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let echoed = t.client.run(async move {
        tokio::time::timeout(std::time::Duration::from_secs(10), async move {
            let mut s = tokio::net::TcpStream::connect((server_ip, 7000))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut r, mut w) = s.split();
            let write = async {
                w.write_all(&payload).await?;
                w.shutdown().await
            };
            let mut out = Vec::new();
            let read = r.read_to_end(&mut out);
            let (wr, rd) = tokio::join!(write, read);
            wr.map_err(|e| format!("write: {e} (read {} bytes)", out.len()))?;
            rd.map_err(|e| format!("read: {e}"))?;
            Ok::<_, String>(out)
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
    });
    let echoed = echoed.unwrap_or_else(|e| panic!("echo through mecha: {e}\n{}", stats(&t.client)));
    assert!(
        echoed == expected,
        "echo differs ({} vs {} bytes)",
        echoed.len(),
        expected.len()
    );

    let s = stats(&t.client);
    assert_eq!(stat(&s, "tcp.passthrough.downstream_cx_total"), 1, "{s}");
    assert_eq!(stat(&s, "tls_inspector.tls_not_found"), 2, "{s}");
    // mecha's own upstream connections are not captured again: exactly the client's two
    // connections reached the outbound listener (a loop would add one per upstream connection).
    assert_eq!(
        stat(&s, "listener.0.0.0.0_15001.downstream_cx_total"),
        2,
        "{s}"
    );
}

#[test]
fn outbound_retries_go_to_the_original_destination() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut t = Topology::new();
    let server_ip = t.server_ip;
    let hits = Arc::new(AtomicUsize::new(0));
    flaky_http_server(&t.server, (server_ip, 80).into(), 2, hits.clone());
    http_server(&t.server, (server_ip, 8080).into(), "other");
    install(&t.client, &[]);
    // The captured HTTP route (any port) retries 5xx: every attempt must go to the request's
    // original destination, not to another destination the ORIGINAL_DST cluster has seen.
    let config = OUTBOUND
        .replace(
            "route: {cluster: outbound_http}",
            "route: {cluster: outbound_http, retry_policy: {retry_on: 5xx, num_retries: 3, \
             retry_back_off: {base_interval: 0.001s}}}",
        )
        .replace(
            "destination_port: 80, application_protocols",
            "application_protocols",
        );
    assert_eq!(config.matches("retry_policy").count(), 1);
    assert!(!config.contains("destination_port"));
    t.procs.push(MechaProc::start(&t.client, &config));

    // A second destination in the cluster's host table.
    let (status, headers, _) = t
        .client
        .run(http_get((server_ip, 8080).into(), "/warm"))
        .expect("http to the second destination");
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("x-served-by").map(|v| v.as_bytes()),
        Some(&b"other"[..])
    );

    let (status, headers, body) = t
        .client
        .run(http_get((server_ip, 80).into(), "/retry"))
        .expect("http through mecha");
    let s = stats(&t.client);
    assert_eq!(status, 200, "{body}\n{s}");
    assert_eq!(body, "attempt 3", "{s}");
    assert!(headers.get("x-served-by").is_none(), "{headers:?}");
    assert_eq!(
        headers.get("x-mecha-route").map(|v| v.as_bytes()),
        Some(&b"outbound-http"[..])
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(
        stat(&s, "cluster.outbound_http.upstream_rq_retry"),
        2,
        "{s}"
    );
    assert_eq!(
        stat(&s, "cluster.outbound_http.upstream_rq_retry_success"),
        1,
        "{s}"
    );
    assert_eq!(
        stat(&s, "cluster.outbound_http.upstream_rq_total"),
        4,
        "{s}"
    );
}

#[test]
fn inbound_capture_delivers_to_the_app_with_inbound_stats() {
    let mut t = Topology::new();
    // The app listens on all addresses; mecha delivers to it on 127.0.0.1:8080.
    http_server(&t.server, (Ipv4Addr::UNSPECIFIED, 8080).into(), "app");
    install(&t.server, &[]);
    t.procs.push(MechaProc::start(&t.server, INBOUND));
    let server_ip = t.server_ip;
    let (status, headers, body) = t
        .client
        .run(http_get((server_ip, 8080).into(), "/in"))
        .expect("inbound request");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("x-mecha-inbound").map(|v| v.as_bytes()),
        Some(&b"8080"[..])
    );
    // Delivered by mecha (from loopback), not directly from the client.
    assert_eq!(body, "app:/in:127.0.0.1");
    let s = stats(&t.server);
    assert_eq!(stat(&s, "http.inbound_8080.downstream_rq_total"), 1, "{s}");
    assert_eq!(stat(&s, "cluster.inbound|8080||.upstream_rq_2xx"), 1, "{s}");
    assert_eq!(
        stat(&s, "listener.0.0.0.0_15006.downstream_cx_total"),
        1,
        "{s}"
    );
    // The admin port is excluded from inbound capture by default.
    let client_ip = t.client_ip;
    assert_ne!(client_ip, server_ip);
}

#[test]
fn install_is_idempotent_and_uninstall_restores_iptables_exactly() {
    let t = Topology::new();
    http_server(&t.server, (t.server_ip, 80).into(), "server");
    // Somebody else's rules, which must survive install + uninstall untouched.
    t.client.exec_ok(&[
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "RETURN",
    ]);
    t.client.exec_ok(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9998", "-j", "ACCEPT",
    ]);
    let before = t.client.iptables_rules();

    // --dry-run prints the commands and touches nothing.
    let dry = t
        .client
        .exec_ok(&[mecha_bin(), "iptables", "install", "--dry-run"]);
    assert!(dry.contains("-t nat -N MECHA_OUTPUT"), "{dry}");
    assert!(
        dry.contains("-t nat -A MECHA_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{dry}"
    );
    assert!(
        dry.contains("-t nat -A MECHA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
        "{dry}"
    );
    assert!(
        dry.contains("-t nat -A MECHA_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
        "{dry}"
    );
    assert_eq!(
        t.client.iptables_rules(),
        before,
        "--dry-run changed iptables"
    );

    install(&t.client, &[]);
    let once = t.client.iptables_rules();
    install(&t.client, &[]);
    assert_eq!(
        t.client.iptables_rules(),
        once,
        "a second install must leave one set of rules"
    );
    assert!(once.contains("-A OUTPUT -p tcp -j MECHA_OUTPUT"), "{once}");
    // With the rules and no proxy on 15001 the server is unreachable: capture is in effect.
    let addr: SocketAddr = (t.server_ip, 80).into();
    assert!(t.client.run(http_get(addr, "/")).is_err());

    t.client.exec_ok(&[mecha_bin(), "iptables", "uninstall"]);
    assert_eq!(
        t.client.iptables_rules(),
        before,
        "uninstall must restore iptables exactly"
    );
    assert!(!t.client.exec_ok(&["iptables-save"]).contains("MECHA"));
    let (status, headers, _) = t
        .client
        .run(http_get(addr, "/"))
        .expect("direct after uninstall");
    assert_eq!(status, 200);
    assert!(headers.get("x-mecha-route").is_none());
}

#[test]
fn iptables_errors_are_clear() {
    let t = Topology::new();
    // Not privileged.
    let out = t.client.exec(&[
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        mecha_bin(),
        "iptables",
        "install",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root or with CAP_NET_ADMIN") || err.contains("Permission denied"),
        "{err}"
    );
    // No iptables binary in PATH.
    let out = t.client.exec(&[
        "env",
        "PATH=/nonexistent",
        mecha_bin(),
        "iptables",
        "install",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was not found in PATH"), "{err}");
    // Bad option.
    let out = t.client.exec(&[
        mecha_bin(),
        "iptables",
        "install",
        "--exclude-outbound-cidrs",
        "10.0.0.0/99",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--exclude-outbound-cidrs"));
}

#[test]
fn tls_passthrough_with_sni_matching() {
    let mut t = Topology::new();
    let server_ip = t.server_ip;
    let tls = tls_configs();
    tls_server(&t.server, (server_ip, 443).into(), tls.server.clone());
    install(&t.client, &[]);
    t.procs.push(MechaProc::start(&t.client, OUTBOUND));

    // TLS stays end to end: the client, which trusts only the server's certificate, completes
    // the handshake with the real server (mecha never terminates it) and the data comes back.
    // The SNI picks the `tls-sni` chain.
    let cfg = tls.client.clone();
    let (reply, cert) = t
        .client
        .run(tls_call((server_ip, 443).into(), "secure.example.com", cfg))
        .unwrap_or_else(|e| panic!("tls via the sni chain: {e}\n{}", stats(&t.client)));
    assert_eq!(reply, "tls:secure.example.com:ping");
    assert_eq!(cert, tls.cert.to_vec(), "the server's own certificate");
    let s = stats(&t.client);
    assert_eq!(stat(&s, "tcp.tls_sni.downstream_cx_total"), 1, "{s}");
    assert_eq!(stat(&s, "tcp.passthrough.downstream_cx_total"), 0, "{s}");
    assert_eq!(
        stat(&s, "cluster.PassthroughCluster.upstream_cx_total"),
        1,
        "{s}"
    );

    // Another SNI matches no chain's server_names: the default (passthrough) chain takes it,
    // still end to end.
    let cfg = tls.client.clone();
    let (reply, cert) = t
        .client
        .run(tls_call((server_ip, 443).into(), "other.example.com", cfg))
        .unwrap_or_else(|e| panic!("tls via the default chain: {e}\n{}", stats(&t.client)));
    assert_eq!(reply, "tls:other.example.com:ping");
    assert_eq!(cert, tls.cert.to_vec());

    let s = stats(&t.client);
    assert_eq!(stat(&s, "tcp.tls_sni.downstream_cx_total"), 1, "{s}");
    assert_eq!(stat(&s, "tcp.passthrough.downstream_cx_total"), 1, "{s}");
    assert_eq!(stat(&s, "tls_inspector.tls_found"), 2, "{s}");
    assert_eq!(stat(&s, "tls_inspector.sni_found"), 2, "{s}");
    // The ClientHello alone decided the chain: nothing waited for the listener filter timeout
    // (continue_on_listener_filters_timeout would otherwise have sent both to the default chain).
    assert_eq!(
        stat(&s, "listener.0.0.0.0_15001.downstream_pre_cx_timeout"),
        0,
        "{s}"
    );
    assert_eq!(stat(&s, "http_inspector.http_not_found"), 0, "{s}");
    assert_eq!(
        stat(&s, "listener.0.0.0.0_15001.downstream_cx_total"),
        2,
        "{s}"
    );
}
