//! State stores: the [`StateStore`] trait every component implements, the request types the API
//! hands it, and Dapr's key prefixing (`keyPrefix`).
//!
//! Values are opaque bytes (the HTTP API stores the JSON text of `value`, gRPC the raw bytes), and
//! etags are the store's version numbers as decimal strings, as Dapr's stores issue them.

pub mod memory;
pub mod redis;
mod resp;
pub mod sqlite;

use crate::error::ComponentError;
use bytes::Bytes;
use mecha_filters::BoxFuture;
use std::time::Duration;

/// `options.concurrency`: with `FirstWrite` a write without an etag only succeeds when the key
/// does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    FirstWrite,
    #[default]
    LastWrite,
}

impl Concurrency {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "last-write" => Ok(Self::LastWrite),
            "first-write" => Ok(Self::FirstWrite),
            other => Err(format!(
                "invalid concurrency \"{other}\" (expected first-write or last-write)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SetRequest {
    pub key: String,
    pub value: Bytes,
    pub etag: Option<String>,
    pub concurrency: Concurrency,
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct DeleteRequest {
    pub key: String,
    pub etag: Option<String>,
    pub concurrency: Concurrency,
}

#[derive(Debug, Clone)]
pub enum TxOp {
    Upsert(SetRequest),
    Delete(DeleteRequest),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateItem {
    pub value: Bytes,
    pub etag: String,
    /// When the item expires (RFC 3339 in Dapr's `ttlExpireTime` metadata), if it has a TTL.
    pub expires_unix_ms: Option<u64>,
}

pub type StoreResult<T> = Result<T, ComponentError>;

/// A Dapr state store. Keys arrive already prefixed.
pub trait StateStore: Send + Sync + 'static {
    fn get(&self, key: String) -> BoxFuture<'_, StoreResult<Option<StateItem>>>;
    fn set(&self, req: SetRequest) -> BoxFuture<'_, StoreResult<()>>;
    fn delete(&self, req: DeleteRequest) -> BoxFuture<'_, StoreResult<()>>;
    /// Applies every operation or none.
    fn transact(&self, ops: Vec<TxOp>) -> BoxFuture<'_, StoreResult<()>>;
    /// Dapr's feature names (`ETAG`, `TRANSACTIONAL`, `TTL`) shown by the metadata API.
    fn features(&self) -> &'static [&'static str] {
        &["ETAG", "TRANSACTIONAL", "TTL"]
    }
}

/// Dapr's `keyPrefix` metadata: how a state key is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPrefix {
    /// `appid||key` (the default).
    AppId,
    /// `storename||key`.
    Name,
    /// `key` unchanged.
    None,
    /// `literal||key`.
    Literal(String),
}

impl KeyPrefix {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            None | Some("") | Some("appid") => Self::AppId,
            Some("name") => Self::Name,
            Some("none") => Self::None,
            Some(other) => Self::Literal(other.to_string()),
        }
    }

    pub fn apply(&self, app_id: &str, store: &str, key: &str) -> String {
        match self {
            Self::AppId if app_id.is_empty() => key.to_string(),
            Self::AppId => format!("{app_id}||{key}"),
            Self::Name => format!("{store}||{key}"),
            Self::None => key.to_string(),
            Self::Literal(p) => format!("{p}||{key}"),
        }
    }
}

/// Parses an etag this crate's stores issue (a positive version number).
pub(crate) fn parse_etag(etag: &str) -> StoreResult<u64> {
    etag.parse::<u64>()
        .map_err(|_| ComponentError::InvalidEtag(etag.to_string()))
}

pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks a write against the current version, as every store here does: a given etag must match
/// the stored version exactly (a missing key never matches), and first-write without an etag only
/// succeeds on a missing key.
pub(crate) fn check_version(
    key: &str,
    current: Option<u64>,
    etag: Option<&str>,
    concurrency: Concurrency,
) -> StoreResult<()> {
    match (etag.filter(|e| !e.is_empty()), current) {
        (Some(e), cur) => {
            let want = parse_etag(e)?;
            if cur != Some(want) {
                return Err(ComponentError::EtagMismatch(format!(
                    "etag \"{e}\" does not match the stored version of key {key}"
                )));
            }
        }
        (None, Some(_)) if concurrency == Concurrency::FirstWrite => {
            return Err(ComponentError::EtagMismatch(format!(
                "first-write without etag on existing key {key}"
            )));
        }
        _ => {}
    }
    Ok(())
}
