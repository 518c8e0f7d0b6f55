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

pub trait PubSub: Send + Sync + 'static {
    fn publish(
        &self,
        topic: &str,
        data: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<(), ComponentError>>;

    /// Starts delivering `topic` to `handler` (in background tasks) until the broker is dropped
    /// or `stop` fires.
    fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> BoxFuture<'_, Result<(), ComponentError>>;

    fn features(&self) -> &'static [&'static str] {
        &[]
    }
}
