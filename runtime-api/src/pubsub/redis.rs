//! `pubsub.redis`: Redis Streams, as Dapr's component uses them. A topic is a stream; messages
//! are `XADD topic [MAXLEN ~ maxLenApprox] * data <payload>`. Each app is a consumer group
//! (`consumerID`, default the app id); a message is `XACK`ed only after the handler succeeded.
//! Messages left pending — the handler failed, or mecha died mid-delivery — are reclaimed with
//! `XAUTOCLAIM` once idle longer than `processingTimeout`, checked every `redeliverInterval`.
//! On start, this consumer's own pending entries are read again first, so a restarted sidecar
//! finishes what it had in flight.

use super::{Message, MessageHandler, PubSub, SubscribeControl};
use crate::component::Metadata;
use crate::error::ComponentError;
use crate::state::redis::{client_from_metadata, connect, redis_err};
use bytes::Bytes;
use mecha_filters::BoxFuture;
use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamMaxlen, StreamReadOptions,
    StreamReadReply,
};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Settings {
    pub consumer_group: String,
    pub consumer_name: String,
    pub processing_timeout: Duration,
    pub redeliver_interval: Duration,
    pub max_len_approx: Option<usize>,
    pub concurrency: usize,
}

pub struct RedisPubSub {
    client: redis::Client,
    conn: ConnectionManager,
    settings: Settings,
}

impl RedisPubSub {
    pub async fn new(meta: &Metadata, app_id: &str) -> Result<Self, ComponentError> {
        let client = client_from_metadata(meta)?;
        let secs = Duration::from_secs(1);
        let d = |n: &str, default: Duration| -> Result<Duration, ComponentError> {
            Ok(meta
                .get_duration(n, secs)
                .map_err(ComponentError::Invalid)?
                .unwrap_or(default))
        };
        let group = meta
            .get("consumerID")
            .filter(|c| !c.is_empty())
            .unwrap_or(app_id)
            .to_string();
        let settings = Settings {
            // One stable consumer name per app id: a restarted sidecar re-reads its own pending
            // entries first.
            consumer_name: group.clone(),
            consumer_group: group,
            processing_timeout: d("processingTimeout", Duration::from_secs(60))?,
            redeliver_interval: d("redeliverInterval", Duration::from_secs(60))?,
            max_len_approx: meta
                .get_i64("maxLenApprox")
                .map_err(ComponentError::Invalid)?
                .filter(|n| *n > 0)
                .map(|n| n as usize),
            concurrency: meta
                .get_i64("concurrency")
                .map_err(ComponentError::Invalid)?
                .filter(|n| *n > 0)
                .unwrap_or(10) as usize,
        };
        let conn = connect(client.clone()).await?;
        Ok(Self {
            client,
            conn,
            settings,
        })
    }
}

impl PubSub for RedisPubSub {
    fn publish(
        &self,
        topic: &str,
        data: Bytes,
        _metadata: &BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<(), ComponentError>> {
        let topic = topic.to_string();
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let items = [("data", data.as_ref())];
            let r: redis::RedisResult<Option<String>> = match self.settings.max_len_approx {
                Some(n) => {
                    conn.xadd_maxlen(&topic, StreamMaxlen::Approx(n), "*", &items)
                        .await
                }
                None => conn.xadd(&topic, "*", &items).await,
            };
            r.map(|_| ()).map_err(redis_err)
        })
    }

    fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        ctl: SubscribeControl,
    ) -> BoxFuture<'_, Result<(), ComponentError>> {
        let topic = topic.to_string();
        Box::pin(async move {
            let s = self.settings.clone();
            let mut conn = self.conn.clone();
            let created: redis::RedisResult<()> = conn
                .xgroup_create_mkstream(&topic, &s.consumer_group, "0")
                .await;
            if let Err(e) = created {
                if e.code() != Some("BUSYGROUP") {
                    return Err(redis_err(e));
                }
            }
            // A dedicated connection for the blocking reads, so they never hold up publishes.
            let read_conn = connect(self.client.clone()).await?;
            let consumer = Arc::new(Consumer {
                topic,
                settings: s,
                conn: self.conn.clone(),
                handler,
                sem: Arc::new(tokio::sync::Semaphore::new(self.settings.concurrency)),
                in_flight: parking_lot::Mutex::new(std::collections::HashSet::new()),
            });
            tokio::spawn(consumer.clone().read_loop(read_conn, ctl.clone()));
            tokio::spawn(consumer.reclaim_loop(ctl));
            Ok(())
        })
    }
}

struct Consumer {
    topic: String,
    settings: Settings,
    conn: ConnectionManager,
    handler: Arc<dyn MessageHandler>,
    sem: Arc<tokio::sync::Semaphore>,
    /// Entry ids being delivered now, so the reclaim loop does not deliver them twice.
    in_flight: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl Consumer {
    async fn read_loop(self: Arc<Self>, mut conn: ConnectionManager, mut ctl: SubscribeControl) {
        let mut stop = ctl.stop.clone();
        let s = &self.settings;
        // "0" first: this consumer's pending entries from a previous run; then ">" for new ones.
        let mut cursor = "0".to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            // Paused (app unhealthy): no XREADGROUP, so new entries stay in the stream and
            // pending ones stay pending until the app is healthy again.
            if !ctl.wait_active().await {
                return;
            }
            let opts = StreamReadOptions::default()
                .group(&s.consumer_group, &s.consumer_name)
                .count(s.concurrency.max(1))
                .block(1000);
            let keys = [self.topic.as_str()];
            let ids = [cursor.as_str()];
            let read = tokio::select! {
                r = conn.xread_options::<_, _, StreamReadReply>(&keys, &ids, &opts) => r,
                _ = stop.changed() => return,
                // Paused during the blocking read: abandon it. Entries Redis handed to this
                // consumer meanwhile are in its pending list, read again below ("0").
                r = ctl.active.changed() => {
                    // The runtime (the sender) is gone: shut down.
                    if r.is_err() {
                        return;
                    }
                    cursor = "0".to_string();
                    continue;
                }
            };
            match read {
                Ok(reply) => {
                    backoff = Duration::from_millis(100);
                    let entries: Vec<StreamId> =
                        reply.keys.into_iter().flat_map(|k| k.ids).collect();
                    if !*ctl.active.borrow() {
                        // Paused as the read returned: not delivered now; they stay pending for
                        // this consumer and are read from its pending list on resume.
                        cursor = "0".to_string();
                        continue;
                    }
                    if cursor != ">" {
                        match entries.last() {
                            Some(last) => cursor = last.id.clone(),
                            None => cursor = ">".to_string(),
                        }
                    }
                    for e in entries {
                        self.clone().dispatch(e).await;
                    }
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // The stream was deleted under us: recreate the group.
                        let _: redis::RedisResult<()> = conn
                            .xgroup_create_mkstream(&self.topic, &s.consumer_group, "0")
                            .await;
                    }
                    tracing::warn!(topic = %self.topic, error = %e, "redis pubsub read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn reclaim_loop(self: Arc<Self>, mut ctl: SubscribeControl) {
        let mut stop = ctl.stop.clone();
        let s = &self.settings;
        let mut tick = tokio::time::interval(s.redeliver_interval.max(Duration::from_millis(50)));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = stop.changed() => return,
            }
            // No redelivery to an unhealthy app either.
            if !ctl.wait_active().await {
                return;
            }
            let mut conn = self.conn.clone();
            let mut start = "0-0".to_string();
            loop {
                let r: redis::RedisResult<StreamAutoClaimReply> = conn
                    .xautoclaim_options(
                        &self.topic,
                        &s.consumer_group,
                        &s.consumer_name,
                        s.processing_timeout.as_millis() as u64,
                        &start,
                        StreamAutoClaimOptions::default().count(100),
                    )
                    .await;
                match r {
                    Ok(reply) => {
                        for e in reply.claimed {
                            self.clone().dispatch(e).await;
                        }
                        if reply.next_stream_id == "0-0" {
                            break;
                        }
                        start = reply.next_stream_id;
                    }
                    Err(e) => {
                        tracing::warn!(topic = %self.topic, error = %e, "redis pubsub reclaim failed");
                        break;
                    }
                }
            }
        }
    }

    /// Delivers one entry in its own task (bounded by `concurrency`), acking on success.
    async fn dispatch(self: Arc<Self>, e: StreamId) {
        if !self.in_flight.lock().insert(e.id.clone()) {
            return;
        }
        let Ok(permit) = self.sem.clone().acquire_owned().await else {
            return;
        };
        tokio::spawn(async move {
            let data = match e.map.get("data") {
                Some(redis::Value::BulkString(b)) => Bytes::copy_from_slice(b),
                Some(redis::Value::SimpleString(s)) => Bytes::copy_from_slice(s.as_bytes()),
                _ => Bytes::new(),
            };
            let msg = Message {
                topic: self.topic.clone(),
                data,
                id: e.id.clone(),
            };
            if self.handler.handle(msg).await.is_ok() {
                let mut conn = self.conn.clone();
                let acked: redis::RedisResult<usize> = conn
                    .xack(&self.topic, &self.settings.consumer_group, &[&e.id])
                    .await;
                if let Err(err) = acked {
                    // Left pending: it will be redelivered after processingTimeout.
                    tracing::warn!(topic = %self.topic, id = %e.id, error = %err, "XACK failed");
                }
            }
            self.in_flight.lock().remove(&e.id);
            drop(permit);
        });
    }
}
