//! `mecha validate` on good and bad files.

use crate::common::*;
use std::process::Command;

fn validate(yaml: &str) -> (i32, String, String) {
    let dir = TempDir::new();
    let p = dir.0.join("c.yaml");
    std::fs::write(&p, yaml).unwrap();
    let out = Command::new(mecha_bin())
        .arg("validate")
        .arg("-c")
        .arg(&p)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn example_front_proxy_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/front-proxy.yaml");
    let out = Command::new(mecha_bin())
        .args(["validate", "-c", path])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OK (1 listeners, 2 clusters, 3 routes)"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1);
}

#[test]
fn every_error_is_reported_with_its_path() {
    let yaml = r#"
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 1 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: x
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: nope }
              - match: { safe_regex: { regex: "([" } }
                route: { cluster: a }
          http_filters:
          - name: envoy.filters.http.made_up
            typed_config: { "@type": type.googleapis.com/made.up.Filter }
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: a
    load_assignment: { cluster_name: a, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 2 } } } }] }] }
  - name: b
    connect_timeout: 1s
    colour: blue
  - name: c
    lb_policy: FASTEST
"#;
    let (code, _out, err) = validate(yaml);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("static_resources.clusters[2].lb_policy: unknown value \"FASTEST\""),
        "{err}"
    );
    assert!(
        err.contains(
            "static_resources.clusters[1].colour: unknown or unsupported field \"colour\""
        ),
        "{err}"
    );
    // Errors in different resources are all reported, not just the first.
    let (code, _out, err) = validate(&yaml.replace("  - name: b\n    connect_timeout: 1s\n    colour: blue\n  - name: c\n    lb_policy: FASTEST\n", ""));
    assert_eq!(code, 1);
    let vh = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0]";
    assert!(
        err.contains(&format!(
            "{vh}.routes[0].route.cluster: unknown cluster \"nope\""
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{vh}.routes[1].match.safe_regex.regex: invalid regex"
        )),
        "{err}"
    );
    let (code, _out, err) = validate(&yaml.replace("  - name: b\n    connect_timeout: 1s\n    colour: blue\n  - name: c\n    lb_policy: FASTEST\n", "").replace("cluster: nope", "cluster: a").replace("\"([\"", "\"/x\""));
    assert_eq!(code, 1);
    assert!(
        err.contains("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.@type: unknown HTTP filter type \"type.googleapis.com/made.up.Filter\""),
        "{err}"
    );
}

#[test]
fn bad_yaml_and_missing_file_are_clear_errors() {
    let (code, _o, err) = validate("static_resources: [unclosed");
    assert_eq!(code, 1);
    assert!(err.contains("invalid YAML"), "{err}");
    let out = Command::new(mecha_bin())
        .args(["validate", "-c", "/nonexistent/mecha.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/mecha.yaml"));
}
