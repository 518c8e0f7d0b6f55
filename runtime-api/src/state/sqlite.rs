//! `state.sqlite`: the embedded, durable default store. One SQLite file in WAL mode; every write is
//! a transaction, so data survives a crash or restart. Expired rows are invisible to reads and
//! removed by a periodic cleanup task (`cleanupInterval`, like Dapr's SQLite store).

use super::{check_version, now_unix_ms, StateItem, StateStore, StoreResult, TxOp};
use super::{Concurrency, DeleteRequest, SetRequest};
use crate::error::ComponentError;
use mecha_filters::BoxFuture;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    table: String,
}

fn backend(e: rusqlite::Error) -> ComponentError {
    ComponentError::Backend(format!("sqlite: {e}"))
}

impl SqliteStore {
    /// Opens (creating when needed) the database at `path` and its table.
    pub fn open(path: &Path, table: &str, cleanup_interval: Option<Duration>) -> StoreResult<Self> {
        if !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || table.is_empty() {
            return Err(ComponentError::Invalid(format!(
                "tableName \"{table}\" must be letters, digits and underscores"
            )));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                ComponentError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path).map_err(backend)?;
        // First, so that two sidecars opening the same file at once (switching it to WAL, creating
        // the table) wait for each other instead of failing with "database is locked".
        conn.busy_timeout(Duration::from_secs(5)).map_err(backend)?;
        // WAL: readers do not block the writer, and a committed write is durable.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                key TEXT NOT NULL PRIMARY KEY,
                value BLOB NOT NULL,
                version INTEGER NOT NULL,
                expiration_time INTEGER
            );"
        ))
        .map_err(backend)?;
        let store = Self {
            conn: Arc::new(Mutex::new(conn)),
            table: table.to_string(),
        };
        if let Some(every) = cleanup_interval.filter(|d| !d.is_zero()) {
            let conn = Arc::downgrade(&store.conn);
            let table = store.table.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        let Some(conn) = conn.upgrade() else { return };
                        let table = table.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            let c = conn.lock();
                            if let Err(e) = c.execute(
                                &format!("DELETE FROM {table} WHERE expiration_time IS NOT NULL AND expiration_time <= ?1"),
                                params![now_unix_ms() as i64],
                            ) {
                                tracing::warn!(error = %e, "sqlite state cleanup failed");
                            }
                        })
                        .await;
                    }
                });
            }
        }
        Ok(store)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &str) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = self.conn.clone();
        let table = self.table.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock();
            f(&mut c, &table)
        })
        .await
        .map_err(|e| ComponentError::Backend(format!("sqlite task failed: {e}")))?
    }

    fn current(tx: &Connection, table: &str, key: &str, now: u64) -> StoreResult<Option<u64>> {
        tx.query_row(
            &format!(
                "SELECT version FROM {table} WHERE key = ?1 AND (expiration_time IS NULL OR expiration_time > ?2)"
            ),
            params![key, now as i64],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|v| v.map(|v| v as u64))
        .map_err(backend)
    }

    fn run(c: &mut Connection, table: &str, ops: Vec<TxOp>) -> StoreResult<()> {
        let now = now_unix_ms();
        let tx = c.transaction().map_err(backend)?;
        for op in ops {
            match op {
                TxOp::Upsert(r) => {
                    let cur = Self::current(&tx, table, &r.key, now)?;
                    check_version(&r.key, cur, r.etag.as_deref(), r.concurrency)?;
                    let exp = r.ttl.map(|t| (now + t.as_millis() as u64) as i64);
                    tx.execute(
                        &format!(
                            "INSERT INTO {table} (key, value, version, expiration_time) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version, expiration_time = excluded.expiration_time"
                        ),
                        params![r.key, r.value.as_ref(), (cur.unwrap_or(0) + 1) as i64, exp],
                    )
                    .map_err(backend)?;
                }
                TxOp::Delete(r) => {
                    let cur = Self::current(&tx, table, &r.key, now)?;
                    if cur.is_none() && r.etag.as_deref().is_none_or(str::is_empty) {
                        continue;
                    }
                    check_version(&r.key, cur, r.etag.as_deref(), Concurrency::LastWrite)?;
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE key = ?1"),
                        params![r.key],
                    )
                    .map_err(backend)?;
                }
            }
        }
        // Dropping `tx` on an error above rolls everything back.
        tx.commit().map_err(backend)
    }
}

impl StateStore for SqliteStore {
    fn get(&self, key: String) -> BoxFuture<'_, StoreResult<Option<StateItem>>> {
        Box::pin(self.blocking(move |c, table| {
            c.query_row(
                &format!(
                    "SELECT value, version, expiration_time FROM {table} WHERE key = ?1 AND (expiration_time IS NULL OR expiration_time > ?2)"
                ),
                params![key, now_unix_ms() as i64],
                |r| {
                    Ok(StateItem {
                        value: bytes::Bytes::from(r.get::<_, Vec<u8>>(0)?),
                        etag: r.get::<_, i64>(1)?.to_string(),
                        expires_unix_ms: r.get::<_, Option<i64>>(2)?.map(|t| t as u64),
                    })
                },
            )
            .optional()
            .map_err(backend)
        }))
    }

    fn set(&self, req: SetRequest) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.blocking(move |c, t| Self::run(c, t, vec![TxOp::Upsert(req)])))
    }

    fn delete(&self, req: DeleteRequest) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.blocking(move |c, t| Self::run(c, t, vec![TxOp::Delete(req)])))
    }

    fn transact(&self, ops: Vec<TxOp>) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.blocking(move |c, t| Self::run(c, t, ops)))
    }
}
