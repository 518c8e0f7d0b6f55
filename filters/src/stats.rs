//! Counters, gauges and histograms with Envoy's stat names.
//!
//! Registration (at config time) takes a lock; the handles it returns are plain atomics, so the
//! request path never locks. Registering the same name twice returns the same handle, which keeps
//! values across config swaps, as Envoy does.
//!
//! Each stat has Envoy's dotted name (`cluster.backend.upstream_rq_total`, shown by `/stats`) and
//! the tag Envoy's default tag extraction would pull out of it, so `/stats/prometheus` prints
//! `envoy_cluster_upstream_rq_total{envoy_cluster_name="backend"}` like Envoy does.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Default, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Default, Debug)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn value(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The lowest and highest status codes [`CodeCounters`] count (others are only in the class).
const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 599;

/// One counter per HTTP status code (`upstream_rq_200`, `upstream_rq_503`, …), as Envoy creates
/// them on first use. The slots are allocated by the first response (most stat scopes never see
/// one) and a code's stat is listed once it is non-zero, so counting never registers a name and
/// never takes the store's lock.
#[derive(Clone, Default, Debug)]
pub struct CodeCounters(Arc<std::sync::OnceLock<CodeSlots>>);

#[derive(Debug)]
struct CodeSlots {
    counts: Box<[AtomicU64]>,
    /// Codes seen before a `/reset_counters`: still listed (at 0), as Envoy keeps the stat.
    /// Kept apart so counting touches nothing but the count.
    zeroed: Box<[std::sync::atomic::AtomicBool]>,
}

impl CodeCounters {
    #[inline]
    pub fn inc(&self, code: u16) {
        if !(FIRST_CODE..=LAST_CODE).contains(&code) {
            return;
        }
        let slots = self.0.get_or_init(|| CodeSlots {
            counts: (FIRST_CODE..=LAST_CODE)
                .map(|_| AtomicU64::new(0))
                .collect(),
            zeroed: (FIRST_CODE..=LAST_CODE)
                .map(|_| Default::default())
                .collect(),
        });
        slots.counts[usize::from(code - FIRST_CODE)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn value(&self, code: u16) -> u64 {
        match (self.0.get(), code.checked_sub(FIRST_CODE)) {
            (Some(slots), Some(i)) => slots
                .counts
                .get(usize::from(i))
                .map_or(0, |c| c.load(Ordering::Relaxed)),
            _ => 0,
        }
    }
    /// The codes seen (now or before a reset) and their counts.
    fn used(&self) -> Vec<(u16, u64)> {
        let Some(slots) = self.0.get() else {
            return vec![];
        };
        (FIRST_CODE..=LAST_CODE)
            .zip(slots.counts.iter().zip(slots.zeroed.iter()))
            .map(|(code, (c, z))| (code, c.load(Ordering::Relaxed), z.load(Ordering::Relaxed)))
            .filter(|(_, v, z)| *v != 0 || *z)
            .map(|(code, v, _)| (code, v))
            .collect()
    }
    fn reset(&self) {
        if let Some(slots) = self.0.get() {
            for (c, z) in slots.counts.iter().zip(slots.zeroed.iter()) {
                if c.swap(0, Ordering::Relaxed) != 0 {
                    z.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Envoy's default histogram bucket bounds (milliseconds for time histograms).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The quantiles Envoy's `/stats` prints, as fractions.
pub const SUPPORTED_QUANTILES: [f64; 10] =
    [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0];

const NBUCKETS: usize = BUCKETS.len() + 1;

#[derive(Default, Debug)]
struct HistogramInner {
    buckets: [AtomicU64; NBUCKETS],
    count: AtomicU64,
    /// Sum in thousandths of a unit, to stay integral.
    sum_milli: AtomicU64,
    /// Extremes as f64 bits (values are clamped to >= 0, whose bits order like the values); the
    /// minimum is stored inverted so that 0 means "none" for both. They narrow the first and
    /// last buckets, so a single 1.2 ms request reads 1.2 at every quantile, not 1 to 5.
    max: AtomicU64,
    min_inv: AtomicU64,
    /// The extremes since the last flush.
    since_max: AtomicU64,
    since_min_inv: AtomicU64,
    /// Bucket counts at the last flush, and what the interval before it added.
    flushed: [AtomicU64; NBUCKETS],
    interval: [AtomicU64; NBUCKETS],
    interval_max: AtomicU64,
    interval_min_inv: AtomicU64,
}

#[inline]
fn raise(a: &AtomicU64, v: u64) {
    // A plain load first: once the extremes settle, recording writes nothing but its bucket.
    if a.load(Ordering::Relaxed) < v {
        a.fetch_max(v, Ordering::Relaxed);
    }
}

#[derive(Clone, Default, Debug)]
pub struct Histogram(Arc<HistogramInner>);

/// A histogram's quantiles ([`SUPPORTED_QUANTILES`]) over the last flush interval and since
/// start; NaN where there are no values.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSummary {
    pub interval: [f64; 10],
    pub cumulative: [f64; 10],
}

impl Histogram {
    #[inline]
    pub fn record(&self, value: f64) {
        let value = value.max(0.0);
        let idx = BUCKETS
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(BUCKETS.len());
        let h = &self.0;
        h.buckets[idx].fetch_add(1, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_milli
            .fetch_add((value * 1000.0) as u64, Ordering::Relaxed);
        let bits = value.to_bits();
        raise(&h.max, bits);
        raise(&h.min_inv, !bits);
        raise(&h.since_max, bits);
        raise(&h.since_min_inv, !bits);
    }
    #[inline]
    pub fn record_duration_ms(&self, d: std::time::Duration) {
        self.record(d.as_secs_f64() * 1000.0);
    }
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
    pub fn sum(&self) -> f64 {
        self.0.sum_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }
    /// Cumulative counts per bucket bound (the last entry is +Inf).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.0
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect()
    }
    /// Quantile `q` of every value so far, interpolated linearly within its bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts = load(&self.0.buckets);
        let v = quantile(&counts, extremes(&self.0.min_inv, &self.0.max), q);
        (!v.is_nan()).then_some(v)
    }
    /// Ends a flush interval (Envoy's `stats_flush_interval`): what was recorded since the
    /// previous flush becomes the interval the quantiles' first value reports.
    pub fn flush(&self) {
        let h = &self.0;
        for i in 0..NBUCKETS {
            let cur = h.buckets[i].load(Ordering::Relaxed);
            let prev = h.flushed[i].swap(cur, Ordering::Relaxed);
            h.interval[i].store(cur.saturating_sub(prev), Ordering::Relaxed);
        }
        h.interval_max
            .store(h.since_max.swap(0, Ordering::Relaxed), Ordering::Relaxed);
        h.interval_min_inv.store(
            h.since_min_inv.swap(0, Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }
    pub fn summary(&self) -> HistogramSummary {
        let h = &self.0;
        let (cum, int) = (load(&h.buckets), load(&h.interval));
        let (ce, ie) = (
            extremes(&h.min_inv, &h.max),
            extremes(&h.interval_min_inv, &h.interval_max),
        );
        HistogramSummary {
            interval: SUPPORTED_QUANTILES.map(|q| quantile(&int, ie, q)),
            cumulative: SUPPORTED_QUANTILES.map(|q| quantile(&cum, ce, q)),
        }
    }
}

fn load(a: &[AtomicU64; NBUCKETS]) -> [u64; NBUCKETS] {
    std::array::from_fn(|i| a[i].load(Ordering::Relaxed))
}

/// (min, max) when some value was recorded.
fn extremes(min_inv: &AtomicU64, max: &AtomicU64) -> Option<(f64, f64)> {
    match min_inv.load(Ordering::Relaxed) {
        0 => None,
        m => Some((
            f64::from_bits(!m),
            f64::from_bits(max.load(Ordering::Relaxed)),
        )),
    }
}

/// Quantile `q` of bucket `counts`, interpolated linearly within the bucket it falls in, with
/// the buckets narrowed to the recorded extremes; NaN without values.
fn quantile(counts: &[u64; NBUCKETS], extremes: Option<(f64, f64)>, q: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    let (min, max) = extremes.unwrap_or((0.0, f64::INFINITY));
    let target = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        if (below + c) as f64 >= target {
            let lo = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            // The overflow bucket ends at the maximum (or, without one, reads as its start).
            let hi = BUCKETS.get(i).copied().unwrap_or(max.max(lo));
            let (lo, hi) = (lo.max(min).min(hi), hi.min(max).max(lo.max(min).min(hi)));
            let frac = ((target - below as f64) / c as f64).clamp(0.0, 1.0);
            return lo + frac * (hi - lo);
        }
        below += c;
    }
    max
}

#[derive(Clone, Debug)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
    /// Registered as `<scope><stat>`, listed as `<scope><stat>_<code>` per used code.
    Codes(CodeCounters),
}

impl Metric {
    /// Whether `?usedonly` shows it: Envoy's "used" flag approximated by a non-zero value.
    fn used(&self) -> bool {
        match self {
            Metric::Counter(c) => c.value() != 0,
            Metric::Gauge(g) => g.value() != 0,
            Metric::Histogram(h) => h.count() != 0,
            Metric::Codes(_) => true,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    /// What the Prometheus family name and labels are derived from (at render time): shared by
    /// every stat of one scope, so registering a stat allocates only its name and its value — a
    /// thousand xDS clusters register tens of thousands of stats.
    scope: Arc<ScopeMeta>,
    metric: Metric,
}

impl Entry {
    /// Prometheus family name, e.g. `envoy_cluster_upstream_rq_total`, of the stat `name`, and
    /// the tag Envoy's default extractors pull out of the stat's own name, if any.
    fn family(&self, name: &str) -> (String, Option<Tag>) {
        let stat = name.get(self.scope.prefix_len..).unwrap_or(name);
        let (stat, tag) = extract_response_code(stat);
        (
            sanitize(&format!("envoy_{}_{}", self.scope.family_prefix, stat)),
            tag,
        )
    }
}

/// A Prometheus label: name and value.
type Tag = (&'static str, String);

/// Envoy's `envoy.response_code_class` (`_rq_(\d)xx$`, the digit removed: `upstream_rq_2xx` →
/// `upstream_rq_xx`) and `envoy.response_code` (`_rq(_(\d{3}))$`, the whole suffix removed:
/// `upstream_rq_503` → `upstream_rq`) tag extractors.
fn extract_response_code(
    stat: &str,
) -> (std::borrow::Cow<'_, str>, Option<(&'static str, String)>) {
    use std::borrow::Cow;
    let b = stat.as_bytes();
    let n = b.len();
    if n >= 7
        && stat.ends_with("xx")
        && b[n - 3].is_ascii_digit()
        && stat[..n - 3].ends_with("_rq_")
    {
        let class = stat[n - 3..n - 2].to_string();
        return (
            Cow::Owned(format!("{}xx", &stat[..n - 3])),
            Some(("envoy_response_code_class", class)),
        );
    }
    if n >= 7 && b[n - 3..].iter().all(u8::is_ascii_digit) && stat[..n - 3].ends_with("_rq_") {
        return (
            Cow::Borrowed(&stat[..n - 4]),
            Some(("envoy_response_code", stat[n - 3..].to_string())),
        );
    }
    (Cow::Borrowed(stat), None)
}

/// The process-wide stats registry.
#[derive(Default)]
pub struct Store {
    entries: Mutex<BTreeMap<String, Entry>>,
}

/// A scope: the dotted prefix plus the tag Envoy would extract from it.
#[derive(Clone, Debug)]
pub struct Scope {
    prefix: String,
    meta: Arc<ScopeMeta>,
}

#[derive(Debug)]
struct ScopeMeta {
    /// Length of the dotted prefix: the stat's own name follows it.
    prefix_len: usize,
    family_prefix: String,
    /// Labels extracted from the dotted name.
    labels: Vec<(&'static str, String)>,
}

impl Scope {
    fn make(prefix: String, family_prefix: String, labels: Vec<(&'static str, String)>) -> Self {
        Self {
            meta: Arc::new(ScopeMeta {
                prefix_len: prefix.len(),
                family_prefix,
                labels,
            }),
            prefix,
        }
    }
    /// `cluster.<name>.` with tag `envoy_cluster_name`.
    pub fn cluster(name: &str) -> Self {
        Self::tagged("cluster", "envoy_cluster_name", name)
    }
    /// `http.<stat_prefix>.` with tag `envoy_http_conn_manager_prefix`.
    pub fn http(prefix: &str) -> Self {
        Self::tagged("http", "envoy_http_conn_manager_prefix", prefix)
    }
    /// `tcp.<stat_prefix>.` with tag `envoy_tcp_prefix`.
    pub fn tcp(prefix: &str) -> Self {
        Self::tagged("tcp", "envoy_tcp_prefix", prefix)
    }
    /// `listener.<address>.` with tag `envoy_listener_address`; as Envoy, ':' in the address
    /// becomes '_' (`listener.0.0.0.0_15001.`, `listener.[__]_15001.`).
    pub fn listener(addr: &str) -> Self {
        Self::tagged(
            "listener",
            "envoy_listener_address",
            &addr.replace(':', "_"),
        )
    }
    /// A scope without a tag (`server.`, `cluster_manager.`, `listener_manager.`, …).
    pub fn plain(prefix: &str) -> Self {
        Self::make(format!("{prefix}."), prefix.replace('.', "_"), vec![])
    }
    fn tagged(kind: &str, tag: &'static str, value: &str) -> Self {
        Self::make(
            format!("{kind}.{value}."),
            kind.to_string(),
            vec![(tag, value.to_string())],
        )
    }
    /// A sub-scope whose segment stays in the name (`cluster.x.circuit_breakers.default.`).
    pub fn sub(&self, segment: &str) -> Self {
        Self::make(
            format!("{}{segment}.", self.prefix),
            format!("{}_{}", self.meta.family_prefix, segment.replace('.', "_")),
            self.meta.labels.clone(),
        )
    }
    /// A sub-scope whose segment is a tag (`http.x.rds.<name>.` with a route-config tag, etc.).
    pub fn sub_tagged(&self, kind: &str, tag: &'static str, value: &str) -> Self {
        let mut labels = self.meta.labels.clone();
        labels.push((tag, value.to_string()));
        Self::make(
            format!("{}{kind}.{value}.", self.prefix),
            format!("{}_{}", self.meta.family_prefix, kind),
            labels,
        )
    }
    fn name(&self, stat: &str) -> String {
        let mut name = String::with_capacity(self.prefix.len() + stat.len());
        name.push_str(&self.prefix);
        name.push_str(stat);
        name
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn get_or_insert(&self, scope: &Scope, stat: &str, make: impl FnOnce() -> Metric) -> Metric {
        let name = scope.name(stat);
        let mut entries = self.entries.lock();
        entries
            .entry(name)
            .or_insert_with(|| Entry {
                scope: scope.meta.clone(),
                metric: make(),
            })
            .metric
            .clone()
    }

    pub fn counter(&self, scope: &Scope, stat: &str) -> Counter {
        match self.get_or_insert(scope, stat, || Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    pub fn gauge(&self, scope: &Scope, stat: &str) -> Gauge {
        match self.get_or_insert(scope, stat, || Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    pub fn histogram(&self, scope: &Scope, stat: &str) -> Histogram {
        match self.get_or_insert(scope, stat, || Metric::Histogram(Histogram::default())) {
            Metric::Histogram(h) => h,
            _ => Histogram::default(),
        }
    }

    /// Registers a per-status-code family (`cluster.<name>.upstream_rq_<code>`).
    pub fn codes(&self, scope: &Scope, stat: &str) -> CodeCounters {
        match self.get_or_insert(scope, stat, || Metric::Codes(CodeCounters::default())) {
            Metric::Codes(c) => c,
            _ => CodeCounters::default(),
        }
    }

    /// The current value of a counter or gauge by its dotted name (tests and admin use this).
    pub fn value(&self, name: &str) -> Option<i64> {
        let entries = self.entries.lock();
        match entries.get(name).map(|e| &e.metric) {
            Some(Metric::Counter(c)) => Some(c.value() as i64),
            Some(Metric::Gauge(g)) => Some(g.value()),
            Some(Metric::Histogram(h)) => Some(h.count() as i64),
            Some(Metric::Codes(_)) => None,
            None => {
                let (base, code) = name.rsplit_once('_')?;
                let code: u16 = code.parse().ok()?;
                match &entries.get(base)?.metric {
                    Metric::Codes(c) => Some(c.value(code) as i64),
                    _ => None,
                }
            }
        }
    }

    /// Every stat by name, sorted, with each used status code of a [`CodeCounters`] as a
    /// counter of its own (a snapshot of its value).
    fn listed(&self) -> Vec<(String, Entry)> {
        let entries = self.entries.lock().clone();
        let mut out = Vec::with_capacity(entries.len());
        let mut codes = vec![];
        for (name, e) in entries {
            match &e.metric {
                Metric::Codes(c) => {
                    for (code, v) in c.used() {
                        let counter = Counter::default();
                        counter.add(v);
                        codes.push((
                            format!("{name}_{code}"),
                            Entry {
                                scope: e.scope.clone(),
                                metric: Metric::Counter(counter),
                            },
                        ));
                    }
                }
                _ => out.push((name, e)),
            }
        }
        if !codes.is_empty() {
            out.extend(codes);
            out.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out
    }

    /// The histograms by name, with their quantile summaries (`/stats?format=json`).
    pub fn histograms(&self) -> Vec<(String, HistogramSummary, u64)> {
        self.entries
            .lock()
            .iter()
            .filter_map(|(name, e)| match &e.metric {
                Metric::Histogram(h) => Some((name.clone(), h.clone())),
                _ => None,
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(name, h)| (name, h.summary(), h.count()))
            .collect()
    }

    /// Ends a flush interval for every histogram (called every `stats_flush_interval`, off the
    /// request path).
    pub fn flush_histograms(&self) {
        let hs: Vec<Histogram> = self
            .entries
            .lock()
            .values()
            .filter_map(|e| match &e.metric {
                Metric::Histogram(h) => Some(h.clone()),
                _ => None,
            })
            .collect();
        hs.iter().for_each(Histogram::flush);
    }

    /// Zeroes every counter (Envoy's `/reset_counters`); gauges and histograms keep their values.
    pub fn reset_counters(&self) {
        for e in self.entries.lock().values() {
            match &e.metric {
                Metric::Counter(c) => c.0.store(0, Ordering::Relaxed),
                Metric::Codes(c) => c.reset(),
                _ => {}
            }
        }
    }

    /// Envoy's `/stats` text: `name: value`, sorted by name.
    pub fn render_text(&self, filter: Option<&str>) -> String {
        let entries = self.listed();
        let mut out = String::new();
        for (name, e) in entries.iter() {
            if filter.is_some_and(|f| !name.contains(f)) {
                continue;
            }
            match &e.metric {
                Metric::Counter(c) => writeln!(out, "{name}: {}", c.value()).ok(),
                Metric::Gauge(g) => writeln!(out, "{name}: {}", g.value()).ok(),
                Metric::Codes(_) => None,
                Metric::Histogram(h) => writeln!(out, "{name}: {}", histogram_text(h)).ok(),
            };
        }
        out
    }

    /// Prometheus text exposition format 0.0.4, families grouped as the format requires.
    pub fn render_prometheus(&self) -> String {
        self.render_prometheus_filtered(&|_| true, false)
    }

    /// As [`Store::render_prometheus`], with only the stats whose dotted name passes `keep`
    /// and, with `used_only`, only counters and gauges that are not zero and histograms that
    /// recorded something (Envoy's `?filter=` and `?usedonly`).
    pub fn render_prometheus_filtered(
        &self,
        keep: &dyn Fn(&str) -> bool,
        used_only: bool,
    ) -> String {
        let entries = self.listed();
        let mut families: BTreeMap<String, Vec<(Option<Tag>, &Entry)>> = BTreeMap::new();
        for (name, e) in entries.iter() {
            if !keep(name) || (used_only && !e.metric.used()) {
                continue;
            }
            let (family, tag) = e.family(name);
            families.entry(family).or_default().push((tag, e));
        }
        let mut out = String::new();
        for (family, list) in families {
            let kind = match list[0].1.metric {
                Metric::Counter(_) => "counter",
                Metric::Gauge(_) => "gauge",
                Metric::Histogram(_) => "histogram",
                // Not listed: `listed` turned them into counters.
                Metric::Codes(_) => continue,
            };
            writeln!(out, "# TYPE {family} {kind}").ok();
            for (tag, e) in list {
                // As Envoy, the tag taken from the stat's own name comes before the scope's.
                let mut tags: Vec<(&'static str, String)> = tag.into_iter().collect();
                tags.extend(e.scope.labels.iter().cloned());
                let labels = render_labels(&tags, None);
                match &e.metric {
                    Metric::Counter(c) => writeln!(out, "{family}{labels} {}", c.value()).ok(),
                    Metric::Gauge(g) => writeln!(out, "{family}{labels} {}", g.value()).ok(),
                    Metric::Codes(_) => None,
                    Metric::Histogram(h) => {
                        for (bound, count) in BUCKETS
                            .iter()
                            .map(|b| b.to_string())
                            .chain(["+Inf".to_string()])
                            .zip(h.cumulative())
                        {
                            let l = render_labels(&tags, Some(&bound));
                            writeln!(out, "{family}_bucket{l} {count}").ok();
                        }
                        writeln!(out, "{family}_sum{labels} {}", h.sum()).ok();
                        writeln!(out, "{family}_count{labels} {}", h.count()).ok()
                    }
                };
            }
        }
        out
    }
}

/// Envoy's `/stats` text for a histogram: `P0(interval,cumulative) … P100(…)`, or
/// `No recorded values`.
fn histogram_text(h: &Histogram) -> String {
    if h.count() == 0 {
        return "No recorded values".into();
    }
    let s = h.summary();
    let num = |v: f64| {
        if v.is_nan() {
            "nan".to_string()
        } else {
            format!("{v}")
        }
    };
    let parts: Vec<String> = SUPPORTED_QUANTILES
        .iter()
        .zip(s.interval.iter().zip(s.cumulative.iter()))
        .map(|(q, (i, c))| format!("P{}({},{})", q * 100.0, num(*i), num(*c)))
        .collect();
    parts.join(" ")
}

fn render_labels(labels: &[(&'static str, String)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_handle_and_envoy_names() {
        let s = Store::new();
        let scope = Scope::cluster("backend");
        s.counter(&scope, "upstream_rq_total").inc();
        s.counter(&scope, "upstream_rq_total").inc();
        assert_eq!(s.value("cluster.backend.upstream_rq_total"), Some(2));
        let text = s.render_prometheus();
        assert!(
            text.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"backend\"} 2"),
            "{text}"
        );
        assert!(s
            .render_text(None)
            .contains("cluster.backend.upstream_rq_total: 2"));
    }

    #[test]
    fn response_code_tags_as_envoy_default_extractors() {
        let s = Store::new();
        let c = Scope::cluster("backend");
        s.counter(&c, "upstream_rq_2xx").add(7);
        s.counter(&c, "upstream_rq_5xx").inc();
        s.counter(&c, "upstream_rq_503").inc();
        s.counter(&c, "upstream_rq_per_try_timeout").inc();
        s.counter(&Scope::http("in"), "downstream_rq_4xx").add(3);
        let text = s.render_prometheus();
        for line in [
            "# TYPE envoy_cluster_upstream_rq_xx counter",
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"backend\"} 7",
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"5\",envoy_cluster_name=\"backend\"} 1",
            "envoy_cluster_upstream_rq{envoy_response_code=\"503\",envoy_cluster_name=\"backend\"} 1",
            "envoy_cluster_upstream_rq_per_try_timeout{envoy_cluster_name=\"backend\"} 1",
            "envoy_http_downstream_rq_xx{envoy_response_code_class=\"4\",envoy_http_conn_manager_prefix=\"in\"} 3",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in\n{text}");
        }
        assert_eq!(
            text.matches("# TYPE envoy_cluster_upstream_rq_xx ").count(),
            1
        );
        let only = s.render_prometheus_filtered(&|n| n.ends_with("_503"), true);
        assert_eq!(
            only,
            "# TYPE envoy_cluster_upstream_rq counter\nenvoy_cluster_upstream_rq{envoy_response_code=\"503\",envoy_cluster_name=\"backend\"} 1\n"
        );
    }

    #[test]
    fn code_counters_are_listed_per_used_code() {
        let s = Store::new();
        let c = Scope::cluster("b");
        let codes = s.codes(&c, "upstream_rq");
        s.counter(&c, "upstream_rq_total").add(3);
        codes.inc(200);
        codes.inc(200);
        codes.inc(503);
        codes.inc(1000);
        assert_eq!(s.value("cluster.b.upstream_rq_200"), Some(2));
        assert_eq!(s.value("cluster.b.upstream_rq_404"), Some(0));
        assert_eq!(
            s.render_text(None),
            "cluster.b.upstream_rq_200: 2\ncluster.b.upstream_rq_503: 1\ncluster.b.upstream_rq_total: 3\n"
        );
        assert!(s.render_prometheus().contains(
            "envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"b\"} 2\n"
        ));
        s.reset_counters();
        assert_eq!(
            s.render_text(None),
            "cluster.b.upstream_rq_200: 0\ncluster.b.upstream_rq_503: 0\ncluster.b.upstream_rq_total: 0\n"
        );
    }

    #[test]
    fn listener_names_replace_colons_as_envoy() {
        let s = Store::new();
        s.counter(&Scope::listener("0.0.0.0:15001"), "downstream_cx_total")
            .inc();
        s.counter(&Scope::listener("[::]:15006"), "downstream_cx_total")
            .inc();
        assert_eq!(
            s.value("listener.0.0.0.0_15001.downstream_cx_total"),
            Some(1)
        );
        assert_eq!(s.value("listener.[__]_15006.downstream_cx_total"), Some(1));
        let text = s.render_prometheus();
        assert!(
            text.contains(
                "envoy_listener_downstream_cx_total{envoy_listener_address=\"0.0.0.0_15001\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::default();
        for v in [0.3, 3.0, 3.0, 700.0] {
            h.record(v);
        }
        assert_eq!(h.count(), 4);
        // Half the values are at or below the middle of (1, 5]: interpolated, 1 + 4 * 1/2.
        assert_eq!(h.quantile(0.5), Some(3.0));
        assert_eq!(h.quantile(0.0), Some(0.3), "P0 is the minimum");
        assert_eq!(h.quantile(1.0), Some(700.0), "P100 is the maximum");
        assert_eq!(*h.cumulative().last().unwrap(), 4);
    }

    #[test]
    fn histogram_text_interval_and_cumulative() {
        let s = Store::new();
        let h = s.histogram(&Scope::cluster("b"), "upstream_rq_time");
        assert_eq!(
            s.render_text(None),
            "cluster.b.upstream_rq_time: No recorded values\n"
        );
        h.record(1.2);
        assert_eq!(
            s.render_text(None),
            "cluster.b.upstream_rq_time: P0(nan,1.2) P25(nan,1.2) P50(nan,1.2) P75(nan,1.2) P90(nan,1.2) P95(nan,1.2) P99(nan,1.2) P99.5(nan,1.2) P99.9(nan,1.2) P100(nan,1.2)\n"
        );
        s.flush_histograms();
        h.record(20.0);
        let sum = h.summary();
        assert_eq!(
            sum.interval[0], 1.2,
            "the interval holds what the flush closed"
        );
        assert_eq!(sum.interval[9], 1.2);
        assert_eq!(sum.cumulative[9], 20.0);
        s.flush_histograms();
        assert_eq!(h.summary().interval[0], 20.0);
        s.flush_histograms();
        assert!(h.summary().interval[0].is_nan(), "nothing recorded since");
        assert_eq!(h.summary().cumulative[0], 1.2);
    }
}
