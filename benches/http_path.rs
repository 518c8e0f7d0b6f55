//! The HTTP request path in-process, without the downstream codec:
//!
//! - `hcm_prepare`: the connection manager's request preparation for a typical request
//!   (hop-by-hop stripping, `x-forwarded-*`, `x-request-id`, route selection, request info);
//! - `chain_direct_response`: preparation + filter chain + router answering a `direct_response`
//!   route (no network);
//! - `chain_proxied_loopback`: preparation + filter chain + router + cluster pick + per-host pool,
//!   and a real HTTP/1.1 upstream on loopback (one keep-alive connection), body read to the end —
//!   everything mecha does for a proxied request except parsing/serialising the downstream side.
//!
//! The snapshot is built from a bootstrap exactly as `mecha run` builds it.
//!
//! `cargo bench --bench http_path`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mecha_proxy::http::{ConnInfo, Hcm};
use mecha_proxy::listener::Terminal;
use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

fn bootstrap(upstream: SocketAddr) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: bench
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            name: local
            virtual_hosts:
            - name: other
              domains: ["other.example.com"]
              routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: up }} }}]
            - name: api
              domains: ["api.example.com", "api.example.com:*"]
              routes:
              - match: {{ path: "/healthz" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}
              - match: {{ prefix: "/admin" }}
                route: {{ cluster: up }}
              - match: {{ safe_regex: {{ regex: "/users/[0-9]+" }} }}
                route: {{ cluster: up }}
              - match: {{ prefix: "/direct" }}
                direct_response: {{ status: 200, body: {{ inline_string: "hello" }} }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: up }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
"#,
        ip = upstream.ip(),
        port = upstream.port()
    )
}

fn request(path: &str) -> Request<mecha_filters::Body> {
    Request::builder()
        .uri(path)
        .header("host", "api.example.com")
        .header("user-agent", "wrk/4.2")
        .header("accept", "*/*")
        .header("connection", "keep-alive")
        .body(mecha_filters::empty())
        .expect("request")
}

/// A minimal HTTP/1.1 upstream: 200 with a 2-byte body, keep-alive.
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
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Prepare, run the chain, read the response body to the end.
async fn run(hcm: &Hcm, mut req: Request<mecha_filters::Body>, info: ConnInfo) -> Bytes {
    assert!(hcm.prepare(&mut req, info).is_ok());
    let resp = hcm.chain.run(req).await;
    assert_eq!(resp.status(), 200);
    black_box(resp.into_body().collect().await.expect("body").to_bytes())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let up = rt.block_on(upstream());
    let hcm: Arc<Hcm> = rt.block_on(async {
        let b = mecha_config::parse_bootstrap(&bootstrap(up)).expect("bootstrap");
        let ctx = mecha_proxy::BuildContext::new(mecha_filters::Registry::new());
        let snap = mecha_proxy::build(&b, &ctx).expect("snapshot");
        ctx.clusters.store(snap.clusters.clone());
        match &snap.listeners[0].chains[0].terminal {
            Terminal::Http(h) => h.clone(),
            Terminal::Tcp(_) => unreachable!(),
        }
    });
    let info = ConnInfo {
        remote: "127.0.0.1:40000".parse().expect("addr"),
        local: "127.0.0.1:10000".parse().expect("addr"),
    };

    let mut g = c.benchmark_group("http_path");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hcm_prepare", |b| {
        b.iter_batched(
            || request("/users/12345?expand=1"),
            |mut req| {
                let r = hcm.prepare(&mut req, info);
                black_box((r.is_ok(), req))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("chain_direct_response", |b| {
        b.iter_batched(
            || request("/direct/x"),
            |req| rt.block_on(run(&hcm, req, info)),
            criterion::BatchSize::SmallInput,
        )
    });
    // Warm the pool so the benchmark measures reuse, not connects.
    rt.block_on(run(&hcm, request("/api/items"), info));
    g.bench_function("chain_proxied_loopback", |b| {
        b.iter_batched(
            || request("/api/items"),
            |req| rt.block_on(run(&hcm, req, info)),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
