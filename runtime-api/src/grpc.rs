//! The gRPC API `dapr.proto.runtime.v1.Dapr` (protos from the `dapr` crate), served on the Dapr
//! gRPC port and, by content type, through the HTTP filter. Methods are dispatched by path to
//! tonic's unary handler, so only the methods mecha implements need code; every other method
//! answers `UNIMPLEMENTED`, as a gRPC server must.

use crate::error::ApiError;
use crate::runtime::Runtime;
use crate::state_api::{DeleteItem, SaveItem, TxItem};
use bytes::Bytes;
use dapr::dapr::proto::common::v1 as common;
use dapr::dapr::proto::runtime::v1 as rt;
use http_body_util::BodyExt;
use mecha_filters::{Body, BoxError, Next};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const SERVICE_PREFIX: &str = "/dapr.proto.runtime.v1.Dapr/";

fn st(e: ApiError) -> Status {
    e.to_status()
}

fn concurrency(o: &Option<common::StateOptions>) -> String {
    match o.as_ref().map(|o| o.concurrency) {
        Some(1) => "first-write".into(),
        _ => String::new(),
    }
}

fn save_item(s: common::StateItem) -> SaveItem {
    SaveItem {
        concurrency: concurrency(&s.options),
        key: s.key,
        value: Bytes::from(s.value),
        etag: s.etag.map(|e| e.value),
        metadata: s.metadata.into_iter().collect(),
    }
}

fn check_token(rt: &Runtime, md: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    match &rt.opts.api_token {
        None => Ok(()),
        Some(t) => match md.get("dapr-api-token").and_then(|v| v.to_str().ok()) {
            Some(v) if v == t => Ok(()),
            _ => Err(Status::unauthenticated(
                "authentication error: api token mismatch",
            )),
        },
    }
}

/// Runs one unary method: decodes `M1`, checks the API token, calls `f`, encodes `M2`.
async fn unary<M1, M2, F, Fut, B>(
    rt: Arc<Runtime>,
    req: http::Request<B>,
    f: F,
) -> http::Response<tonic::body::Body>
where
    M1: prost::Message + Default + Send + 'static,
    M2: prost::Message + Default + Send + 'static,
    F: FnOnce(Arc<Runtime>, M1) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = Result<M2, Status>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let svc = tower::service_fn(move |r: Request<M1>| {
        let rt = rt.clone();
        let f = f.clone();
        async move {
            check_token(&rt, r.metadata())?;
            f(rt, r.into_inner()).await.map(Response::new)
        }
    });
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<M2, M1>::default());
    grpc.unary(svc, req).await
}

/// `InvokeService`, with the rest of the filter chain when the call arrived through the HTTP
/// filter: a remote app id then goes through the connection manager's routes, as HTTP invocation
/// does. `Next` is not `Clone`, so the one-shot service takes it out of a slot.
async fn unary_invoke<B>(
    rt: Arc<Runtime>,
    req: http::Request<B>,
    next: Option<Next<'_>>,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let mut slot = Some((rt, next));
    let svc = tower::service_fn(move |r: Request<rt::InvokeServiceRequest>| {
        let taken = slot.take();
        async move {
            let Some((rt, next)) = taken else {
                return Err(Status::internal(
                    "InvokeService called twice for one request",
                ));
            };
            check_token(&rt, r.metadata())?;
            let (md, _, msg) = r.into_parts();
            invoke(rt, md, msg, next).await.map(Response::new)
        }
    });
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
        common::InvokeResponse,
        rt::InvokeServiceRequest,
    >::default());
    grpc.unary(svc, req).await
}

/// Serves one gRPC request to the Dapr service. `next` is the rest of the HTTP filter chain
/// when the request came through the runtime API filter (the Dapr gRPC port is such a listener
/// in `mecha run`), used by `InvokeService` to route remote app ids through the mesh.
pub async fn serve_grpc<B>(
    rt: Arc<Runtime>,
    req: http::Request<B>,
    next: Option<Next<'_>>,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let method = req
        .uri()
        .path()
        .strip_prefix(SERVICE_PREFIX)
        .unwrap_or("")
        .to_string();
    match method.as_str() {
        "GetState" => unary(rt, req, |rt, r: rt::GetStateRequest| async move {
            let item = rt.get_state(&r.store_name, &r.key).await.map_err(st)?;
            Ok(match item {
                Some(i) => rt::GetStateResponse {
                    data: i.value.to_vec(),
                    etag: i.etag,
                    metadata: Default::default(),
                },
                None => rt::GetStateResponse::default(),
            })
        })
        .await,
        "GetBulkState" => unary(rt, req, |rt, r: rt::GetBulkStateRequest| async move {
            let items = rt
                .get_bulk_state(&r.store_name, r.keys, r.parallelism.max(1) as usize)
                .await
                .map_err(st)?;
            Ok(rt::GetBulkStateResponse {
                items: items
                    .into_iter()
                    .map(|(key, res)| match res {
                        Ok(Some(i)) => rt::BulkStateItem { key, data: i.value.to_vec(), etag: i.etag, ..Default::default() },
                        Ok(None) => rt::BulkStateItem { key, ..Default::default() },
                        Err(error) => rt::BulkStateItem { key, error, ..Default::default() },
                    })
                    .collect(),
            })
        })
        .await,
        "SaveState" => unary(rt, req, |rt, r: rt::SaveStateRequest| async move {
            rt.save_state(&r.store_name, r.states.into_iter().map(save_item).collect())
                .await
                .map_err(st)
        })
        .await,
        "DeleteState" => unary(rt, req, |rt, r: rt::DeleteStateRequest| async move {
            let item = DeleteItem {
                concurrency: concurrency(&r.options),
                key: r.key,
                etag: r.etag.map(|e| e.value),
            };
            rt.delete_state(&r.store_name, item).await.map_err(st)
        })
        .await,
        "DeleteBulkState" => unary(rt, req, |rt, r: rt::DeleteBulkStateRequest| async move {
            for s in r.states {
                let item = DeleteItem {
                    concurrency: concurrency(&s.options),
                    key: s.key,
                    etag: s.etag.map(|e| e.value),
                };
                rt.delete_state(&r.store_name, item).await.map_err(st)?;
            }
            Ok(())
        })
        .await,
        "ExecuteStateTransaction" => unary(rt, req, |rt, r: rt::ExecuteStateTransactionRequest| async move {
            let mut ops = vec![];
            for op in r.operations {
                let Some(item) = op.request else {
                    return Err(Status::invalid_argument("ERR_MALFORMED_REQUEST: a transaction operation needs a request"));
                };
                ops.push(match op.operation_type.as_str() {
                    "upsert" => TxItem::Upsert(save_item(item)),
                    "delete" => TxItem::Delete(DeleteItem {
                        concurrency: concurrency(&item.options),
                        key: item.key,
                        etag: item.etag.map(|e| e.value),
                    }),
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "ERR_NOT_SUPPORTED_STATE_OPERATION: operation type {other} not supported"
                        )))
                    }
                });
            }
            rt.transact_state(&r.store_name, ops).await.map_err(st)
        })
        .await,
        "PublishEvent" => unary(rt, req, |rt, r: rt::PublishEventRequest| async move {
            let meta: BTreeMap<String, String> = r.metadata.into_iter().collect();
            rt.publish(&r.pubsub_name, &r.topic, &r.data, &r.data_content_type, &meta, Default::default())
                .await
                .map_err(st)
        })
        .await,
        "BulkPublishEventAlpha1" | "BulkPublishEvent" => {
            unary(rt, req, |rt, r: rt::BulkPublishRequest| async move {
                rt.pubsub(&r.pubsub_name).map_err(st)?;
                let base: BTreeMap<String, String> = r.metadata.into_iter().collect();
                let mut failed = vec![];
                for e in r.entries {
                    let mut m = base.clone();
                    m.extend(e.metadata);
                    if let Err(err) = rt.publish(&r.pubsub_name, &r.topic, &e.event, &e.content_type, &m, Default::default()).await {
                        failed.push(rt::BulkPublishResponseFailedEntry { entry_id: e.entry_id, error: err.message });
                    }
                }
                Ok(rt::BulkPublishResponse { failed_entries: failed })
            })
            .await
        }
        "InvokeService" => unary_invoke(rt, req, next).await,
        "GetMetadata" => unary(rt, req, |rt, _r: rt::GetMetadataRequest| async move {
            Ok(metadata(&rt))
        })
        .await,
        "SetMetadata" => unary(rt, req, |rt, r: rt::SetMetadataRequest| async move {
            rt.set_extended(r.key, r.value);
            Ok(())
        })
        .await,
        "Shutdown" => unary(rt, req, |rt, _r: rt::ShutdownRequest| async move {
            rt.shutdown.notify_one();
            Ok(())
        })
        .await,
        _ => Status::unimplemented(format!("method {method} is not implemented by mecha")).into_http(),
    }
}

fn verb(v: i32) -> http::Method {
    match v {
        1 => http::Method::GET,
        2 => http::Method::HEAD,
        4 => http::Method::PUT,
        5 => http::Method::DELETE,
        6 => http::Method::CONNECT,
        7 => http::Method::OPTIONS,
        8 => http::Method::TRACE,
        9 => http::Method::PATCH,
        _ => http::Method::POST,
    }
}

async fn invoke(
    rt: Arc<Runtime>,
    md: tonic::metadata::MetadataMap,
    r: rt::InvokeServiceRequest,
    next: Option<Next<'_>>,
) -> Result<common::InvokeResponse, Status> {
    let msg = r
        .message
        .ok_or_else(|| Status::invalid_argument("ERR_MALFORMED_REQUEST: message is required"))?;
    if (r.id == rt.app_id() || r.id.is_empty())
        && rt.opts.app_protocol == crate::app_channel::AppProtocol::Grpc
    {
        // A gRPC app gets the InvokeRequest as sent, as Dapr forwards it to OnInvoke.
        return rt.app_on_invoke(msg, &md).await;
    }
    let ext = msg.http_extension.unwrap_or_default();
    let mut mq = msg.method.trim_start_matches('/').to_string();
    if !ext.querystring.is_empty() {
        mq = format!("{mq}?{}", ext.querystring);
    }
    let data = msg.data.map(|a| a.value).unwrap_or_default();
    let mut req = http::Request::builder()
        .method(verb(ext.verb))
        .uri("/")
        .header(http::header::HOST, "localhost")
        .body(mecha_filters::full(Bytes::from(data)))
        .map_err(|e| Status::internal(e.to_string()))?;
    if !msg.content_type.is_empty() {
        if let Ok(v) = http::HeaderValue::from_str(&msg.content_type) {
            req.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
    }
    // The caller's metadata travels as headers (traceparent, the app's own headers), minus
    // gRPC's transport headers and the caller's API token, as Dapr forwards it.
    for kv in md.iter() {
        if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
            let name = k.as_str();
            if name.starts_with("grpc-")
                || name.starts_with(':')
                || matches!(
                    name,
                    "dapr-api-token" | "te" | "content-type" | "user-agent" | "host"
                )
            {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(v.as_encoded_bytes()),
            ) {
                req.headers_mut().append(n, v);
            }
        }
    }
    let resp = rt.invoke_with(&r.id, &mq, req, next).await.map_err(st)?;
    let status = resp.status();
    let ct = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Status::internal(format!("ERR_DIRECT_INVOKE: {e}")))?
        .to_bytes();
    if !status.is_success() {
        // Dapr maps a non-2xx app answer to a gRPC error carrying the HTTP status.
        return Err(Status::unknown(format!(
            "ERR_DIRECT_INVOKE: app answered HTTP {}: {}",
            status.as_u16(),
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(common::InvokeResponse {
        data: Some(prost_types::Any {
            type_url: String::new(),
            value: body.to_vec(),
        }),
        content_type: ct,
    })
}

fn metadata(r: &Runtime) -> rt::GetMetadataResponse {
    rt::GetMetadataResponse {
        id: r.app_id().to_string(),
        registered_components: r
            .components()
            .iter()
            .map(|(name, ty, version, caps)| rt::RegisteredComponents {
                name: name.clone(),
                r#type: ty.clone(),
                version: version.clone(),
                capabilities: caps.clone(),
            })
            .collect(),
        extended_metadata: r.extended_metadata().into_iter().collect(),
        subscriptions: r
            .subscriptions()
            .into_iter()
            .map(|s| rt::PubsubSubscription {
                pubsub_name: s.pubsub,
                topic: s.topic,
                metadata: s.metadata.into_iter().collect(),
                rules: Some(rt::PubsubSubscriptionRules {
                    rules: s
                        .routes
                        .rules
                        .iter()
                        .map(|x| rt::PubsubSubscriptionRule {
                            r#match: x.match_.clone(),
                            path: x.path.clone(),
                        })
                        .chain(s.routes.default.iter().map(|p| rt::PubsubSubscriptionRule {
                            r#match: String::new(),
                            path: p.clone(),
                        }))
                        .collect(),
                }),
                dead_letter_topic: s.dead_letter_topic.unwrap_or_default(),
                r#type: if s.kind == "declarative" { 1 } else { 2 },
            })
            .collect(),
        runtime_version: crate::runtime::RUNTIME_VERSION.to_string(),
        ..Default::default()
    }
}

/// The filter's entry point for gRPC arriving on an HTTP listener.
pub fn serve<'a>(
    rt: Arc<Runtime>,
    req: http::Request<Body>,
    next: Next<'a>,
) -> mecha_filters::BoxFuture<'a, http::Response<Body>> {
    // Built in a pooled block: the future spans every method's (several KiB), and boxing it
    // moved it into the box and cost a large allocation per call.
    mecha_filters::boxed_in_place(move || async move {
        serve_grpc(rt, req, Some(next))
            .await
            .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
    })
}

/// Runs the gRPC API on its own port (HTTP/2 cleartext) until `stop` fires, outside any filter
/// chain: `InvokeService` to another app id then reaches it by its cluster or DNS only, without
/// routes. `mecha run` does not use it: it serves the Dapr gRPC port as a proxy listener whose
/// chain holds the runtime API filter, so gRPC invocation gets routes like HTTP invocation.
pub async fn run_server(
    rt: Arc<Runtime>,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let rt = rt.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let rt = rt.clone();
                    async move {
                        if !req.uri().path().starts_with(SERVICE_PREFIX) {
                            return Ok::<_, Infallible>(
                                Status::unimplemented("unknown service").into_http(),
                            );
                        }
                        Ok::<_, Infallible>(serve_grpc(rt, req, None).await)
                    }
                });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http2_only()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "gRPC connection ended");
            }
        });
    }
}
