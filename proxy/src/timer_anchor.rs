//! Keeps Tokio's timer driver from waking itself on every request.
//!
//! Tokio's time driver remembers, each time it parks or fires timers, the earliest instant it
//! will wake up by itself ("next wake"). Registering a timer that expires before that instant
//! makes it unpark the I/O driver (an `eventfd` write), so that the parked thread recomputes its
//! `epoll_wait` timeout. On a lightly loaded proxy every request's timers (route timeout, stream
//! idle timeout) are the earliest ones, because the previous request already cancelled its own:
//! `strace` showed one or two `eventfd` writes per proxied request at one connection, and
//! sometimes an extra `epoll_wait` that returns at once with only that wake-up.
//!
//! The anchor is a timer that always expires within [`PERIOD`]. With it in the wheel the
//! driver's next wake is never further away than that, so registering any timer of at least
//! [`PERIOD`] (Envoy's timeouts are seconds to minutes) leaves the driver alone. The cost is
//! one wake-up per period on an idle worker. Shorter timers still unpark the driver, as they
//! must. One anchor serves a whole runtime (Tokio has one timer wheel per runtime).

use std::time::Duration;

/// How often the anchor fires.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Re-arms a timer every [`PERIOD`], forever. Spawn once per runtime.
pub async fn run() {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// Write-family syscalls made by this thread so far (`syscw` in `/proc/thread-self/io`).
    fn writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// Registers and cancels `n` request-like timers, each after a park of the driver (as
    /// between requests), and counts the write syscalls the thread made meanwhile.
    async fn writes_for_timers(n: u64) -> u64 {
        let mut total = 0;
        for _ in 0..n {
            // A short sleep parks the driver and makes it recompute its next wake (registering
            // it may itself wake the driver, so it is not counted).
            tokio::time::sleep(Duration::from_micros(50)).await;
            let before = writes();
            let route_timeout = tokio::time::sleep(Duration::from_secs(15));
            tokio::pin!(route_timeout);
            // Polling once registers the timer; dropping it cancels it.
            std::future::poll_fn(|cx| {
                let _ = route_timeout.as_mut().poll(cx);
                std::task::Poll::Ready(())
            })
            .await;
            total += writes() - before;
        }
        total
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn without_the_anchor_each_timer_wakes_the_driver() {
        // The control: proves the measurement sees the wake-ups the anchor removes.
        let n = current_thread().block_on(writes_for_timers(50));
        assert!(n >= 50, "{n} write syscalls for 50 timers");
    }

    #[test]
    fn with_the_anchor_timers_leave_the_driver_alone() {
        let n = current_thread().block_on(async {
            tokio::spawn(run());
            tokio::task::yield_now().await;
            writes_for_timers(50).await
        });
        assert!(n <= 5, "{n} write syscalls for 50 timers");
    }
}
