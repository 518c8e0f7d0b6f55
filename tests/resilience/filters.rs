//! The fault-injection and local rate-limit HTTP filters in a real chain.

use crate::*;

fn with_filters(cfg: String, filters: &str) -> String {
    cfg.replacen(
        "          http_filters:\n",
        &format!("          http_filters:\n{filters}"),
        1,
    )
}

#[tokio::test]
async fn fault_abort_and_header_delay() {
    let up = Upstream::echo("a").await;
    let (admin, port) = (free_port(), free_port());
    let filters = "          - name: envoy.filters.http.fault\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n              delay: { header_delay: {}, percentage: { numerator: 100 } }\n              max_active_faults: 100\n";
    let per_route = "                typed_per_filter_config:\n                  envoy.filters.http.fault:\n                    \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n                    abort: { http_status: 418, percentage: { numerator: 100 } }\n";
    let route = format!("              - match: {{ prefix: \"/abort\" }}\n                route: {{ cluster: a }}\n{per_route}              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: a }}\n");
    let cfg = with_filters(
        http_bootstrap(
            admin,
            port,
            "",
            &routes("", &route),
            &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
        ),
        filters,
    );
    let m = Mecha::start(&cfg, admin).await;
    let r = request(port, "GET", "/abort", &[], vec![]).await;
    assert_eq!(
        (r.status, r.text()),
        (418, "fault filter abort".to_string())
    );
    assert_eq!(
        up.hits(),
        0,
        "an aborted request never reaches the upstream"
    );
    let t0 = std::time::Instant::now();
    let r = request(
        port,
        "GET",
        "/",
        &[("x-envoy-fault-delay-request", "300")],
        vec![],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(280),
        "{:?}",
        t0.elapsed()
    );
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 2);
    assert_eq!(
        m.stat("http.ingress_http.fault.aborts_injected").await,
        Some(1)
    );
    assert_eq!(
        m.stat("http.ingress_http.fault.delays_injected").await,
        Some(1)
    );
    assert_eq!(
        m.stat("http.ingress_http.fault.active_faults").await,
        Some(0)
    );
}

#[tokio::test]
async fn local_rate_limit_buckets_per_listener_and_route() {
    let up = Upstream::echo("a").await;
    let (admin, port) = (free_port(), free_port());
    let rl = |prefix: &str, tokens: u32, indent: &str| {
        format!("{indent}\"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n{indent}stat_prefix: {prefix}\n{indent}token_bucket: {{ max_tokens: {tokens}, tokens_per_fill: {tokens}, fill_interval: 60s }}\n{indent}filter_enabled: {{ default_value: {{ numerator: 100 }} }}\n{indent}filter_enforced: {{ default_value: {{ numerator: 100 }} }}\n{indent}enable_x_ratelimit_headers: DRAFT_VERSION_03\n{indent}response_headers_to_add: [{{ header: {{ key: x-limited, value: \"yes\" }} }}]\n")
    };
    let filters = format!(
        "          - name: envoy.filters.http.local_ratelimit\n            typed_config:\n{}",
        rl("listener_rl", 3, "              ")
    );
    let route = format!("              - match: {{ prefix: \"/route\" }}\n                route: {{ cluster: a }}\n                typed_per_filter_config:\n                  envoy.filters.http.local_ratelimit:\n{}              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: a }}\n", rl("route_rl", 1, "                    "));
    let cfg = with_filters(
        http_bootstrap(
            admin,
            port,
            "",
            &routes("", &route),
            &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
        ),
        &filters,
    );
    let m = Mecha::start(&cfg, admin).await;
    for left in ["2", "1", "0"] {
        let r = request(port, "GET", "/", &[], vec![]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some(left));
    }
    let r = request(port, "GET", "/", &[], vec![]).await;
    assert_eq!(
        (r.status, r.text()),
        (429, "local_rate_limited".to_string())
    );
    assert_eq!(r.header("x-limited"), Some("yes"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    // The route has its own bucket (1 token), untouched by the listener's.
    assert_eq!(
        request(port, "GET", "/route", &[], vec![]).await.status,
        200
    );
    assert_eq!(
        request(port, "GET", "/route", &[], vec![]).await.status,
        429
    );
    assert_eq!(up.hits(), 4);
    assert_eq!(
        m.stat("listener_rl.http_local_rate_limit.ok").await,
        Some(3)
    );
    assert_eq!(
        m.stat("listener_rl.http_local_rate_limit.rate_limited")
            .await,
        Some(1)
    );
    assert_eq!(
        m.stat("listener_rl.http_local_rate_limit.enforced").await,
        Some(1)
    );
    assert_eq!(
        m.stat("listener_rl.http_local_rate_limit.enabled").await,
        Some(4)
    );
    assert_eq!(
        m.stat("route_rl.http_local_rate_limit.rate_limited").await,
        Some(1)
    );
}
