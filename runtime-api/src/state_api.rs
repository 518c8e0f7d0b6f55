//! The state API operations shared by HTTP and gRPC: key prefixing, option and metadata parsing,
//! and Dapr's error codes for each failure.

use crate::error::{ApiError, ComponentError};
use crate::runtime::Runtime;
use crate::state::{Concurrency, DeleteRequest, SetRequest, StateItem, TxOp};
use bytes::Bytes;
use http::StatusCode;
use std::collections::BTreeMap;
use std::time::Duration;

/// One item to save, as the API received it.
#[derive(Debug, Clone, Default)]
pub struct SaveItem {
    pub key: String,
    pub value: Bytes,
    pub etag: Option<String>,
    pub concurrency: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteItem {
    pub key: String,
    pub etag: Option<String>,
    pub concurrency: String,
}

pub enum TxItem {
    Upsert(SaveItem),
    Delete(DeleteItem),
}

fn component_error(code: &'static str, e: ComponentError, what: &str) -> ApiError {
    let status = match e {
        ComponentError::EtagMismatch(_) => StatusCode::CONFLICT,
        ComponentError::InvalidEtag(_) | ComponentError::Invalid(_) => StatusCode::BAD_REQUEST,
        ComponentError::Backend(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, code, format!("{what}: {e}"))
}

fn ttl(meta: &BTreeMap<String, String>) -> Result<Option<Duration>, ApiError> {
    match meta.get("ttlInSeconds") {
        None => Ok(None),
        Some(v) => match v.trim().parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(Duration::from_secs(n as u64))),
            // -1 = never expire, as in Dapr.
            Ok(-1) | Ok(0) => Ok(None),
            _ => Err(ApiError::malformed(format!(
                "metadata ttlInSeconds \"{v}\" must be an integer >= -1"
            ))),
        },
    }
}

fn concurrency(s: &str) -> Result<Concurrency, ApiError> {
    Concurrency::parse(s).map_err(ApiError::malformed)
}

impl Runtime {
    fn set_request(&self, store: &str, item: SaveItem) -> Result<SetRequest, ApiError> {
        let e = self.store(store)?;
        if item.key.is_empty() {
            return Err(ApiError::malformed("a state item needs a key"));
        }
        if item.key.contains("||") {
            return Err(ApiError::malformed(format!(
                "input key/keyPrefix '{}' can't contain '||'",
                item.key
            )));
        }
        Ok(SetRequest {
            key: self.key(store, e, &item.key),
            value: item.value,
            etag: item.etag.filter(|e| !e.is_empty()),
            concurrency: concurrency(&item.concurrency)?,
            ttl: ttl(&item.metadata)?,
        })
    }

    fn delete_request(&self, store: &str, item: DeleteItem) -> Result<DeleteRequest, ApiError> {
        let e = self.store(store)?;
        Ok(DeleteRequest {
            key: self.key(store, e, &item.key),
            etag: item.etag.filter(|e| !e.is_empty()),
            concurrency: concurrency(&item.concurrency)?,
        })
    }

    pub async fn save_state(&self, store: &str, items: Vec<SaveItem>) -> Result<(), ApiError> {
        let e = self.store(store)?;
        let mut reqs = Vec::with_capacity(items.len());
        for i in items {
            reqs.push(self.set_request(store, i)?);
        }
        // Dapr saves each item on its own (not atomically); the first failure is reported.
        for r in reqs {
            e.store.set(r).await.map_err(|err| {
                component_error(
                    "ERR_STATE_SAVE",
                    err,
                    &format!("failed saving state in state store {store}"),
                )
            })?;
        }
        Ok(())
    }

    pub async fn get_state(&self, store: &str, key: &str) -> Result<Option<StateItem>, ApiError> {
        let e = self.store(store)?;
        e.store.get(self.key(store, e, key)).await.map_err(|err| {
            component_error(
                "ERR_STATE_GET",
                err,
                &format!("fail to get {key} from state store {store}"),
            )
        })
    }

    /// Bulk get, `parallelism` keys at a time; a per-key failure is reported in that item.
    pub async fn get_bulk_state(
        &self,
        store: &str,
        keys: Vec<String>,
        parallelism: usize,
    ) -> Result<Vec<(String, Result<Option<StateItem>, String>)>, ApiError> {
        let e = self.store(store)?;
        use futures_util::stream::StreamExt;
        let futs: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let full = self.key(store, e, &k);
                let fut = e.store.get(full);
                async move { (k, fut.await.map_err(|err| err.to_string())) }
            })
            .collect();
        let results: Vec<(String, Result<Option<StateItem>, String>)> =
            futures_util::stream::iter(futs)
                .buffered(parallelism.clamp(1, 100))
                .collect()
                .await;
        Ok(results)
    }

    pub async fn delete_state(&self, store: &str, item: DeleteItem) -> Result<(), ApiError> {
        let e = self.store(store)?;
        let req = self.delete_request(store, item)?;
        e.store.delete(req).await.map_err(|err| {
            component_error(
                "ERR_STATE_DELETE",
                err,
                &format!("failed deleting state in state store {store}"),
            )
        })
    }

    pub async fn transact_state(&self, store: &str, ops: Vec<TxItem>) -> Result<(), ApiError> {
        let e = self.store(store)?;
        let mut tx = Vec::with_capacity(ops.len());
        for op in ops {
            tx.push(match op {
                TxItem::Upsert(s) => TxOp::Upsert(self.set_request(store, s)?),
                TxItem::Delete(d) => TxOp::Delete(self.delete_request(store, d)?),
            });
        }
        e.store.transact(tx).await.map_err(|err| {
            component_error(
                "ERR_STATE_TRANSACTION",
                err,
                &format!("error while executing state transaction in state store {store}"),
            )
        })
    }
}
