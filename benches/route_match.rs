//! Route matching over 10 / 1,000 / 10,000 routes.
//!
//! The table is a realistic mix, in the order a bootstrap would list them: exact `path`
//! matches, `prefix` matches, `safe_regex` matches and prefixes guarded by a header matcher, all in
//! one `*` virtual host (Envoy matches routes of a virtual host in order, so the last route is the
//! worst case). Benchmarked: a request that hits the first route, the middle route, the last
//! route (worst case), and one that matches nothing (404, also a full scan); plus virtual-host
//! selection among 1,000 domains.
//!
//! `cargo bench --bench route_match`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use mecha_config::{ConfigError, RouteConfiguration};
use mecha_proxy::route::{Action, ClusterTarget, RouteTable};
use serde_json::{json, Value};
use std::hint::black_box;

/// The i-th route of the mix and a request (path, header) that it — and no earlier route — matches.
fn route(i: usize) -> (Value, String, Option<(&'static str, String)>) {
    let cluster = format!("svc{}", i % 17);
    match i % 4 {
        0 => (
            json!({"match": {"path": format!("/api/v1/exact{i}")}, "route": {"cluster": cluster}}),
            format!("/api/v1/exact{i}"),
            None,
        ),
        1 => (
            json!({"match": {"prefix": format!("/app{i}/")}, "route": {"cluster": cluster}}),
            format!("/app{i}/static/main.js?v=3"),
            None,
        ),
        2 => (
            json!({"match": {"safe_regex": {"regex": format!("/users{i}/[0-9]+/profile")}},
                   "route": {"cluster": cluster}}),
            format!("/users{i}/12345/profile"),
            None,
        ),
        _ => (
            json!({"match": {"prefix": format!("/canary{i}"),
                             "headers": [{"name": "x-canary",
                                          "string_match": {"exact": format!("group-{i}")}}]},
                   "route": {"cluster": cluster}}),
            format!("/canary{i}/checkout"),
            Some(("x-canary", format!("group-{i}"))),
        ),
    }
}

fn table(n: usize) -> RouteTable {
    let routes: Vec<Value> = (0..n).map(|i| route(i).0).collect();
    let rc: RouteConfiguration = serde_json::from_value(json!({
        "name": "bench",
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
    }))
    .expect("route configuration");
    compile(&rc)
}

fn cluster_of(r: &mecha_proxy::route::RouteEntry) -> String {
    match &r.action {
        Action::Route(a) => match &a.target {
            ClusterTarget::Single(c) => c.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

fn compile(rc: &RouteConfiguration) -> RouteTable {
    let parser = |_: &str, _: &mecha_config::TypedConfig, p: &str| {
        Err::<std::sync::Arc<dyn std::any::Any + Send + Sync>, _>(ConfigError::new(p, "unused"))
    };
    RouteTable::compile(rc, "route_config", &parser).unwrap_or_else(|e| panic!("{e:?}"))
}

/// A typical browser/API request's headers, plus the route's header if it needs one.
fn headers(extra: Option<(&'static str, String)>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("api.example.com"));
    h.insert(
        "user-agent",
        HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64)"),
    );
    h.insert("accept", HeaderValue::from_static("application/json"));
    h.insert(
        "accept-encoding",
        HeaderValue::from_static("gzip, deflate, br"),
    );
    h.insert("x-trace", HeaderValue::from_static("abc123"));
    if let Some((k, v)) = extra {
        h.insert(k, HeaderValue::from_str(&v).expect("value"));
    }
    h
}

fn bench_routes(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 1_000, 10_000] {
        let t = table(n);
        assert_eq!(t.route_count(), n);
        for (label, i) in [("first", 0), ("middle", n / 2), ("last", n - 1)] {
            let (_, path, extra) = route(i);
            let h = headers(extra);
            // The request must select exactly route i.
            let r = t
                .route(&http::Method::GET, "api.example.com", &path, &h)
                .expect("a route");
            assert_eq!(cluster_of(r), format!("svc{}", i % 17));
            g.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| {
                    black_box(t.route(
                        &http::Method::GET,
                        black_box("api.example.com"),
                        black_box(path.as_str()),
                        black_box(&h),
                    ))
                })
            });
        }
        let h = headers(None);
        assert!(t
            .route(&http::Method::GET, "api.example.com", "/nothing/here", &h)
            .is_none());
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| {
                black_box(t.route(
                    &http::Method::GET,
                    black_box("api.example.com"),
                    black_box("/nothing/here"),
                    black_box(&h),
                ))
            })
        });
    }
    g.finish();
}

fn bench_vhosts(c: &mut Criterion) {
    // 1,000 virtual hosts: exact domains, suffix and prefix wildcards, and a catch-all.
    let mut vhosts: Vec<Value> = (0..1000)
        .map(|i| {
            let domains = match i % 3 {
                0 => vec![
                    format!("svc{i}.example.com"),
                    format!("svc{i}.example.com:8080"),
                ],
                1 => vec![format!("*.tenant{i}.example.com")],
                _ => vec![format!("svc{i}.internal.*")],
            };
            json!({"name": format!("vh{i}"), "domains": domains,
                   "routes": [{"match": {"prefix": "/"}, "route": {"cluster": format!("c{i}")}}]})
        })
        .collect();
    vhosts.push(json!({"name": "default", "domains": ["*"],
                       "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "default"}}]}));
    let rc: RouteConfiguration =
        serde_json::from_value(json!({"name": "vh", "virtual_hosts": vhosts})).expect("config");
    let t = compile(&rc);
    let h = headers(None);
    let mut g = c.benchmark_group("vhost_select_1000");
    g.throughput(Throughput::Elements(1));
    for (label, host) in [
        ("exact", "svc999.example.com"),
        ("exact_port", "svc999.example.com:8080"),
        ("suffix", "a.tenant997.example.com"),
        ("prefix", "svc998.internal.local"),
        ("catch_all", "unknown.example.org"),
        ("uppercase", "SVC999.Example.COM"),
    ] {
        assert!(t.route(&http::Method::GET, host, "/", &h).is_some());
        g.bench_function(label, |b| {
            b.iter(|| {
                black_box(t.route(
                    &http::Method::GET,
                    black_box(host),
                    black_box("/x"),
                    black_box(&h),
                ))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_routes, bench_vhosts);
criterion_main!(benches);
