//! Graceful drain: stop accepting, let in-flight work finish within a deadline, then stop.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{watch, Notify};

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const FORCED: u8 = 2;

#[derive(Clone)]
pub struct Drain {
    state: watch::Sender<u8>,
    conns: Arc<(AtomicUsize, Notify)>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(RUNNING),
            conns: Arc::new((AtomicUsize::new(0), Notify::new())),
        }
    }
}

/// Held by each open downstream connection.
pub struct ConnTracker(Arc<(AtomicUsize, Notify)>);

impl Drop for ConnTracker {
    fn drop(&mut self) {
        if self.0 .0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0 .1.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves once draining has begun.
    pub fn signaled(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut rx = self.state.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|s| *s >= DRAINING).await;
        })
    }

    pub fn is_draining(&self) -> bool {
        *self.state.borrow() >= DRAINING
    }

    pub fn is_forced(&self) -> bool {
        *self.state.borrow() >= FORCED
    }

    pub fn track(&self) -> ConnTracker {
        self.conns.0.fetch_add(1, Ordering::AcqRel);
        ConnTracker(self.conns.clone())
    }

    pub fn open_connections(&self) -> usize {
        self.conns.0.load(Ordering::Acquire)
    }

    /// Starts draining and waits until every tracked connection has closed or `timeout` passed.
    /// Returns whether everything closed in time.
    pub async fn drain(&self, timeout: std::time::Duration) -> bool {
        self.state.send_replace(DRAINING);
        let wait = async {
            loop {
                let notified = self.conns.1.notified();
                if self.open_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let done = tokio::time::timeout(timeout, wait).await.is_ok();
        self.state.send_replace(FORCED);
        done
    }
}
