//! Header processing of a typical request, piece by piece: hop-by-hop stripping (what the
//! connection manager does to every request and the router to every response), `x-request-id`
//! generation, and compiled header mutations (`request_headers_to_add/remove`,
//! `response_headers_to_add/remove`) with static values and `%VAR%` templates.
//! The connection manager's whole request preparation is benchmarked in `http_path`.
//!
//! `cargo bench --bench headers`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use mecha_config::HeaderMutations;
use mecha_proxy::http::headers::{strip_hop_by_hop, upgrade_type, uuid_v4};
use mecha_proxy::route::headers::{HeaderOps, Vars};
use serde_json::json;
use std::hint::black_box;

/// What a browser or an HTTP client library sends on a keep-alive connection.
fn typical_request() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("cookie", "session=3f8a9c0d2e1b; theme=dark"),
        ("x-forwarded-for", "203.0.113.7"),
        ("content-type", "application/json"),
        ("content-length", "42"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    h
}

fn typical_response() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("date", "Tue, 01 Jul 2025 12:00:00 GMT"),
        ("cache-control", "no-cache"),
        ("connection", "keep-alive"),
        ("x-internal-debug", "node-7"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    h
}

fn ops() -> HeaderOps {
    let m: serde_json::Value = json!({
        "request_headers_to_add": [
            {"header": {"key": "x-envoy-external-address", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
            {"header": {"key": "x-tenant", "value": "blue"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": "x-env", "value": "prod"}, "append_action": "ADD_IF_ABSENT"}
        ],
        "request_headers_to_remove": ["cookie"],
        "response_headers_to_add": [
            {"header": {"key": "x-served-by", "value": "mecha"}},
            {"header": {"key": "strict-transport-security", "value": "max-age=31536000"},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        "response_headers_to_remove": ["x-internal-debug"]
    });
    let opt = |k: &str| -> Vec<mecha_config::HeaderValueOption> {
        serde_json::from_value(m[k].clone()).expect("header options")
    };
    let names = |k: &str| -> Vec<String> { serde_json::from_value(m[k].clone()).expect("names") };
    let mutations = HeaderMutations {
        request_headers_to_add: opt("request_headers_to_add"),
        request_headers_to_remove: names("request_headers_to_remove"),
        response_headers_to_add: opt("response_headers_to_add"),
        response_headers_to_remove: names("response_headers_to_remove"),
    };
    HeaderOps::compile(&mutations, "route").expect("ops")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("headers");
    g.throughput(Throughput::Elements(1));
    let req = typical_request();
    let resp = typical_response();
    // The clone of a typical header map is the baseline every mutation bench below includes.
    g.bench_function("clone_request_map", |b| b.iter(|| black_box(req.clone())));
    g.bench_function("strip_hop_by_hop_request", |b| {
        b.iter_batched_ref(
            || req.clone(),
            |h| {
                let up = upgrade_type(h);
                strip_hop_by_hop(h, up.is_some());
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("strip_hop_by_hop_response", |b| {
        b.iter_batched_ref(
            || resp.clone(),
            |h| strip_hop_by_hop(h, false),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("x_request_id_uuid_v4", |b| b.iter(|| black_box(uuid_v4())));
    let ops = ops();
    let vars = Vars {
        downstream_remote: "203.0.113.7:51234".parse().expect("addr"),
        downstream_local: "10.0.0.1:10000".parse().expect("addr"),
        upstream: Some("10.0.3.4:8080".parse().expect("addr")),
        protocol: "HTTP/1.1",
    };
    g.bench_function("header_ops_request", |b| {
        b.iter_batched_ref(
            || req.clone(),
            |h| ops.apply_request(h, &vars),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("header_ops_response", |b| {
        b.iter_batched_ref(
            || resp.clone(),
            |h| ops.apply_response(h, &vars),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
