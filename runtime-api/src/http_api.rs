//! Dapr's HTTP API v1.0 as the HTTP filter `mecha.filters.http.runtime_api`: it answers
//! `/v1.0/…` and `/v1.0-alpha1/…` (and `dapr-app-id` invocations, and gRPC calls to
//! `dapr.proto.runtime.v1.Dapr` by content type) and passes every other request down the chain.

use crate::error::ApiError;
use crate::runtime::{Runtime, TraceContext};
use crate::state_api::{DeleteItem, SaveItem, TxItem};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use mecha_filters::{empty, full, spare, Body, BoxFuture, HttpFilter, Next};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct RuntimeApiFilter {
    pub rt: Arc<Runtime>,
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = spare::response(full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn no_content() -> Response<Body> {
    let mut r = spare::response(empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// Decodes `%XX` escapes in a path segment.
pub(crate) fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 && i + 2 <= b.len().saturating_sub(1) {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The decoded rest of a path (`key @ ..` segments joined by `/`); borrowed when it is one
/// segment without escapes, as state keys and topics nearly always are.
fn decode_rest<'a>(segs: &[&'a str]) -> std::borrow::Cow<'a, str> {
    match segs {
        [one] => percent_decode_cow(one),
        _ => std::borrow::Cow::Owned(percent_decode(&segs.join("/"))),
    }
}

/// Decodes `%XX` escapes only when there are any (app ids rarely have them).
fn percent_decode_cow(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('%') {
        std::borrow::Cow::Owned(percent_decode(s))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// For `/v1.0/invoke/{app-id}/method/{method…}`: the raw app id and the byte offset of the
/// method in the path (also its offset in the path-and-query, which starts with the path).
fn invoke_target(path: &str) -> Option<(&str, usize)> {
    const PREFIX: &str = "/v1.0/invoke/";
    let rest = path.strip_prefix(PREFIX)?;
    let (app_id, after) = rest.split_once('/')?;
    after.strip_prefix("method/")?;
    Some((app_id, PREFIX.len() + app_id.len() + 1 + "method/".len()))
}

/// `metadata.<name>=<value>` query parameters, as Dapr reads them.
fn query_metadata(q: Option<&str>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for pair in q.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if let Some(name) = k.strip_prefix("metadata.") {
            m.insert(percent_decode(name), percent_decode(&v.replace('+', " ")));
        }
    }
    m
}

fn query_param(q: Option<&str>, name: &str) -> Option<String> {
    q.unwrap_or("").split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Reads the whole body, refusing more than `limit` bytes (Dapr's `--max-body-size`).
pub(crate) async fn read_body(req: Request<Body>, limit: usize) -> Result<Bytes, ApiError> {
    let (parts, mut body) = req.into_parts();
    spare::recycle(parts.headers);
    spare::recycle_extensions(parts.extensions);
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::malformed(format!("cannot read the request body: {e}")))?;
        if let Some(d) = frame.data_ref() {
            if buf.len() + d.len() > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "ERR_BODY_TOO_LARGE",
                    format!("the request body exceeds the {limit} byte limit"),
                ));
            }
            buf.extend_from_slice(d);
        }
    }
    Ok(buf.freeze())
}

fn parse_json<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(b)
        .map_err(|e| ApiError::malformed(format!("failed to parse the request body: {e}")))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StateOptions {
    concurrency: String,
    #[allow(dead_code)]
    consistency: String,
}

#[derive(Deserialize)]
struct StateItemIn {
    key: String,
    #[serde(default)]
    value: serde_json::Value,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    options: StateOptions,
}

fn meta_strings(m: BTreeMap<String, serde_json::Value>) -> BTreeMap<String, String> {
    m.into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, s)
        })
        .collect()
}

impl StateItemIn {
    fn into_save(self) -> SaveItem {
        SaveItem {
            key: self.key,
            value: Bytes::from(self.value.to_string()),
            etag: self.etag,
            concurrency: self.options.concurrency,
            metadata: meta_strings(self.metadata),
        }
    }
}

/// Stored bytes as JSON for bulk/ transaction answers: JSON as is, else a string.
pub(crate) fn stored_json(v: &[u8]) -> serde_json::Value {
    serde_json::from_slice(v)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(v).into_owned()))
}

impl RuntimeApiFilter {
    fn authorized(&self, req: &Request<Body>, path: &str) -> bool {
        let Some(token) = &self.rt.opts.api_token else {
            return true;
        };
        if path.starts_with("/v1.0/healthz") {
            return true;
        }
        req.headers()
            .get("dapr-api-token")
            .is_some_and(|v| v.as_bytes() == token.as_bytes())
    }

    async fn handle(&self, req: Request<Body>, next: Next<'_>) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let q = query.as_deref();
        let (version, rest) = if let Some(r) = path.strip_prefix("/v1.0/") {
            ("v1.0", r)
        } else if let Some(r) = path.strip_prefix("/v1.0-alpha1/") {
            ("v1.0-alpha1", r)
        } else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "ERR_NOT_FOUND",
                "not found",
            ));
        };
        let segs: Vec<&str> = rest.split('/').collect();
        let method = req.method().clone();
        let limit = self.rt.opts.max_body_bytes.max(1);
        match (version, segs.as_slice(), &method) {
            // The sidecar's health, not the app's (as Dapr). `?appid=` names the app id the
            // caller expects here (used by name resolvers to detect a replaced app).
            ("v1.0", ["healthz"], &Method::GET) => match query_param(q, "appid") {
                Some(id) if id != self.rt.app_id() => Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_HEALTH_APPID_NOT_MATCH",
                    "dapr app-id does not match",
                )),
                _ => Ok(no_content()),
            },
            ("v1.0", ["healthz", "outbound"], &Method::GET) => Ok(no_content()),
            ("v1.0", ["state", store], &Method::POST)
            | ("v1.0", ["state", store], &Method::PUT) => {
                let store = percent_decode(store);
                self.rt.store(&store)?;
                let body = read_body(req, limit).await?;
                let items: Vec<StateItemIn> = parse_json(&body)?;
                self.rt
                    .save_state(
                        &store,
                        items.into_iter().map(StateItemIn::into_save).collect(),
                    )
                    .await?;
                Ok(no_content())
            }
            ("v1.0", ["state", store, "bulk"], &Method::POST) => {
                let store = percent_decode(store);
                self.rt.store(&store)?;
                #[derive(Deserialize)]
                struct Bulk {
                    keys: Vec<String>,
                    #[serde(default)]
                    parallelism: Option<usize>,
                }
                let body = read_body(req, limit).await?;
                let b: Bulk = parse_json(&body)?;
                let items = self
                    .rt
                    .get_bulk_state(&store, b.keys, b.parallelism.unwrap_or(10))
                    .await?;
                let out: Vec<serde_json::Value> = items
                    .into_iter()
                    .map(|(k, r)| match r {
                        Ok(Some(it)) => serde_json::json!({"key": k, "data": stored_json(&it.value), "etag": it.etag}),
                        Ok(None) => serde_json::json!({"key": k}),
                        Err(e) => serde_json::json!({"key": k, "error": e}),
                    })
                    .collect();
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::Value::Array(out),
                ))
            }
            ("v1.0", ["state", store, "transaction"], &Method::POST)
            | ("v1.0", ["state", store, "transaction"], &Method::PUT) => {
                let store = percent_decode(store);
                self.rt.store(&store)?;
                #[derive(Deserialize)]
                struct Op {
                    operation: String,
                    request: StateItemIn,
                }
                #[derive(Deserialize)]
                struct Tx {
                    operations: Vec<Op>,
                    #[serde(default)]
                    #[allow(dead_code)]
                    metadata: BTreeMap<String, serde_json::Value>,
                }
                let body = read_body(req, limit).await?;
                let tx: Tx = parse_json(&body)?;
                let mut ops = vec![];
                for op in tx.operations {
                    match op.operation.as_str() {
                        "upsert" => ops.push(TxItem::Upsert(op.request.into_save())),
                        "delete" => ops.push(TxItem::Delete(DeleteItem {
                            key: op.request.key,
                            etag: op.request.etag,
                            concurrency: op.request.options.concurrency,
                        })),
                        other => {
                            return Err(ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "ERR_NOT_SUPPORTED_STATE_OPERATION",
                                format!("operation type {other} not supported"),
                            ))
                        }
                    }
                }
                self.rt.transact_state(&store, ops).await?;
                Ok(no_content())
            }
            ("v1.0", ["state", store, key @ ..], &Method::GET) if !key.is_empty() => {
                let store = percent_decode_cow(store);
                let key = decode_rest(key);
                // Nothing below reads the request: its head goes back for the reply to use.
                spare::recycle_request(req);
                match self.rt.get_state(&store, &key).await? {
                    None => Ok(no_content()),
                    Some(item) => {
                        let mut r = spare::response(full(item.value));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        if let Ok(v) = http::HeaderValue::from_str(&item.etag) {
                            r.headers_mut().insert(http::header::ETAG, v);
                        }
                        if let Some(exp) = item.expires_unix_ms {
                            if let Ok(v) = http::HeaderValue::from_str(
                                &crate::cloudevents::rfc3339((exp / 1000) as i64),
                            ) {
                                r.headers_mut().insert("metadata.ttlexpiretime", v);
                            }
                        }
                        Ok(r)
                    }
                }
            }
            ("v1.0", ["state", store, key @ ..], &Method::DELETE) if !key.is_empty() => {
                let store = percent_decode_cow(store);
                let key = decode_rest(key);
                let etag = req
                    .headers()
                    .get(http::header::IF_MATCH)
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.trim_matches('"').to_string());
                self.rt
                    .delete_state(
                        &store,
                        DeleteItem {
                            key: key.into_owned(),
                            etag,
                            concurrency: query_param(q, "concurrency").unwrap_or_default(),
                        },
                    )
                    .await?;
                Ok(no_content())
            }
            ("v1.0", ["publish", pubsub, topic @ ..], &Method::POST) => {
                let pubsub = percent_decode_cow(pubsub);
                let topic = decode_rest(topic);
                self.rt.pubsub(&pubsub)?;
                let h = req.headers().clone();
                let ct = h
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/json")
                    .to_string();
                let body = read_body(req, limit).await?;
                let tp = h
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let ts = h
                    .get("tracestate")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                self.rt
                    .publish(
                        &pubsub,
                        &topic,
                        &body,
                        &ct,
                        &query_metadata(q),
                        TraceContext {
                            parent: tp.as_deref(),
                            state: ts.as_deref(),
                        },
                    )
                    .await?;
                Ok(no_content())
            }
            ("v1.0-alpha1", ["publish", "bulk", pubsub, topic @ ..], &Method::POST) => {
                let pubsub = percent_decode_cow(pubsub);
                let topic = decode_rest(topic);
                self.rt.pubsub(&pubsub)?;
                #[derive(Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Entry {
                    entry_id: String,
                    event: serde_json::Value,
                    content_type: String,
                    #[serde(default)]
                    metadata: BTreeMap<String, String>,
                }
                let meta = query_metadata(q);
                let body = read_body(req, limit).await?;
                let entries: Vec<Entry> = parse_json(&body)?;
                let mut failed = vec![];
                for e in entries {
                    let data = match (
                        &e.event,
                        e.content_type.starts_with("application/json")
                            || e.content_type.ends_with("+json"),
                    ) {
                        (serde_json::Value::String(s), false) => Bytes::from(s.clone()),
                        (v, _) => Bytes::from(v.to_string()),
                    };
                    let mut m = meta.clone();
                    m.extend(e.metadata);
                    if let Err(err) = self
                        .rt
                        .publish(
                            &pubsub,
                            &topic,
                            &data,
                            &e.content_type,
                            &m,
                            Default::default(),
                        )
                        .await
                    {
                        failed
                            .push(serde_json::json!({"entryId": e.entry_id, "error": err.message}));
                    }
                }
                if failed.is_empty() {
                    Ok(no_content())
                } else {
                    Ok(json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &serde_json::json!({"failedEntries": failed, "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE"}),
                    ))
                }
            }
            ("v1.0", ["invoke", app_id, "method", ..], _) => {
                let app_id = percent_decode(app_id);
                let prefix = format!("/v1.0/invoke/{}/method/", segs[1]);
                let mut method_q = path.strip_prefix(&prefix).unwrap_or("").to_string();
                if let Some(q) = q {
                    method_q = format!("{method_q}?{q}");
                }
                self.rt
                    .invoke_with(&app_id, &method_q, req, Some(next))
                    .await
            }
            ("v1.0", ["metadata"], &Method::GET) => {
                Ok(json_response(StatusCode::OK, &self.metadata()))
            }
            ("v1.0", ["metadata", key], &Method::PUT) => {
                let key = percent_decode(key);
                let body = read_body(req, limit).await?;
                self.rt
                    .set_extended(key, String::from_utf8_lossy(&body).into_owned());
                Ok(no_content())
            }
            ("v1.0", ["shutdown"], &Method::POST) => {
                tracing::info!("shutdown requested through the API");
                self.rt.shutdown.notify_one();
                Ok(no_content())
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "ERR_NOT_FOUND",
                format!("{method} {path} is not a Dapr API this sidecar serves"),
            )),
        }
    }

    pub fn metadata(&self) -> serde_json::Value {
        crate::metadata_json(&self.rt)
    }
}

impl HttpFilter for RuntimeApiFilter {
    fn call<'a>(&'a self, req: Request<Body>, next: Next<'a>) -> BoxFuture<'a, Response<Body>> {
        mecha_filters::boxed_in_place(|| async move {
            let path = req.uri().path();
            let is_grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if is_grpc && path.starts_with(crate::grpc::SERVICE_PREFIX) {
                return crate::grpc::serve(self.rt.clone(), req, next).await;
            }
            // The header form of invocation: any path, `dapr-app-id` names the target.
            let header_app = req
                .headers()
                .get("dapr-app-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let is_api = path.starts_with("/v1.0/") || path.starts_with("/v1.0-alpha1/");
            if !is_api && header_app.is_none() {
                return next.run(req).await;
            }
            if !self.authorized(&req, path) {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "ERR_UNAUTHORIZED",
                    "invalid api token",
                )
                .to_response();
            }
            // The invocation fast path: `/v1.0/invoke/{app-id}/method/…` needs no split into
            // segments and no copies of the path; the request keeps its URI (see
            // `Runtime::invoke_api`).
            if let Some((app_id, method_start)) = invoke_target(path) {
                let app_id = percent_decode_cow(app_id).into_owned();
                return self
                    .rt
                    .invoke_api(&app_id, method_start, req, Some(next))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::debug!(error = %e, "runtime API error");
                        e.to_response()
                    });
            }
            let result = match header_app {
                Some(app) if !is_api => {
                    let mq = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str().trim_start_matches('/').to_string())
                        .unwrap_or_default();
                    self.rt.invoke_with(&app, &mq, req, Some(next)).await
                }
                _ => self.handle(req, next).await,
            };
            result.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "runtime API error");
                e.to_response()
            })
        })
    }
}
