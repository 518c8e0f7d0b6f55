//! `state.redis`: values stored in Dapr's Redis layout — a hash per key with fields `data` and
//! `version` — so data a Dapr app wrote reads back unchanged. Writes and transactions run as Lua
//! scripts, which Redis executes atomically (check every etag, then apply every operation).

use super::{now_unix_ms, StateItem, StateStore, StoreResult, TxOp};
use super::{Concurrency, DeleteRequest, SetRequest};
use crate::error::ComponentError;
use mecha_filters::BoxFuture;
use redis::aio::ConnectionManager;
use std::sync::LazyLock;

/// Checks every operation, then applies them. ARGV holds 5 values per key: op ("s"et/"d"elete),
/// etag ("" for none), data, first-write ("1"/"0"), ttl seconds ("" for none).
const TX_SCRIPT: &str = r#"
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 5
  local op, etag, fw = ARGV[b + 1], ARGV[b + 2], ARGV[b + 4]
  local cur = redis.call("HGET", key, "version")
  if etag ~= "" then
    if (not cur) or cur ~= etag then
      return redis.error_reply("ETAG_MISMATCH " .. key)
    end
  elseif op == "s" and fw == "1" and cur then
    return redis.error_reply("ETAG_MISMATCH " .. key)
  end
end
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 5
  local op, data, ttl = ARGV[b + 1], ARGV[b + 3], ARGV[b + 5]
  if op == "s" then
    redis.call("HSET", key, "data", data)
    redis.call("HINCRBY", key, "version", 1)
    if ttl ~= "" and tonumber(ttl) > 0 then
      redis.call("EXPIRE", key, ttl)
    else
      redis.call("PERSIST", key)
    end
  else
    redis.call("DEL", key)
  end
end
return 1
"#;

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TX_SCRIPT));

pub struct RedisStore {
    conn: ConnectionManager,
}

pub(crate) fn redis_err(e: redis::RedisError) -> ComponentError {
    ComponentError::Backend(format!("redis: {e}"))
}

/// Builds a client from Dapr's `redisHost` / `redisPassword` / `redisUsername` / `redisDB`.
pub(crate) fn client_from_metadata(
    meta: &crate::component::Metadata,
) -> Result<redis::Client, ComponentError> {
    let host = meta
        .get("redisHost")
        .ok_or_else(|| ComponentError::Invalid("metadata redisHost is required".into()))?;
    let tls = meta.get_bool("enableTLS").unwrap_or(false);
    // Client certificates (Dapr's clientCert / clientKey) are not implemented: refuse them rather
    // than connect without the identity the server expects.
    for k in ["clientCert", "clientKey"] {
        if meta.get(k).is_some_and(|v| !v.is_empty()) {
            return Err(ComponentError::Invalid(format!(
                "{k}: TLS client certificates to Redis are not supported"
            )));
        }
    }
    let (h, p) = match host.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>().map_err(|_| {
                ComponentError::Invalid(format!("redisHost \"{host}\": invalid port"))
            })?,
        ),
        None => (host.to_string(), 6379),
    };
    let db = match meta.get("redisDB") {
        Some(d) => d
            .parse::<i64>()
            .map_err(|_| ComponentError::Invalid(format!("redisDB \"{d}\" is not a number")))?,
        None => 0,
    };
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    let auth = match (
        meta.get("redisUsername").filter(|u| !u.is_empty()),
        meta.get("redisPassword").filter(|p| !p.is_empty()),
    ) {
        (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
        (None, Some(p)) => format!(":{}@", enc(p)),
        (Some(u), None) => format!("{}@", enc(u)),
        (None, None) => String::new(),
    };
    // enableTLS as Dapr does it: TLS without verifying the server certificate (Dapr's Redis
    // client sets InsecureSkipVerify = enableTLS), i.e. rustls with `#insecure`.
    let url = if tls {
        format!("rediss://{auth}{h}:{p}/{db}#insecure")
    } else {
        format!("redis://{auth}{h}:{p}/{db}")
    };
    redis::Client::open(url).map_err(redis_err)
}

/// A connection manager that reconnects by itself, created without waiting for Redis to be up
/// (a Redis that is down is an error per request, and recovery when it is back).
pub(crate) async fn connect(client: redis::Client) -> Result<ConnectionManager, ComponentError> {
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
        .set_response_timeout(Some(std::time::Duration::from_secs(5)))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client, cfg)
        .await
        .map_err(redis_err)
}

impl RedisStore {
    pub async fn new(meta: &crate::component::Metadata) -> Result<Self, ComponentError> {
        let client = client_from_metadata(meta)?;
        Ok(Self {
            conn: connect(client).await?,
        })
    }

    async fn run(&self, ops: Vec<TxOp>) -> StoreResult<()> {
        let mut inv = SCRIPT.prepare_invoke();
        for op in &ops {
            match op {
                TxOp::Upsert(r) => {
                    if let Some(e) = r.etag.as_deref().filter(|e| !e.is_empty()) {
                        super::parse_etag(e)?;
                    }
                    inv.key(&r.key)
                        .arg("s")
                        .arg(r.etag.as_deref().unwrap_or(""))
                        .arg(r.value.as_ref())
                        .arg(if r.concurrency == Concurrency::FirstWrite {
                            "1"
                        } else {
                            "0"
                        })
                        .arg(
                            r.ttl
                                .map(|t| t.as_secs().max(1).to_string())
                                .unwrap_or_default(),
                        );
                }
                TxOp::Delete(r) => {
                    if let Some(e) = r.etag.as_deref().filter(|e| !e.is_empty()) {
                        super::parse_etag(e)?;
                    }
                    inv.key(&r.key)
                        .arg("d")
                        .arg(r.etag.as_deref().unwrap_or(""))
                        .arg("")
                        .arg("0")
                        .arg("");
                }
            }
        }
        let mut conn = self.conn.clone();
        match inv.invoke_async::<i64>(&mut conn).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("ETAG_MISMATCH") => {
                Err(ComponentError::EtagMismatch(e.to_string()))
            }
            Err(e) => Err(redis_err(e)),
        }
    }
}

impl StateStore for RedisStore {
    fn get(&self, key: String) -> BoxFuture<'_, StoreResult<Option<StateItem>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // HMGET of the two fields Dapr's layout has, rather than HGETALL: the same answer for
            // that layout without a map of owned field names per read.
            // Sized up front: growing the commands' argument and byte vectors one argument at a
            // time was five of the read's allocations.
            let mut hmget = redis::Cmd::with_capacity(4, key.len() + 24);
            hmget.arg("HMGET").arg(&key).arg("data").arg("version");
            let mut pttl = redis::Cmd::with_capacity(2, key.len() + 4);
            pttl.arg("PTTL").arg(&key);
            let mut pipe = redis::Pipeline::with_capacity(2);
            pipe.add_command(hmget).add_command(pttl);
            let ((data, version), pttl): ((Option<Vec<u8>>, Option<Vec<u8>>), i64) =
                pipe.query_async(&mut conn).await.map_err(redis_err)?;
            let (Some(data), Some(version)) = (data, version) else {
                return Ok(None);
            };
            Ok(Some(StateItem {
                value: bytes::Bytes::from(data),
                etag: String::from_utf8(version)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                expires_unix_ms: (pttl > 0).then(|| now_unix_ms() + pttl as u64),
            }))
        })
    }

    fn set(&self, req: SetRequest) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.run(vec![TxOp::Upsert(req)]))
    }

    fn delete(&self, req: DeleteRequest) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.run(vec![TxOp::Delete(req)]))
    }

    fn transact(&self, ops: Vec<TxOp>) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.run(ops))
    }
}
