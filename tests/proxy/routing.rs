//! Route matching, actions and header mutations, through the real binary.

use crate::common::*;
use std::collections::HashMap;

pub fn vhost_routes(routes: &str) -> String {
    format!(
        "            name: local\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n{routes}"
    )
}

/// Starts mecha with two echo clusters `a` and `b` and the given route-config YAML.
async fn start_ab(route_config: &str, hcm_extra: &str) -> (Mecha, u16, Upstream, Upstream) {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let (admin, port) = (free_port(), free_port());
    let clusters = format!(
        "{}{}",
        static_cluster("a", &[a.addr], "ROUND_ROBIN", ""),
        static_cluster("b", &[b.addr], "ROUND_ROBIN", "")
    );
    let cfg = http_bootstrap(admin, port, hcm_extra, route_config, &clusters);
    (Mecha::start(&cfg, admin).await, port, a, b)
}

#[tokio::test]
async fn prefix_route_reaches_upstream_and_stats_move() {
    let (m, port, _a, _b) = start_ab(
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        ),
        "",
    )
    .await;
    let r = get(&format!("http://127.0.0.1:{port}/hello?x=1"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream-name"), Some("a"));
    let j = r.json();
    assert_eq!(j["uri"], "/hello?x=1");
    assert_eq!(j["headers"]["x-request-id"][0].as_str().unwrap().len(), 36);
    assert_eq!(j["headers"]["x-forwarded-proto"][0], "http");
    assert!(j["headers"]["x-envoy-expected-rq-timeout-ms"][0] == "15000");
    assert_eq!(m.stat("cluster.a.upstream_rq_total").await, Some(1));
    assert_eq!(m.stat("cluster.a.upstream_rq_2xx").await, Some(1));
    assert_eq!(m.stat("http.ingress_http.downstream_rq_2xx").await, Some(1));
}

#[tokio::test]
async fn path_regex_and_case_insensitive_matches() {
    let routes = r#"              - match: { path: "/exact" }
                route: { cluster: a }
              - match: { safe_regex: { google_re2: {}, regex: "/items/[0-9]+" } }
                route: { cluster: b }
              - match: { prefix: "/CaSe", case_sensitive: false }
                route: { cluster: b }
              - match: { path_separated_prefix: "/sep" }
                route: { cluster: a }
"#;
    let (_m, port, _a, _b) = start_ab(&vhost_routes(routes), "").await;
    let who = |p: &str| {
        let url = format!("http://127.0.0.1:{port}{p}");
        async move {
            let r = get(&url).await.unwrap();
            (r.status, r.header("x-upstream-name").map(str::to_string))
        }
    };
    assert_eq!(who("/exact").await, (200, Some("a".into())));
    assert_eq!(who("/exact/more").await.0, 404);
    assert_eq!(who("/exact?q=1").await, (200, Some("a".into())));
    assert_eq!(who("/items/42").await, (200, Some("b".into())));
    assert_eq!(who("/items/42x").await.0, 404);
    assert_eq!(who("/case/anything").await, (200, Some("b".into())));
    assert_eq!(who("/sep").await, (200, Some("a".into())));
    assert_eq!(who("/sep/x").await, (200, Some("a".into())));
    assert_eq!(who("/separate").await.0, 404);
}

#[tokio::test]
async fn header_and_query_matchers() {
    let routes = r#"              - match:
                  prefix: "/"
                  headers:
                  - { name: x-exact, string_match: { exact: "yes" } }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  headers:
                  - { name: x-pre, string_match: { prefix: "ab" } }
                  - { name: x-suf, string_match: { suffix: "yz" } }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  headers:
                  - { name: x-contains, string_match: { contains: "mid" } }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  headers:
                  - { name: x-present, present_match: true }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  headers:
                  - { name: x-not, string_match: { exact: "bad" }, invert_match: true }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  query_parameters:
                  - { name: debug, string_match: { exact: "1" } }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  query_parameters:
                  - { name: flag, present_match: true }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  headers:
                  - { name: ":method", string_match: { exact: "DELETE" } }
                route: { cluster: b }
              - match:
                  prefix: "/"
                  headers:
                  - { name: ":path", string_match: { suffix: "?pseudo" } }
                  - { name: ":authority", string_match: { prefix: "pseudo." } }
                  - { name: ":scheme", string_match: { exact: "http" } }
                route: { cluster: b }
              - match: { prefix: "/" }
                route: { cluster: a }
"#;
    let (_m, port, _a, _b) = start_ab(&vhost_routes(routes), "").await;
    let url = format!("http://127.0.0.1:{port}/p");
    // Pseudo-header matchers (Envoy matches them for HTTP/1 requests too).
    let del = send(
        &client(),
        http::Request::delete(&url)
            .body(Default::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(del.header("x-upstream-name"), Some("b"));
    assert_eq!(
        get_with(&format!("{url}?pseudo"), &[("host", "pseudo.example")])
            .await
            .header("x-upstream-name"),
        Some("b")
    );
    assert_eq!(
        get_with(&format!("{url}?pseudo"), &[("host", "other.example")])
            .await
            .header("x-upstream-name"),
        Some("a")
    );
    // CONNECT matches no prefix route (Envoy sends it only to connect_matcher routes): 404.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let who = |r: Response| r.header("x-upstream-name").unwrap().to_string();
    assert_eq!(who(get_with(&url, &[]).await), "a");
    assert_eq!(who(get_with(&url, &[("x-exact", "yes")]).await), "b");
    assert_eq!(who(get_with(&url, &[("x-exact", "no")]).await), "a");
    assert_eq!(
        who(get_with(&url, &[("x-pre", "abc"), ("x-suf", "xyz")]).await),
        "b"
    );
    assert_eq!(who(get_with(&url, &[("x-pre", "abc")]).await), "a");
    assert_eq!(who(get_with(&url, &[("x-contains", "amidst")]).await), "b");
    assert_eq!(who(get_with(&url, &[("x-present", "")]).await), "b");
    assert_eq!(who(get_with(&url, &[("x-not", "good")]).await), "b");
    assert_eq!(who(get_with(&url, &[("x-not", "bad")]).await), "a");
    assert_eq!(who(get_with(&format!("{url}?debug=1"), &[]).await), "b");
    assert_eq!(who(get_with(&format!("{url}?debug=2"), &[]).await), "a");
    assert_eq!(who(get_with(&format!("{url}?a=b&flag"), &[]).await), "b");
}

#[tokio::test]
async fn virtual_host_domain_selection() {
    let rc = r#"            name: local
            virtual_hosts:
            - name: exact
              domains: ["api.example.com", "api.example.com:8443"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "exact" } } }]
            - name: suffix
              domains: ["*.example.com"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "suffix" } } }]
            - name: longer_suffix
              domains: ["*.b.example.com"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "longer-suffix" } } }]
            - name: prefix
              domains: ["internal.*"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "prefix" } } }]
            - name: fallback
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "any" } } }]
"#;
    let (_m, port, _a, _b) = start_ab(rc, "").await;
    let url = format!("http://127.0.0.1:{port}/");
    let body = |host: &'static str| {
        let url = url.clone();
        async move { get_with(&url, &[("host", host)]).await.text() }
    };
    assert_eq!(body("api.example.com").await, "exact");
    assert_eq!(body("API.Example.com").await, "exact");
    assert_eq!(body("api.example.com:8443").await, "exact");
    // As in Envoy, the port is part of the host: no fallback to the port-less domain.
    assert_eq!(body("api.example.com:9999").await, "any");
    assert_eq!(body("x.example.com:80").await, "any");
    assert_eq!(body("x.example.com").await, "suffix");
    assert_eq!(body("a.b.example.com").await, "longer-suffix");
    assert_eq!(body("internal.corp").await, "prefix");
    assert_eq!(body("internal.corp:8080").await, "prefix");
    assert_eq!(body("other.org").await, "any");
}

#[tokio::test]
async fn ignore_port_in_host_matching_drops_the_port() {
    let rc = r#"            name: local
            ignore_port_in_host_matching: true
            virtual_hosts:
            - name: exact
              domains: ["api.example.com"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "exact" } } }]
            - name: fallback
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "any" } } }]
"#;
    let (_m, port, _a, _b) = start_ab(rc, "").await;
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(
        get_with(&url, &[("host", "api.example.com:9999")])
            .await
            .text(),
        "exact"
    );
    assert_eq!(get_with(&url, &[("host", "[::1]:80")]).await.text(), "any");
}

#[tokio::test]
async fn weighted_clusters_split_within_tolerance() {
    let routes = r#"              - match: { prefix: "/" }
                route:
                  weighted_clusters:
                    clusters:
                    - { name: a, weight: 80 }
                    - { name: b, weight: 20, request_headers_to_add: [{ header: { key: x-canary, value: "true" } }] }
"#;
    let (_m, port, _a, _b) = start_ab(&vhost_routes(routes), "").await;
    let c = client();
    let mut counts: HashMap<String, u32> = HashMap::new();
    let n = 1000;
    for _ in 0..n {
        let r = send(
            &c,
            http::Request::get(format!("http://127.0.0.1:{port}/"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
        let name = r.header("x-upstream-name").unwrap().to_string();
        if name == "b" {
            assert_eq!(r.json()["headers"]["x-canary"][0], "true");
        } else {
            assert!(r.json()["headers"].get("x-canary").is_none());
        }
        *counts.entry(name).or_default() += 1;
    }
    let b = counts.get("b").copied().unwrap_or(0) as f64 / n as f64;
    // 20% with n=1000: stddev ~1.3%; allow 5 points either way.
    assert!((0.15..=0.25).contains(&b), "b got {b}");
}

#[tokio::test]
async fn rewrites_redirects_and_direct_responses() {
    let routes = r#"              - match: { prefix: "/api/" }
                route: { cluster: a, prefix_rewrite: "/v2/" }
              - match: { prefix: "/re/" }
                route:
                  cluster: a
                  regex_rewrite: { pattern: { google_re2: {}, regex: "^/re/(\\w+)/(\\w+)$" }, substitution: "/\\2/\\1" }
              - match: { prefix: "/host" }
                route: { cluster: a, host_rewrite_literal: "rewritten.internal" }
              - match: { prefix: "/old" }
                redirect: { path_redirect: "/new", response_code: FOUND }
              - match: { prefix: "/secure" }
                redirect: { https_redirect: true }
              - match: { prefix: "/port" }
                redirect: { port_redirect: 8443 }
              - match: { safe_regex: { regex: "/rxw/[a-z]+" } }
                route: { cluster: a, prefix_rewrite: "/whole" }
              - match: { safe_regex: { regex: "/rx/[a-z]+" }, case_sensitive: false }
                direct_response: { status: 200, body: { inline_string: "regex" } }
              - match: { prefix: "/strip" }
                redirect: { host_redirect: "other.example", prefix_rewrite: "/moved", strip_query: true, response_code: PERMANENT_REDIRECT }
              - match: { prefix: "/teapot" }
                direct_response: { status: 418, body: { inline_string: "short and stout" } }
"#;
    let (_m, port, _a, _b) = start_ab(&vhost_routes(routes), "").await;
    let base = format!("http://127.0.0.1:{port}");
    let r = get(&format!("{base}/api/users?id=7")).await.unwrap();
    assert_eq!(r.json()["uri"], "/v2/users?id=7");
    let r = get(&format!("{base}/re/one/two")).await.unwrap();
    assert_eq!(r.json()["path"], "/two/one");
    let r = get(&format!("{base}/host")).await.unwrap();
    assert_eq!(r.json()["headers"]["host"][0], "rewritten.internal");
    let r = get_with(&format!("{base}/old?x=1"), &[("host", "site.example")]).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://site.example/new?x=1"));
    let r = get_with(&format!("{base}/secure/page"), &[("host", "site.example")]).await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://site.example/secure/page")
    );
    // Envoy keeps a non-default port across a scheme change and drops the old scheme's default.
    let r = get_with(
        &format!("{base}/secure/p"),
        &[("host", "site.example:8080")],
    )
    .await;
    assert_eq!(
        r.header("location"),
        Some("https://site.example:8080/secure/p")
    );
    let r = get_with(&format!("{base}/secure/p"), &[("host", "site.example:80")]).await;
    assert_eq!(r.header("location"), Some("https://site.example/secure/p"));
    let r = get_with(&format!("{base}/port/x"), &[("host", "site.example:8080")]).await;
    assert_eq!(
        r.header("location"),
        Some("http://site.example:8443/port/x")
    );
    // prefix_rewrite on a regex route replaces the whole path, as Envoy's does.
    let r = get(&format!("{base}/rxw/abc?k=v")).await.unwrap();
    assert_eq!(r.json()["uri"], "/whole?k=v");
    // case_sensitive does not apply to safe_regex (Envoy ignores it there).
    assert_eq!(
        get(&format!("{base}/rx/abc")).await.unwrap().text(),
        "regex"
    );
    assert_eq!(get(&format!("{base}/RX/ABC")).await.unwrap().status, 404);
    let r = get_with(&format!("{base}/strip/a?q=1"), &[("host", "site.example")]).await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("http://other.example/moved/a"));
    let r = get(&format!("{base}/teapot")).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (418, "short and stout"));
}

#[tokio::test]
async fn header_mutations_at_every_level() {
    let rc = r#"            name: local
            request_headers_to_add: [{ header: { key: x-level, value: config } }]
            response_headers_to_add: [{ header: { key: x-resp-config, value: "1" } }]
            response_headers_to_remove: [x-upstream-name]
            virtual_hosts:
            - name: all
              domains: ["*"]
              request_headers_to_add: [{ header: { key: x-level, value: vhost } }]
              request_headers_to_remove: [x-drop-me]
              routes:
              - match: { prefix: "/" }
                route: { cluster: a }
                request_headers_to_add:
                - { header: { key: x-level, value: route } }
                - { header: { key: x-client, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" } }
                - { header: { key: x-only-if-absent, value: added }, append_action: ADD_IF_ABSENT }
                - { header: { key: x-overwrite, value: new }, append_action: OVERWRITE_IF_EXISTS_OR_ADD }
                response_headers_to_add: [{ header: { key: x-resp-route, value: "2" } }]
"#;
    let (_m, port, _a, _b) = start_ab(rc, "").await;
    let r = get_with(
        &format!("http://127.0.0.1:{port}/"),
        &[
            ("x-drop-me", "1"),
            ("x-only-if-absent", "client"),
            ("x-overwrite", "old"),
        ],
    )
    .await;
    let h = &r.json()["headers"];
    assert_eq!(
        h["x-level"],
        serde_json::json!(["route", "vhost", "config"])
    );
    assert!(h.get("x-drop-me").is_none());
    assert_eq!(h["x-client"][0], "127.0.0.1");
    assert_eq!(h["x-only-if-absent"], serde_json::json!(["client"]));
    assert_eq!(h["x-overwrite"], serde_json::json!(["new"]));
    assert_eq!(r.header("x-resp-config"), Some("1"));
    assert_eq!(r.header("x-resp-route"), Some("2"));
    assert_eq!(r.header("x-upstream-name"), None);
}

#[tokio::test]
async fn forwarded_headers_at_the_edge() {
    let (_m, port, _a, _b) = start_ab(
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        ),
        "          use_remote_address: true\n",
    )
    .await;
    let r = get_with(
        &format!("http://127.0.0.1:{port}/"),
        &[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-request-id", "external"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("x-envoy-internal", "true"),
            ("x-envoy-decorator-operation", "spoofed"),
            ("x-envoy-original-url", "spoofed"),
        ],
    )
    .await;
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"][0], "10.0.0.1, 127.0.0.1");
    // Two XFF addresses after the append: an external (edge) request, cleaned as Envoy does.
    for stripped in [
        "x-envoy-internal",
        "x-envoy-decorator-operation",
        "x-envoy-original-url",
    ] {
        assert!(h.get(stripped).is_none(), "{stripped} was forwarded");
    }
    // A loopback peer without XFF is internal: Envoy marks it and keeps its x-envoy-* headers.
    let r = get_with(
        &format!("http://127.0.0.1:{port}/"),
        &[("x-envoy-original-url", "kept")],
    )
    .await;
    let h2 = &r.json()["headers"];
    assert_eq!(h2["x-envoy-internal"][0], "true");
    assert_eq!(h2["x-envoy-original-url"][0], "kept");
    assert_ne!(
        h["x-request-id"][0], "external",
        "edge proxies regenerate x-request-id"
    );
    assert!(
        h.get("x-hop").is_none(),
        "headers named by Connection are hop-by-hop"
    );
    assert!(h.get("keep-alive").is_none());
    assert!(r.header("x-envoy-upstream-service-time").is_some());
}

#[tokio::test]
async fn server_header_transformation_modes() {
    // The upstream names itself on /named and sends no Server header elsewhere.
    let up = Upstream::start(std::sync::Arc::new(
        |req: http::Request<hyper::body::Incoming>| {
            let named = req.uri().path() == "/named";
            Box::pin(async move {
                let mut b = http::Response::builder();
                if named {
                    b = b.header("server", "app/1.0");
                }
                b.body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                    .unwrap()
            })
        },
    ))
    .await;
    let routes = vhost_routes(
        "              - match: { path: \"/local\" }\n                direct_response: { status: 200 }\n              - match: { prefix: \"/\" }\n                route: { cluster: up }\n",
    );
    // (mode, expected Server on /named, on /plain, on the local reply /local)
    let cases = [
        ("", Some("mecha"), Some("mecha"), Some("mecha")),
        ("OVERWRITE", Some("edge"), Some("edge"), Some("edge")),
        (
            "APPEND_IF_ABSENT",
            Some("app/1.0"),
            Some("edge"),
            Some("edge"),
        ),
        ("PASS_THROUGH", Some("app/1.0"), None, None),
    ];
    for (mode, named, plain, local) in cases {
        let (admin, port) = (free_port(), free_port());
        let extra = if mode.is_empty() {
            String::new()
        } else {
            format!("          server_name: edge\n          server_header_transformation: {mode}\n")
        };
        let cfg = http_bootstrap(
            admin,
            port,
            &extra,
            &routes,
            &static_cluster("up", &[up.addr], "ROUND_ROBIN", ""),
        );
        let _m = Mecha::start(&cfg, admin).await;
        for (path, want) in [("/named", named), ("/plain", plain), ("/local", local)] {
            let r = get(&format!("http://127.0.0.1:{port}{path}"))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{mode} {path}");
            assert_eq!(r.header("server"), want, "mode {mode:?}, {path}");
        }
    }
}
