//! Load-balancing policies and DNS discovery, observed from real upstreams.

use crate::common::*;
use crate::routing::vhost_routes;
use std::collections::HashMap;

async fn start_lb(
    policy: &str,
    n: usize,
    route_extra: &str,
    cluster_extra: &str,
) -> (Mecha, u16, Vec<Upstream>) {
    let mut ups = vec![];
    for i in 0..n {
        ups.push(Upstream::echo(&format!("u{i}")).await);
    }
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let (admin, port) = (free_port(), free_port());
    let routes = format!("              - match: {{ prefix: \"/\" }}\n                route:\n                  cluster: c\n{route_extra}");
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(&routes),
        &static_cluster("c", &addrs, policy, cluster_extra),
    );
    (Mecha::start(&cfg, admin).await, port, ups)
}

async fn distribution(port: u16, n: usize, headers: &[(&str, String)]) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let mut b = http::Request::get(format!("http://127.0.0.1:{port}/"));
        for (k, v) in headers {
            b = b.header(*k, v.as_str());
        }
        let r = send(&c, b.body(Default::default()).unwrap()).await.unwrap();
        *counts
            .entry(r.header("x-upstream-name").unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_is_exactly_even() {
    let (_m, port, _ups) = start_lb("ROUND_ROBIN", 3, "", "").await;
    let d = distribution(port, 300, &[]).await;
    assert_eq!(d.len(), 3);
    assert!(d.values().all(|v| *v == 100), "{d:?}");
}

#[tokio::test]
async fn weighted_round_robin_follows_weights() {
    let a = Upstream::echo("heavy").await;
    let b = Upstream::echo("light").await;
    let (admin, port) = (free_port(), free_port());
    let cluster = format!(
        r#"  - name: c
    connect_timeout: 1s
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
          load_balancing_weight: 3
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
          load_balancing_weight: 1
"#,
        a.addr.port(),
        b.addr.port()
    );
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        ),
        &cluster,
    );
    let _m = Mecha::start(&cfg, admin).await;
    let d = distribution(port, 400, &[]).await;
    assert_eq!((d["heavy"], d["light"]), (300, 100));
}

#[tokio::test]
async fn random_and_least_request_spread_load() {
    for policy in ["RANDOM", "LEAST_REQUEST"] {
        let (_m, port, _ups) = start_lb(policy, 3, "", "").await;
        let d = distribution(port, 600, &[]).await;
        assert_eq!(d.len(), 3, "{policy}: {d:?}");
        // Expected 200 each; a fair policy stays well inside [120, 280].
        assert!(
            d.values().all(|v| (120..=280).contains(v)),
            "{policy}: {d:?}"
        );
    }
}

#[tokio::test]
async fn least_request_follows_weights() {
    let a = Upstream::echo("heavy").await;
    let b = Upstream::echo("light").await;
    let (admin, port) = (free_port(), free_port());
    let cluster = format!(
        r#"  - name: c
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
          load_balancing_weight: 9
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
          load_balancing_weight: 1
"#,
        a.addr.port(),
        b.addr.port()
    );
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        ),
        &cluster,
    );
    let _m = Mecha::start(&cfg, admin).await;
    // Sequential requests leave both hosts idle at every pick, so only the weights decide:
    // expected 360 of 400 (sd 6). Ignoring weights (P2C over idle hosts) gives ~200.
    let d = distribution(port, 400, &[]).await;
    let heavy = d.get("heavy").copied().unwrap_or(0);
    assert!((330..=390).contains(&heavy), "{d:?}");
    assert_eq!(heavy + d.get("light").copied().unwrap_or(0), 400, "{d:?}");
}

#[tokio::test]
async fn least_request_avoids_the_busy_host() {
    // Host "slow" holds every request it gets; P2C must steer new requests to the idle hosts.
    let slow = Upstream::start(std::sync::Arc::new(|_req| {
        Box::pin(async {
            tokio::time::sleep(std::time::Duration::from_secs(20)).await;
            http::Response::builder()
                .header("x-upstream-name", "slow")
                .body(Default::default())
                .unwrap()
        })
    }))
    .await;
    let fast1 = Upstream::echo("fast1").await;
    let fast2 = Upstream::echo("fast2").await;
    let (admin, port) = (free_port(), free_port());
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes("              - match: { prefix: \"/\" }\n                route: { cluster: c, timeout: 0s }\n"),
        &static_cluster("c", &[slow.addr, fast1.addr, fast2.addr], "LEAST_REQUEST", "    least_request_lb_config: { choice_count: 3 }\n"),
    );
    let _m = Mecha::start(&cfg, admin).await;
    let url: &'static str = Box::leak(format!("http://127.0.0.1:{port}/").into_boxed_str());
    // Park requests until the slow host holds one of them.
    for _ in 0..60 {
        if slow.hits() >= 1 {
            break;
        }
        tokio::spawn(get(url));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        slow.hits() >= 1,
        "could not park a request on the slow host"
    );
    let before = slow.hits();
    let fast_before = fast1.hits() + fast2.hits();
    // One request at a time, each until it is answered by a fast host or held by the slow one:
    // then the fast hosts are idle at every pick and the slow host is always busier, whatever
    // else the machine is doing (overlapping requests on a loaded box made fast hosts tie with
    // it).
    for _ in 0..60 {
        let held = slow.hits();
        let request = tokio::spawn(get(url));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !request.is_finished() && slow.hits() == held {
            assert!(
                std::time::Instant::now() < deadline,
                "a request got no answer"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    // With choice_count 3 over 3 hosts the busy host only wins when all three picks land on it:
    // 1 in 27 per request, ~2.2 of 60 (10 or more with probability below 0.01 %). Round robin would
    // send it 20, random 20 ± 3.7.
    let to_slow = slow.hits() - before;
    let to_fast = fast1.hits() + fast2.hits() - fast_before;
    assert!(to_slow <= 9, "slow host got {to_slow} of 60 new requests");
    assert_eq!(to_slow + to_fast, 60);
}

#[tokio::test]
async fn ring_hash_and_maglev_are_sticky_per_key() {
    for policy in ["RING_HASH", "MAGLEV"] {
        let extra = "                  hash_policy: [{ header: { header_name: x-user } }]\n";
        let (_m, port, _ups) = start_lb(policy, 4, extra, "").await;
        let mut owners = HashMap::new();
        for user in 0..40 {
            let key = format!("user-{user}");
            let d = distribution(port, 5, &[("x-user", key.clone())]).await;
            assert_eq!(d.len(), 1, "{policy}: {key} went to several hosts: {d:?}");
            owners.insert(key, d.keys().next().unwrap().clone());
        }
        let distinct: std::collections::HashSet<_> = owners.values().collect();
        assert!(
            distinct.len() >= 3,
            "{policy}: keys should spread over hosts: {owners:?}"
        );
    }
}

/// Envoy's sticky sessions: a cookie hash policy with a `ttl` gives a client without the cookie
/// a generated one (`Set-Cookie`), and the requests that carry it back stay on one host.
#[tokio::test]
async fn cookie_hash_policy_with_ttl_generates_a_sticky_cookie() {
    let extra =
        "                  hash_policy: [{ cookie: { name: sticky, ttl: 3600s, path: / } }]\n";
    let (_m, port, _ups) = start_lb("RING_HASH", 4, extra, "").await;
    let mut owners = std::collections::HashSet::new();
    for _ in 0..12 {
        // A new connection each time: the generated value hashes the connection's addresses.
        let r = send(
            &client(),
            http::Request::get(format!("http://127.0.0.1:{port}/"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
        let set = r
            .header("set-cookie")
            .expect("a generated cookie")
            .to_string();
        assert!(set.starts_with("sticky=\""), "{set}");
        assert!(set.ends_with("; Max-Age=3600; Path=/; HttpOnly"), "{set}");
        let first = r.header("x-upstream-name").unwrap().to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        // Sent back (quoted, as set), the cookie keeps the client on the host it got first.
        let d = distribution(port, 5, &[("cookie", cookie.clone())]).await;
        assert_eq!(d.len(), 1, "{cookie}: {d:?}");
        assert_eq!(d.keys().next(), Some(&first), "{cookie}");
        owners.insert(first);
        // A request that carries the cookie gets no new one.
        let r = send(
            &client(),
            http::Request::get(format!("http://127.0.0.1:{port}/"))
                .header("cookie", cookie.as_str())
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.header("set-cookie"), None);
    }
    assert!(
        owners.len() >= 2,
        "generated cookies should spread: {owners:?}"
    );
}

#[tokio::test]
async fn priorities_fail_over_only_when_needed() {
    let p0 = Upstream::echo("p0").await;
    let p1 = Upstream::echo("p1").await;
    let (admin, port) = (free_port(), free_port());
    let cluster = format!(
        r#"  - name: c
    connect_timeout: 1s
    load_assignment:
      cluster_name: c
      endpoints:
      - priority: 0
        lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
      - priority: 1
        lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
"#,
        p0.addr.port(),
        p1.addr.port()
    );
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        ),
        &cluster,
    );
    let _m = Mecha::start(&cfg, admin).await;
    let d = distribution(port, 50, &[]).await;
    assert_eq!(d.get("p0"), Some(&50), "{d:?}");
}

/// A cluster of one locality per priority; each host is `(name, unhealthy)`.
async fn start_priorities(levels: &[&[(&str, bool)]]) -> (Mecha, u16, Vec<Upstream>) {
    let mut ups = vec![];
    let mut endpoints = String::new();
    for (p, hosts) in levels.iter().enumerate() {
        endpoints += &format!("      - priority: {p}\n        lb_endpoints:\n");
        for (name, unhealthy) in hosts.iter() {
            let up = Upstream::echo(name).await;
            endpoints += &format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}\n",
                up.addr.port()
            );
            if *unhealthy {
                endpoints += "          health_status: UNHEALTHY\n";
            }
            ups.push(up);
        }
    }
    let cluster = format!(
        "  - name: c\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: c\n      endpoints:\n{endpoints}"
    );
    let (admin, port) = (free_port(), free_port());
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        ),
        &cluster,
    );
    (Mecha::start(&cfg, admin).await, port, ups)
}

#[tokio::test]
async fn a_degraded_priority_spills_over_by_overprovisioned_health() {
    // P0: 1 of 3 hosts healthy, so its health is 1.4 × 1/3 = 46 %; P1 takes the other 54 %.
    let (_m, port, _ups) = start_priorities(&[
        &[("p0", false), ("bad1", true), ("bad2", true)],
        &[("p1", false)],
    ])
    .await;
    let d = distribution(port, 400, &[]).await;
    let p0 = d.get("p0").copied().unwrap_or(0);
    let p1 = d.get("p1").copied().unwrap_or(0);
    // Expected 184 (sd 10); all-or-nothing failover would give 400 or 0.
    assert!((144..=224).contains(&p0), "{d:?}");
    assert_eq!(
        p0 + p1,
        400,
        "unhealthy hosts got traffic outside panic: {d:?}"
    );
}

#[tokio::test]
async fn an_unhealthy_priority_fails_over_entirely() {
    let (_m, port, _ups) =
        start_priorities(&[&[("bad1", true), ("bad2", true)], &[("p1", false)]]).await;
    let d = distribution(port, 50, &[]).await;
    assert_eq!(d.get("p1"), Some(&50), "{d:?}");
}

#[tokio::test]
async fn below_the_panic_threshold_every_host_gets_traffic() {
    // One level, 1 of 3 healthy: health 46 % is under the 50 % panic threshold, so round robin
    // runs over all three hosts, ignoring health.
    let (_m, port, _ups) =
        start_priorities(&[&[("ok", false), ("bad1", true), ("bad2", true)]]).await;
    let d = distribution(port, 300, &[]).await;
    assert_eq!(
        (d.get("ok"), d.get("bad1"), d.get("bad2")),
        (Some(&100), Some(&100), Some(&100)),
        "{d:?}"
    );
}

#[tokio::test]
async fn strict_dns_resolves_localhost() {
    let up = Upstream::echo("dns").await;
    let (admin, port) = (free_port(), free_port());
    let cluster = format!(
        r#"  - name: dns
    type: STRICT_DNS
    connect_timeout: 1s
    dns_lookup_family: V4_ONLY
    dns_refresh_rate: 1s
    load_assignment:
      cluster_name: dns
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: localhost, port_value: {} }} }} }}
"#,
        up.addr.port()
    );
    let cfg = http_bootstrap(admin, port, "", &vhost_routes("              - match: { prefix: \"/\" }\n                route: { cluster: dns, auto_host_rewrite: true }\n"), &cluster);
    let m = Mecha::start(&cfg, admin).await;
    let mut ok = None;
    for _ in 0..50 {
        let r = get(&format!("http://127.0.0.1:{port}/")).await.unwrap();
        if r.status == 200 {
            ok = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = ok.expect("STRICT_DNS cluster never resolved localhost");
    assert_eq!(r.header("x-upstream-name"), Some("dns"));
    assert_eq!(
        r.json()["headers"]["host"][0],
        "localhost",
        "auto_host_rewrite uses the DNS name"
    );
    assert!(m.stat("cluster.dns.update_success").await.unwrap() >= 1);
    assert_eq!(m.stat("cluster.dns.membership_total").await, Some(1));
}

#[tokio::test]
async fn logical_dns_resolves_localhost() {
    let up = Upstream::echo("logical").await;
    let (admin, port) = (free_port(), free_port());
    let cluster = format!(
        r#"  - name: ldns
    type: LOGICAL_DNS
    connect_timeout: 1s
    dns_lookup_family: V4_ONLY
    dns_refresh_rate: 0.2s
    load_assignment:
      cluster_name: ldns
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: localhost, port_value: {} }} }} }}
"#,
        up.addr.port()
    );
    let cfg = http_bootstrap(admin, port, "", &vhost_routes("              - match: { prefix: \"/\" }\n                route: { cluster: ldns, auto_host_rewrite: true }\n"), &cluster);
    let m = Mecha::start(&cfg, admin).await;
    let mut ok = None;
    for _ in 0..50 {
        let r = get(&format!("http://127.0.0.1:{port}/")).await.unwrap();
        if r.status == 200 {
            ok = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = ok.expect("LOGICAL_DNS cluster never resolved localhost");
    assert_eq!(r.header("x-upstream-name"), Some("logical"));
    assert_eq!(r.json()["headers"]["host"][0], "localhost");
    assert_eq!(m.stat("cluster.ldns.membership_total").await, Some(1));
    // Re-resolved every 0.2 s (the cache is off), each answer the same single host.
    let first = m.stat("cluster.ldns.update_success").await.unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let later = m.stat("cluster.ldns.update_success").await.unwrap_or(0);
    assert!(later >= first + 2, "{first} -> {later} resolutions");
    assert_eq!(m.stat("cluster.ldns.membership_total").await, Some(1));
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn endpoints_marked_unhealthy_get_no_traffic() {
    let good = Upstream::echo("good").await;
    let bad = Upstream::echo("bad").await;
    let (admin, port) = (free_port(), free_port());
    let cluster = format!(
        r#"  - name: c
    connect_timeout: 1s
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
          health_status: DRAINING
"#,
        good.addr.port(),
        bad.addr.port()
    );
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: c }\n",
        ),
        &cluster,
    );
    let _m = Mecha::start(&cfg, admin).await;
    let d = distribution(port, 20, &[]).await;
    assert_eq!(d.get("good"), Some(&20), "{d:?}");
}
