//! The typed fast path of [`crate::translate`]: prost-generated envoy-types structs straight into
//! mecha-config types, for the resource types that come in bulk (RouteConfiguration,
//! ClusterLoadAssignment, and the plain Cluster a control plane sends by the thousand).
//!
//! The general path (protobuf → dynamic message → JSON-shaped value → serde) is the reference: it
//! is what names an unsupported field with its path. This module covers the common subset only and
//! gives up (`None`) on anything else — a field it does not translate, a value the serde decoders
//! would refuse (a required field left empty, an enum number without a name, an out-of-range
//! number) — and the caller then runs the general path, so errors and NACK `error_detail` stay
//! exactly what they were. What the fast path accepts must decode to the same value as the general
//! path; `tests::fast_matches_general` checks that field by field.
//!
//! "Everything else is default" is checked by taking the translated fields out of a message and
//! comparing the rest with `Default::default()`, so a field added to envoy-types later makes the
//! fast path give up instead of being dropped.

// mecha supports some fields Envoy has deprecated but still accepts (`append`, `total_weight`,
// `per_request_buffer_limit_bytes`, the direct header-match forms), so static and xDS config agree.
#![allow(deprecated)]

use envoy_types::pb::envoy::config::cluster::v3 as cl;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ep;
use envoy_types::pb::envoy::config::route::v3 as rt;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf as pbw;
use mecha_config as mc;
use std::collections::{BTreeMap, HashMap};
use std::mem::take;

/// `None` (give up) unless `$msg`, with the translated fields taken out, is all defaults.
macro_rules! rest_default {
    ($msg:expr) => {
        if $msg != Default::default() {
            return None;
        }
    };
}

/// Largest protobuf JSON duration mecha's parser accepts (`parse_duration`).
const MAX_DURATION_S: i64 = 315_576_000_000;

fn duration(d: pbw::Duration) -> Option<mc::PbDuration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 || d.seconds > MAX_DURATION_S {
        return None;
    }
    Some(mc::PbDuration(std::time::Duration::new(
        d.seconds as u64,
        d.nanos as u32,
    )))
}

fn opt_duration(d: Option<pbw::Duration>) -> Option<Option<mc::PbDuration>> {
    match d {
        None => Some(None),
        Some(d) => duration(d).map(Some),
    }
}

/// `f` over every element, or `None` if it gives up on one. A fresh vector of exactly the right
/// size: `into_iter().map(f).collect()` would reuse the prost vector's allocation in place
/// (sized for the larger protobuf structs, with their growth slack), which tripled the memory of
/// decoded clusters.
fn map_all<T, U>(v: Vec<T>, f: impl FnMut(T) -> Option<U>) -> Option<Vec<U>> {
    let mut out = Vec::with_capacity(v.len());
    for x in v.into_iter().map(f) {
        out.push(x?);
    }
    Some(out)
}

/// Proto3 strings have no presence: empty is absent in the JSON form.
fn opt_string(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn header_value_option(mut h: core::HeaderValueOption) -> Option<mc::HeaderValueOption> {
    let mut hv = h.header.take()?;
    let key = take(&mut hv.key);
    let value = take(&mut hv.value);
    if key.is_empty() {
        return None;
    }
    rest_default!(hv);
    #[allow(deprecated)]
    let append = h.append.take().map(|b| b.value);
    let append_action = match take(&mut h.append_action) {
        0 => None,
        1 => Some(mc::AppendAction::ADD_IF_ABSENT),
        2 => Some(mc::AppendAction::OVERWRITE_IF_EXISTS_OR_ADD),
        3 => Some(mc::AppendAction::OVERWRITE_IF_EXISTS),
        _ => return None,
    };
    let keep_empty_value = take(&mut h.keep_empty_value);
    rest_default!(h);
    Some(mc::HeaderValueOption {
        header: mc::HeaderValue { key, value },
        append,
        append_action,
        keep_empty_value,
    })
}

fn header_list(v: Vec<core::HeaderValueOption>) -> Option<Vec<mc::HeaderValueOption>> {
    map_all(v, header_value_option)
}

fn regex(mut r: matcher::RegexMatcher) -> Option<mc::RegexMatcher> {
    let regex = take(&mut r.regex);
    if regex.is_empty() {
        return None;
    }
    // `google_re2` (deprecated engine field) is left to the general path.
    rest_default!(r);
    Some(mc::RegexMatcher {
        regex,
        google_re2: None,
    })
}

fn string_matcher(mut s: matcher::StringMatcher) -> Option<mc::StringMatcher> {
    use matcher::string_matcher::MatchPattern as P;
    let mut out = mc::StringMatcher {
        exact: None,
        prefix: None,
        suffix: None,
        contains: None,
        safe_regex: None,
        ignore_case: take(&mut s.ignore_case),
    };
    match s.match_pattern.take() {
        None => {}
        Some(P::Exact(x)) => out.exact = Some(x),
        Some(P::Prefix(x)) => out.prefix = Some(x),
        Some(P::Suffix(x)) => out.suffix = Some(x),
        Some(P::Contains(x)) => out.contains = Some(x),
        Some(P::SafeRegex(r)) => out.safe_regex = Some(regex(r)?),
        Some(_) => return None,
    }
    rest_default!(s);
    Some(out)
}

/// A typed `Any` (per-filter config): the message's fields through the general translation (they
/// are few and rare), so the filter sees exactly what static config would give it.
fn typed_config(any: pbw::Any) -> Option<mc::TypedConfig> {
    // Well-known types have a special JSON form (`{"@type", "value"}`): general path.
    if any.type_url.contains("google.protobuf.") {
        return None;
    }
    let value = crate::translate::any_to_value(&any.type_url, &any.value).ok()?;
    let serde_yaml::Value::Mapping(value) = value else {
        return None;
    };
    Some(mc::TypedConfig {
        type_url: any.type_url,
        value,
    })
}

fn per_filter(m: HashMap<String, pbw::Any>) -> Option<BTreeMap<String, mc::TypedConfig>> {
    m.into_iter()
        .map(|(k, v)| Some((k, typed_config(v)?)))
        .collect()
}

fn header_matcher(mut h: rt::HeaderMatcher) -> Option<mc::HeaderMatcher> {
    use rt::header_matcher::HeaderMatchSpecifier as S;
    let name = take(&mut h.name);
    if name.is_empty() {
        return None;
    }
    let mut out = mc::HeaderMatcher {
        name,
        exact_match: None,
        prefix_match: None,
        suffix_match: None,
        contains_match: None,
        safe_regex_match: None,
        present_match: None,
        string_match: None,
        range_match: None,
        invert_match: take(&mut h.invert_match),
        treat_missing_header_as_empty: take(&mut h.treat_missing_header_as_empty),
    };
    #[allow(deprecated)]
    match h.header_match_specifier.take() {
        None => {}
        Some(S::ExactMatch(x)) => out.exact_match = Some(x),
        Some(S::PrefixMatch(x)) => out.prefix_match = Some(x),
        Some(S::SuffixMatch(x)) => out.suffix_match = Some(x),
        Some(S::ContainsMatch(x)) => out.contains_match = Some(x),
        Some(S::SafeRegexMatch(r)) => out.safe_regex_match = Some(regex(r)?),
        Some(S::PresentMatch(b)) => out.present_match = Some(b),
        Some(S::StringMatch(s)) => out.string_match = Some(string_matcher(s)?),
        // `start` and `end` are required by the serde decoder; a zero is absent in JSON.
        Some(S::RangeMatch(r)) if r.start != 0 && r.end != 0 => {
            out.range_match = Some(mc::Int64Range {
                start: r.start,
                end: r.end,
            })
        }
        Some(_) => return None,
    }
    rest_default!(h);
    Some(out)
}

fn query_matcher(mut q: rt::QueryParameterMatcher) -> Option<mc::QueryParameterMatcher> {
    use rt::query_parameter_matcher::QueryParameterMatchSpecifier as S;
    let name = take(&mut q.name);
    if name.is_empty() {
        return None;
    }
    let mut out = mc::QueryParameterMatcher {
        name,
        string_match: None,
        present_match: None,
    };
    match q.query_parameter_match_specifier.take() {
        None => {}
        Some(S::StringMatch(s)) => out.string_match = Some(string_matcher(s)?),
        Some(S::PresentMatch(b)) => out.present_match = Some(b),
    }
    rest_default!(q);
    Some(out)
}

fn route_match(mut m: rt::RouteMatch) -> Option<mc::RouteMatch> {
    use rt::route_match::PathSpecifier as P;
    let mut out = mc::RouteMatch {
        case_sensitive: m.case_sensitive.take().map(|b| b.value),
        headers: map_all(take(&mut m.headers), header_matcher)?,
        query_parameters: map_all(take(&mut m.query_parameters), query_matcher)?,
        ..Default::default()
    };
    match m.path_specifier.take() {
        None => {}
        Some(P::Prefix(x)) => out.prefix = Some(x),
        Some(P::Path(x)) => out.path = Some(x),
        Some(P::PathSeparatedPrefix(x)) => out.path_separated_prefix = Some(x),
        Some(P::SafeRegex(r)) => out.safe_regex = Some(regex(r)?),
        Some(_) => return None,
    }
    // `grpc` and the rest: general path.
    rest_default!(m);
    Some(out)
}

fn cluster_weight(mut w: rt::weighted_cluster::ClusterWeight) -> Option<mc::ClusterWeight> {
    let name = take(&mut w.name);
    if name.is_empty() {
        return None;
    }
    let out = mc::ClusterWeight {
        name,
        weight: w.weight.take().map(|v| v.value).unwrap_or(0),
        request_headers_to_add: header_list(take(&mut w.request_headers_to_add))?,
        request_headers_to_remove: take(&mut w.request_headers_to_remove),
        response_headers_to_add: header_list(take(&mut w.response_headers_to_add))?,
        response_headers_to_remove: take(&mut w.response_headers_to_remove),
        typed_per_filter_config: per_filter(take(&mut w.typed_per_filter_config))?,
    };
    rest_default!(w);
    Some(out)
}

fn weighted(mut w: rt::WeightedCluster) -> Option<mc::WeightedClusters> {
    let out = mc::WeightedClusters {
        clusters: map_all(take(&mut w.clusters), cluster_weight)?,
        total_weight: w.total_weight.take().map(|v| v.value),
        runtime_key_prefix: opt_string(take(&mut w.runtime_key_prefix)),
    };
    rest_default!(w);
    Some(out)
}

fn route_action(mut a: rt::RouteAction) -> Option<mc::RouteAction> {
    use rt::route_action::ClusterSpecifier as C;
    use rt::route_action::HostRewriteSpecifier as H;
    let mut out = mc::RouteAction {
        cluster_not_found_response_code: match take(&mut a.cluster_not_found_response_code) {
            0 => None,
            1 => Some(mc::ClusterNotFoundResponseCode::NOT_FOUND),
            2 => Some(mc::ClusterNotFoundResponseCode::INTERNAL_SERVER_ERROR),
            _ => return None,
        },
        prefix_rewrite: opt_string(take(&mut a.prefix_rewrite)),
        timeout: opt_duration(a.timeout.take())?,
        idle_timeout: opt_duration(a.idle_timeout.take())?,
        ..Default::default()
    };
    match a.cluster_specifier.take() {
        None => {}
        Some(C::Cluster(c)) => out.cluster = Some(c),
        Some(C::ClusterHeader(c)) => out.cluster_header = Some(c),
        Some(C::WeightedClusters(w)) => out.weighted_clusters = Some(weighted(w)?),
        Some(_) => return None,
    }
    match a.host_rewrite_specifier.take() {
        None => {}
        Some(H::HostRewriteLiteral(h)) => out.host_rewrite_literal = Some(h),
        Some(H::AutoHostRewrite(b)) => out.auto_host_rewrite = Some(b.value),
        Some(H::HostRewriteHeader(h)) => out.host_rewrite_header = Some(h),
        Some(_) => return None,
    }
    if let Some(mut rr) = a.regex_rewrite.take() {
        let pattern = regex(rr.pattern.take()?)?;
        let substitution = take(&mut rr.substitution);
        rest_default!(rr);
        out.regex_rewrite = Some(mc::RegexRewrite {
            pattern,
            substitution,
        });
    }
    // Retry policy, hash policy, max_stream_duration and the rest: general path.
    rest_default!(a);
    Some(out)
}

fn direct_response(mut d: rt::DirectResponseAction) -> Option<mc::DirectResponseAction> {
    use core::data_source::Specifier as S;
    let status = u16::try_from(take(&mut d.status))
        .ok()
        .filter(|s| *s != 0)?;
    let body = match d.body.take() {
        None => None,
        Some(mut b) => {
            let mut out = mc::DataSource {
                inline_string: None,
                filename: None,
            };
            match b.specifier.take() {
                None => {}
                Some(S::InlineString(s)) => out.inline_string = Some(s),
                Some(S::Filename(s)) => out.filename = Some(s),
                Some(_) => return None,
            }
            rest_default!(b);
            Some(out)
        }
    };
    rest_default!(d);
    Some(mc::DirectResponseAction { status, body })
}

fn route(mut r: rt::Route) -> Option<mc::Route> {
    use rt::route::Action as A;
    let route_match = route_match(r.r#match.take()?)?;
    let (route, direct_response) = match r.action.take() {
        None => (None, None),
        Some(A::Route(a)) => (Some(route_action(a)?), None),
        Some(A::DirectResponse(d)) => (None, Some(direct_response(d)?)),
        // Redirects and the rest: general path.
        Some(_) => return None,
    };
    let out = mc::Route {
        name: take(&mut r.name),
        route_match,
        route,
        redirect: None,
        direct_response,
        request_headers_to_add: header_list(take(&mut r.request_headers_to_add))?,
        request_headers_to_remove: take(&mut r.request_headers_to_remove),
        response_headers_to_add: header_list(take(&mut r.response_headers_to_add))?,
        response_headers_to_remove: take(&mut r.response_headers_to_remove),
        typed_per_filter_config: per_filter(take(&mut r.typed_per_filter_config))?,
        per_request_buffer_limit_bytes: r.per_request_buffer_limit_bytes.take().map(|v| v.value),
    };
    rest_default!(r);
    Some(out)
}

fn virtual_host(mut v: rt::VirtualHost) -> Option<mc::VirtualHost> {
    let name = take(&mut v.name);
    let domains = take(&mut v.domains);
    // Both are required by the serde decoder; empty is absent in JSON.
    if name.is_empty() || domains.is_empty() {
        return None;
    }
    let out = mc::VirtualHost {
        name,
        domains,
        routes: map_all(take(&mut v.routes), route)?,
        request_headers_to_add: header_list(take(&mut v.request_headers_to_add))?,
        request_headers_to_remove: take(&mut v.request_headers_to_remove),
        response_headers_to_add: header_list(take(&mut v.response_headers_to_add))?,
        response_headers_to_remove: take(&mut v.response_headers_to_remove),
        typed_per_filter_config: per_filter(take(&mut v.typed_per_filter_config))?,
        retry_policy: None,
        include_request_attempt_count: take(&mut v.include_request_attempt_count),
        include_attempt_count_in_response: take(&mut v.include_attempt_count_in_response),
        per_request_buffer_limit_bytes: v.per_request_buffer_limit_bytes.take().map(|x| x.value),
    };
    rest_default!(v);
    Some(out)
}

/// A RouteConfiguration in the common subset, or `None` for the general path.
pub fn route_configuration(mut r: rt::RouteConfiguration) -> Option<mc::RouteConfiguration> {
    let out = mc::RouteConfiguration {
        name: take(&mut r.name),
        virtual_hosts: map_all(take(&mut r.virtual_hosts), virtual_host)?,
        request_headers_to_add: header_list(take(&mut r.request_headers_to_add))?,
        request_headers_to_remove: take(&mut r.request_headers_to_remove),
        response_headers_to_add: header_list(take(&mut r.response_headers_to_add))?,
        response_headers_to_remove: take(&mut r.response_headers_to_remove),
        validate_clusters: r.validate_clusters.take().map(|b| b.value),
        ignore_port_in_host_matching: take(&mut r.ignore_port_in_host_matching),
    };
    rest_default!(r);
    Some(out)
}

fn socket_address(mut s: core::SocketAddress) -> Option<mc::SocketAddress> {
    use core::socket_address::PortSpecifier as P;
    let address = take(&mut s.address);
    // Only TCP (0) exists in mecha; the address is required by the serde decoder.
    if address.is_empty() || s.protocol != 0 {
        return None;
    }
    let port_value = match s.port_specifier.take() {
        None => 0,
        Some(P::PortValue(p)) => u16::try_from(p).ok()?,
        Some(P::NamedPort(_)) => return None,
    };
    let ipv4_compat = take(&mut s.ipv4_compat);
    rest_default!(s);
    Some(mc::SocketAddress {
        address,
        port_value,
        protocol: mc::SocketProtocol::TCP,
        ipv4_compat,
    })
}

fn address(mut a: core::Address) -> Option<mc::Address> {
    let socket_address = match a.address.take()? {
        core::address::Address::SocketAddress(s) => socket_address(s)?,
        _ => return None,
    };
    rest_default!(a);
    Some(mc::Address { socket_address })
}

fn lb_endpoint(mut e: ep::LbEndpoint) -> Option<mc::LbEndpoint> {
    let endpoint = match e.host_identifier.take()? {
        ep::lb_endpoint::HostIdentifier::Endpoint(mut x) => {
            let out = mc::Endpoint {
                address: address(x.address.take()?)?,
                hostname: opt_string(take(&mut x.hostname)),
            };
            rest_default!(x);
            out
        }
        _ => return None,
    };
    let health_status = match take(&mut e.health_status) {
        0 => None,
        1 => Some(mc::HealthStatus::HEALTHY),
        2 => Some(mc::HealthStatus::UNHEALTHY),
        3 => Some(mc::HealthStatus::DRAINING),
        4 => Some(mc::HealthStatus::TIMEOUT),
        5 => Some(mc::HealthStatus::DEGRADED),
        _ => return None,
    };
    let out = mc::LbEndpoint {
        endpoint,
        load_balancing_weight: e.load_balancing_weight.take().map(|v| v.value),
        health_status,
    };
    rest_default!(e);
    Some(out)
}

fn locality_endpoints(mut l: ep::LocalityLbEndpoints) -> Option<mc::LocalityLbEndpoints> {
    let out = mc::LocalityLbEndpoints {
        locality: l.locality.take().map(|x| mc::Locality {
            region: x.region,
            zone: x.zone,
            sub_zone: x.sub_zone,
        }),
        lb_endpoints: map_all(take(&mut l.lb_endpoints), lb_endpoint)?,
        load_balancing_weight: l.load_balancing_weight.take().map(|v| v.value),
        priority: take(&mut l.priority),
    };
    rest_default!(l);
    Some(out)
}

/// A ClusterLoadAssignment in the common subset, or `None` for the general path.
pub fn cluster_load_assignment(
    mut c: ep::ClusterLoadAssignment,
) -> Option<mc::ClusterLoadAssignment> {
    let out = mc::ClusterLoadAssignment {
        cluster_name: take(&mut c.cluster_name),
        endpoints: map_all(take(&mut c.endpoints), locality_endpoints)?,
    };
    rest_default!(c);
    Some(out)
}

/// An `eds_config` / `config_source` that is `ads: {}` (the only source mecha serves), as the
/// JSON-shaped value the general path keeps: `{ads: {}, resource_api_version: V3}`.
fn ads_config_source(mut c: core::ConfigSource) -> Option<serde_yaml::Value> {
    use core::config_source::ConfigSourceSpecifier as S;
    let Some(S::Ads(ads)) = c.config_source_specifier.take() else {
        return None;
    };
    if ads != Default::default() {
        return None;
    }
    let mut m = serde_yaml::Mapping::new();
    m.insert("ads".into(), serde_yaml::Mapping::new().into());
    match take(&mut c.resource_api_version) {
        0 => {}
        2 => {
            m.insert("resource_api_version".into(), "V3".into());
        }
        _ => return None,
    }
    rest_default!(c);
    Some(m.into())
}

/// A Cluster in the common subset (name, type, connect_timeout, lb_policy, load_assignment,
/// eds_cluster_config over ADS), or `None` for the general path.
pub fn cluster(mut c: cl::Cluster) -> Option<mc::Cluster> {
    use cl::cluster::ClusterDiscoveryType as D;
    let discovery_type = match c.cluster_discovery_type.take() {
        None | Some(D::Type(0)) => mc::DiscoveryType::STATIC,
        Some(D::Type(1)) => mc::DiscoveryType::STRICT_DNS,
        Some(D::Type(2)) => mc::DiscoveryType::LOGICAL_DNS,
        Some(D::Type(3)) => mc::DiscoveryType::EDS,
        Some(D::Type(4)) => mc::DiscoveryType::ORIGINAL_DST,
        _ => return None,
    };
    let lb_policy = match take(&mut c.lb_policy) {
        0 => mc::LbPolicy::ROUND_ROBIN,
        1 => mc::LbPolicy::LEAST_REQUEST,
        2 => mc::LbPolicy::RING_HASH,
        3 => mc::LbPolicy::RANDOM,
        5 => mc::LbPolicy::MAGLEV,
        6 => mc::LbPolicy::CLUSTER_PROVIDED,
        _ => return None,
    };
    let eds_cluster_config = match c.eds_cluster_config.take() {
        None => None,
        Some(mut e) => {
            let out = mc::EdsClusterConfig {
                eds_config: match e.eds_config.take() {
                    None => None,
                    Some(src) => Some(ads_config_source(src)?),
                },
                service_name: take(&mut e.service_name),
            };
            rest_default!(e);
            Some(out)
        }
    };
    let out = mc::Cluster {
        name: take(&mut c.name),
        discovery_type,
        connect_timeout: opt_duration(c.connect_timeout.take())?,
        lb_policy,
        load_assignment: match c.load_assignment.take() {
            None => None,
            Some(cla) => Some(cluster_load_assignment(cla)?),
        },
        eds_cluster_config,
        // Everything else is what the serde decoder gives an absent field (listed, not
        // `..Default`, so a field added to the model must be decided here).
        dns_refresh_rate: None,
        respect_dns_ttl: false,
        dns_lookup_family: Default::default(),
        typed_extension_protocol_options: Default::default(),
        http2_protocol_options: None,
        http_protocol_options: None,
        common_http_protocol_options: None,
        ring_hash_lb_config: None,
        maglev_lb_config: None,
        least_request_lb_config: None,
        per_connection_buffer_limit_bytes: None,
        original_dst_lb_config: None,
        cleanup_interval: None,
        circuit_breakers: None,
        outlier_detection: None,
        health_checks: vec![],
        common_lb_config: None,
    };
    rest_default!(c);
    Some(out)
}

#[cfg(test)]
mod tests {
    use crate::translate::{any_to_value, value_to_bytes, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};
    use prost::Message;
    use serde_json::json;

    /// The general path's decoding (without validation, which both paths share).
    fn general(t: &str, bytes: &[u8]) -> serde_json::Value {
        let v = any_to_value(t, bytes).unwrap();
        match t {
            ROUTE_TYPE => serde_json::to_value(
                serde_yaml::from_value::<mecha_config::RouteConfiguration>(v).unwrap(),
            )
            .unwrap(),
            CLUSTER_TYPE => {
                serde_json::to_value(serde_yaml::from_value::<mecha_config::Cluster>(v).unwrap())
                    .unwrap()
            }
            _ => serde_json::to_value(
                serde_yaml::from_value::<mecha_config::ClusterLoadAssignment>(v).unwrap(),
            )
            .unwrap(),
        }
    }

    fn fast(t: &str, bytes: &[u8]) -> Option<serde_json::Value> {
        use envoy_types::pb::envoy::config::{
            cluster::v3 as cl, endpoint::v3 as ep, route::v3 as rt,
        };
        match t {
            ROUTE_TYPE => super::route_configuration(rt::RouteConfiguration::decode(bytes).ok()?)
                .map(|r| serde_json::to_value(r).unwrap()),
            CLUSTER_TYPE => super::cluster(cl::Cluster::decode(bytes).ok()?)
                .map(|r| serde_json::to_value(r).unwrap()),
            _ => super::cluster_load_assignment(ep::ClusterLoadAssignment::decode(bytes).ok()?)
                .map(|r| serde_json::to_value(r).unwrap()),
        }
    }

    /// Everything the fast path translates decodes to the same value as on the general path.
    #[test]
    fn fast_matches_general() {
        let rc = json!({
            "name": "r", "validate_clusters": false,
            "request_headers_to_add": [{"header": {"key": "a", "value": "1"}, "append": false}],
            "response_headers_to_add": [{"header": {"key": "b", "value": ""}, "append_action": "OVERWRITE_IF_EXISTS", "keep_empty_value": true}],
            "request_headers_to_remove": ["x"], "response_headers_to_remove": ["y"],
            "virtual_hosts": [{
                "name": "vh", "domains": ["*", "a.example"],
                "include_request_attempt_count": true,
                "per_request_buffer_limit_bytes": 1024,
                "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    "stat_prefix": "rl"}},
                "routes": [
                    {"name": "p", "match": {"prefix": "/a/", "case_sensitive": false,
                        "headers": [
                            {"name": "h1", "exact_match": "v"},
                            {"name": "h2", "present_match": true, "invert_match": true},
                            {"name": "h3", "string_match": {"prefix": "p", "ignore_case": true}},
                            {"name": "h4", "safe_regex_match": {"regex": "a.*"}},
                            {"name": "h5", "range_match": {"start": 1, "end": 10}},
                            {"name": "h6", "prefix_match": "x"},
                            {"name": "h7", "string_match": {"exact": ""}},
                        ],
                        "query_parameters": [{"name": "q", "string_match": {"exact": "1"}}, {"name": "q2", "present_match": true}]},
                     "route": {"cluster": "c1", "timeout": "0.250s", "idle_timeout": "3s",
                        "prefix_rewrite": "/b/", "host_rewrite_literal": "h",
                        "cluster_not_found_response_code": "NOT_FOUND"}},
                    {"match": {"path": "/exact"}, "route": {"cluster_header": "x-c", "auto_host_rewrite": true}},
                    {"match": {"safe_regex": {"regex": "^/r/[0-9]+$"}},
                     "route": {"weighted_clusters": {"clusters": [
                        {"name": "a", "weight": 30, "request_headers_to_add": [{"header": {"key": "w", "value": "a"}}]},
                        {"name": "b", "weight": 70}], "total_weight": 100},
                        "regex_rewrite": {"pattern": {"regex": "^/r/"}, "substitution": "/s/"}}},
                    {"match": {"path_separated_prefix": "/ps"}, "direct_response": {"status": 200, "body": {"inline_string": "hi"}}},
                    {"match": {"prefix": ""}, "direct_response": {"status": 503}},
                    {"match": {"prefix": "/t"}, "route": {"cluster": "c", "timeout": "0s"}},
                ]
            }]
        });
        let cla = json!({
            "cluster_name": "e",
            "endpoints": [
                {"locality": {"zone": "z"}, "priority": 1, "load_balancing_weight": 3, "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}, "hostname": "h"},
                     "health_status": "DRAINING", "load_balancing_weight": 2},
                    {"endpoint": {"address": {"socket_address": {"address": "::1", "port_value": 81, "ipv4_compat": true}}}},
                ]},
                {"lb_endpoints": []},
            ]
        });
        let clusters = [
            json!({"name": "s", "type": "STATIC", "connect_timeout": "0.5s", "lb_policy": "RING_HASH",
                   "load_assignment": cla.clone()}),
            json!({"name": "e", "type": "EDS", "lb_policy": "LEAST_REQUEST",
                   "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}, "service_name": "svc"}}),
            json!({"name": "e2", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}),
            json!({"name": "d", "type": "STRICT_DNS", "lb_policy": "RANDOM"}),
            json!({"name": "o", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}),
            json!({"name": "m", "lb_policy": "MAGLEV"}),
        ];
        let cases = [(ROUTE_TYPE, rc), (ENDPOINT_TYPE, cla)]
            .into_iter()
            .chain(clusters.into_iter().map(|c| (CLUSTER_TYPE, c)));
        for (t, v) in cases {
            let bytes = value_to_bytes(t, &v).unwrap();
            let f = fast(t, &bytes).unwrap_or_else(|| panic!("fast path gave up on {v}"));
            assert_eq!(f, general(t, &bytes), "{t}");
        }
    }

    /// Outside the subset the fast path gives up, and the general path names the field.
    #[test]
    fn fast_gives_up_outside_its_subset() {
        for (t, v) in [
            (
                ROUTE_TYPE,
                json!({"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "c"}, "decorator": {"operation": "op"}}]}]}),
            ),
            (
                ROUTE_TYPE,
                json!({"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "c", "retry_policy": {"retry_on": "5xx"}}}]}]}),
            ),
            (
                ROUTE_TYPE,
                json!({"name": "r", "virtual_hosts": [{"name": "", "domains": ["*"]}]}),
            ),
            (
                ROUTE_TYPE,
                json!({"name": "r", "vhds": {"config_source": {"ads": {}}}}),
            ),
            (
                ENDPOINT_TYPE,
                json!({"cluster_name": "e", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "1.2.3.4", "port_value": 70000}}}}]}]}),
            ),
            (
                ENDPOINT_TYPE,
                json!({"cluster_name": "e", "policy": {"overprovisioning_factor": 140}}),
            ),
            (
                CLUSTER_TYPE,
                json!({"name": "c", "circuit_breakers": {"thresholds": [{"max_connections": 1}]}}),
            ),
            (
                CLUSTER_TYPE,
                json!({"name": "c", "type": "EDS", "eds_cluster_config": {"eds_config": {"path_config_source": {"path": "/x"}}}}),
            ),
            (
                CLUSTER_TYPE,
                json!({"name": "c", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "1s"}}}),
            ),
            (CLUSTER_TYPE, json!({"name": "c", "dns_jitter": "1s"})),
        ] {
            let bytes = value_to_bytes(t, &v).unwrap();
            assert!(fast(t, &bytes).is_none(), "{v}");
        }
    }
}
