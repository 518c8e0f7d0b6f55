//! Cross-field checks that a field-by-field decode cannot make: references, uniqueness, regexes.

use crate::*;
use std::collections::HashSet;

pub(crate) fn validate(b: &Bootstrap) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let clusters: HashSet<&str> = b
        .static_resources
        .clusters
        .iter()
        .map(|c| c.name.as_str())
        .collect();

    let mut seen = HashSet::new();
    for (i, c) in b.static_resources.clusters.iter().enumerate() {
        let path = format!("static_resources.clusters[{i}]");
        if !seen.insert(c.name.as_str()) {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!("duplicate cluster name \"{}\"", c.name),
            ));
        }
        validate_cluster(c, &path, &mut errors);
    }

    let mut seen = HashSet::new();
    for (i, l) in b.static_resources.listeners.iter().enumerate() {
        let path = format!("static_resources.listeners[{i}]");
        if !seen.insert(l.name.as_str()) {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!("duplicate listener name \"{}\"", l.name),
            ));
        }
        let dynamic_cds = b
            .dynamic_resources
            .as_ref()
            .is_some_and(|d| d.cds_config.is_some());
        validate_listener_inner(l, &path, &clusters, dynamic_cds, &mut errors);
    }
    if let Some(d) = &b.dynamic_resources {
        validate_dynamic_resources(d, b, &mut errors);
    }
    errors
}

/// Checks `dynamic_resources`: sources must be `ads: {}` backed by an `ads_config` whose gRPC
/// service is a declared static cluster.
fn validate_dynamic_resources(d: &DynamicResources, b: &Bootstrap, errors: &mut Vec<ConfigError>) {
    for (name, src) in [("lds_config", &d.lds_config), ("cds_config", &d.cds_config)] {
        let Some(src) = src else { continue };
        let path = format!("dynamic_resources.{name}");
        match (&src.ads, &src.path_config_source) {
            (Some(_), None) if d.ads_config.is_none() => errors.push(ConfigError::new(
                format!("{path}.ads"),
                "ads: {} needs dynamic_resources.ads_config",
            )),
            (Some(_), None) => {}
            (None, Some(p)) if p.path.is_empty() => errors.push(ConfigError::new(
                format!("{path}.path_config_source.path"),
                "a path is required",
            )),
            (None, Some(p))
                if p.watched_directory
                    .as_ref()
                    .is_some_and(|w| w.path.is_empty()) =>
            {
                errors.push(ConfigError::new(
                    format!("{path}.path_config_source.watched_directory.path"),
                    "a path is required",
                ))
            }
            (None, Some(_)) => {}
            _ => errors.push(ConfigError::new(
                &path,
                "exactly one of ads or path_config_source is required",
            )),
        }
    }
    if let Some(ads) = &d.ads_config {
        let path = "dynamic_resources.ads_config.grpc_services";
        if ads.grpc_services.len() != 1 {
            errors.push(ConfigError::new(
                path,
                "exactly one grpc_service is required",
            ));
        }
        for (i, g) in ads.grpc_services.iter().enumerate() {
            let name = &g.envoy_grpc.cluster_name;
            match b.static_resources.clusters.iter().find(|c| &c.name == name) {
                None => errors.push(ConfigError::new(
                    format!("{path}[{i}].envoy_grpc.cluster_name"),
                    format!(
                        "unknown cluster \"{name}\" (the xDS cluster must be a static cluster)"
                    ),
                )),
                Some(c) if !c.upstream_http2() => errors.push(ConfigError::new(
                    format!("{path}[{i}].envoy_grpc.cluster_name"),
                    format!("cluster \"{name}\" must use HTTP/2 (gRPC)"),
                )),
                Some(_) => {}
            }
        }
    }
}

/// The checks of one listener; `clusters` are the names an inline route table may reference.
pub(crate) fn validate_listener(
    l: &Listener,
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Vec<ConfigError>,
) {
    validate_listener_inner(l, path, clusters, false, errors)
}

fn validate_listener_inner(
    l: &Listener,
    path: &str,
    clusters: &HashSet<&str>,
    dynamic_cds: bool,
    errors: &mut Vec<ConfigError>,
) {
    crate::capture::validate_listener_capture(l, path, errors);
    if l.filter_chains.is_empty() && l.default_filter_chain.is_none() {
        errors.push(ConfigError::new(
            format!("{path}.filter_chains"),
            "a listener needs at least one filter chain",
        ));
    }
    let default_chain = l
        .default_filter_chain
        .iter()
        .map(|c| (format!("{path}.default_filter_chain"), c));
    let chains = l.filter_chains.iter().enumerate();
    let chains = chains.map(|(ci, c)| (format!("{path}.filter_chains[{ci}]"), c));
    for (cpath, chain) in chains.chain(default_chain) {
        for (fi, f) in chain.filters.iter().enumerate() {
            let fpath = format!("{cpath}.filters[{fi}].typed_config");
            let terminal = fi + 1 == chain.filters.len();
            match &f.config {
                NetworkFilterConfig::HttpConnectionManager(hcm) => {
                    if !terminal {
                        errors.push(ConfigError::new(
                            &fpath,
                            "the HTTP connection manager must be the last network filter",
                        ));
                    }
                    validate_hcm(hcm, &fpath, clusters, errors)
                }
                NetworkFilterConfig::TcpProxy(tp) => {
                    if tp.max_connect_attempts == Some(0) {
                        errors.push(ConfigError::new(
                            format!("{fpath}.typed_config.max_connect_attempts"),
                            "must be at least 1",
                        ));
                    }
                    if !terminal {
                        errors.push(ConfigError::new(
                            &fpath,
                            "tcp_proxy must be the last network filter",
                        ));
                    }
                    if !dynamic_cds && !clusters.contains(tp.cluster.as_str()) {
                        errors.push(ConfigError::new(
                            format!("{fpath}.cluster"),
                            format!("unknown cluster \"{}\"", tp.cluster),
                        ));
                    }
                }
                NetworkFilterConfig::Other(_) => {}
            }
        }
    }
}

pub(crate) fn validate_cluster(c: &Cluster, path: &str, errors: &mut Vec<ConfigError>) {
    crate::resilience::validate_health_checks(c, path, errors);
    let endpoints = c
        .load_assignment
        .as_ref()
        .map(|la| la.endpoints.iter().map(|e| e.lb_endpoints.len()).sum())
        .unwrap_or(0usize);
    match c.discovery_type {
        DiscoveryType::LOGICAL_DNS if endpoints != 1 => errors.push(ConfigError::new(
            format!("{path}.load_assignment"),
            "LOGICAL_DNS clusters must have exactly one endpoint",
        )),
        DiscoveryType::ORIGINAL_DST => crate::capture::validate_original_dst(c, path, errors),
        DiscoveryType::EDS => match &c.eds_cluster_config {
            Some(e) => errors.extend(crate::validate_config_source(
                &e.eds_config,
                &format!("{path}.eds_cluster_config.eds_config"),
            )),
            None => errors.push(ConfigError::new(
                format!("{path}.eds_cluster_config"),
                "an EDS cluster needs eds_cluster_config",
            )),
        },
        _ => {}
    }
    if let Some(la) = &c.load_assignment {
        for (li, loc) in la.endpoints.iter().enumerate() {
            for (ei, ep) in loc.lb_endpoints.iter().enumerate() {
                let epath = format!("{path}.load_assignment.endpoints[{li}].lb_endpoints[{ei}]");
                let sa = &ep.endpoint.address.socket_address;
                if c.discovery_type == DiscoveryType::STATIC
                    && sa.address.parse::<std::net::IpAddr>().is_err()
                {
                    errors.push(ConfigError::new(
                        format!("{epath}.endpoint.address.socket_address.address"),
                        format!("\"{}\" is not an IP address (a STATIC cluster needs IPs; use STRICT_DNS for names)", sa.address),
                    ));
                }
                if sa.port_value == 0 {
                    errors.push(ConfigError::new(
                        format!("{epath}.endpoint.address.socket_address.port_value"),
                        "port_value must be set",
                    ));
                }
                if ep.load_balancing_weight == Some(0) {
                    errors.push(ConfigError::new(
                        format!("{epath}.load_balancing_weight"),
                        "must be at least 1",
                    ));
                }
            }
        }
    }
    validate_lb_config(c, path, errors);
    if let Some(d) = c.dns_refresh_rate {
        // Envoy's proto constraint is `gt: 1ms`; a smaller value would spin the resolver.
        if d.0 <= std::time::Duration::from_millis(1) {
            errors.push(ConfigError::new(
                format!("{path}.dns_refresh_rate"),
                "must be greater than 1ms",
            ));
        }
    }
    for (k, v) in &c.typed_extension_protocol_options {
        let kpath = format!("{path}.typed_extension_protocol_options[\"{k}\"]");
        if k != UPSTREAM_HTTP_OPTIONS_KEY {
            errors.push(ConfigError::new(
                &kpath,
                format!("unsupported extension \"{k}\""),
            ));
        } else if !v.type_url.ends_with(UPSTREAM_HTTP_OPTIONS_KEY) {
            errors.push(ConfigError::new(
                format!("{kpath}.@type"),
                format!(
                    "expected {UPSTREAM_HTTP_OPTIONS_KEY}, got \"{}\"",
                    v.type_url
                ),
            ));
        } else if let Some(e) = &v.explicit_http_config {
            // Envoy's oneof: exactly one protocol.
            if e.http_protocol_options.is_some() == e.http2_protocol_options.is_some() {
                errors.push(ConfigError::new(
                    format!("{kpath}.explicit_http_config"),
                    "exactly one of http_protocol_options or http2_protocol_options is required",
                ));
            }
        }
    }
    // Envoy: connect_timeout must be greater than 0.
    if c.connect_timeout.is_some_and(|d| d.is_zero()) {
        errors.push(ConfigError::new(
            format!("{path}.connect_timeout"),
            "must be greater than 0",
        ));
    }
}

/// Envoy's largest ring (`minimum_ring_size` / `maximum_ring_size`, `lte: 8388608`).
const RING_SIZE_LIMIT: u64 = 8 * 1024 * 1024;
/// Envoy's largest Maglev table (`table_size`, `lte: 5000011`).
const MAGLEV_TABLE_LIMIT: u64 = 5_000_011;

/// The proto constraints of the load-balancer configs. Envoy checks them whatever `lb_policy` is,
/// and so do we: a config that Envoy rejects must not start here.
fn validate_lb_config(c: &Cluster, path: &str, errors: &mut Vec<ConfigError>) {
    if let Some(n) = c
        .least_request_lb_config
        .as_ref()
        .and_then(|l| l.choice_count)
    {
        if n < 2 {
            errors.push(ConfigError::new(
                format!("{path}.least_request_lb_config.choice_count"),
                format!("must be at least 2, got {n}"),
            ));
        }
    }
    if let Some(n) = c.maglev_lb_config.as_ref().and_then(|m| m.table_size) {
        let fpath = format!("{path}.maglev_lb_config.table_size");
        // The limit first: it also bounds the trial division below. Maglev's permutations only
        // cover every slot when the table size is prime; with any other size the build loops.
        if n > MAGLEV_TABLE_LIMIT {
            errors.push(ConfigError::new(
                fpath,
                format!("{n} is larger than {MAGLEV_TABLE_LIMIT}"),
            ));
        } else if !is_prime(n) {
            errors.push(ConfigError::new(fpath, format!("{n} is not a prime")));
        }
    }
    if let Some(r) = &c.ring_hash_lb_config {
        let rpath = format!("{path}.ring_hash_lb_config");
        for (name, v) in [
            ("minimum_ring_size", r.minimum_ring_size),
            ("maximum_ring_size", r.maximum_ring_size),
        ] {
            if let Some(v) = v.filter(|v| *v > RING_SIZE_LIMIT) {
                errors.push(ConfigError::new(
                    format!("{rpath}.{name}"),
                    format!("{v} is larger than {RING_SIZE_LIMIT}"),
                ));
            }
        }
        if let (Some(min), Some(max)) = (r.minimum_ring_size, r.maximum_ring_size) {
            if min > max {
                errors.push(ConfigError::new(
                    format!("{rpath}.minimum_ring_size"),
                    format!("{min} is larger than maximum_ring_size {max}"),
                ));
            }
        }
        if let Some(f) = r.hash_function.as_deref().filter(|f| *f != "XX_HASH") {
            errors.push(ConfigError::new(
                format!("{rpath}.hash_function"),
                format!("unsupported value \"{f}\" (only XX_HASH, the default, is supported)"),
            ));
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn validate_hcm(
    h: &HttpConnectionManager,
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Vec<ConfigError>,
) {
    match (&h.route_config, &h.rds) {
        (Some(rc), None) => {
            validate_route_config(rc, &format!("{path}.route_config"), clusters, errors)
        }
        (None, Some(rds)) => {
            if rds.route_config_name.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.rds.route_config_name"),
                    "must not be empty",
                ));
            }
            errors.extend(crate::validate_config_source(
                &rds.config_source,
                &format!("{path}.rds.config_source"),
            ));
        }
        (Some(_), Some(_)) => errors.push(ConfigError::new(
            path,
            "route_config and rds are mutually exclusive",
        )),
        (None, None) => errors.push(ConfigError::new(
            format!("{path}.route_config"),
            "an inline route_config (or rds) is required",
        )),
    }
    if let Some(kb) = h.max_request_headers_kb {
        if kb == 0 || kb > 8192 {
            errors.push(ConfigError::new(
                format!("{path}.max_request_headers_kb"),
                "must be between 1 and 8192",
            ));
        }
    }
    for (i, f) in h.http_filters.iter().enumerate() {
        let is_last = i + 1 == h.http_filters.len();
        let is_router = f.name == "envoy.filters.http.router"
            || f.typed_config.as_ref().is_some_and(|t| {
                t.message_name() == "envoy.extensions.filters.http.router.v3.Router"
            });
        if is_router && !is_last {
            errors.push(ConfigError::new(
                format!("{path}.http_filters[{i}]"),
                "the router must be the last HTTP filter",
            ));
        }
    }
}

pub fn validate_route_config(
    rc: &RouteConfiguration,
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Vec<ConfigError>,
) {
    let check_clusters = rc.validate_clusters.unwrap_or(true);
    let mut domains = HashSet::new();
    for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
        let vpath = format!("{path}.virtual_hosts[{vi}]");
        if vh.domains.is_empty() {
            errors.push(ConfigError::new(
                format!("{vpath}.domains"),
                "at least one domain is required",
            ));
        }
        for (di, d) in vh.domains.iter().enumerate() {
            if !domains.insert(d.to_ascii_lowercase()) {
                errors.push(ConfigError::new(
                    format!("{vpath}.domains[{di}]"),
                    format!("domain \"{d}\" appears in more than one virtual host"),
                ));
            }
            if d != "*" && d.matches('*').count() > 0 && !(d.starts_with('*') ^ d.ends_with('*')) {
                errors.push(ConfigError::new(
                    format!("{vpath}.domains[{di}]"),
                    format!(
                        "invalid wildcard in \"{d}\" (only \"*\", \"*.suffix\" or \"prefix.*\")"
                    ),
                ));
            }
        }
        for (ri, r) in vh.routes.iter().enumerate() {
            validate_route(
                r,
                &format!("{vpath}.routes[{ri}]"),
                clusters,
                check_clusters,
                errors,
            );
        }
    }
}

fn validate_route(
    r: &Route,
    path: &str,
    clusters: &HashSet<&str>,
    check_clusters: bool,
    errors: &mut Vec<ConfigError>,
) {
    let m = &r.route_match;
    let specifiers = [
        m.prefix.is_some(),
        m.path.is_some(),
        m.safe_regex.is_some(),
        m.path_separated_prefix.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if specifiers != 1 {
        errors.push(ConfigError::new(
            format!("{path}.match"),
            "exactly one of prefix, path, safe_regex or path_separated_prefix is required",
        ));
    }
    if let Some(re) = &m.safe_regex {
        check_regex(&re.regex, &format!("{path}.match.safe_regex.regex"), errors);
    }
    for (hi, h) in m.headers.iter().enumerate() {
        let hpath = format!("{path}.match.headers[{hi}]");
        let kinds = [
            h.exact_match.is_some(),
            h.prefix_match.is_some(),
            h.suffix_match.is_some(),
            h.contains_match.is_some(),
            h.safe_regex_match.is_some(),
            h.present_match.is_some(),
            h.string_match.is_some(),
            h.range_match.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if kinds > 1 {
            errors.push(ConfigError::new(
                &hpath,
                "at most one match kind may be set",
            ));
        }
        if let Some(re) = &h.safe_regex_match {
            check_regex(
                &re.regex,
                &format!("{hpath}.safe_regex_match.regex"),
                errors,
            );
        }
        if let Some(sm) = &h.string_match {
            check_string_matcher(sm, &format!("{hpath}.string_match"), errors);
        }
    }
    for (qi, q) in m.query_parameters.iter().enumerate() {
        if let Some(sm) = &q.string_match {
            check_string_matcher(
                sm,
                &format!("{path}.match.query_parameters[{qi}].string_match"),
                errors,
            );
        }
    }
    let actions = [
        r.route.is_some(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if actions != 1 {
        errors.push(ConfigError::new(
            path.to_string(),
            "exactly one of route, redirect or direct_response is required",
        ));
    }
    if let Some(a) = &r.route {
        let apath = format!("{path}.route");
        let targets = [
            a.cluster.is_some(),
            a.weighted_clusters.is_some(),
            a.cluster_header.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if targets != 1 {
            errors.push(ConfigError::new(
                &apath,
                "exactly one of cluster, weighted_clusters or cluster_header is required",
            ));
        }
        if let Some(c) = &a.cluster {
            if check_clusters && !clusters.contains(c.as_str()) {
                errors.push(ConfigError::new(
                    format!("{apath}.cluster"),
                    format!("unknown cluster \"{c}\""),
                ));
            }
        }
        if let Some(wc) = &a.weighted_clusters {
            let sum: u64 = wc.clusters.iter().map(|c| c.weight as u64).sum();
            if sum == 0 {
                errors.push(ConfigError::new(
                    format!("{apath}.weighted_clusters"),
                    "the weights must not all be zero",
                ));
            }
            // Envoy checks total_weight only when it is set above 0 (0 = the sum).
            if let Some(total) = wc.total_weight.filter(|t| *t > 0) {
                if total as u64 != sum {
                    errors.push(ConfigError::new(
                        format!("{apath}.weighted_clusters.total_weight"),
                        format!("is {total} but the weights add up to {sum}"),
                    ));
                }
            }
            for (ci, c) in wc.clusters.iter().enumerate() {
                if check_clusters && !clusters.contains(c.name.as_str()) {
                    errors.push(ConfigError::new(
                        format!("{apath}.weighted_clusters.clusters[{ci}].name"),
                        format!("unknown cluster \"{}\"", c.name),
                    ));
                }
            }
        }
        if let Some(rr) = &a.regex_rewrite {
            check_regex(
                &rr.pattern.regex,
                &format!("{apath}.regex_rewrite.pattern.regex"),
                errors,
            );
        }
        if a.prefix_rewrite.is_some() && a.regex_rewrite.is_some() {
            errors.push(ConfigError::new(
                &apath,
                "prefix_rewrite and regex_rewrite are mutually exclusive",
            ));
        }
        let host_rewrites = [
            a.host_rewrite_literal.is_some(),
            a.auto_host_rewrite == Some(true),
            a.host_rewrite_header.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if host_rewrites > 1 {
            errors.push(ConfigError::new(&apath, "only one host rewrite may be set"));
        }
        for (hi, h) in a.hash_policy.iter().enumerate() {
            let n = [
                h.header.is_some(),
                h.cookie.is_some(),
                h.connection_properties.is_some(),
                h.query_parameter.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if n != 1 {
                errors.push(ConfigError::new(format!("{apath}.hash_policy[{hi}]"), "exactly one of header, cookie, connection_properties or query_parameter is required"));
            }
        }
    }
    if let Some(rd) = &r.redirect {
        if let Some(rr) = &rd.regex_rewrite {
            check_regex(
                &rr.pattern.regex,
                &format!("{path}.redirect.regex_rewrite.pattern.regex"),
                errors,
            );
        }
        if rd.https_redirect && rd.scheme_redirect.is_some() {
            errors.push(ConfigError::new(
                format!("{path}.redirect"),
                "https_redirect and scheme_redirect are mutually exclusive",
            ));
        }
    }
    if let Some(dr) = &r.direct_response {
        if !(200..=599).contains(&dr.status) {
            errors.push(ConfigError::new(
                format!("{path}.direct_response.status"),
                "must be between 200 and 599",
            ));
        }
        if let Some(body) = &dr.body {
            if body.inline_string.is_some() == body.filename.is_some() {
                errors.push(ConfigError::new(
                    format!("{path}.direct_response.body"),
                    "exactly one of inline_string or filename is required",
                ));
            }
        }
    }
}

fn check_string_matcher(sm: &StringMatcher, path: &str, errors: &mut Vec<ConfigError>) {
    let n = [
        sm.exact.is_some(),
        sm.prefix.is_some(),
        sm.suffix.is_some(),
        sm.contains.is_some(),
        sm.safe_regex.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if n != 1 {
        errors.push(ConfigError::new(
            path,
            "exactly one of exact, prefix, suffix, contains or safe_regex is required",
        ));
    }
    if let Some(re) = &sm.safe_regex {
        check_regex(&re.regex, &format!("{path}.safe_regex.regex"), errors);
    }
}

fn check_regex(re: &str, path: &str, errors: &mut Vec<ConfigError>) {
    if let Err(e) = regex::Regex::new(re) {
        errors.push(ConfigError::new(path, format!("invalid regex: {e}")));
    }
}
