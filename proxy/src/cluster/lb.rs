//! Load-balancing policies over one priority level's hosts.
//!
//! Each policy precomputes what it can when the host set changes (schedules, rings, tables), so a
//! pick is a few atomic loads and arithmetic — no lock, no allocation.

use super::host::Host;
use mecha_config::{Cluster as ClusterConfig, LbPolicy};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub enum Lb {
    RoundRobin {
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    LeastRequest {
        choices: u32,
        /// Cumulative weights when the hosts' weights differ; `None` when they are all equal.
        weighted: Option<Vec<u64>>,
    },
    Random {
        cumulative: Vec<u64>,
    },
    RingHash {
        ring: Vec<(u64, u32)>,
    },
    Maglev {
        table: Vec<u32>,
    },
}

/// Envoy's `HashUtil::xxHash64` (seed 0), for hash policies, rings and tables: the same keys land
/// on the same hosts as in Envoy, and the hash does not change with the Rust release.
pub fn hash_bytes(data: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(data, 0)
}

const MAGLEV_DEFAULT_TABLE: usize = 65537;
const RING_MIN_DEFAULT: u64 = 1024;
const RING_MAX_DEFAULT: u64 = 8 * 1024 * 1024;

impl Lb {
    pub fn build(cfg: &ClusterConfig, hosts: &[Arc<Host>]) -> Self {
        let weights: Vec<u64> = hosts.iter().map(|h| h.weight.max(1) as u64).collect();
        match cfg.lb_policy {
            // CLUSTER_PROVIDED (ORIGINAL_DST) clusters pick their host themselves; RR is never used.
            LbPolicy::ROUND_ROBIN | LbPolicy::CLUSTER_PROVIDED => Lb::RoundRobin {
                schedule: smooth_wrr(&weights),
                next: AtomicUsize::new(rand::random::<u32>() as usize),
            },
            // Validation guarantees choice_count >= 2.
            LbPolicy::LEAST_REQUEST => Lb::LeastRequest {
                choices: cfg
                    .least_request_lb_config
                    .as_ref()
                    .and_then(|c| c.choice_count)
                    .unwrap_or(2),
                weighted: weights
                    .iter()
                    .any(|w| *w != weights[0])
                    .then(|| cumulative(&weights)),
            },
            LbPolicy::RANDOM => Lb::Random {
                cumulative: cumulative(&weights),
            },
            LbPolicy::RING_HASH => {
                let rc = cfg.ring_hash_lb_config.clone().unwrap_or_default();
                let min = rc.minimum_ring_size.unwrap_or(RING_MIN_DEFAULT);
                let max = rc.maximum_ring_size.unwrap_or(RING_MAX_DEFAULT);
                Lb::RingHash {
                    ring: build_ring(&keys(hosts), &weights, min, max),
                }
            }
            LbPolicy::MAGLEV => {
                let size = cfg
                    .maglev_lb_config
                    .as_ref()
                    .and_then(|m| m.table_size)
                    .unwrap_or(MAGLEV_DEFAULT_TABLE as u64) as usize;
                Lb::Maglev {
                    table: build_maglev(&keys(hosts), &weights, size),
                }
            }
        }
    }

    /// Picks an index into `hosts`. `hash` comes from the route's hash policy; hash-based
    /// policies fall back to random without one, as Envoy does.
    pub fn pick(&self, hosts: &[Arc<Host>], hash: Option<u64>) -> Option<usize> {
        let n = hosts.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return Some(0);
        }
        match self {
            Lb::RoundRobin { schedule, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                Some(schedule[i % schedule.len()] as usize)
            }
            // Equal weights: Envoy's power of N choices by active requests.
            Lb::LeastRequest {
                choices,
                weighted: None,
            } => {
                let mut best = rand::random_range(0..n);
                let mut best_active = hosts[best].rq_active.load(Ordering::Relaxed);
                for _ in 1..*choices {
                    let c = rand::random_range(0..n);
                    let a = hosts[c].rq_active.load(Ordering::Relaxed);
                    if a < best_active {
                        best = c;
                        best_active = a;
                    }
                }
                Some(best)
            }
            // Unequal weights. Envoy runs an EDF schedule over weight / (active + 1)^bias, which
            // needs a shared mutable scheduler (a lock on every pick). Instead: N candidates drawn
            // in proportion to weight, the one with the fewest active requests per unit of weight
            // wins, and a tie keeps the first draw. Idle hosts then get traffic exactly in
            // proportion to weight, and under load the active requests settle proportional to
            // weight (Envoy's bias-1.0 scheduler settles at active + 1 proportional to weight).
            // `active_request_bias` is not supported.
            Lb::LeastRequest {
                choices,
                weighted: Some(cumulative),
            } => {
                let mut best = weighted_random(cumulative);
                for _ in 1..*choices {
                    let c = weighted_random(cumulative);
                    if fewer_per_weight(&hosts[c], &hosts[best]) {
                        best = c;
                    }
                }
                Some(best)
            }
            Lb::Random { cumulative } => Some(weighted_random(cumulative)),
            Lb::RingHash { ring } => {
                let h = hash.unwrap_or_else(rand::random);
                let idx = ring.partition_point(|(p, _)| *p < h);
                Some(ring[if idx == ring.len() { 0 } else { idx }].1 as usize)
            }
            Lb::Maglev { table } => {
                let h = hash.unwrap_or_else(rand::random);
                Some(table[(h % table.len() as u64) as usize] as usize)
            }
        }
    }
}

fn cumulative(weights: &[u64]) -> Vec<u64> {
    weights
        .iter()
        .scan(0u64, |acc, w| {
            *acc += w;
            Some(*acc)
        })
        .collect()
}

/// Whether `a` has fewer active requests per unit of weight than `b` (cross-multiplied, so no
/// floating point; weights are at least 1).
fn fewer_per_weight(a: &Host, b: &Host) -> bool {
    let wa = a.weight.max(1) as u128;
    let wb = b.weight.max(1) as u128;
    let aa = a.rq_active.load(Ordering::Relaxed) as u128;
    let ab = b.rq_active.load(Ordering::Relaxed) as u128;
    aa * wb < ab * wa
}

fn weighted_random(cumulative: &[u64]) -> usize {
    let total = *cumulative.last().unwrap_or(&1);
    let r = rand::random_range(0..total.max(1));
    cumulative.partition_point(|c| *c <= r)
}

/// Smooth weighted round robin (nginx's algorithm), unrolled into one cycle.
fn smooth_wrr(weights: &[u64]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let mut total: u64 = w.iter().sum();
    // Keep the cycle bounded; proportions survive the scaling.
    while total > 65536 {
        for x in w.iter_mut() {
            *x = (*x / 2).max(1);
        }
        total = w.iter().sum();
    }
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += *wi as i64;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .unwrap_or((0, &0));
        current[best] -= total as i64;
        out.push(best as u32);
    }
    if out.is_empty() {
        out.push(0);
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Envoy's ring (`RingHashLoadBalancer::Ring`): the ring is scaled so the lightest host gets a
/// whole number of entries (at least `min`, at most `max` in all), entries are handed out by
/// running sums of the normalized weights, and entry `i` of a host hashes `"<address>_<i>"`.
/// Envoy's hash key of a host: its address (`127.0.0.1:80`, `[::1]:80`).
fn keys(hosts: &[Arc<Host>]) -> Vec<String> {
    hosts.iter().map(|h| h.addr.to_string()).collect()
}

fn build_ring(hosts: &[String], weights: &[u64], min: u64, max: u64) -> Vec<(u64, u32)> {
    let total = weights.iter().sum::<u64>().max(1) as f64;
    let min_weight = weights
        .iter()
        .map(|w| *w as f64 / total)
        .fold(1.0f64, f64::min)
        .max(f64::MIN_POSITIVE);
    let scale = ((min_weight * min as f64).ceil() / min_weight).min(max as f64);
    let mut ring = Vec::with_capacity(scale.ceil() as usize + hosts.len());
    let (mut current, mut target) = (0.0f64, 0.0f64);
    for (i, key) in hosts.iter().enumerate() {
        target += scale * weights[i] as f64 / total;
        let mut j = 0u64;
        while current < target {
            ring.push((hash_bytes(format!("{key}_{j}").as_bytes()), i as u32));
            j += 1;
            current += 1.0;
        }
    }
    ring.sort_unstable();
    ring
}

/// Envoy's weighted Maglev table (`MaglevTable`): host `i` walks the permutation
/// `offset + skip * next` with `offset = xxHash64(address) % m` and `skip = xxHash64(address,
/// seed 1) % (m - 1) + 1`, and takes a slot in round `k` only while `k * weight` has reached its
/// running target (the heaviest host takes one every round).
fn build_maglev(hosts: &[String], weights: &[u64], size: usize) -> Vec<u32> {
    // Validation makes `table_size` prime, but more hosts than slots raise the size; the fill
    // loop below only ends when the size is prime, so round up to one.
    let m = next_prime(size.max(hosts.len()) as u64);
    let perms: Vec<(u64, u64)> = hosts
        .iter()
        .map(|k| {
            let offset = xxhash_rust::xxh64::xxh64(k.as_bytes(), 0) % m;
            let skip = xxhash_rust::xxh64::xxh64(k.as_bytes(), 1) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let total = weights.iter().sum::<u64>().max(1) as f64;
    let norm: Vec<f64> = weights.iter().map(|w| *w as f64 / total).collect();
    let max_w = norm.iter().copied().fold(0.0f64, f64::max);
    let mut next = vec![0u64; hosts.len()];
    let mut target = vec![0f64; hosts.len()];
    let mut table = vec![u32::MAX; m as usize];
    let mut filled = 0u64;
    let mut round = 1u64;
    while filled < m {
        for i in 0..hosts.len() {
            if filled == m {
                break;
            }
            if (round as f64) * norm[i] < target[i] {
                continue;
            }
            target[i] += max_w;
            let (offset, skip) = perms[i];
            loop {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[slot] == u32::MAX {
                    table[slot] = i as u32;
                    filled += 1;
                    break;
                }
            }
        }
        round += 1;
    }
    table
}

fn next_prime(mut n: u64) -> u64 {
    let is_prime = |n: u64| {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    };
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_envoys_xxhash64() {
        // xxHash64 reference vectors (seed 0).
        assert_eq!(hash_bytes(b""), 0xef46_db37_51d8_e999);
        assert_eq!(hash_bytes(b"a"), 0xd24e_c4f1_a98c_6e5b);
    }

    #[test]
    fn ring_follows_envoys_scaled_running_sums() {
        let keys = vec!["10.0.0.1:80".to_string(), "10.0.0.2:80".to_string()];
        // Weights 1:2, minimum 1024: the lighter host gets ceil(1024/3) = 342 entries, the ring
        // 3 x 342 = 1026.
        let ring = build_ring(&keys, &[1, 2], 1024, 8 << 20);
        assert_eq!(ring.len(), 1026);
        assert_eq!(ring.iter().filter(|e| e.1 == 0).count(), 342);
        assert!(ring.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(ring.contains(&(hash_bytes(b"10.0.0.1:80_341"), 0)));
        assert!(!ring.contains(&(hash_bytes(b"10.0.0.1:80_342"), 0)));
        // Weights 1:1000 scale to 2 x 1001 = 2002 entries; with 1:10000 the maximum caps it.
        assert_eq!(build_ring(&keys, &[1, 1000], 1024, 4096).len(), 2002);
        assert_eq!(build_ring(&keys, &[1, 10000], 1024, 2048).len(), 2048);
    }

    #[test]
    fn maglev_fills_in_proportion_to_weight() {
        let keys: Vec<String> = (1..=3).map(|i| format!("10.0.0.{i}:80")).collect();
        let t = build_maglev(&keys, &[1, 1, 2], 65537);
        assert_eq!(t.len(), 65537);
        let count = |i: u32| t.iter().filter(|h| **h == i).count() as f64 / 65537.0;
        assert!((count(2) - 0.5).abs() < 0.01, "{}", count(2));
        assert!((count(0) - 0.25).abs() < 0.01, "{}", count(0));
        // Host 0's first slot is its offset, as in Envoy's permutation.
        let offset = xxhash_rust::xxh64::xxh64(b"10.0.0.1:80", 0) % 65537;
        assert_eq!(t[offset as usize], 0);
    }

    #[test]
    fn maglev_table_size_is_always_prime() {
        assert_eq!(next_prime(4), 5);
        assert_eq!(next_prime(65537), 65537);
        assert_eq!(next_prime(0), 2);
    }

    #[test]
    fn smooth_wrr_is_proportional_and_interleaved() {
        let s = smooth_wrr(&[5, 1, 1]);
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().filter(|i| **i == 0).count(), 5);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr(&[2, 2]), vec![0, 1]);
    }
}
