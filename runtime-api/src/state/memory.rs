//! `state.in-memory`: a process-local store (lost on restart), with etags, transactions and TTL.

use super::{check_version, now_unix_ms, StateItem, StateStore, StoreResult, TxOp};
use super::{DeleteRequest, SetRequest};
use mecha_filters::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;

struct Entry {
    value: bytes::Bytes,
    version: u64,
    expires: Option<u64>,
}

/// The in-memory store. One mutex: operations are short map updates, and a transaction must see
/// and change every key it touches atomically.
#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, Entry>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn live_version(map: &HashMap<String, Entry>, key: &str, now: u64) -> Option<u64> {
        map.get(key)
            .filter(|e| e.expires.is_none_or(|t| t > now))
            .map(|e| e.version)
    }

    fn check(map: &HashMap<String, Entry>, op: &TxOp, now: u64) -> StoreResult<()> {
        match op {
            TxOp::Upsert(r) => check_version(
                &r.key,
                Self::live_version(map, &r.key, now),
                r.etag.as_deref(),
                r.concurrency,
            ),
            TxOp::Delete(r) => {
                let cur = Self::live_version(map, &r.key, now);
                // Deleting a missing key without an etag is a success, as in Dapr.
                if cur.is_none() && r.etag.as_deref().is_none_or(str::is_empty) {
                    return Ok(());
                }
                check_version(
                    &r.key,
                    cur,
                    r.etag.as_deref(),
                    super::Concurrency::LastWrite,
                )
            }
        }
    }

    fn apply(map: &mut HashMap<String, Entry>, op: TxOp, now: u64) {
        match op {
            TxOp::Upsert(r) => {
                let version = Self::live_version(map, &r.key, now).unwrap_or(0) + 1;
                map.insert(
                    r.key,
                    Entry {
                        value: r.value,
                        version,
                        expires: r.ttl.map(|t| now + t.as_millis() as u64),
                    },
                );
            }
            TxOp::Delete(r) => {
                map.remove(&r.key);
            }
        }
    }

    fn run(&self, ops: Vec<TxOp>) -> StoreResult<()> {
        let now = now_unix_ms();
        let mut map = self.map.lock();
        for op in &ops {
            Self::check(&map, op, now)?;
        }
        for op in ops {
            Self::apply(&mut map, op, now);
        }
        Ok(())
    }
}

impl StateStore for MemoryStore {
    fn get(&self, key: String) -> BoxFuture<'_, StoreResult<Option<StateItem>>> {
        let now = now_unix_ms();
        let map = self.map.lock();
        let item = map
            .get(&key)
            .filter(|e| e.expires.is_none_or(|t| t > now))
            .map(|e| StateItem {
                value: e.value.clone(),
                etag: e.version.to_string(),
                expires_unix_ms: e.expires,
            });
        drop(map);
        Box::pin(async move { Ok(item) })
    }

    fn set(&self, req: SetRequest) -> BoxFuture<'_, StoreResult<()>> {
        let r = self.run(vec![TxOp::Upsert(req)]);
        Box::pin(async move { r })
    }

    fn delete(&self, req: DeleteRequest) -> BoxFuture<'_, StoreResult<()>> {
        let r = self.run(vec![TxOp::Delete(req)]);
        Box::pin(async move { r })
    }

    fn transact(&self, ops: Vec<TxOp>) -> BoxFuture<'_, StoreResult<()>> {
        let r = self.run(ops);
        Box::pin(async move { r })
    }
}
