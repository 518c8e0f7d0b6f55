//! The compiled route table: virtual host selection by domain, route matching, and the actions
//! (route to cluster, redirect, direct response) with their rewrites.
//!
//! Everything here is built once per configuration; matching a request allocates nothing unless
//! the Host header needs lower-casing.

pub mod headers;

use bytes::Bytes;
use headers::HeaderOps;
use http::{HeaderMap, HeaderName, HeaderValue};
use mecha_config::{self as cfg, ConfigError, TypedConfig};
use mecha_filters::PerFilterConfig;
use regex::Regex;
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Parses one `typed_per_filter_config` entry: (filter name, config, path).
pub type PerFilterParser<'a> =
    &'a dyn Fn(&str, &TypedConfig, &str) -> Result<Arc<dyn Any + Send + Sync>, ConfigError>;

pub struct RouteTable {
    pub name: String,
    vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// (suffix without '*', vhost), longest first.
    suffixes: Vec<(String, usize)>,
    /// (prefix without '*', vhost), longest first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
    ignore_port: bool,
    pub headers: Arc<HeaderOps>,
}

#[derive(Clone)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Arc<RouteEntry>>,
    pub headers: Arc<HeaderOps>,
}

pub struct RouteEntry {
    pub name: Arc<str>,
    path: PathMatch,
    case_sensitive: bool,
    header_matchers: Vec<HeaderMatch>,
    query_matchers: Vec<QueryMatch>,
    grpc_only: bool,
    pub action: Action,
    /// Route, then virtual host, then route-config level (most specific first).
    pub header_levels: Vec<Arc<HeaderOps>>,
    pub per_filter: PerFilterConfig,
}

enum PathMatch {
    Prefix(String),
    Exact(String),
    /// The regex, and the literal text every match must start with (checked first: a
    /// `starts_with` is far cheaper than running thousands of regexes per request).
    Regex(Regex, String),
    SeparatedPrefix(String),
}

pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    Direct {
        status: http::StatusCode,
        body: Bytes,
    },
}

pub struct RouteAction {
    pub target: ClusterTarget,
    pub not_found_status: http::StatusCode,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: HostRewrite,
    /// `None` = no timeout (configured as 0).
    pub timeout: Option<Duration>,
    /// Route `idle_timeout`, replacing the connection manager's `stream_idle_timeout`:
    /// `None` = not set, `Some(None)` = `0s` (no stream idle timer on this route).
    pub idle_timeout: Option<Option<Duration>>,
    pub hash_policy: Vec<HashPolicy>,
    /// Retries, attempt-count headers, body buffer limit, gRPC timeout (issue 4, `http/retry.rs`).
    pub resilience: Arc<crate::http::retry::RoutePolicy>,
}

pub enum ClusterTarget {
    Single(String),
    Weighted {
        clusters: Vec<WeightedCluster>,
        total: u64,
    },
    Header(HeaderName),
}

pub struct WeightedCluster {
    pub name: String,
    pub weight: u64,
    pub headers: Arc<HeaderOps>,
}

pub enum HostRewrite {
    None,
    Literal(http::HeaderValue),
    Auto,
    Header(HeaderName),
}

pub enum HashPolicy {
    Header {
        name: HeaderName,
        terminal: bool,
    },
    /// With `ttl`, a request without the cookie gets one generated (Envoy's sticky sessions).
    Cookie {
        name: String,
        terminal: bool,
        generate: Option<CookieSpec>,
    },
    SourceIp {
        terminal: bool,
    },
    Query {
        name: String,
        terminal: bool,
    },
}

/// How to generate a missing hash cookie: `Max-Age` (0 = a session cookie) and `Path`.
#[derive(Clone)]
pub struct CookieSpec {
    pub ttl: std::time::Duration,
    pub path: Option<String>,
}

pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub status: http::StatusCode,
    pub strip_query: bool,
}

enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

struct StringMatcher {
    m: StrMatch,
    ignore_case: bool,
}

impl StringMatcher {
    fn compile(sm: &cfg::StringMatcher) -> Result<Self, String> {
        let ic = sm.ignore_case;
        let norm = |s: &String| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        let m = if let Some(s) = &sm.exact {
            StrMatch::Exact(norm(s))
        } else if let Some(s) = &sm.prefix {
            StrMatch::Prefix(norm(s))
        } else if let Some(s) = &sm.suffix {
            StrMatch::Suffix(norm(s))
        } else if let Some(s) = &sm.contains {
            StrMatch::Contains(norm(s))
        } else if let Some(r) = &sm.safe_regex {
            StrMatch::Regex(full_regex(&r.regex)?)
        } else {
            return Err("empty string matcher".into());
        };
        Ok(Self { m, ignore_case: ic })
    }

    fn matches(&self, v: &str) -> bool {
        let lowered;
        let v = if self.ignore_case && !matches!(self.m, StrMatch::Regex(_)) {
            lowered = v.to_ascii_lowercase();
            lowered.as_str()
        } else {
            v
        };
        match &self.m {
            StrMatch::Exact(s) => v == s,
            StrMatch::Prefix(s) => v.starts_with(s.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Contains(s) => v.contains(s.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

enum HeaderTest {
    Str(StringMatcher),
    Present(bool),
    Range(i64, i64),
}

/// What a header matcher reads: a header, or one of the HTTP/2 pseudo-headers Envoy lets routes
/// match on (for HTTP/1 requests too).
enum MatchTarget {
    Header(HeaderName),
    Method,
    Authority,
    Path,
    Scheme,
}

/// The request line, for pseudo-header matchers.
pub struct Pseudo<'a> {
    pub method: &'a http::Method,
    pub authority: &'a str,
    pub path_and_query: &'a str,
}

struct HeaderMatch {
    target: MatchTarget,
    test: HeaderTest,
    invert: bool,
    missing_as_empty: bool,
}

impl HeaderMatch {
    fn matches(&self, pseudo: &Pseudo<'_>, headers: &HeaderMap) -> bool {
        let name = match &self.target {
            MatchTarget::Header(n) => n,
            MatchTarget::Method => return self.test_value(Some(pseudo.method.as_str())),
            MatchTarget::Authority => return self.test_value(Some(pseudo.authority)),
            MatchTarget::Path => return self.test_value(Some(pseudo.path_and_query)),
            // mecha's listeners are cleartext.
            MatchTarget::Scheme => return self.test_value(Some("http")),
        };
        let mut values = headers.get_all(name).iter();
        let joined: Option<std::borrow::Cow<'_, str>> = match values.next() {
            None => None,
            Some(first) => {
                let first = first.to_str().unwrap_or("");
                match values.next() {
                    None => Some(first.into()),
                    Some(second) => {
                        // Envoy matches multiple values joined with ','.
                        let mut s = format!("{first},{}", second.to_str().unwrap_or(""));
                        for v in values {
                            s.push(',');
                            s.push_str(v.to_str().unwrap_or(""));
                        }
                        Some(s.into())
                    }
                }
            }
        };
        self.test_value(joined.as_deref())
    }

    fn test_value(&self, value: Option<&str>) -> bool {
        let value = match (value, self.missing_as_empty) {
            (Some(v), _) => v,
            (None, true) => "",
            (None, false) => {
                // A missing header only satisfies `present_match: false` (or its inversion).
                return match self.test {
                    HeaderTest::Present(p) => p == self.invert,
                    _ => false,
                };
            }
        };
        let r = match &self.test {
            HeaderTest::Str(m) => m.matches(value),
            HeaderTest::Present(p) => *p,
            HeaderTest::Range(start, end) => value
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| n >= *start && n < *end),
        };
        r != self.invert
    }
}

struct QueryMatch {
    name: String,
    test: Option<StringMatcher>,
    present: Option<bool>,
}

/// Anchors a regex so it must match the whole input, as RE2 full match does in Envoy.
fn full_regex(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("invalid regex: {e}"))
}

/// The literal text at the start of a regex that every match must begin with ("" when unsure):
/// stops at the first metacharacter, and drops the last character when it is made optional.
fn literal_prefix(re: &str) -> String {
    if re.contains('|') {
        return String::new();
    }
    let mut out = String::new();
    for c in re.chars() {
        match c {
            '?' | '*' | '{' => {
                out.pop();
                break;
            }
            '.' | '^' | '$' | '+' | '(' | ')' | '[' | ']' | '}' | '\\' => break,
            c => out.push(c),
        }
    }
    out
}

/// Converts RE2-style `\1` back-references to the regex crate's `${1}`.
fn substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let d = chars.next().unwrap_or('0');
                out.push_str(&format!("${{{d}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn err(path: String, msg: impl Into<String>) -> ConfigError {
    ConfigError::new(path, msg)
}

impl RouteTable {
    /// Compiles a route configuration; `path` locates it in the document for error messages.
    pub fn compile(
        rc: &cfg::RouteConfiguration,
        path: &str,
        per_filter: PerFilterParser<'_>,
    ) -> Result<Self, Vec<ConfigError>> {
        Self::compile_reusing(rc, path, per_filter, None)
    }

    /// Like [`RouteTable::compile`], but takes the compiled virtual hosts of `previous` (the table
    /// compiled from that configuration, for the same connection manager) whose configuration did
    /// not change: an RDS update usually touches a few virtual hosts of many, and compiling
    /// thousands of unchanged routes again dominated its cost. Only when the route-config level
    /// headers are unchanged too, as every compiled route holds them.
    pub fn compile_reusing(
        rc: &cfg::RouteConfiguration,
        path: &str,
        per_filter: PerFilterParser<'_>,
        previous: Option<(&cfg::RouteConfiguration, &RouteTable)>,
    ) -> Result<Self, Vec<ConfigError>> {
        let reusable: HashMap<&str, (&cfg::VirtualHost, &VirtualHost)> = previous
            .filter(|(prc, _)| {
                prc.request_headers_to_add == rc.request_headers_to_add
                    && prc.request_headers_to_remove == rc.request_headers_to_remove
                    && prc.response_headers_to_add == rc.response_headers_to_add
                    && prc.response_headers_to_remove == rc.response_headers_to_remove
            })
            .map(|(prc, table)| {
                prc.virtual_hosts
                    .iter()
                    .zip(&table.vhosts)
                    .map(|(c, v)| (c.name.as_str(), (c, v)))
                    .collect()
            })
            .unwrap_or_default();
        let mut errors = vec![];
        let top = Arc::new(
            HeaderOps::compile(&rc.header_mutations(), path).unwrap_or_else(|mut e| {
                errors.append(&mut e);
                HeaderOps::default()
            }),
        );
        let mut table = RouteTable {
            name: rc.name.clone(),
            vhosts: vec![],
            exact: HashMap::new(),
            suffixes: vec![],
            prefixes: vec![],
            any: None,
            ignore_port: rc.ignore_port_in_host_matching,
            headers: top.clone(),
        };
        for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
            let idx = table.vhosts.len();
            let reused = reusable
                .get(vh.name.as_str())
                .filter(|(c, _)| *c == vh)
                .map(|(_, v)| (*v).clone());
            let compiled = match reused {
                Some(v) => v,
                None => compile_vhost(vh, vi, path, per_filter, &top, &mut errors),
            };
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    table.any = Some(idx);
                } else if let Some(s) = d.strip_prefix('*') {
                    table.suffixes.push((s.to_string(), idx));
                } else if let Some(p) = d.strip_suffix('*') {
                    table.prefixes.push((p.to_string(), idx));
                } else {
                    table.exact.insert(d, idx);
                }
            }
            table.vhosts.push(compiled);
        }
        // Longest pattern first (stable, so equal lengths keep their configured order).
        table.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        table.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }

    /// Envoy's domain search: exact, then longest suffix wildcard, then longest prefix
    /// wildcard, then `*`. The port is part of the host unless `ignore_port_in_host_matching`:
    /// `a.example:8080` does not select `a.example`, as in Envoy.
    pub fn select_vhost(&self, host: &str) -> Option<&VirtualHost> {
        if self.exact.is_empty() && self.suffixes.is_empty() && self.prefixes.is_empty() {
            // Only `*` (the usual sidecar table): no need to lower-case or hash the host.
            return self.any.map(|i| &self.vhosts[i]);
        }
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let host = if self.ignore_port {
            split_host_port(host).0
        } else {
            host
        };
        self.find_vhost_named(host)
            .or_else(|| self.any.map(|i| &self.vhosts[i]))
    }

    fn find_vhost_named(&self, host: &str) -> Option<&VirtualHost> {
        if !self.exact.is_empty() {
            if let Some(i) = self.exact.get(host) {
                return Some(&self.vhosts[*i]);
            }
        }
        for (s, i) in &self.suffixes {
            if host.len() > s.len() && host.ends_with(s.as_str()) {
                return Some(&self.vhosts[*i]);
            }
        }
        for (p, i) in &self.prefixes {
            if host.len() > p.len() && host.starts_with(p.as_str()) {
                return Some(&self.vhosts[*i]);
            }
        }
        None
    }

    /// Selects the route for a request: the first matching route of the selected virtual host.
    ///
    /// A CONNECT request matches no route: Envoy sends it only to `connect_matcher` routes, which
    /// mecha does not have.
    pub fn route(
        &self,
        method: &http::Method,
        host: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Option<&Arc<RouteEntry>> {
        if method == http::Method::CONNECT {
            return None;
        }
        let vh = self.select_vhost(host)?;
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let pseudo = Pseudo {
            method,
            authority: host,
            path_and_query,
        };
        vh.routes
            .iter()
            .find(|r| r.matches(path, query, &pseudo, headers))
    }

    pub fn route_count(&self) -> usize {
        self.vhosts.iter().map(|v| v.routes.len()).sum()
    }
}

impl RouteEntry {
    pub fn matches(
        &self,
        path: &str,
        query: Option<&str>,
        pseudo: &Pseudo<'_>,
        headers: &HeaderMap,
    ) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(path, p, self.case_sensitive),
            PathMatch::Exact(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r, literal) => path.starts_with(literal.as_str()) && r.is_match(path),
            PathMatch::SeparatedPrefix(p) => {
                starts_with(path, p, self.case_sensitive)
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
        };
        if !path_ok {
            return false;
        }
        if self.grpc_only
            && !headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/grpc"))
        {
            return false;
        }
        if !self
            .header_matchers
            .iter()
            .all(|h| h.matches(pseudo, headers))
        {
            return false;
        }
        self.query_matchers.iter().all(|m| {
            let value = query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == m.name).then_some(v)
                })
            });
            match (value, &m.test, m.present) {
                (None, _, Some(false)) => true,
                (None, _, _) => false,
                (Some(_), _, Some(p)) => p,
                (Some(v), Some(t), None) => t.matches(&percent_decode(v)),
                (Some(_), None, None) => true,
            }
        })
    }

    /// The path after `prefix_rewrite` (replacing the matched prefix) or `regex_rewrite`.
    pub fn rewrite_path(&self, path_and_query: &str, rewrite: &RouteAction) -> Option<String> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let new_path = if let Some(pr) = &rewrite.prefix_rewrite {
            let matched = match &self.path {
                PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len(),
                // Envoy replaces the whole path of an exact or regex match.
                PathMatch::Exact(_) | PathMatch::Regex(..) => path.len(),
            };
            format!("{pr}{}", &path[matched.min(path.len())..])
        } else if let Some((re, sub)) = &rewrite.regex_rewrite {
            re.replace_all(path, sub.as_str()).into_owned()
        } else {
            return None;
        };
        Some(match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path.starts_with(prefix)
    } else {
        path.len() >= prefix.len()
            && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    }
}

fn parse_per_filter(
    map: &BTreeMap<String, TypedConfig>,
    path: &str,
    parser: PerFilterParser<'_>,
    errors: &mut Vec<ConfigError>,
) -> HashMap<String, Arc<dyn Any + Send + Sync>> {
    let mut out = HashMap::new();
    for (name, tc) in map {
        let p = format!("{path}.typed_per_filter_config[\"{name}\"]");
        match parser(name, tc, &p) {
            Ok(v) => {
                out.insert(name.clone(), v);
            }
            Err(e) => errors.push(e),
        }
    }
    out
}

/// Compiles virtual host `vi` of a route configuration (`top`: its route-config level headers).
fn compile_vhost(
    vh: &cfg::VirtualHost,
    vi: usize,
    path: &str,
    per_filter: PerFilterParser<'_>,
    top: &Arc<HeaderOps>,
    errors: &mut Vec<ConfigError>,
) -> VirtualHost {
    let vpath = format!("{path}.virtual_hosts[{vi}]");
    let vops = Arc::new(
        HeaderOps::compile(&vh.header_mutations(), &vpath).unwrap_or_else(|mut e| {
            errors.append(&mut e);
            HeaderOps::default()
        }),
    );
    let vfilters = parse_per_filter(&vh.typed_per_filter_config, &vpath, per_filter, errors);
    let mut routes = vec![];
    for (ri, r) in vh.routes.iter().enumerate() {
        let rpath = format!("{vpath}.routes[{ri}]");
        match compile_route(
            r,
            &rpath,
            &vfilters,
            per_filter,
            [vops.clone(), top.clone()],
        ) {
            Ok(mut e) => {
                if let Action::Route(a) = &mut e.action {
                    match crate::http::retry::RoutePolicy::compile(r, &rpath, vh, &vpath) {
                        Ok(p) => a.resilience = p,
                        Err(mut e) => errors.append(&mut e),
                    }
                }
                routes.push(Arc::new(e))
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    VirtualHost {
        name: vh.name.clone(),
        routes,
        headers: vops,
    }
}

fn compile_route(
    r: &cfg::Route,
    path: &str,
    vhost_filters: &HashMap<String, Arc<dyn Any + Send + Sync>>,
    per_filter: PerFilterParser<'_>,
    outer: [Arc<HeaderOps>; 2],
) -> Result<RouteEntry, Vec<ConfigError>> {
    let mut errors = vec![];
    let m = &r.route_match;
    let mpath = format!("{path}.match");
    let case_sensitive = m.case_sensitive.unwrap_or(true);
    let path_match = if let Some(p) = &m.prefix {
        PathMatch::Prefix(p.clone())
    } else if let Some(p) = &m.path {
        PathMatch::Exact(p.clone())
    } else if let Some(re) = &m.safe_regex {
        // Envoy ignores `case_sensitive` for `safe_regex`: the pattern says it (`(?i)`).
        match full_regex(&re.regex) {
            Ok(r) => PathMatch::Regex(r, literal_prefix(&re.regex)),
            Err(e) => {
                errors.push(err(format!("{mpath}.safe_regex.regex"), e));
                PathMatch::Prefix("/".into())
            }
        }
    } else if let Some(p) = &m.path_separated_prefix {
        PathMatch::SeparatedPrefix(p.clone())
    } else {
        errors.push(err(mpath.clone(), "a path specifier is required"));
        PathMatch::Prefix("/".into())
    };

    let mut header_matchers = vec![];
    for (i, h) in m.headers.iter().enumerate() {
        let hpath = format!("{mpath}.headers[{i}]");
        let lower = h.name.to_ascii_lowercase();
        let target = match lower.as_str() {
            ":method" => MatchTarget::Method,
            ":authority" | "host" => MatchTarget::Authority,
            ":path" => MatchTarget::Path,
            ":scheme" => MatchTarget::Scheme,
            _ => match HeaderName::from_bytes(lower.as_bytes()) {
                Ok(n) => MatchTarget::Header(n),
                Err(_) => {
                    errors.push(err(
                        format!("{hpath}.name"),
                        format!("invalid header name \"{}\"", h.name),
                    ));
                    continue;
                }
            },
        };
        let s = |m: StrMatch| {
            Ok(HeaderTest::Str(StringMatcher {
                m,
                ignore_case: false,
            }))
        };
        let test: Result<HeaderTest, String> = if let Some(v) = &h.exact_match {
            s(StrMatch::Exact(v.clone()))
        } else if let Some(v) = &h.prefix_match {
            s(StrMatch::Prefix(v.clone()))
        } else if let Some(v) = &h.suffix_match {
            s(StrMatch::Suffix(v.clone()))
        } else if let Some(v) = &h.contains_match {
            s(StrMatch::Contains(v.clone()))
        } else if let Some(re) = &h.safe_regex_match {
            full_regex(&re.regex).map(|r| {
                HeaderTest::Str(StringMatcher {
                    m: StrMatch::Regex(r),
                    ignore_case: false,
                })
            })
        } else if let Some(sm) = &h.string_match {
            StringMatcher::compile(sm).map(HeaderTest::Str)
        } else if let Some(rg) = &h.range_match {
            Ok(HeaderTest::Range(rg.start, rg.end))
        } else {
            // No match kind: Envoy treats it as "header is present".
            Ok(HeaderTest::Present(h.present_match.unwrap_or(true)))
        };
        match test {
            Ok(test) => header_matchers.push(HeaderMatch {
                target,
                test,
                invert: h.invert_match,
                missing_as_empty: h.treat_missing_header_as_empty,
            }),
            Err(e) => errors.push(err(hpath, e)),
        }
    }
    let mut query_matchers = vec![];
    for (i, q) in m.query_parameters.iter().enumerate() {
        let test = match &q.string_match {
            Some(sm) => match StringMatcher::compile(sm) {
                Ok(t) => Some(t),
                Err(e) => {
                    errors.push(err(
                        format!("{mpath}.query_parameters[{i}].string_match"),
                        e,
                    ));
                    None
                }
            },
            None => None,
        };
        query_matchers.push(QueryMatch {
            name: q.name.clone(),
            test,
            present: q.present_match,
        });
    }

    let action = if let Some(a) = &r.route {
        match compile_route_action(a, &format!("{path}.route")) {
            Ok(a) => Action::Route(a),
            Err(mut e) => {
                errors.append(&mut e);
                Action::Direct {
                    status: http::StatusCode::NOT_FOUND,
                    body: Bytes::new(),
                }
            }
        }
    } else if let Some(rd) = &r.redirect {
        let regex_rewrite =
            rd.regex_rewrite
                .as_ref()
                .and_then(|rr| match Regex::new(&rr.pattern.regex) {
                    Ok(re) => Some((re, substitution(&rr.substitution))),
                    Err(e) => {
                        errors.push(err(
                            format!("{path}.redirect.regex_rewrite.pattern.regex"),
                            format!("invalid regex: {e}"),
                        ));
                        None
                    }
                });
        Action::Redirect(Redirect {
            scheme: if rd.https_redirect {
                Some("https".into())
            } else {
                rd.scheme_redirect.clone()
            },
            host: rd.host_redirect.clone(),
            port: rd.port_redirect,
            path: rd.path_redirect.clone(),
            prefix_rewrite: rd.prefix_rewrite.clone(),
            regex_rewrite,
            status: http::StatusCode::from_u16(rd.response_code.status())
                .unwrap_or(http::StatusCode::MOVED_PERMANENTLY),
            strip_query: rd.strip_query,
        })
    } else if let Some(dr) = &r.direct_response {
        let body = match &dr.body {
            Some(cfg::DataSource {
                inline_string: Some(s),
                ..
            }) => Bytes::from(s.clone()),
            Some(cfg::DataSource {
                filename: Some(f), ..
            }) => match std::fs::read(f) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    errors.push(err(
                        format!("{path}.direct_response.body.filename"),
                        format!("cannot read \"{f}\": {e}"),
                    ));
                    Bytes::new()
                }
            },
            _ => Bytes::new(),
        };
        match http::StatusCode::from_u16(dr.status) {
            Ok(status) => Action::Direct { status, body },
            Err(_) => {
                errors.push(err(
                    format!("{path}.direct_response.status"),
                    "invalid status",
                ));
                Action::Direct {
                    status: http::StatusCode::OK,
                    body,
                }
            }
        }
    } else {
        errors.push(err(
            path.to_string(),
            "exactly one of route, redirect or direct_response is required",
        ));
        Action::Direct {
            status: http::StatusCode::NOT_FOUND,
            body: Bytes::new(),
        }
    };

    let route_ops = Arc::new(
        HeaderOps::compile(&r.header_mutations(), path).unwrap_or_else(|mut e| {
            errors.append(&mut e);
            HeaderOps::default()
        }),
    );
    let mut filters = vhost_filters.clone();
    filters.extend(parse_per_filter(
        &r.typed_per_filter_config,
        path,
        per_filter,
        &mut errors,
    ));
    if !errors.is_empty() {
        return Err(errors);
    }
    let [vops, top] = outer;
    let header_levels: Vec<Arc<HeaderOps>> = [route_ops, vops, top]
        .into_iter()
        .filter(|o| !o.is_empty())
        .collect();
    Ok(RouteEntry {
        name: r.name.as_str().into(),
        path: path_match,
        case_sensitive,
        header_matchers,
        query_matchers,
        grpc_only: m.grpc.is_some(),
        action,
        header_levels,
        per_filter: PerFilterConfig(if filters.is_empty() {
            None
        } else {
            Some(Arc::new(filters))
        }),
    })
}

fn compile_route_action(a: &cfg::RouteAction, path: &str) -> Result<RouteAction, Vec<ConfigError>> {
    let mut errors = vec![];
    let target = if let Some(c) = &a.cluster {
        ClusterTarget::Single(c.clone())
    } else if let Some(wc) = &a.weighted_clusters {
        let mut clusters = vec![];
        for (i, c) in wc.clusters.iter().enumerate() {
            let ops = HeaderOps::compile(
                &c.header_mutations(),
                &format!("{path}.weighted_clusters.clusters[{i}]"),
            )
            .unwrap_or_else(|mut e| {
                errors.append(&mut e);
                HeaderOps::default()
            });
            clusters.push(WeightedCluster {
                name: c.name.clone(),
                weight: c.weight as u64,
                headers: Arc::new(ops),
            });
        }
        let total = clusters.iter().map(|c| c.weight).sum();
        ClusterTarget::Weighted { clusters, total }
    } else if let Some(h) = &a.cluster_header {
        match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
            Ok(n) => ClusterTarget::Header(n),
            Err(_) => {
                errors.push(err(format!("{path}.cluster_header"), "invalid header name"));
                ClusterTarget::Single(String::new())
            }
        }
    } else {
        errors.push(err(path.to_string(), "a cluster is required"));
        ClusterTarget::Single(String::new())
    };
    let regex_rewrite =
        a.regex_rewrite
            .as_ref()
            .and_then(|rr| match Regex::new(&rr.pattern.regex) {
                Ok(re) => Some((re, substitution(&rr.substitution))),
                Err(e) => {
                    errors.push(err(
                        format!("{path}.regex_rewrite.pattern.regex"),
                        format!("invalid regex: {e}"),
                    ));
                    None
                }
            });
    let host_rewrite = if let Some(h) = &a.host_rewrite_literal {
        match http::HeaderValue::from_str(h) {
            Ok(v) => HostRewrite::Literal(v),
            Err(_) => {
                errors.push(err(format!("{path}.host_rewrite_literal"), "invalid host"));
                HostRewrite::None
            }
        }
    } else if a.auto_host_rewrite == Some(true) {
        HostRewrite::Auto
    } else if let Some(h) = &a.host_rewrite_header {
        match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
            Ok(n) => HostRewrite::Header(n),
            Err(_) => {
                errors.push(err(
                    format!("{path}.host_rewrite_header"),
                    "invalid header name",
                ));
                HostRewrite::None
            }
        }
    } else {
        HostRewrite::None
    };
    let mut hash_policy = vec![];
    for (i, h) in a.hash_policy.iter().enumerate() {
        let terminal = h.terminal;
        if let Some(hh) = &h.header {
            match HeaderName::from_bytes(hh.header_name.to_ascii_lowercase().as_bytes()) {
                Ok(name) => hash_policy.push(HashPolicy::Header { name, terminal }),
                Err(_) => errors.push(err(
                    format!("{path}.hash_policy[{i}].header.header_name"),
                    "invalid header name",
                )),
            }
        } else if let Some(c) = &h.cookie {
            hash_policy.push(HashPolicy::Cookie {
                name: c.name.clone(),
                terminal,
                generate: c.ttl.map(|ttl| CookieSpec {
                    ttl: ttl.0,
                    path: c.path.clone(),
                }),
            });
        } else if h
            .connection_properties
            .as_ref()
            .is_some_and(|c| c.source_ip)
        {
            hash_policy.push(HashPolicy::SourceIp { terminal });
        } else if let Some(q) = &h.query_parameter {
            hash_policy.push(HashPolicy::Query {
                name: q.name.clone(),
                terminal,
            });
        }
    }
    let not_found_status = match a.cluster_not_found_response_code {
        Some(cfg::ClusterNotFoundResponseCode::NOT_FOUND) => http::StatusCode::NOT_FOUND,
        Some(cfg::ClusterNotFoundResponseCode::INTERNAL_SERVER_ERROR) => {
            http::StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => http::StatusCode::SERVICE_UNAVAILABLE,
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(RouteAction {
        target,
        not_found_status,
        prefix_rewrite: a.prefix_rewrite.clone(),
        regex_rewrite,
        host_rewrite,
        timeout: match a.timeout {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d.0),
            None => Some(Duration::from_secs(15)),
        },
        idle_timeout: a.idle_timeout.map(|d| (!d.is_zero()).then_some(d.0)),
        hash_policy,
        resilience: Default::default(),
    })
}

impl RouteAction {
    /// Chooses the cluster: fixed, by weight (random within the total), or from a header.
    pub fn pick_cluster<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> Option<(&'a str, Option<&'a Arc<HeaderOps>>)> {
        match &self.target {
            ClusterTarget::Single(c) => Some((c.as_str(), None)),
            ClusterTarget::Weighted { clusters, total } => {
                let mut r = rand::random_range(0..(*total).max(1));
                for c in clusters {
                    if r < c.weight {
                        return Some((c.name.as_str(), Some(&c.headers)));
                    }
                    r -= c.weight;
                }
                clusters.last().map(|c| (c.name.as_str(), Some(&c.headers)))
            }
            ClusterTarget::Header(h) => headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(|c| (c, None)),
        }
    }

    /// Computes the request hash from the route's hash policies (Envoy combines them by
    /// rotate-and-xor; a terminal policy that produced a hash stops the rest). A cookie policy
    /// with a `ttl` whose cookie is missing generates one, as Envoy does: its value is the hex
    /// hash of the connection's addresses, the request hashes on it, and `set_cookie` gets the
    /// `Set-Cookie` for the response.
    pub fn hash(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        remote: std::net::SocketAddr,
        local: std::net::SocketAddr,
        set_cookie: &mut Option<HeaderValue>,
    ) -> Option<u64> {
        let mut out: Option<u64> = None;
        for p in &self.hash_policy {
            let (h, terminal) = match p {
                HashPolicy::Header { name, terminal } => (
                    headers
                        .get(name)
                        .map(|v| crate::cluster::lb::hash_bytes(v.as_bytes())),
                    *terminal,
                ),
                HashPolicy::Cookie {
                    name,
                    terminal,
                    generate,
                } => {
                    let found = cookie_value(headers, name);
                    let h = match (found, generate) {
                        (Some(v), _) => Some(crate::cluster::lb::hash_bytes(v.as_bytes())),
                        (None, Some(spec)) => {
                            let value = format!(
                                "{:016x}",
                                crate::cluster::lb::hash_bytes(
                                    format!("{remote}{local}").as_bytes()
                                )
                            );
                            *set_cookie = set_cookie_header(name, &value, spec);
                            Some(crate::cluster::lb::hash_bytes(value.as_bytes()))
                        }
                        (None, None) => None,
                    };
                    (h, *terminal)
                }
                HashPolicy::SourceIp { terminal } => (
                    Some(crate::cluster::lb::hash_bytes(
                        remote.ip().to_string().as_bytes(),
                    )),
                    *terminal,
                ),
                HashPolicy::Query { name, terminal } => (
                    query.and_then(|q| {
                        q.split('&').find_map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                            (k == name).then(|| crate::cluster::lb::hash_bytes(v.as_bytes()))
                        })
                    }),
                    *terminal,
                ),
            };
            if let Some(h) = h {
                out = Some(match out {
                    Some(prev) => prev.rotate_left(1) ^ h,
                    None => h,
                });
                if terminal {
                    break;
                }
            }
        }
        out
    }
}

/// A cookie's value from the request's `Cookie` headers, without surrounding quotes (as Envoy's
/// `parseCookieValue`, so a generated `name="value"` cookie hashes like its value).
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| {
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
            })
        })
}

/// Envoy's `makeSetCookieValue`: `name="value"; Max-Age=N; Path=p; HttpOnly`.
fn set_cookie_header(name: &str, value: &str, spec: &CookieSpec) -> Option<HeaderValue> {
    let mut c = format!("{name}=\"{value}\"");
    if !spec.ttl.is_zero() {
        c.push_str(&format!("; Max-Age={}", spec.ttl.as_secs()));
    }
    if let Some(p) = spec.path.as_deref().filter(|p| !p.is_empty()) {
        c.push_str(&format!("; Path={p}"));
    }
    c.push_str("; HttpOnly");
    HeaderValue::from_str(&c).ok()
}

impl Redirect {
    /// Builds the `Location` for a request to `host` + `path_and_query` over `scheme`.
    pub fn location(
        &self,
        route: &RouteEntry,
        scheme: &str,
        host: &str,
        path_and_query: &str,
    ) -> String {
        // Envoy's processRequestHost: the request's port stays unless a new port replaces it,
        // or the scheme changes and the port was the old scheme's default (`:80` for http).
        let new_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let mut host_out = match &self.host {
            Some(h) => h.clone(),
            None => {
                let (host_only, orig_port) = split_host_port(host);
                let default_of_old = matches!(
                    (scheme, orig_port),
                    ("http", Some("80")) | ("https", Some("443"))
                );
                let strip = self.port.is_some() || (new_scheme != scheme && default_of_old);
                if strip { host_only } else { host }.to_string()
            }
        };
        if let Some(p) = self.port {
            host_out = format!("{host_out}:{p}");
        }
        let scheme = new_scheme;
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path_and_query.to_string(), None),
        };
        let (mut new_path, mut new_query) = (path.clone(), query);
        if let Some(p) = &self.path {
            match p.split_once('?') {
                Some((pp, pq)) => {
                    new_path = pp.to_string();
                    new_query = Some(pq.to_string()).filter(|q| !q.is_empty());
                }
                None => new_path = p.clone(),
            }
        } else if self.prefix_rewrite.is_some() || self.regex_rewrite.is_some() {
            let ra = RouteAction {
                target: ClusterTarget::Single(String::new()),
                not_found_status: http::StatusCode::NOT_FOUND,
                prefix_rewrite: self.prefix_rewrite.clone(),
                regex_rewrite: self
                    .regex_rewrite
                    .as_ref()
                    .map(|(r, s)| (r.clone(), s.clone())),
                host_rewrite: HostRewrite::None,
                timeout: None,
                idle_timeout: None,
                hash_policy: vec![],
                resilience: Default::default(),
            };
            if let Some(p) = route.rewrite_path(&path, &ra) {
                new_path = p;
            }
        }
        if self.strip_query {
            new_query = None;
        }
        match new_query {
            Some(q) => format!("{scheme}://{host_out}{new_path}?{q}"),
            None => format!("{scheme}://{host_out}{new_path}"),
        }
    }
}

fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let h = &host[..end + 2];
            let p = host[end + 2..].strip_prefix(':');
            return (h, p);
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() => (h, Some(p)),
        _ => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::literal_prefix;

    #[test]
    fn literal_prefix_is_conservative() {
        assert_eq!(literal_prefix("/items/[0-9]+"), "/items/");
        assert_eq!(literal_prefix("/ab?c"), "/a");
        assert_eq!(literal_prefix("/ab*"), "/a");
        assert_eq!(literal_prefix("/ab+"), "/ab");
        assert_eq!(literal_prefix("/a{2}"), "/");
        assert_eq!(literal_prefix("/a|/b"), "");
        assert_eq!(literal_prefix("^/x"), "");
        assert_eq!(literal_prefix("/x\\d"), "/x");
        assert_eq!(literal_prefix("(/x)"), "");
    }

    /// An RDS update recompiles the virtual hosts that changed and shares the others.
    #[test]
    fn compile_reusing_shares_unchanged_virtual_hosts() {
        use super::*;
        let rc = |target_b: &str| -> cfg::RouteConfiguration {
            let yaml = format!(
                "name: r
virtual_hosts:
- {{ name: a, domains: [a], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: ca }} }}] }}
- {{ name: b, domains: [b], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: {target_b} }} }}] }}
"
            );
            serde_yaml::from_str(&yaml).expect("route config")
        };
        let no_filters = |_: &str,
                          _: &TypedConfig,
                          p: &str|
         -> Result<Arc<dyn Any + Send + Sync>, ConfigError> {
            Err(ConfigError::new(p, "none"))
        };
        let (old_rc, new_rc) = (rc("cb"), rc("cb2"));
        let old = RouteTable::compile(&old_rc, "", &no_filters).expect("old");
        let new = RouteTable::compile_reusing(&new_rc, "", &no_filters, Some((&old_rc, &old)))
            .expect("new");
        let route = |t: &RouteTable, host: &str| {
            t.route(&http::Method::GET, host, "/x", &HeaderMap::new())
                .cloned()
        };
        let (old_a, new_a) = (route(&old, "a").unwrap(), route(&new, "a").unwrap());
        assert!(
            Arc::ptr_eq(&old_a, &new_a),
            "unchanged virtual host recompiled"
        );
        let new_b = route(&new, "b").unwrap();
        assert!(!Arc::ptr_eq(&route(&old, "b").unwrap(), &new_b));
        match &new_b.action {
            Action::Route(a) => {
                assert!(matches!(&a.target, ClusterTarget::Single(c) if c == "cb2"))
            }
            _ => panic!("not a route action"),
        }
    }
}
