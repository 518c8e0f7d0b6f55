//! The gRPC side of the app channel (`--app-protocol grpc`): Dapr's `AppCallback` service called
//! through the proxy's app cluster, and the conversions Dapr applies between its HTTP shapes and
//! the callback protos (CloudEvent → `TopicEventRequest`, HTTP request → `InvokeRequest`,
//! gRPC status → HTTP status).
//!
//! The tonic clients run over [`UpstreamChannel`], a tower service that hands each HTTP/2 request
//! to the cluster manager, so calls to a gRPC app get the same pools, circuit breakers, outlier
//! detection and `cluster.local_app.*` stats as calls to an HTTP app.

use crate::cloudevents;
use bytes::Bytes;
use dapr::dapr::proto::common::v1 as common;
use dapr::dapr::proto::runtime::v1 as rt;
use http_body_util::BodyExt;
use mecha_filters::{Body, BoxError, BoxFuture, Upstream, UpstreamError};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::task::{Context, Poll};

/// How mecha talks to its app (Dapr's `--app-protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AppProtocol {
    #[default]
    Http,
    Grpc,
}

impl AppProtocol {
    /// Parses `--app-protocol`. Dapr also has `https`, `grpcs` and `h2c`; mecha refuses them
    /// rather than silently talking plain HTTP/1.1 to an app that expects something else.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(Self::Http),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!(
                "--app-protocol {other}: supported values are http and grpc"
            )),
        }
    }
}

/// A tower service that sends tonic's requests to a cluster through the proxy upstream.
#[derive(Clone)]
pub struct UpstreamChannel {
    up: Arc<dyn Upstream>,
    cluster: Arc<str>,
}

impl UpstreamChannel {
    pub fn new(up: Arc<dyn Upstream>, cluster: &str) -> Self {
        Self {
            up,
            cluster: Arc::from(cluster),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for UpstreamChannel {
    type Response = http::Response<Body>;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, UpstreamError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The cluster manager queues or refuses (circuit breakers) per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let req = req.map(|b| b.map_err(|s| Box::new(s) as BoxError).boxed_unsync());
        self.up.call(&self.cluster, req)
    }
}

pub type AppCallbackClient = rt::app_callback_client::AppCallbackClient<UpstreamChannel>;
pub type AppCallbackAlphaClient =
    rt::app_callback_alpha_client::AppCallbackAlphaClient<UpstreamChannel>;

/// The origin tonic puts on requests; the upstream replaces scheme and authority with the
/// chosen host's, so only the path matters.
fn origin() -> http::Uri {
    http::Uri::from_static("http://localhost")
}

pub fn callback_client(ch: UpstreamChannel) -> AppCallbackClient {
    AppCallbackClient::with_origin(ch, origin())
}

pub fn callback_alpha_client(ch: UpstreamChannel) -> AppCallbackAlphaClient {
    AppCallbackAlphaClient::with_origin(ch, origin())
}

/// Whether a client-side status came from mecha failing to reach the app (connect error,
/// overflow, no healthy host) rather than from the app itself.
pub fn is_transport_error(s: &tonic::Status) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = src {
        if e.is::<UpstreamError>() || e.is::<hyper::Error>() {
            return true;
        }
        src = e.source();
    }
    false
}

/// grpc-gateway's `HTTPStatusFromCode`, which Dapr uses for a gRPC app's invocation answer on
/// the HTTP API.
pub fn http_status_from_code(c: tonic::Code) -> http::StatusCode {
    use http::StatusCode as S;
    use tonic::Code as C;
    match c {
        C::Ok => S::OK,
        C::Cancelled => S::from_u16(499).unwrap_or(S::INTERNAL_SERVER_ERROR),
        C::InvalidArgument | C::FailedPrecondition | C::OutOfRange => S::BAD_REQUEST,
        C::DeadlineExceeded => S::GATEWAY_TIMEOUT,
        C::NotFound => S::NOT_FOUND,
        C::AlreadyExists | C::Aborted => S::CONFLICT,
        C::PermissionDenied => S::FORBIDDEN,
        C::Unauthenticated => S::UNAUTHORIZED,
        C::ResourceExhausted => S::TOO_MANY_REQUESTS,
        C::Unimplemented => S::NOT_IMPLEMENTED,
        C::Unavailable => S::SERVICE_UNAVAILABLE,
        C::Unknown | C::Internal | C::DataLoss => S::INTERNAL_SERVER_ERROR,
    }
}

/// `common.v1.HTTPExtension.Verb` for an HTTP method (NONE for methods the enum lacks).
pub fn verb_of(m: &http::Method) -> i32 {
    use common::http_extension::Verb;
    let v = match *m {
        http::Method::GET => Verb::Get,
        http::Method::HEAD => Verb::Head,
        http::Method::POST => Verb::Post,
        http::Method::PUT => Verb::Put,
        http::Method::DELETE => Verb::Delete,
        http::Method::CONNECT => Verb::Connect,
        http::Method::OPTIONS => Verb::Options,
        http::Method::TRACE => Verb::Trace,
        http::Method::PATCH => Verb::Patch,
        _ => Verb::None,
    };
    v as i32
}

/// The `InvokeRequest` Dapr sends a gRPC app for an HTTP invocation: the method, the body as
/// `Any.value`, the content type, and the verb and query string in `http_extension`.
pub fn invoke_request(
    method: &str,
    query: &str,
    verb: &http::Method,
    content_type: &str,
    body: Bytes,
) -> common::InvokeRequest {
    common::InvokeRequest {
        method: method.to_string(),
        data: Some(prost_types::Any {
            type_url: String::new(),
            value: body.to_vec(),
        }),
        content_type: content_type.to_string(),
        http_extension: Some(common::HttpExtension {
            verb: verb_of(verb),
            querystring: query.to_string(),
        }),
    }
}

/// Headers that describe the HTTP/1.1 message or belong to the sidecar, never sent to the app
/// as gRPC metadata.
fn skip_as_metadata(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-type"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-connection"
            | "user-agent"
            | "accept-encoding"
    ) || name.starts_with("grpc-")
        || name.starts_with(':')
        || (name.starts_with("dapr-") && name != "dapr-caller-app-id")
}

/// Copies a caller's HTTP headers into gRPC metadata for the app, as Dapr forwards them.
pub fn headers_to_metadata(h: &http::HeaderMap, md: &mut tonic::metadata::MetadataMap) {
    for (k, v) in h {
        if skip_as_metadata(k.as_str()) {
            continue;
        }
        if let (Ok(key), Ok(val)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes()),
            tonic::metadata::MetadataValue::try_from(v.as_bytes()),
        ) {
            md.append(key, val);
        }
    }
}

/// The CloudEvent attributes that have their own `TopicEventRequest` field; every other
/// attribute goes to `extensions`.
const CE_FIELDS: [&str; 7] = [
    "id",
    "source",
    "type",
    "specversion",
    "datacontenttype",
    "data",
    "data_base64",
];

fn ce_str(ev: &Map<String, Value>, k: &str) -> String {
    ev.get(k)
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_default()
}

fn is_json_ct(ct: &str) -> bool {
    let ct = ct.split(';').next().unwrap_or("").trim();
    ct == "application/json" || ct.ends_with("+json")
}

/// The event payload as bytes, as Dapr puts it in `TopicEventRequest.data`: `data_base64`
/// decoded; string `data` as its UTF-8 bytes unless the content type is JSON; anything else as
/// its JSON text.
fn ce_data(ev: &Map<String, Value>) -> Result<Vec<u8>, String> {
    if let Some(b64) = ev.get("data_base64") {
        use base64::Engine;
        let s = b64
            .as_str()
            .ok_or("the event's data_base64 is not a string")?;
        return base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("the event's data_base64 is not valid base64: {e}"));
    }
    let ct = ce_str(ev, "datacontenttype");
    Ok(match ev.get("data") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) if !is_json_ct(&ct) => s.clone().into_bytes(),
        Some(v) => v.to_string().into_bytes(),
    })
}

fn json_to_prost(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_to_struct(o.iter())),
    };
    prost_types::Value { kind: Some(kind) }
}

fn json_to_struct<'a>(it: impl Iterator<Item = (&'a String, &'a Value)>) -> prost_types::Struct {
    prost_types::Struct {
        fields: it.map(|(k, v)| (k.clone(), json_to_prost(v))).collect(),
    }
}

fn extensions(ev: &Map<String, Value>) -> prost_types::Struct {
    json_to_struct(ev.iter().filter(|(k, _)| !CE_FIELDS.contains(&k.as_str())))
}

/// `OnTopicEvent`'s request for a delivered CloudEvent.
pub fn topic_event_request(
    ev: &Map<String, Value>,
    topic: &str,
    pubsub: &str,
    path: &str,
) -> Result<rt::TopicEventRequest, String> {
    Ok(rt::TopicEventRequest {
        id: ce_str(ev, "id"),
        source: ce_str(ev, "source"),
        r#type: ce_str(ev, "type"),
        spec_version: ce_str(ev, "specversion"),
        data_content_type: ce_str(ev, "datacontenttype"),
        data: ce_data(ev)?,
        topic: topic.to_string(),
        pubsub_name: pubsub.to_string(),
        path: path.to_string(),
        extensions: Some(extensions(ev)),
    })
}

/// One entry of `OnBulkTopicEvent`'s request.
pub fn bulk_entry(
    entry_id: &str,
    ev: &Map<String, Value>,
) -> Result<rt::TopicEventBulkRequestEntry, String> {
    Ok(rt::TopicEventBulkRequestEntry {
        entry_id: entry_id.to_string(),
        content_type: cloudevents::CE_CONTENT_TYPE.to_string(),
        metadata: Default::default(),
        event: Some(rt::topic_event_bulk_request_entry::Event::CloudEvent(
            rt::TopicEventCeRequest {
                id: ce_str(ev, "id"),
                source: ce_str(ev, "source"),
                r#type: ce_str(ev, "type"),
                spec_version: ce_str(ev, "specversion"),
                data_content_type: ce_str(ev, "datacontenttype"),
                data: ce_data(ev)?,
                extensions: Some(extensions(ev)),
            },
        )),
    })
}

/// One raw entry of `OnBulkTopicEvent`'s request (a `rawPayload` subscription): the message's
/// bytes, not a CloudEvent.
pub fn bulk_entry_raw(
    entry_id: &str,
    data: &[u8],
    content_type: &str,
) -> rt::TopicEventBulkRequestEntry {
    rt::TopicEventBulkRequestEntry {
        entry_id: entry_id.to_string(),
        content_type: content_type.to_string(),
        metadata: Default::default(),
        event: Some(rt::topic_event_bulk_request_entry::Event::Bytes(
            data.to_vec(),
        )),
    }
}

/// A `ListTopicSubscriptions` item as a subscription. Dapr's gRPC routing: the rules, then
/// `default` when set; with neither, every event goes to the empty path.
pub fn subscription_from_grpc(s: rt::TopicSubscription) -> crate::component::Subscription {
    let routes = s.routes.unwrap_or_default();
    let rules: Vec<crate::component::RouteRule> = routes
        .rules
        .into_iter()
        .map(|r| crate::component::RouteRule {
            match_: r.r#match,
            path: r.path,
        })
        .collect();
    let default = if !routes.default.is_empty() {
        Some(routes.default)
    } else if rules.is_empty() {
        Some(String::new())
    } else {
        None
    };
    crate::component::Subscription {
        pubsub: s.pubsub_name,
        topic: s.topic,
        routes: crate::component::Routes { rules, default },
        dead_letter_topic: Some(s.dead_letter_topic).filter(|d| !d.is_empty()),
        bulk_subscribe: s.bulk_subscribe.map(|b| crate::component::BulkSubscribe {
            enabled: b.enabled,
            max_messages_count: Some(b.max_messages_count as i64).filter(|n| *n > 0),
            max_await_duration_ms: Some(b.max_await_duration_ms as i64).filter(|n| *n > 0),
        }),
        metadata: s.metadata.into_iter().collect(),
        scopes: vec![],
        kind: "programmatic",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn topic_event_from_cloudevent() {
        let ev = json!({"id": "1", "source": "a", "type": "t", "specversion": "1.0",
            "datacontenttype": "application/json", "data": {"x": 1}, "topic": "orders",
            "traceparent": "00-abc"});
        let Value::Object(ev) = ev else { panic!() };
        let r = topic_event_request(&ev, "orders", "ps", "/p").unwrap();
        assert_eq!(r.data, br#"{"x":1}"#);
        assert_eq!(r.id, "1");
        let ext = r.extensions.unwrap();
        assert!(ext.fields.contains_key("traceparent"));
        assert!(!ext.fields.contains_key("data"));
        let Value::Object(text) = json!({"datacontenttype": "text/plain", "data": "hi"}) else {
            panic!()
        };
        assert_eq!(ce_data(&text).unwrap(), b"hi");
        let Value::Object(b64) = json!({"data_base64": "aGk="}) else {
            panic!()
        };
        assert_eq!(ce_data(&b64).unwrap(), b"hi");
        let Value::Object(bad) = json!({"data_base64": "%%"}) else {
            panic!()
        };
        assert!(ce_data(&bad).is_err());
    }

    #[test]
    fn grpc_routes_default_to_empty_path() {
        let s = subscription_from_grpc(rt::TopicSubscription {
            pubsub_name: "ps".into(),
            topic: "t".into(),
            ..Default::default()
        });
        assert_eq!(s.routes.default.as_deref(), Some(""));
        assert_eq!(s.dead_letter_topic, None);
    }
}
