//! Delivery of subscribed messages to the app, over HTTP (`POST <route>` with a CloudEvent) or
//! gRPC (`AppCallback.OnTopicEvent`), one message at a time or — with `bulkSubscribe.enabled` —
//! in batches (`POST <route>` with Dapr's bulk envelope, or `OnBulkTopicEvent`).
//!
//! The app's answer decides, as in Dapr: SUCCESS acknowledges; RETRY, an error status or a
//! transport failure redelivers per the component's retry policy and then goes to the dead-letter
//! topic (or stays unacknowledged for the broker to redeliver); DROP and HTTP 404 acknowledge
//! after sending the message to the dead-letter topic when one is configured; a gRPC app without
//! the method (`UNIMPLEMENTED`) acknowledges with a warning.

use crate::app_channel::{self, AppProtocol};
use crate::cloudevents;
use crate::component::Subscription;
use crate::matcher::Expr;
use crate::pubsub::{Message, MessageHandler};
use crate::runtime::{RetryPolicy, Runtime};
use base64::Engine as _;
use bytes::Bytes;
use dapr::dapr::proto::runtime::v1 as rtpb;
use http::StatusCode;
use mecha_filters::BoxFuture;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Dapr's defaults for a bulk subscription without explicit limits.
const BULK_DEFAULT_MAX_MESSAGES: usize = 100;
const BULK_DEFAULT_MAX_AWAIT: Duration = Duration::from_millis(1000);
/// The CloudEvent type of Dapr's bulk envelope.
const BULK_EVENT_TYPE: &str = "com.dapr.event.sent.bulk";

/// The content type of a raw bulk entry whose message carries none (Dapr's default).
const RAW_CONTENT_TYPE: &str = "application/octet-stream";

/// A subscription with its route rules parsed.
pub(crate) struct CompiledSub {
    pub sub: Subscription,
    pub rules: Vec<(Expr, String)>,
    /// The subscription's `rawPayload` metadata: payloads are not CloudEvents.
    pub raw: bool,
}

impl CompiledSub {
    /// The path for an event: the first rule that matches, else the default. `None` means no
    /// route applies, and Dapr drops the event.
    fn route(&self, ev: &Value) -> Option<String> {
        self.rules
            .iter()
            .find(|(e, _)| e.eval(ev))
            .map(|(_, p)| p.clone())
            .or_else(|| self.sub.routes.default.clone())
    }
}

/// What the app's answer means for one message.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Success,
    /// DROP or HTTP 404: acknowledged, after the dead-letter topic when there is one.
    Drop,
    /// The app has no such gRPC method: acknowledged, nothing else (as Dapr).
    Discard,
    Retry(String),
}

fn http_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

/// Reads the app's answer body: `{"status": "SUCCESS"|"RETRY"|"DROP"}`, or empty / non-JSON =
/// success; an unknown status is retried (Dapr treats an unknown status as an error).
fn app_status(body: &[u8]) -> Outcome {
    #[derive(serde::Deserialize)]
    struct S {
        #[serde(default)]
        status: Option<String>,
    }
    let Ok(s) = serde_json::from_slice::<S>(body) else {
        return Outcome::Success;
    };
    match s.status.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("") | Some("SUCCESS") => Outcome::Success,
        Some("RETRY") => Outcome::Retry("app answered RETRY".into()),
        Some("DROP") => {
            tracing::warn!("app answered DROP; message dropped");
            Outcome::Drop
        }
        Some(other) => Outcome::Retry(format!("app answered unknown status {other}")),
    }
}

fn grpc_status(status: i32) -> Outcome {
    use rtpb::topic_event_response::TopicEventResponseStatus as S;
    match S::try_from(status) {
        Ok(S::Success) => Outcome::Success,
        Ok(S::Retry) => Outcome::Retry("app answered RETRY".into()),
        Ok(S::Drop) => {
            tracing::warn!("app answered DROP; message dropped");
            Outcome::Drop
        }
        Err(_) => Outcome::Retry(format!("app answered unknown status {status}")),
    }
}

/// Publishes a message that could not be delivered to the subscription's dead-letter topic.
/// `None` when the subscription has none.
async fn dead_letter(rt: &Runtime, sub: &CompiledSub, msg: &Message) -> Option<Result<(), ()>> {
    let dlt = sub
        .sub
        .dead_letter_topic
        .as_deref()
        .filter(|d| !d.is_empty())?;
    let Ok(ps) = rt.pubsub(&sub.sub.pubsub) else {
        return Some(Err(()));
    };
    Some(
        match ps
            .pubsub
            .publish(dlt, msg.data.clone(), &BTreeMap::new())
            .await
        {
            Ok(()) => {
                tracing::info!(topic = %msg.topic, dead_letter = %dlt, "message sent to the dead-letter topic");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, dead_letter = %dlt, "dead-letter publish failed");
                Err(())
            }
        },
    )
}

/// Single-message delivery of one subscription.
pub(crate) struct Delivery {
    pub rt: Weak<Runtime>,
    pub sub: Arc<CompiledSub>,
    pub retry: RetryPolicy,
}

/// One attempt at delivering one event.
async fn deliver_once(
    rt: &Runtime,
    sub: &CompiledSub,
    ev: &Map<String, Value>,
    body: &Bytes,
    topic: &str,
    path: &str,
) -> Outcome {
    match rt.opts.app_protocol {
        AppProtocol::Http => {
            let path = http_path(path);
            match rt
                .app_request(
                    http::Method::POST,
                    &path,
                    body.clone(),
                    Some(cloudevents::CE_CONTENT_TYPE),
                )
                .await
            {
                Ok((s, b)) if s.is_success() => app_status(&b),
                Ok((s, _)) if s == StatusCode::NOT_FOUND => {
                    tracing::warn!(%topic, %path, "app answered 404; message dropped");
                    Outcome::Drop
                }
                Ok((s, _)) => Outcome::Retry(format!("app answered {s}")),
                Err(e) => Outcome::Retry(e),
            }
        }
        AppProtocol::Grpc => {
            let req = match app_channel::topic_event_request(ev, topic, &sub.sub.pubsub, path) {
                Ok(r) => r,
                Err(e) => return Outcome::Retry(e),
            };
            let mut client = match rt.app_callback() {
                Ok(c) => c,
                Err(e) => return Outcome::Retry(e),
            };
            match client.on_topic_event(rt.grpc_request(req)).await {
                Ok(r) => grpc_status(r.into_inner().status),
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    tracing::warn!(%topic, "the app does not implement OnTopicEvent; message dropped");
                    Outcome::Discard
                }
                Err(s) => Outcome::Retry(format!("OnTopicEvent failed: {s}")),
            }
        }
    }
}

impl MessageHandler for Delivery {
    fn handle(&self, msg: Message) -> BoxFuture<'static, Result<(), ()>> {
        let rt = self.rt.clone();
        let sub = self.sub.clone();
        let retry = self.retry.clone();
        Box::pin(async move {
            let Some(rt) = rt.upgrade() else {
                return Err(());
            };
            let event = cloudevents::for_delivery(
                &msg.data,
                &msg.topic,
                &sub.sub.pubsub,
                rt.app_id(),
                sub.raw,
            );
            let ev_value = Value::Object(event);
            let Some(path) = sub.route(&ev_value) else {
                tracing::debug!(topic = %msg.topic, "no route matches the event; dropped as Dapr does");
                return dead_letter(&rt, &sub, &msg).await.unwrap_or(Ok(()));
            };
            let body = Bytes::from(ev_value.to_string());
            let Value::Object(event) = ev_value else {
                return Err(());
            };
            let mut attempt: u32 = 0;
            loop {
                match deliver_once(&rt, &sub, &event, &body, &msg.topic, &path).await {
                    Outcome::Success | Outcome::Discard => return Ok(()),
                    Outcome::Drop => return dead_letter(&rt, &sub, &msg).await.unwrap_or(Ok(())),
                    Outcome::Retry(why) => {
                        if retry.exhausted(attempt) {
                            tracing::warn!(topic = %msg.topic, id = %msg.id, reason = %why, "delivery failed after retries");
                            break;
                        }
                        tracing::debug!(topic = %msg.topic, reason = %why, attempt, "retrying delivery");
                        tokio::time::sleep(retry.delay(attempt)).await;
                        attempt += 1;
                    }
                }
            }
            // No dead-letter topic: leave the message unacknowledged for the broker.
            dead_letter(&rt, &sub, &msg).await.unwrap_or(Err(()))
        })
    }
}

/// A message waiting in a batch, and where its acknowledgement goes.
struct Pending {
    msg: Message,
    done: oneshot::Sender<Result<(), ()>>,
}

/// Bulk delivery of one subscription: the broker hands messages one by one (each `handle` call
/// waits for its own acknowledgement), a batcher task collects up to `maxMessagesCount` of them
/// or whatever arrived within `maxAwaitDurationMs` of the first, and sends the batch to the app
/// in one call per route path. A batch can only be as large as the number of messages the
/// broker has in flight at once (its `concurrency`).
pub(crate) struct BulkDelivery {
    tx: mpsc::UnboundedSender<Pending>,
}

impl BulkDelivery {
    pub fn start(
        rt: Weak<Runtime>,
        sub: Arc<CompiledSub>,
        retry: RetryPolicy,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let cfg = sub.sub.bulk_subscribe.clone().unwrap_or_default();
        let max_count = cfg
            .max_messages_count
            .filter(|n| *n > 0)
            .map(|n| n as usize)
            .unwrap_or(BULK_DEFAULT_MAX_MESSAGES);
        let max_await = cfg
            .max_await_duration_ms
            .filter(|n| *n > 0)
            .map(|n| Duration::from_millis(n as u64))
            .unwrap_or(BULK_DEFAULT_MAX_AWAIT);
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    p = rx.recv() => match p { Some(p) => p, None => return },
                    _ = stop.changed() => return,
                };
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + max_await;
                while batch.len() < max_count {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(p)) => batch.push(p),
                        Ok(None) | Err(_) => break,
                    }
                }
                tokio::spawn(deliver_batch(rt.clone(), sub.clone(), retry.clone(), batch));
            }
        });
        Self { tx }
    }
}

impl MessageHandler for BulkDelivery {
    fn handle(&self, msg: Message) -> BoxFuture<'static, Result<(), ()>> {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Pending { msg, done }).is_err() {
            return Box::pin(async { Err(()) });
        }
        // A batcher that stopped drops the sender: the message stays unacknowledged.
        Box::pin(async move { rx.await.unwrap_or(Err(())) })
    }
}

/// A batch entry: its id in the bulk request, the event, and the waiting broker message.
struct Entry {
    id: String,
    event: Map<String, Value>,
    pending: Pending,
}

async fn deliver_batch(
    rt: Weak<Runtime>,
    sub: Arc<CompiledSub>,
    retry: RetryPolicy,
    batch: Vec<Pending>,
) {
    let Some(rt) = rt.upgrade() else {
        for p in batch {
            let _ = p.done.send(Err(()));
        }
        return;
    };
    let mut by_path: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for p in batch {
        // Routing rules of a raw subscription see the wrapper event (Dapr matches the raw
        // string, on which rules over event fields never match: the default path either way).
        let event = cloudevents::for_delivery(
            &p.msg.data,
            &p.msg.topic,
            &sub.sub.pubsub,
            rt.app_id(),
            sub.raw,
        );
        let ev_value = Value::Object(event);
        match sub.route(&ev_value) {
            None => {
                tracing::debug!(topic = %p.msg.topic, "no route matches the event; dropped as Dapr does");
                let r = dead_letter(&rt, &sub, &p.msg).await.unwrap_or(Ok(()));
                let _ = p.done.send(r);
            }
            Some(path) => {
                let Value::Object(event) = ev_value else {
                    continue;
                };
                by_path.entry(path).or_default().push(Entry {
                    id: uuid::Uuid::new_v4().to_string(),
                    event,
                    pending: p,
                });
            }
        }
    }
    let jobs = by_path
        .into_iter()
        .map(|(path, entries)| deliver_path(&rt, &sub, &retry, path, entries));
    futures_util::future::join_all(jobs).await;
}

/// Delivers one path's entries, redelivering only the entries the app did not accept.
async fn deliver_path(
    rt: &Runtime,
    sub: &CompiledSub,
    retry: &RetryPolicy,
    path: String,
    mut entries: Vec<Entry>,
) {
    let mut attempt: u32 = 0;
    loop {
        let outcomes = bulk_once(rt, sub, &path, &entries).await;
        let mut again = vec![];
        for e in entries {
            match outcomes.get(&e.id) {
                Some(Outcome::Success) | Some(Outcome::Discard) => {
                    let _ = e.pending.done.send(Ok(()));
                }
                Some(Outcome::Drop) => {
                    let r = dead_letter(rt, sub, &e.pending.msg).await.unwrap_or(Ok(()));
                    let _ = e.pending.done.send(r);
                }
                Some(Outcome::Retry(_)) | None => again.push(e),
            }
        }
        if again.is_empty() {
            return;
        }
        if retry.exhausted(attempt) {
            tracing::warn!(topic = %sub.sub.topic, entries = again.len(), "bulk delivery failed after retries");
            for e in again {
                let r = dead_letter(rt, sub, &e.pending.msg)
                    .await
                    .unwrap_or(Err(()));
                let _ = e.pending.done.send(r);
            }
            return;
        }
        tracing::debug!(topic = %sub.sub.topic, entries = again.len(), attempt, "retrying bulk delivery");
        tokio::time::sleep(retry.delay(attempt)).await;
        attempt += 1;
        entries = again;
    }
}

/// One bulk call: the outcome per entry id (an entry the app did not answer is absent, which
/// means retry).
async fn bulk_once(
    rt: &Runtime,
    sub: &CompiledSub,
    path: &str,
    entries: &[Entry],
) -> HashMap<String, Outcome> {
    let all = |o: Outcome| entries.iter().map(|e| (e.id.clone(), o.clone())).collect();
    let topic = &sub.sub.topic;
    match rt.opts.app_protocol {
        AppProtocol::Http => {
            let envelope = serde_json::json!({
                "id": uuid::Uuid::new_v4().to_string(),
                "type": BULK_EVENT_TYPE,
                "topic": topic,
                "pubsubname": sub.sub.pubsub,
                "metadata": {},
                "entries": entries.iter().map(|e| if sub.raw {
                    // Dapr's raw bulk entry: the message bytes in base64, not a CloudEvent.
                    serde_json::json!({
                        "entryId": e.id,
                        "event": base64::engine::general_purpose::STANDARD
                            .encode(&e.pending.msg.data),
                        "metadata": {},
                        "contentType": RAW_CONTENT_TYPE,
                    })
                } else {
                    serde_json::json!({
                        "entryId": e.id,
                        "event": e.event,
                        "metadata": {},
                        "contentType": cloudevents::CE_CONTENT_TYPE,
                    })
                }).collect::<Vec<_>>(),
            });
            let path = http_path(path);
            match rt
                .app_request(
                    http::Method::POST,
                    &path,
                    Bytes::from(envelope.to_string()),
                    Some("application/json"),
                )
                .await
            {
                Ok((s, b)) if s.is_success() => bulk_http_statuses(&b, entries.len()),
                Ok((s, _)) if s == StatusCode::NOT_FOUND => {
                    tracing::warn!(%topic, %path, "app answered 404 to a bulk delivery; messages dropped");
                    all(Outcome::Discard)
                }
                Ok((s, _)) => all(Outcome::Retry(format!("app answered {s}"))),
                Err(e) => all(Outcome::Retry(e)),
            }
        }
        AppProtocol::Grpc => {
            let mut items = vec![];
            for e in entries {
                if sub.raw {
                    // Raw entries are the message bytes (`event.bytes`), as Dapr sends them.
                    items.push(app_channel::bulk_entry_raw(
                        &e.id,
                        &e.pending.msg.data,
                        RAW_CONTENT_TYPE,
                    ));
                    continue;
                }
                match app_channel::bulk_entry(&e.id, &e.event) {
                    Ok(i) => items.push(i),
                    // Left out of the call: absent from the answer, so retried.
                    Err(err) => {
                        tracing::warn!(entry = %e.id, error = %err, "bulk entry cannot be sent")
                    }
                }
            }
            let req = rtpb::TopicEventBulkRequest {
                id: uuid::Uuid::new_v4().to_string(),
                entries: items,
                metadata: Default::default(),
                topic: topic.clone(),
                pubsub_name: sub.sub.pubsub.clone(),
                r#type: BULK_EVENT_TYPE.to_string(),
                path: path.to_string(),
            };
            let ch = match rt.app_channel() {
                Ok(c) => c,
                Err(e) => return all(Outcome::Retry(e)),
            };
            let mut r = app_channel::callback_client(ch.clone())
                .on_bulk_topic_event(rt.grpc_request(req.clone()))
                .await;
            if matches!(&r, Err(s) if s.code() == tonic::Code::Unimplemented) {
                // Older SDKs only have the alpha service; Dapr falls back to it the same way.
                #[allow(deprecated)]
                let alpha = app_channel::callback_alpha_client(ch)
                    .on_bulk_topic_event_alpha1(rt.grpc_request(req))
                    .await;
                r = alpha;
            }
            match r {
                Ok(resp) => resp
                    .into_inner()
                    .statuses
                    .into_iter()
                    .map(|s| (s.entry_id, grpc_status(s.status)))
                    .collect(),
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    tracing::warn!(%topic, "the app implements neither OnBulkTopicEvent nor OnBulkTopicEventAlpha1; messages dropped");
                    all(Outcome::Discard)
                }
                Err(s) => all(Outcome::Retry(format!("OnBulkTopicEvent failed: {s}"))),
            }
        }
    }
}

/// The app's bulk answer `{"statuses": [{"entryId", "status"}]}`. A missing or empty status is a
/// retry (Dapr's rule for bulk answers); a body that is not that shape retries every entry.
fn bulk_http_statuses(body: &[u8], n: usize) -> HashMap<String, Outcome> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Item {
        entry_id: String,
        #[serde(default)]
        status: String,
    }
    #[derive(serde::Deserialize)]
    struct Resp {
        #[serde(default)]
        statuses: Vec<Item>,
    }
    let Ok(r) = serde_json::from_slice::<Resp>(body) else {
        tracing::warn!(
            entries = n,
            "the app's bulk answer is not {{\"statuses\": [...]}}; retrying every entry"
        );
        return HashMap::new();
    };
    r.statuses
        .into_iter()
        .map(|i| {
            let o = match i.status.to_ascii_uppercase().as_str() {
                "SUCCESS" => Outcome::Success,
                "DROP" => Outcome::Drop,
                "" | "RETRY" => Outcome::Retry("app answered RETRY".into()),
                other => Outcome::Retry(format!("app answered unknown status {other}")),
            };
            (i.entry_id, o)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_app_status() {
        assert_eq!(app_status(b""), Outcome::Success);
        assert_eq!(app_status(br#"{"status":"success"}"#), Outcome::Success);
        assert_eq!(app_status(br#"{"status":"DROP"}"#), Outcome::Drop);
        assert!(matches!(
            app_status(br#"{"status":"RETRY"}"#),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            app_status(br#"{"status":"MAYBE"}"#),
            Outcome::Retry(_)
        ));
    }

    #[test]
    fn bulk_statuses() {
        let m = bulk_http_statuses(
            br#"{"statuses":[{"entryId":"a","status":"SUCCESS"},{"entryId":"b","status":"DROP"},{"entryId":"c"}]}"#,
            3,
        );
        assert_eq!(m.get("a"), Some(&Outcome::Success));
        assert_eq!(m.get("b"), Some(&Outcome::Drop));
        assert!(matches!(m.get("c"), Some(Outcome::Retry(_))));
        assert!(bulk_http_statuses(b"nope", 3).is_empty());
    }
}
