//! Pub/sub brokers: the [`PubSub`] trait every component implements.
//!
//! A broker hands each message of a subscribed topic to a [`MessageHandler`] and acknowledges it
//! only when the handler returns `Ok` — the handler (the runtime's delivery to the app) returns
//! `Ok` once the app said SUCCESS or DROP, or the message went to the dead-letter topic. On `Err`
//! a broker that can redeliver (Redis Streams) keeps the message pending; the in-memory broker
//! logs the loss.

pub mod memory;
pub mod redis;

use crate::error::ComponentError;
use bytes::Bytes;
use mecha_filters::BoxFuture;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub data: Bytes,
    /// Broker-specific message id (stream entry id for Redis).
    pub id: String,
}

pub trait MessageHandler: Send + Sync + 'static {
    /// `Ok` acknowledges the message to the broker; `Err` leaves it for redelivery.
    fn handle(&self, msg: Message) -> BoxFuture<'static, Result<(), ()>>;
}

/// What a subscription's consumer loops watch: `stop` (true = shut down for good) and `active`
/// (false = paused, Dapr's reaction to an unhealthy app: stop taking new work, resume when the app
/// is healthy again). Both senders live in the runtime; a closed channel ends the consumer.
#[derive(Clone)]
pub struct SubscribeControl {
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub active: tokio::sync::watch::Receiver<bool>,
}

impl SubscribeControl {
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits while paused. `false` when `stop` fired meanwhile (the loop should end).
    pub async fn wait_active(&mut self) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            if *self.active.borrow_and_update() {
                return true;
            }
            tokio::select! {
                r = self.active.changed() => {
                    // The health checker is gone (shutdown): nothing will resume us.
                    if r.is_err() {
                        return false;
                    }
                }
                r = self.stop.changed() => {
                    if r.is_err() {
                        return false;
                    }
                }
            }
        }
    }
}

pub trait PubSub: Send + Sync + 'static {
    fn publish(
        &self,
        topic: &str,
        data: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<(), ComponentError>>;

    /// Starts delivering `topic` to `handler` (in background tasks) until the broker is dropped
    /// or `ctl.stop` fires. While `ctl` is paused (the app is unhealthy) nothing is pulled from
    /// the broker: messages stay there (or queued, for in-memory) until it resumes.
    fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        ctl: SubscribeControl,
    ) -> BoxFuture<'_, Result<(), ComponentError>>;

    fn features(&self) -> &'static [&'static str] {
        &[]
    }
}
