//! Load-balancing policies over one priority level's hosts.
//!
//! Each policy precomputes what it can when the host set changes (schedules, rings, tables), so a
//! pick is a few atomic loads and arithmetic — no lock, no allocation.

use super::host::Host;
use mecha_config::{Cluster as ClusterConfig, LbPolicy};
use std::hash::{Hash, Hasher};
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

/// A stable 64-bit hash (SipHash with fixed keys) for hash policies, rings and tables.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
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
                    ring: build_ring(hosts, &weights, min, max),
                }
            }
            LbPolicy::MAGLEV => {
                let size = cfg
                    .maglev_lb_config
                    .as_ref()
                    .and_then(|m| m.table_size)
                    .unwrap_or(MAGLEV_DEFAULT_TABLE as u64) as usize;
                Lb::Maglev {
                    table: build_maglev(hosts, &weights, size),
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

fn build_ring(hosts: &[Arc<Host>], weights: &[u64], min: u64, max: u64) -> Vec<(u64, u32)> {
    let total: u64 = weights.iter().sum::<u64>().max(1);
    let size = min.max(hosts.len() as u64).min(max);
    let mut ring = Vec::with_capacity(size as usize + hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        let entries = ((size as f64) * weights[i] as f64 / total as f64)
            .ceil()
            .max(1.0) as u64;
        let key = h.addr.to_string();
        for j in 0..entries {
            ring.push((hash_bytes(format!("{key}_{j}").as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

fn build_maglev(hosts: &[Arc<Host>], weights: &[u64], size: usize) -> Vec<u32> {
    // Validation makes `table_size` prime, but more hosts than slots raise the size; the fill
    // loop below only ends when the size is prime, so round up to one.
    let m = next_prime(size.max(hosts.len()) as u64);
    let perms: Vec<(u64, u64)> = hosts
        .iter()
        .map(|h| {
            let k = h.addr.to_string();
            let offset = hash_bytes(format!("{k}#offset").as_bytes()) % m;
            let skip = hash_bytes(format!("{k}#skip").as_bytes()) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let max_w = *weights.iter().max().unwrap_or(&1) as f64;
    let mut next = vec![0u64; hosts.len()];
    let mut credit = vec![0f64; hosts.len()];
    let mut table = vec![u32::MAX; m as usize];
    let mut filled = 0u64;
    'outer: loop {
        for i in 0..hosts.len() {
            // Weighted Maglev: a host takes a turn only when it has accumulated a full credit.
            credit[i] += weights[i] as f64 / max_w;
            if credit[i] < 1.0 {
                continue;
            }
            credit[i] -= 1.0;
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
            if filled == m {
                break 'outer;
            }
        }
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
