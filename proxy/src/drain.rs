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
    /// Set by `/drain_listeners` (without `graceful`): listeners stop accepting while the
    /// connections they accepted carry on undisturbed.
    accepting_stopped: watch::Sender<bool>,
    conns: Arc<(AtomicUsize, Notify)>,
    /// Set for a [`Drain::child`]: the parent's drain reaches this scope too.
    parent: Option<Box<Drain>>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(RUNNING),
            accepting_stopped: watch::Sender::new(false),
            conns: Arc::new((AtomicUsize::new(0), Notify::new())),
            parent: None,
        }
    }
}

/// Held by each open downstream connection.
/// The second field is the parent scope's tracker, released together with this one.
pub struct ConnTracker(
    Arc<(AtomicUsize, Notify)>,
    #[allow(dead_code)] Option<Box<ConnTracker>>,
);

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

    /// A nested drain scope (e.g. one generation of a listener replaced by xDS): it can be drained
    /// on its own, it is drained when this one is, and its connections count as this one's too.
    pub fn child(&self) -> Drain {
        Drain {
            parent: Some(Box::new(self.clone())),
            ..Drain::default()
        }
    }

    /// Resolves once draining has begun (here or in a parent scope).
    pub fn signaled(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut rx = self.state.subscribe();
        let parent = self.parent.as_ref().map(|p| p.signaled());
        Box::pin(async move {
            let own = async move {
                let _ = rx.wait_for(|s| *s >= DRAINING).await;
            };
            match parent {
                Some(parent) => {
                    tokio::select! {
                        _ = own => {}
                        _ = parent => {}
                    }
                }
                None => own.await,
            }
        })
    }

    /// Stops listeners of this scope (and its children) from accepting, without draining.
    pub fn stop_accepting(&self) {
        self.accepting_stopped.send_replace(true);
    }

    /// Resolves once listeners must stop accepting: on [`Drain::stop_accepting`] or when
    /// draining begins, here or in a parent scope.
    pub fn accept_stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut rx = self.accepting_stopped.subscribe();
        let draining = self.signaled();
        let parent = self.parent.as_ref().map(|p| p.accept_stopped());
        Box::pin(async move {
            let own = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let parent = async move {
                match parent {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = own => {}
                _ = draining => {}
                _ = parent => {}
            }
        })
    }

    pub fn is_draining(&self) -> bool {
        *self.state.borrow() >= DRAINING || self.parent.as_ref().is_some_and(|p| p.is_draining())
    }

    pub fn is_forced(&self) -> bool {
        *self.state.borrow() >= FORCED || self.parent.as_ref().is_some_and(|p| p.is_forced())
    }

    pub fn track(&self) -> ConnTracker {
        self.conns.0.fetch_add(1, Ordering::AcqRel);
        ConnTracker(
            self.conns.clone(),
            self.parent.as_ref().map(|p| Box::new(p.track())),
        )
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
