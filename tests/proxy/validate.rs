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

/// `mecha run` logs to stderr (Envoy's convention), without colour codes when redirected, and
/// writes nothing to stdout.
#[test]
fn run_logs_to_stderr_and_leaves_stdout_empty() {
    let (admin, port) = (free_port(), free_port());
    let routes = crate::routing::vhost_routes(
        "              - match: { prefix: \"/\" }\n                direct_response: { status: 200 }\n",
    );
    let dir = TempDir::new();
    let path = dir.0.join("c.yaml");
    std::fs::write(&path, http_bootstrap(admin, port, "", &routes, "    []\n")).unwrap();
    let mut child = Command::new(mecha_bin())
        .arg("run")
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!("mecha exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(std::time::Instant::now() < deadline, "mecha did not listen");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout, "", "stdout: {stdout}");
    assert!(stderr.contains("listening"), "stderr: {stderr}");
    assert!(stderr.contains("stopped"), "stderr: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a redirected log: {stderr}"
    );
}

#[test]
fn header_mutations_follow_envoys_rules() {
    let yaml = |mutations: &str| {
        format!(
            r#"
static_resources:
  listeners:
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 1 }} }}
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
{mutations}
              routes:
              - match: {{ prefix: "/" }}
                route:
                  weighted_clusters: {{ total_weight: 0, clusters: [{{ name: a, weight: 1 }}] }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: a
    connect_timeout: 1s
    load_assignment: {{ cluster_name: a, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 2 }} }} }} }}] }}] }}
"#
        )
    };
    // total_weight 0 means "the sum", as in Envoy.
    let (code, _, err) = validate(&yaml(""));
    assert_eq!(code, 0, "{err}");
    let vh = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0]";
    let (code, _, err) = validate(&yaml(
        "              request_headers_to_add: [{ header: { key: Host, value: x } }]\n              request_headers_to_remove: [host]",
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{vh}.request_headers_to_add[0].header.key: the host header cannot be modified"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{vh}.request_headers_to_remove[0]: the host header cannot be modified"
        )),
        "{err}"
    );
    let (code, _, err) = validate(&yaml(
        "              response_headers_to_add: [{ header: { key: x-a, value: b }, append: true, append_action: ADD_IF_ABSENT }]",
    ));
    assert_eq!(code, 1);
    assert!(err.contains(&format!("{vh}.response_headers_to_add[0].append: append and append_action are mutually exclusive")), "{err}");
}
