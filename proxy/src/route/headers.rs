//! Compiled header mutations (`request_headers_to_add/remove`, `response_headers_to_add/remove`)
//! with the subset of Envoy's `%VAR%` substitutions that make sense per request.

use http::{HeaderMap, HeaderName, HeaderValue};
use mecha_config::{AppendAction, ConfigError, HeaderMutations, HeaderValueOption};
use std::net::SocketAddr;

/// Values for `%VAR%` substitution.
pub struct Vars<'a> {
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub protocol: &'a str,
}

#[derive(Clone, Debug)]
enum Part {
    Lit(String),
    DownstreamRemote,
    DownstreamRemoteNoPort,
    DownstreamLocal,
    DownstreamLocalNoPort,
    UpstreamRemote,
    Protocol,
    Hostname,
}

#[derive(Clone, Debug)]
enum Value {
    Static(HeaderValue),
    Template(Vec<Part>),
}

#[derive(Clone, Debug)]
struct Add {
    name: HeaderName,
    value: Value,
    action: AppendAction,
    keep_empty: bool,
}

/// One level's compiled mutations.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    req_add: Vec<Add>,
    req_remove: Vec<HeaderName>,
    resp_add: Vec<Add>,
    resp_remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn compile(m: &HeaderMutations, path: &str) -> Result<Self, Vec<ConfigError>> {
        let mut errors = vec![];
        let mut ops = HeaderOps::default();
        for (i, h) in m.request_headers_to_add.iter().enumerate() {
            match compile_add(h, &format!("{path}.request_headers_to_add[{i}]")) {
                Ok(a) => ops.req_add.push(a),
                Err(e) => errors.push(e),
            }
        }
        for (i, h) in m.response_headers_to_add.iter().enumerate() {
            match compile_add(h, &format!("{path}.response_headers_to_add[{i}]")) {
                Ok(a) => ops.resp_add.push(a),
                Err(e) => errors.push(e),
            }
        }
        for (list, out, field) in [
            (
                &m.request_headers_to_remove,
                &mut ops.req_remove,
                "request_headers_to_remove",
            ),
            (
                &m.response_headers_to_remove,
                &mut ops.resp_remove,
                "response_headers_to_remove",
            ),
        ] {
            for (i, n) in list.iter().enumerate() {
                match HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()) {
                    Ok(n) if n == http::header::HOST => errors.push(ConfigError::new(
                        format!("{path}.{field}[{i}]"),
                        UNMODIFIABLE,
                    )),
                    Ok(n) => out.push(n),
                    Err(_) => errors.push(ConfigError::new(
                        format!("{path}.{field}[{i}]"),
                        format!("invalid header name \"{n}\""),
                    )),
                }
            }
        }
        if errors.is_empty() {
            Ok(ops)
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.req_add.is_empty()
            && self.req_remove.is_empty()
            && self.resp_add.is_empty()
            && self.resp_remove.is_empty()
    }

    pub fn has_response_ops(&self) -> bool {
        !self.resp_add.is_empty() || !self.resp_remove.is_empty()
    }

    pub fn apply_request(&self, headers: &mut HeaderMap, vars: &Vars<'_>) {
        for n in &self.req_remove {
            headers.remove(n);
        }
        for a in &self.req_add {
            apply_add(a, headers, vars);
        }
    }

    pub fn apply_response(&self, headers: &mut HeaderMap, vars: &Vars<'_>) {
        for n in &self.resp_remove {
            headers.remove(n);
        }
        for a in &self.resp_add {
            apply_add(a, headers, vars);
        }
    }
}

fn apply_add(a: &Add, headers: &mut HeaderMap, vars: &Vars<'_>) {
    let value = match &a.value {
        Value::Static(v) => v.clone(),
        Value::Template(parts) => match HeaderValue::from_str(&render(parts, vars)) {
            Ok(v) => v,
            Err(_) => return,
        },
    };
    if value.is_empty() && !a.keep_empty {
        return;
    }
    match a.action {
        AppendAction::APPEND_IF_EXISTS_OR_ADD => {
            headers.append(a.name.clone(), value);
        }
        AppendAction::ADD_IF_ABSENT => {
            if !headers.contains_key(&a.name) {
                headers.insert(a.name.clone(), value);
            }
        }
        AppendAction::OVERWRITE_IF_EXISTS_OR_ADD => {
            headers.insert(a.name.clone(), value);
        }
        AppendAction::OVERWRITE_IF_EXISTS => {
            if headers.contains_key(&a.name) {
                headers.insert(a.name.clone(), value);
            }
        }
    }
}

fn render(parts: &[Part], v: &Vars<'_>) -> String {
    let mut s = String::new();
    for p in parts {
        match p {
            Part::Lit(l) => s.push_str(l),
            Part::DownstreamRemote => s.push_str(&v.downstream_remote.to_string()),
            Part::DownstreamRemoteNoPort => s.push_str(&v.downstream_remote.ip().to_string()),
            Part::DownstreamLocal => s.push_str(&v.downstream_local.to_string()),
            Part::DownstreamLocalNoPort => s.push_str(&v.downstream_local.ip().to_string()),
            Part::UpstreamRemote => {
                s.push_str(&v.upstream.map(|a| a.to_string()).unwrap_or_default())
            }
            Part::Protocol => s.push_str(v.protocol),
            Part::Hostname => s.push_str(&hostname()),
        }
    }
    s
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Envoy's `isModifiableHeader`: `host` (and pseudo-headers, which are not valid names here)
/// cannot be added or removed by header mutations.
const UNMODIFIABLE: &str = "the host header cannot be modified by header mutations (use host_rewrite_literal or auto_host_rewrite)";

fn compile_add(h: &HeaderValueOption, path: &str) -> Result<Add, ConfigError> {
    let name =
        HeaderName::from_bytes(h.header.key.to_ascii_lowercase().as_bytes()).map_err(|_| {
            ConfigError::new(
                format!("{path}.header.key"),
                format!("invalid header name \"{}\"", h.header.key),
            )
        })?;
    if name == http::header::HOST {
        return Err(ConfigError::new(format!("{path}.header.key"), UNMODIFIABLE));
    }
    if h.append.is_some() && h.append_action.is_some() {
        return Err(ConfigError::new(
            format!("{path}.append"),
            "append and append_action are mutually exclusive (append is deprecated)",
        ));
    }
    let parts = parse_template(&h.header.value)
        .map_err(|e| ConfigError::new(format!("{path}.header.value"), e))?;
    let value = match parts.as_slice() {
        [] => Value::Static(HeaderValue::from_static("")),
        [Part::Lit(l)] => Value::Static(HeaderValue::from_str(l).map_err(|_| {
            ConfigError::new(format!("{path}.header.value"), "invalid header value")
        })?),
        _ => Value::Template(parts),
    };
    Ok(Add {
        name,
        value,
        action: h.action(),
        keep_empty: h.keep_empty_value,
    })
}

fn parse_template(s: &str) -> Result<Vec<Part>, String> {
    let mut parts = vec![];
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let end = rest
            .find('%')
            .ok_or_else(|| format!("unterminated %VARIABLE% in \"{s}\""))?;
        let var = &rest[..end];
        rest = &rest[end + 1..];
        let part = match var {
            "DOWNSTREAM_REMOTE_ADDRESS" => Part::DownstreamRemote,
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Part::DownstreamRemoteNoPort,
            "DOWNSTREAM_LOCAL_ADDRESS" => Part::DownstreamLocal,
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Part::DownstreamLocalNoPort,
            "UPSTREAM_REMOTE_ADDRESS" => Part::UpstreamRemote,
            "PROTOCOL" => Part::Protocol,
            "HOSTNAME" => Part::Hostname,
            other => return Err(format!("unsupported substitution %{other}%")),
        };
        if !lit.is_empty() {
            parts.push(Part::Lit(std::mem::take(&mut lit)));
        }
        parts.push(part);
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(parts)
}
