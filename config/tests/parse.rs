//! Parsing and validation of the bootstrap subset: Envoy field names, durations, errors with paths.

use mecha_config::*;

const GOOD: &str = r#"
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 9901 } } }
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 0.0.0.0, port_value: 10000 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          common_http_protocol_options: { idle_timeout: 1.5s }
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: c, timeout: { seconds: 2, nanos: 500000000 } }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: c
    connect_timeout: 0.25s
    type: STRICT_DNS
    lb_policy: MAGLEV
    load_assignment:
      cluster_name: c
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: example.com, port_value: 80 } } } }] }]
"#;

#[test]
fn envoy_style_bootstrap_parses() {
    let b = parse_bootstrap(GOOD).unwrap();
    let l = &b.static_resources.listeners[0];
    let NetworkFilterConfig::HttpConnectionManager(hcm) = &l.filter_chains[0].filters[0].config
    else {
        panic!("not an HCM")
    };
    assert_eq!(hcm.stat_prefix, "ingress");
    assert_eq!(
        hcm.common_http_protocol_options
            .as_ref()
            .unwrap()
            .idle_timeout,
        Some(PbDuration::millis(1500))
    );
    let route = hcm.route_config.as_ref().unwrap().virtual_hosts[0].routes[0]
        .route
        .as_ref()
        .unwrap();
    assert_eq!(route.timeout, Some(PbDuration::millis(2500)));
    let c = &b.static_resources.clusters[0];
    assert_eq!(
        (c.discovery_type, c.lb_policy),
        (DiscoveryType::STRICT_DNS, LbPolicy::MAGLEV)
    );
    assert_eq!(c.connect_timeout(), std::time::Duration::from_millis(250));
}

#[test]
fn json_is_accepted_too() {
    let json = r#"{"static_resources": {"clusters": [{"name": "c", "connect_timeout": "1s"}]}}"#;
    assert_eq!(
        parse_bootstrap(json).unwrap().static_resources.clusters[0].name,
        "c"
    );
}

#[test]
fn errors_name_the_field_path() {
    let bad = GOOD
        .replace("lb_policy: MAGLEV", "lb_policy: FASTEST")
        .replace("idle_timeout: 1.5s", "idle_timeout: soon");
    let errs = parse_bootstrap(&bad).unwrap_err();
    let text = errs.to_string();
    assert!(
        text.contains("static_resources.clusters[0].lb_policy: unknown value \"FASTEST\""),
        "{text}"
    );
    assert!(
        text.contains("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.common_http_protocol_options.idle_timeout: invalid duration \"soon\""),
        "{text}"
    );
    assert_eq!(errs.0.len(), 2, "{text}");
}

#[test]
fn unsupported_fields_are_rejected_not_ignored() {
    let bad = GOOD.replace(
        "    connect_timeout: 0.25s\n",
        "    connect_timeout: 0.25s\n    upstream_bind_config: {}\n",
    );
    let text = parse_bootstrap(&bad).unwrap_err().to_string();
    assert!(
        text.contains(
            "static_resources.clusters[0].upstream_bind_config: unknown or unsupported field \"upstream_bind_config\""
        ),
        "{text}"
    );
}

#[test]
fn cross_references_and_shapes_are_validated() {
    let bad = GOOD
        .replace("route: { cluster: c,", "route: { cluster: missing,")
        .replace("type: STRICT_DNS", "type: STATIC")
        .replace("domains: [\"*\"]", "domains: [\"a.*.b\"]");
    let text = parse_bootstrap(&bad).unwrap_err().to_string();
    assert!(
        text.contains("routes[0].route.cluster: unknown cluster \"missing\""),
        "{text}"
    );
    assert!(
        text.contains("socket_address.address: \"example.com\" is not an IP address"),
        "{text}"
    );
    assert!(
        text.contains("virtual_hosts[0].domains[0]: invalid wildcard"),
        "{text}"
    );
}

#[test]
fn durations_parse_like_protobuf_json() {
    assert_eq!(
        parse_duration("0.25s").unwrap(),
        std::time::Duration::from_millis(250)
    );
    assert_eq!(
        parse_duration("15s").unwrap(),
        std::time::Duration::from_secs(15)
    );
    assert!(parse_duration("15").is_err());
    assert!(parse_duration("-1s").is_err());
}

#[test]
fn duration_objects_reject_unknown_keys() {
    let bad = GOOD.replace(
        "timeout: { seconds: 2, nanos: 500000000 }",
        "timeout: { secs: 2 }",
    );
    let text = parse_bootstrap(&bad).unwrap_err().to_string();
    assert!(
        text.contains("routes[0].route.timeout") && text.contains("secs"),
        "{text}"
    );
    let bad = GOOD.replace("nanos: 500000000", "nanos: 1500000000");
    let text = parse_bootstrap(&bad).unwrap_err().to_string();
    assert!(text.contains("routes[0].route.timeout"), "{text}");
}

#[test]
fn durations_are_written_back_in_protobuf_json_form() {
    use std::time::Duration;
    assert_eq!(format_duration(Duration::from_secs(15)), "15s");
    assert_eq!(format_duration(Duration::from_millis(250)), "0.250s");
    assert_eq!(
        format_duration(Duration::from_micros(1_500_001)),
        "1.500001s"
    );
    assert_eq!(format_duration(Duration::new(0, 7)), "0.000000007s");
    let json = serde_json::to_string(&PbDuration::millis(2500)).unwrap();
    assert_eq!(json, "\"2.500s\"");
    let back: PbDuration = serde_json::from_str(&json).unwrap();
    assert_eq!(back, PbDuration::millis(2500));
}

#[test]
fn options_messages_mecha_does_not_implement_are_rejected() {
    let bad = GOOD.replace(
        "match: { prefix: \"/\" }",
        "match: { safe_regex: { google_re2: { max_program_size: 9 }, regex: \"/.*\" } }",
    );
    let text = parse_bootstrap(&bad).unwrap_err().to_string();
    assert!(
        text.contains("match.safe_regex.google_re2.max_program_size"),
        "{text}"
    );
    let bad = GOOD.replace(
        "match: { prefix: \"/\" }",
        "match: { prefix: \"/\", grpc: { x: 1 } }",
    );
    let text = parse_bootstrap(&bad).unwrap_err().to_string();
    assert!(text.contains("match.grpc.x"), "{text}");
    // An empty grpc matcher and google_re2 are fine.
    let ok = GOOD.replace(
        "match: { prefix: \"/\" }",
        "match: { safe_regex: { google_re2: {}, regex: \"/.*\" }, grpc: {} }",
    );
    parse_bootstrap(&ok).expect("empty option messages");
}

#[test]
fn health_checks_are_validated_not_guessed() {
    let with_hc = |hc: &str| {
        GOOD.replace(
            "    lb_policy: MAGLEV\n",
            &format!("    lb_policy: MAGLEV\n    health_checks:\n{hc}"),
        )
    };
    let base = "    - { timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, ";
    parse_bootstrap(&with_hc(&format!(
        "{base}tcp_health_check: {{ send: {{ text: \"0a0B\" }} }} }}\n"
    )))
    .expect("hex payload");
    let text = parse_bootstrap(&with_hc(&format!(
        "{base}tcp_health_check: {{ send: {{ text: zz }}, receive: [{{ binary: AAE= }}] }} }}\n"
    )))
    .unwrap_err()
    .to_string();
    assert!(
        text.contains(
            "health_checks[0].tcp_health_check.send.text: \"zz\" is not hex-encoded bytes"
        ),
        "{text}"
    );
    assert!(text.contains("health_checks[0].tcp_health_check.receive[0].binary: binary payloads are not supported"), "{text}");
    let text = parse_bootstrap(&with_hc(&format!(
        "{base}http_health_check: {{ path: /h, codec_client_type: HTTP3 }} }}\n{base}tcp_health_check: {{}} }}\n"
    )))
    .unwrap_err()
    .to_string();
    assert!(
        text.contains(
            "health_checks[0].http_health_check.codec_client_type: unsupported value \"HTTP3\""
        ),
        "{text}"
    );
    assert!(
        text.contains("health_checks[1]: mecha runs one health checker per cluster"),
        "{text}"
    );
    let text = parse_bootstrap(&with_hc(&format!("{base}}}\n")))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("exactly one of http_health_check, tcp_health_check, grpc_health_check"),
        "{text}"
    );
}

#[test]
fn cluster_protocol_and_connect_timeout_rules() {
    let bad = GOOD.replace("connect_timeout: 0.25s", "connect_timeout: 0s\n    typed_extension_protocol_options: { envoy.extensions.upstreams.http.v3.HttpProtocolOptions: { \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {} } }");
    let text = parse_bootstrap(&bad).unwrap_err().to_string();
    assert!(
        text.contains("static_resources.clusters[0].connect_timeout: must be greater than 0"),
        "{text}"
    );
    assert!(
        text.contains(
            "explicit_http_config: exactly one of http_protocol_options or http2_protocol_options"
        ),
        "{text}"
    );
}

#[test]
fn stream_and_route_idle_timeouts_are_accepted() {
    let with = |extra: &str| {
        GOOD.replace(
            "          stat_prefix: ingress\n",
            &format!("          stat_prefix: ingress\n{extra}"),
        )
    };
    for extra in [
        "          stream_idle_timeout: 0s\n          request_timeout: 0s\n",
        "          stream_idle_timeout: 300s\n          request_timeout: 10s\n",
    ] {
        let b = parse_bootstrap(&with(extra));
        assert!(b.is_ok(), "{extra}: {:?}", b.err());
    }
    let b = parse_bootstrap(&GOOD.replace(
        "timeout: { seconds: 2, nanos: 500000000 }",
        "idle_timeout: 10s",
    ));
    assert!(b.is_ok(), "{:?}", b.err());
    // Still typed: a bad duration names its path.
    let text = parse_bootstrap(&with("          request_timeout: soon\n"))
        .unwrap_err()
        .to_string();
    assert!(text.contains("typed_config.request_timeout"), "{text}");
}

#[test]
fn load_balancer_configs_are_range_checked() {
    let cluster = |extra: &str| {
        GOOD.replace(
            "    lb_policy: MAGLEV\n",
            &format!("    lb_policy: MAGLEV\n{extra}"),
        )
    };
    let err = |extra: &str| parse_bootstrap(&cluster(extra)).unwrap_err().to_string();
    let p = "static_resources.clusters[0]";

    let text = err("    maglev_lb_config: { table_size: 4 }\n");
    assert_eq!(
        text,
        format!("{p}.maglev_lb_config.table_size: 4 is not a prime")
    );
    let text = err("    maglev_lb_config: { table_size: 18446744073709551557 }\n");
    assert!(text.contains("is larger than 5000011"), "{text}");
    let ok = cluster("    maglev_lb_config: { table_size: 65537 }\n");
    assert!(parse_bootstrap(&ok).is_ok());

    let text = err("    least_request_lb_config: { choice_count: 1 }\n");
    assert_eq!(
        text,
        format!("{p}.least_request_lb_config.choice_count: must be at least 2, got 1")
    );

    let text =
        err("    ring_hash_lb_config: { minimum_ring_size: 2048, maximum_ring_size: 1024 }\n");
    assert_eq!(
        text,
        format!(
            "{p}.ring_hash_lb_config.minimum_ring_size: 2048 is larger than maximum_ring_size 1024"
        )
    );
    let text = err("    ring_hash_lb_config: { hash_function: MURMUR_HASH_2 }\n");
    assert!(
        text.starts_with(&format!(
            "{p}.ring_hash_lb_config.hash_function: unsupported value \"MURMUR_HASH_2\""
        )) && text.contains("XX_HASH"),
        "{text}"
    );
    let ok = cluster("    ring_hash_lb_config: { hash_function: XX_HASH, minimum_ring_size: 8, maximum_ring_size: 8 }\n");
    assert!(parse_bootstrap(&ok).is_ok());

    for zero in ["0s", "0.001s"] {
        let text = err(&format!("    dns_refresh_rate: {zero}\n"));
        assert_eq!(
            text,
            format!("{p}.dns_refresh_rate: must be greater than 1ms")
        );
    }
    assert!(parse_bootstrap(&cluster("    dns_refresh_rate: 0.002s\n")).is_ok());
}
