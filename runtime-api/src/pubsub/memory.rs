//! `pubsub.in-memory`: topics inside this process. Every subscription of a topic gets every
//! message; each subscription delivers up to `concurrency` messages at once. Nothing survives a
//! restart, and a message whose delivery finally fails is logged and lost (as in Dapr).

use super::{Message, MessageHandler, PubSub, SubscribeControl};
use crate::error::ComponentError;
use bytes::Bytes;
use mecha_filters::BoxFuture;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::mpsc;

pub struct MemoryPubSub {
    topics: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Message>>>>,
    concurrency: usize,
}

impl MemoryPubSub {
    pub fn new(concurrency: usize) -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            concurrency: concurrency.max(1),
        }
    }
}

impl PubSub for MemoryPubSub {
    fn publish(
        &self,
        topic: &str,
        data: Bytes,
        _metadata: &BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<(), ComponentError>> {
        let mut topics = self.topics.lock();
        if let Some(subs) = topics.get_mut(topic) {
            let msg = Message {
                topic: topic.to_string(),
                data,
                id: uuid::Uuid::new_v4().to_string(),
            };
            // Drop subscribers whose consumer task ended.
            subs.retain(|tx| tx.send(msg.clone()).is_ok());
        }
        Box::pin(async { Ok(()) })
    }

    fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        mut ctl: SubscribeControl,
    ) -> BoxFuture<'_, Result<(), ComponentError>> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        self.topics
            .lock()
            .entry(topic.to_string())
            .or_default()
            .push(tx);
        let sem = Arc::new(tokio::sync::Semaphore::new(self.concurrency));
        tokio::spawn(async move {
            let mut stop = ctl.stop.clone();
            loop {
                // Paused (app unhealthy): published messages wait in the channel.
                if !ctl.wait_active().await {
                    return;
                }
                let msg = tokio::select! {
                    m = rx.recv() => match m { Some(m) => m, None => return },
                    _ = stop.changed() => return,
                    // Paused while idle: go back to waiting before taking the next message
                    // (or end, when the runtime holding the sender is gone).
                    r = ctl.active.changed() => match r {
                        Ok(()) => continue,
                        Err(_) => return,
                    },
                };
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    return;
                };
                let h = handler.clone();
                tokio::spawn(async move {
                    let id = msg.id.clone();
                    let topic = msg.topic.clone();
                    if h.handle(msg).await.is_err() {
                        tracing::warn!(%topic, %id, "in-memory pubsub: message not delivered; dropped");
                    }
                    drop(permit);
                });
            }
        });
        Box::pin(async { Ok(()) })
    }
}
