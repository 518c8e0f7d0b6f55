//! Load-balancer pick per policy over a STATIC cluster of 10 and 100 hosts (equal weights, and
//! mixed weights 1..=5 for the weighted variants), through `Cluster::pick` — the path the router
//! takes: an `arc-swap` load of the host set, the health scan of the priority level and the pick.
//!
//! `cargo bench --bench lb_pick`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mecha_filters::stats::Store;
use mecha_proxy::cluster::Cluster;
use serde_json::json;
use std::hint::black_box;

fn cluster(policy: &str, hosts: usize, weighted: bool, store: &Store) -> std::sync::Arc<Cluster> {
    let endpoints: Vec<_> = (0..hosts)
        .map(|i| {
            let mut ep = json!({"endpoint": {"address": {"socket_address": {
                "address": format!("10.0.{}.{}", i / 250, i % 250 + 1), "port_value": 8080}}}});
            if weighted {
                ep["load_balancing_weight"] = json!(i % 5 + 1);
            }
            ep
        })
        .collect();
    let cfg: mecha_config::Cluster = serde_json::from_value(json!({
        "name": format!("{policy}_{hosts}"),
        "type": "STATIC",
        "lb_policy": policy,
        "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": endpoints}]}
    }))
    .expect("cluster config");
    Cluster::new(cfg, store)
}

fn bench(c: &mut Criterion) {
    // Building a host's pool wants a Tokio context (timers); picks themselves never touch it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let store = Store::new();
    let mut g = c.benchmark_group("lb_pick");
    g.throughput(Throughput::Elements(1));
    for hosts in [10usize, 100] {
        for (policy, weighted, hashed) in [
            ("ROUND_ROBIN", false, false),
            ("ROUND_ROBIN", true, false),
            ("LEAST_REQUEST", false, false),
            ("RANDOM", false, false),
            ("RANDOM", true, false),
            ("RING_HASH", false, true),
            ("MAGLEV", false, true),
        ] {
            let cl = cluster(policy, hosts, weighted, &store);
            let label = format!(
                "{}{}",
                policy.to_ascii_lowercase(),
                if weighted { "_weighted" } else { "" }
            );
            assert!(cl.pick(Some(42)).is_some());
            let mut hash = 0x9e37_79b9_7f4a_7c15u64;
            g.bench_with_input(BenchmarkId::new(label, hosts), &hosts, |b, _| {
                b.iter(|| {
                    // A different hash each time, as different requests would carry.
                    hash = hash.wrapping_mul(6364136223846793005).wrapping_add(1);
                    black_box(cl.pick(if hashed { Some(black_box(hash)) } else { None }))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
