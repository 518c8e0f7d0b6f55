//! Typed bundles of stat handles, resolved once per cluster / connection manager / TCP proxy so
//! the request path only touches atomics.

use mecha_filters::stats::{CodeCounters, Counter, Gauge, Histogram, Scope, Store};

macro_rules! stat_struct {
    ($name:ident { counters: [$($c:ident),* $(,)?], gauges: [$($g:ident),* $(,)?], histograms: [$($h:ident),* $(,)?] $(, codes: [$($k:ident),* $(,)?])? }) => {
        #[derive(Clone, Debug)]
        pub struct $name {
            $(pub $c: Counter,)*
            $(pub $g: Gauge,)*
            $(pub $h: Histogram,)*
            $($(pub $k: CodeCounters,)*)?
        }
        impl $name {
            pub fn new(store: &Store, scope: &Scope) -> Self {
                Self {
                    $($c: store.counter(scope, stringify!($c)),)*
                    $($g: store.gauge(scope, stringify!($g)),)*
                    $($h: store.histogram(scope, stringify!($h)),)*
                    $($($k: store.codes(scope, stringify!($k)),)*)?
                }
            }
        }
    };
}

stat_struct!(ClusterStats {
    counters: [
        upstream_cx_total,
        upstream_cx_connect_fail,
        upstream_cx_connect_timeout,
        upstream_cx_destroy,
        upstream_rq_total,
        upstream_rq_completed,
        upstream_rq_1xx,
        upstream_rq_2xx,
        upstream_rq_3xx,
        upstream_rq_4xx,
        upstream_rq_5xx,
        upstream_rq_timeout,
        upstream_rq_rx_reset,
        upstream_cx_none_healthy,
        upstream_rq_cancelled,
        update_attempt,
        update_success,
        update_failure
    ],
    gauges: [
        upstream_cx_active,
        upstream_rq_active,
        membership_healthy,
        membership_total,
        membership_degraded,
        membership_excluded
    ],
    histograms: [upstream_rq_time, upstream_cx_connect_ms],
    // `upstream_rq_<code>`: listed per code once used, as Envoy creates them.
    codes: [upstream_rq]
});

impl ClusterStats {
    pub fn record_status(&self, status: u16) {
        self.upstream_rq.inc(status);
        match status / 100 {
            1 => self.upstream_rq_1xx.inc(),
            2 => self.upstream_rq_2xx.inc(),
            3 => self.upstream_rq_3xx.inc(),
            4 => self.upstream_rq_4xx.inc(),
            _ => self.upstream_rq_5xx.inc(),
        }
    }
}

stat_struct!(HttpStats {
    counters: [
        downstream_cx_total,
        downstream_cx_http1_total,
        downstream_cx_http2_total,
        downstream_cx_upgrades_total,
        downstream_cx_idle_timeout,
        downstream_cx_destroy,
        downstream_rq_total,
        downstream_rq_http1_total,
        downstream_rq_http2_total,
        downstream_rq_1xx,
        downstream_rq_2xx,
        downstream_rq_3xx,
        downstream_rq_4xx,
        downstream_rq_5xx,
        downstream_rq_completed,
        downstream_rq_idle_timeout,
        downstream_rq_timeout,
        no_route,
        no_cluster,
        rq_redirect,
        rq_direct_response,
        rq_total
    ],
    gauges: [
        downstream_cx_active,
        downstream_rq_active,
        downstream_cx_upgrades_active
    ],
    histograms: [downstream_rq_time]
});

impl HttpStats {
    pub fn record_status(&self, status: u16) {
        match status / 100 {
            1 => self.downstream_rq_1xx.inc(),
            2 => self.downstream_rq_2xx.inc(),
            3 => self.downstream_rq_3xx.inc(),
            4 => self.downstream_rq_4xx.inc(),
            _ => self.downstream_rq_5xx.inc(),
        }
    }
}

stat_struct!(TcpStats {
    counters: [
        downstream_cx_total,
        downstream_cx_no_route,
        downstream_cx_rx_bytes_total,
        downstream_cx_tx_bytes_total,
        idle_timeout,
        upstream_flush_total,
        upstream_cx_connect_attempts_exceeded
    ],
    gauges: [
        downstream_cx_rx_bytes_buffered,
        downstream_cx_tx_bytes_buffered
    ],
    histograms: []
});

stat_struct!(ListenerStats {
    counters: [
        downstream_cx_total,
        downstream_cx_destroy,
        no_filter_chain_match
    ],
    gauges: [downstream_cx_active],
    histograms: [downstream_cx_length_ms]
});

stat_struct!(ClusterManagerStats {
    counters: [cluster_added, cluster_modified, cluster_removed],
    gauges: [active_clusters, warming_clusters],
    histograms: []
});

// Resilience (issue 4): retries, timeouts and overflow, on the cluster scope.
stat_struct!(ResilienceStats {
    counters: [
        upstream_rq_retry,
        upstream_rq_retry_success,
        upstream_rq_retry_overflow,
        upstream_rq_retry_limit_exceeded,
        upstream_rq_retry_backoff_exponential,
        upstream_rq_per_try_timeout,
        upstream_rq_per_try_idle_timeout,
        upstream_cx_overflow,
        upstream_cx_pool_overflow,
        upstream_rq_pending_overflow
    ],
    gauges: [],
    histograms: []
});

// `cluster.<name>.outlier_detection.*`, Envoy's names.
stat_struct!(OutlierStats {
    counters: [
        ejections_enforced_total,
        ejections_total,
        ejections_overflow,
        ejections_consecutive_5xx,
        ejections_enforced_consecutive_5xx,
        ejections_detected_consecutive_5xx,
        ejections_enforced_consecutive_gateway_failure,
        ejections_detected_consecutive_gateway_failure,
        ejections_enforced_consecutive_local_origin_failure,
        ejections_detected_consecutive_local_origin_failure,
        ejections_enforced_success_rate,
        ejections_detected_success_rate,
        ejections_enforced_failure_percentage,
        ejections_detected_failure_percentage,
        ejections_enforced_failure_percentage_local_origin,
        ejections_detected_failure_percentage_local_origin
    ],
    gauges: [ejections_active],
    histograms: []
});

// `cluster.<name>.health_check.*`, Envoy's names.
stat_struct!(HealthCheckStats {
    counters: [
        attempt,
        success,
        failure,
        passive_failure,
        network_failure,
        verify_cluster
    ],
    gauges: [healthy, degraded],
    histograms: []
});

// `server.*`, Envoy's names; refreshed by the stats flush and before `/stats` renders.
stat_struct!(ServerStats {
    counters: [],
    gauges: [live, state, uptime, concurrency, total_connections],
    histograms: []
});
