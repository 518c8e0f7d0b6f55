//! `state.redis`: values stored in Dapr's Redis layout — a hash per key with fields `data` and
//! `version` — so data a Dapr app wrote reads back unchanged. Writes and transactions run as Lua
//! scripts, which Redis executes atomically (check every etag, then apply every operation).

use super::resp::{self, RespClient, Target, Value};
use super::{now_unix_ms, StateItem, StateStore, StoreResult, TxOp};
use super::{Concurrency, DeleteRequest, SetRequest};
use crate::error::ComponentError;
use mecha_filters::BoxFuture;
use redis::aio::ConnectionManager;
use std::sync::LazyLock;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The lean connection reads use, on plain TCP (see `resp`); TLS reads use `conn`.
    reads: Option<RespClient>,
}

pub(crate) fn redis_err(e: redis::RedisError) -> ComponentError {
    ComponentError::Backend(format!("redis: {e}"))
}

/// Where Dapr's `redisHost` / `redisPassword` / `redisUsername` / `redisDB` / `enableTLS` point.
pub(crate) struct RedisTarget {
    pub(crate) resp: Target,
    pub(crate) tls: bool,
}

pub(crate) fn target_from_metadata(
    meta: &crate::component::Metadata,
) -> Result<RedisTarget, ComponentError> {
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
    Ok(RedisTarget {
        resp: Target {
            host: h,
            port: p,
            db,
            username: meta
                .get("redisUsername")
                .filter(|u| !u.is_empty())
                .map(str::to_string),
            password: meta
                .get("redisPassword")
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        },
        tls,
    })
}

/// Builds a `redis` crate client for `target`.
pub(crate) fn client_for(target: &RedisTarget) -> Result<redis::Client, ComponentError> {
    let t = &target.resp;
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
    let auth = match (t.username.as_deref(), t.password.as_deref()) {
        (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
        (None, Some(p)) => format!(":{}@", enc(p)),
        (Some(u), None) => format!("{}@", enc(u)),
        (None, None) => String::new(),
    };
    let (h, p, db) = (&t.host, t.port, t.db);
    // enableTLS as Dapr does it: TLS without verifying the server certificate (Dapr's Redis
    // client sets InsecureSkipVerify = enableTLS), i.e. rustls with `#insecure`.
    let url = if target.tls {
        format!("rediss://{auth}{h}:{p}/{db}#insecure")
    } else {
        format!("redis://{auth}{h}:{p}/{db}")
    };
    redis::Client::open(url).map_err(redis_err)
}

/// Builds a client from Dapr's Redis metadata (see [`target_from_metadata`]).
pub(crate) fn client_from_metadata(
    meta: &crate::component::Metadata,
) -> Result<redis::Client, ComponentError> {
    client_for(&target_from_metadata(meta)?)
}

/// A connection manager that reconnects by itself, created without waiting for Redis to be up
/// (a Redis that is down is an error per request, and recovery when it is back).
pub(crate) async fn connect(client: redis::Client) -> Result<ConnectionManager, ComponentError> {
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client, cfg)
        .await
        .map_err(redis_err)
}

impl RedisStore {
    pub async fn new(meta: &crate::component::Metadata) -> Result<Self, ComponentError> {
        let target = target_from_metadata(meta)?;
        let client = client_for(&target)?;
        Ok(Self {
            conn: connect(client).await?,
            reads: (!target.tls)
                .then(|| RespClient::new(target.resp, CONNECT_TIMEOUT, RESPONSE_TIMEOUT)),
        })
    }

    /// HMGET of the two fields Dapr's layout has (rather than HGETALL: the same answer for that
    /// layout without a map of owned field names per read) and PTTL, in one round trip.
    async fn get_lean(&self, reads: &RespClient, key: &str) -> StoreResult<Option<StateItem>> {
        let mut cmds = Vec::with_capacity(2 * key.len() + 64);
        resp::encode(&mut cmds, &[b"HMGET", key.as_bytes(), b"data", b"version"]);
        resp::encode(&mut cmds, &[b"PTTL", key.as_bytes()]);
        let replies = reads
            .query(cmds, 2)
            .await
            .map_err(|e| ComponentError::Backend(format!("redis: {e}")))?;
        let mut replies = replies.into_iter();
        let (Some(fields), Some(pttl)) = (replies.next(), replies.next()) else {
            return Err(ComponentError::Backend("redis: replies missing".into()));
        };
        let fields = match fields {
            Value::Array(f) => f,
            Value::Error(e) => return Err(ComponentError::Backend(format!("redis: {e}"))),
            other => {
                return Err(ComponentError::Backend(format!(
                    "redis: unexpected HMGET reply {other:?}"
                )))
            }
        };
        let pttl = match pttl {
            Value::Int(t) => t,
            Value::Error(e) => return Err(ComponentError::Backend(format!("redis: {e}"))),
            _ => -1,
        };
        let mut fields = fields.into_iter();
        let (Some(Value::Bulk(data)), Some(Value::Bulk(version))) = (fields.next(), fields.next())
        else {
            return Ok(None);
        };
        Ok(Some(StateItem {
            value: data,
            etag: String::from_utf8(version.to_vec())
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            expires_unix_ms: (pttl > 0).then(|| now_unix_ms() + pttl as u64),
        }))
    }

    /// The same read through the `redis` crate, for TLS connections.
    async fn get_tls(&self, key: &str) -> StoreResult<Option<StateItem>> {
        let mut conn = self.conn.clone();
        let mut hmget = redis::Cmd::with_capacity(4, key.len() + 24);
        hmget.arg("HMGET").arg(key).arg("data").arg("version");
        let mut pttl = redis::Cmd::with_capacity(2, key.len() + 4);
        pttl.arg("PTTL").arg(key);
        let mut pipe = redis::Pipeline::with_capacity(2);
        pipe.add_command(hmget).add_command(pttl);
        // HMGET's two fields, then PTTL's milliseconds.
        type Reply = ((Option<Vec<u8>>, Option<Vec<u8>>), i64);
        let ((data, version), pttl): Reply =
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
        // In a pooled block: the future holds the query's, a few hundred bytes glibc would
        // serve from its slow path per read.
        mecha_filters::boxed_in_place(move || async move {
            match &self.reads {
                Some(reads) => self.get_lean(reads, &key).await,
                None => self.get_tls(&key).await,
            }
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
