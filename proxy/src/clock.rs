//! One clock read per poll of a connection's task.
//!
//! A proxied request wants "now" a dozen times: its start and end for `downstream_rq_time`,
//! the upstream attempt's for `upstream_rq_time` and `x-envoy-upstream-service-time`, the
//! deadlines of the route and stream timers, the idle stamp of the pooled connection, the
//! activity stamp of the downstream one. Each read is a `clock_gettime` (tens of nanoseconds on
//! a VM's paravirtual clock); together they were ~2 % of a proxied request's CPU time. Within
//! one poll of a task the answers differ by microseconds, and nothing here needs that
//! resolution (Envoy's own timers and stats are in milliseconds, and its dispatcher also caches
//! the time per event-loop iteration). So [`Fresh`] wraps a connection's future, and while it
//! is being polled, [`now`] reads the clock once and then returns that reading. Outside such a
//! poll (other tasks, other threads) [`now`] reads the clock every time.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::Instant;

thread_local! {
    /// How many [`Fresh`] polls are on this thread's stack (nested wrappers are harmless).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The reading of the current poll, once taken.
    static CACHED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The current time: the reading taken earlier in the same [`Fresh`] poll, if any.
#[inline]
pub fn now() -> Instant {
    if DEPTH.get() == 0 {
        return Instant::now();
    }
    match CACHED.get() {
        Some(t) => t,
        None => {
            let t = Instant::now();
            CACHED.set(Some(t));
            t
        }
    }
}

pin_project_lite::pin_project! {
    /// Polls `F` with [`now`] answering from one clock reading per poll.
    pub struct Fresh<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Fresh<F> {
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

/// Restores the thread's state even if the inner poll panics.
struct Scope;

impl Scope {
    fn enter() -> Self {
        DEPTH.set(DEPTH.get() + 1);
        CACHED.set(None);
        Scope
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get() - 1);
        // A later poll (of this or another task) must not see this poll's reading.
        CACHED.set(None);
    }
}

impl<F: Future> Future for Fresh<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _scope = Scope::enter();
        self.project().inner.poll(cx)
    }
}

/// Spawns hyper's tasks (HTTP/2 streams) on tokio, each wrapped in [`Fresh`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FreshExecutor;

impl<F> hyper::rt::Executor<F> for FreshExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Fresh::new(fut));
    }
}

/// [`now`] as a `std` instant.
#[inline]
pub fn now_std() -> std::time::Instant {
    now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn outside_a_poll_every_read_is_fresh() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() >= a + Duration::from_millis(2));
    }

    #[tokio::test]
    async fn one_reading_per_poll_and_a_new_one_next_poll() {
        let (first, second, third) = Fresh::new(async {
            let first = now();
            std::thread::sleep(Duration::from_millis(2));
            let second = now();
            // Yielding ends this poll; the next one reads the clock again.
            tokio::task::yield_now().await;
            (first, second, now())
        })
        .await;
        assert_eq!(first, second);
        assert!(third >= first + Duration::from_millis(2));
        // And after the wrapper's poll, reads are fresh again.
        assert!(now() >= third);
    }
}
