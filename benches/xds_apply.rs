//! xDS: from a received response to serving with it (issue 6, Benchmarks).
//!
//! The resources are real Envoy protobufs (`Any` bytes, as they arrive on the ADS stream): 1,000
//! STATIC clusters (one endpoint each), one listener whose connection manager uses RDS, and one
//! route configuration with 10,000 routes (100 virtual hosts x 100 routes, each to one of the
//! clusters). Each measured step does what the ADS client does with a response: decode and
//! validate every resource (`mecha_xds::translate::decode_resource`), build the candidate resource
//! set (a copy of the accepted one with the response patched in, SotW semantics), and apply it to a
//! running server (`XdsApplier::apply`: build clusters/listeners/route tables, swap them in).
//!
//! - `xds_apply/initial_1000c_10000r`: the first CDS, LDS and RDS responses on an empty server,
//!   back to back (the listener warms until RDS arrives), until it serves;
//! - `xds_apply/update_rds_10000r`: an RDS response (all 10,000 routes, one target changed);
//! - `xds_apply/update_cds_1000c`: a SotW CDS response (all 1,000 clusters, one changed);
//! - `xds_apply/translate_*`: the decode + validate part alone.
//!
//! Before criterion runs, the binary prints the memory of 1,000 clusters (bytes live in a counting
//! global allocator, and RSS) and a one-shot phase breakdown.
//!
//! `cargo bench --bench xds_apply`

use criterion::{criterion_group, Criterion};
use mecha_config::{Versioned, XdsResources};
use mecha_proxy::xds_apply::XdsApplier;
use mecha_proxy::{Server, ServerOptions};
use mecha_xds::translate::{
    decode_resource, value_to_bytes, Decoded, CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE,
};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

// ---- allocation counting -------------------------------------------------------------------

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(-1)
}

fn mb(b: isize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

// ---- resources (Envoy JSON -> protobuf bytes, as a control plane sends them) ----------------

const CLUSTERS: usize = 1_000;
const VHOSTS: usize = 100;
const ROUTES_PER_VHOST: usize = 100;

fn cluster(i: usize, timeout: &str) -> serde_json::Value {
    json!({
        "name": format!("c{i}"), "type": "STATIC", "connect_timeout": timeout,
        "load_assignment": {"cluster_name": format!("c{i}"), "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": format!("127.0.{}.{}", i / 250, 1 + i % 250), "port_value": 8080}}}}
        ]}]},
    })
}

fn listener() -> serde_json::Value {
    json!({
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "ingress",
                "rds": {"route_config_name": "routes", "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }
        }]}]
    })
}

/// 100 virtual hosts x 100 routes; `shift` changes the target cluster of the first route.
fn route_config(shift: usize) -> serde_json::Value {
    let vhosts: Vec<_> = (0..VHOSTS)
        .map(|v| {
            let routes: Vec<_> = (0..ROUTES_PER_VHOST)
                .map(|r| {
                    let n = v * ROUTES_PER_VHOST + r;
                    let c = if n == 0 { shift } else { n } % CLUSTERS;
                    json!({"match": {"prefix": format!("/svc{v}/api{r}/")}, "route": {"cluster": format!("c{c}"), "timeout": "5s"}})
                })
                .collect();
            json!({"name": format!("vh{v}"), "domains": [format!("svc{v}.example.com"), format!("svc{v}")], "routes": routes})
        })
        .collect();
    json!({"name": "routes", "virtual_hosts": vhosts})
}

struct Response {
    type_url: &'static str,
    resources: Vec<Vec<u8>>,
}

fn response(type_url: &'static str, values: &[serde_json::Value]) -> Response {
    Response {
        type_url,
        resources: values
            .iter()
            .map(|v| value_to_bytes(type_url, v).expect("encode"))
            .collect(),
    }
}

/// CDS with all clusters; `changed` gets a different connect_timeout.
fn cds(changed: Option<usize>) -> Response {
    let v: Vec<_> = (0..CLUSTERS)
        .map(|i| cluster(i, if Some(i) == changed { "2s" } else { "1s" }))
        .collect();
    response(CLUSTER_TYPE, &v)
}

// ---- the client's steps ----------------------------------------------------------------------

/// Decode and validate every resource of a response (the client's `decode_all`).
fn translate(resp: &Response, accepted: &XdsResources) -> Vec<Decoded> {
    let known: HashSet<&str> = accepted.clusters.keys().map(|s| s.as_str()).collect();
    resp.resources
        .iter()
        .map(|b| match decode_resource(resp.type_url, b, &known) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        })
        .collect()
}

/// The candidate set: a copy of the accepted one with the response patched in (the client's
/// `commit`; SotW: LDS/CDS replace their whole type).
fn candidate(
    accepted: &XdsResources,
    t: &str,
    decoded: Vec<Decoded>,
    version: &str,
) -> XdsResources {
    let mut next = accepted.clone();
    let now = SystemTime::now();
    fn v<T>(version: &str, x: T, now: SystemTime) -> Versioned<T> {
        Versioned {
            version: version.to_string(),
            value: Arc::new(x),
            last_updated: now,
        }
    }
    match t {
        CLUSTER_TYPE => next.clusters.clear(),
        LISTENER_TYPE => next.listeners.clear(),
        _ => {}
    }
    for d in decoded {
        match d {
            Decoded::Cluster(c) => {
                next.clusters.insert(c.name.clone(), v(version, c, now));
            }
            Decoded::Listener(l) => {
                next.listeners.insert(l.name.clone(), v(version, l, now));
            }
            Decoded::Route(r) => {
                next.route_configs
                    .insert(r.name.clone(), v(version, r, now));
            }
            Decoded::Endpoints(e) => {
                next.endpoints
                    .insert(e.cluster_name.clone(), v(version, e, now));
            }
        }
    }
    let wanted = next.wanted_route_configs();
    next.route_configs.retain(|k, _| wanted.contains(k));
    next.versions.insert(t.to_string(), version.to_string());
    next
}

/// One response: translate, build the candidate, apply it; returns the new accepted set.
fn receive(
    applier: &XdsApplier,
    accepted: &XdsResources,
    resp: &Response,
    version: &str,
) -> XdsResources {
    let decoded = translate(resp, accepted);
    let next = candidate(accepted, resp.type_url, decoded, version);
    applier.apply(&next).expect("apply");
    next
}

// ---- setup -----------------------------------------------------------------------------------

struct Fixture {
    rt: tokio::runtime::Runtime,
    _server: Server,
    applier: XdsApplier,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(async {
        let b =
            mecha_config::parse_bootstrap("static_resources: { listeners: [], clusters: [] }\n")
                .expect("bootstrap");
        Server::start(b, mecha_filters::Registry::new(), ServerOptions::default())
            .await
            .expect("server")
    });
    let applier = XdsApplier::new(server.state.clone());
    Fixture {
        rt,
        _server: server,
        applier,
    }
}

struct Inputs {
    cds: Response,
    cds_changed: [Response; 2],
    lds: Response,
    rds: [Response; 2],
}

fn inputs() -> Inputs {
    Inputs {
        cds: cds(None),
        cds_changed: [cds(Some(7)), cds(None)],
        lds: response(LISTENER_TYPE, &[listener()]),
        rds: [
            response(ROUTE_TYPE, &[route_config(1)]),
            response(ROUTE_TYPE, &[route_config(2)]),
        ],
    }
}

/// CDS, LDS, RDS on an empty server.
fn initial(f: &Fixture, i: &Inputs) -> XdsResources {
    let _g = f.rt.enter();
    let r = receive(&f.applier, &XdsResources::default(), &i.cds, "1");
    let r = receive(&f.applier, &r, &i.lds, "1");
    receive(&f.applier, &r, &i.rds[0], "1")
}

fn reset(f: &Fixture) {
    let _g = f.rt.enter();
    f.applier.apply(&XdsResources::default()).expect("reset");
}

// ---- reports printed before criterion ------------------------------------------------------

fn memory_report(i: &Inputs) {
    let f = fixture();
    let _g = f.rt.enter();
    // Warm lazy statics (descriptor pool, regex caches) so they are not counted.
    let warm = receive(
        &f.applier,
        &XdsResources::default(),
        &response(CLUSTER_TYPE, &[cluster(0, "1s")]),
        "0",
    );
    drop(warm);
    f.applier.apply(&XdsResources::default()).expect("reset");
    std::thread::sleep(Duration::from_millis(100));

    let (l0, r0) = (live(), rss_kb());
    let decoded = translate(&i.cds, &XdsResources::default());
    let resources = candidate(&XdsResources::default(), CLUSTER_TYPE, decoded, "1");
    let (l1, r1) = (live(), rss_kb());
    f.applier.apply(&resources).expect("apply");
    std::thread::sleep(Duration::from_millis(100));
    let (l2, r2) = (live(), rss_kb());
    println!("memory per 1,000 clusters (STATIC, 1 endpoint each):");
    println!(
        "  decoded config (XdsResources):        {:7.2} MB live heap",
        mb(l1 - l0)
    );
    println!(
        "  proxy objects (ClusterManager, stats): {:7.2} MB live heap",
        mb(l2 - l1)
    );
    println!(
        "  total:                                {:7.2} MB live heap, RSS +{:.2} MB",
        mb(l2 - l0),
        (r2 - r0) as f64 / 1024.0
    );
    let _ = r1;
    black_box(&resources);
}

fn phase_report(i: &Inputs) {
    let f = fixture();
    let _g = f.rt.enter();
    let time = |what: &str, t: Instant| {
        println!("  {what:<44} {:8.2} ms", t.elapsed().as_secs_f64() * 1e3);
    };
    println!("phases (one run each):");
    let empty = XdsResources::default();
    let t = Instant::now();
    let d = translate(&i.cds, &empty);
    time("CDS 1,000 clusters: translate", t);
    let t = Instant::now();
    let next = candidate(&empty, CLUSTER_TYPE, d, "1");
    time("CDS: candidate set", t);
    let t = Instant::now();
    f.applier.apply(&next).expect("apply");
    time("CDS: apply (new clusters)", t);
    let r = receive(&f.applier, &next, &i.lds, "1");
    let t = Instant::now();
    let d = translate(&i.rds[0], &r);
    time("RDS 10,000 routes: translate", t);
    let t = Instant::now();
    let next = candidate(&r, ROUTE_TYPE, d, "1");
    time("RDS: candidate set", t);
    let t = Instant::now();
    f.applier.apply(&next).expect("apply");
    time("RDS: apply (listener built, bound)", t);
    // Inside translate: protobuf -> JSON/YAML value (prost-reflect), then mecha-config decode +
    // validate of that value.
    let t = Instant::now();
    let value =
        mecha_xds::translate::any_to_value(ROUTE_TYPE, &i.rds[1].resources[0]).expect("value");
    time("RDS update: translate 1/2, protobuf -> value", t);
    let known: HashSet<&str> = next.clusters.keys().map(|s| s.as_str()).collect();
    let t = Instant::now();
    black_box(mecha_config::decode_route_configuration(value, "", &known).expect("decode"));
    time("RDS update: translate 2/2, decode + validate", t);
    let t = Instant::now();
    let d = translate(&i.rds[1], &next);
    time("RDS update: translate", t);
    let next2 = candidate(&next, ROUTE_TYPE, d, "2");
    let t = Instant::now();
    f.applier.apply(&next2).expect("apply");
    time("RDS update: apply (route table swap)", t);
    let t = Instant::now();
    let d = translate(&i.cds_changed[0], &next2);
    time("CDS update: translate", t);
    let next3 = candidate(&next2, CLUSTER_TYPE, d, "2");
    let t = Instant::now();
    f.applier.apply(&next3).expect("apply");
    time("CDS update: apply (999 reused, 1 new)", t);
}

// ---- criterion -----------------------------------------------------------------------------

fn bench(c: &mut Criterion) {
    let i = inputs();
    let f = fixture();
    let mut g = c.benchmark_group("xds_apply");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));

    g.bench_function("translate_cds_1000c", |b| {
        let empty = XdsResources::default();
        b.iter(|| black_box(translate(&i.cds, &empty)))
    });

    g.bench_function("initial_1000c_10000r", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                reset(&f);
                let t = Instant::now();
                black_box(initial(&f, &i));
                total += t.elapsed();
            }
            total
        })
    });

    let base = initial(&f, &i);
    {
        let _g = f.rt.enter();
        g.bench_function("translate_rds_10000r", |b| {
            b.iter(|| black_box(translate(&i.rds[1], &base)))
        });
        let mut accepted = base.clone();
        let mut n = 0usize;
        g.bench_function("update_rds_10000r", |b| {
            b.iter(|| {
                n += 1;
                accepted = receive(&f.applier, &accepted, &i.rds[n % 2], &n.to_string());
            })
        });
        g.bench_function("update_cds_1000c", |b| {
            b.iter(|| {
                n += 1;
                accepted = receive(&f.applier, &accepted, &i.cds_changed[n % 2], &n.to_string());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);

/// `XDS_APPLY_PROFILE=initial|rds|cds [XDS_APPLY_ITERS=n]`: runs only that step, n times, without
/// criterion or the reports, for `valgrind --tool=callgrind` (repeatable instruction counts).
fn profile(step: &str, i: &Inputs) {
    let iters: usize = std::env::var("XDS_APPLY_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let f = fixture();
    let mut accepted = initial(&f, i);
    let _g = f.rt.enter();
    let t = Instant::now();
    for n in 0..iters {
        match step {
            "initial" => {
                reset(&f);
                accepted = initial(&f, i);
            }
            "rds" => {
                accepted = receive(&f.applier, &accepted, &i.rds[(n + 1) % 2], &n.to_string());
            }
            "cds" => {
                accepted = receive(&f.applier, &accepted, &i.cds_changed[n % 2], &n.to_string());
            }
            other => panic!("XDS_APPLY_PROFILE: unknown step {other}"),
        }
    }
    println!(
        "{step}: {:.2} ms per iteration ({iters} iterations)",
        t.elapsed().as_secs_f64() * 1e3 / iters as f64
    );
    black_box(&accepted);
}

fn main() {
    let i = inputs();
    if let Ok(step) = std::env::var("XDS_APPLY_PROFILE") {
        profile(&step, &i);
        return;
    }
    memory_report(&i);
    phase_report(&i);
    drop(i);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
