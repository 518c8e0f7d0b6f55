//! Idle and whole-request timers of one HTTP stream, with Envoy's semantics:
//!
//! - the connection manager's `stream_idle_timeout` (Envoy's default 5 min, `0s` disables),
//!   replaced by the route's `idle_timeout` when the route sets one, and `request_timeout`:
//!   [`StreamTimeouts::run`] watches the stream until the response headers are ready, then an
//!   [`IdleBody`] watches the response body;
//! - the router's `per_try_idle_timeout`: [`await_headers`] watches one attempt until its
//!   response headers arrive, then an [`IdleBody`] watches that attempt's response body.
//!
//! Before the response starts, a timer that expires produces a local reply (Envoy's
//! `maybeRequestTimeoutCode`: 408 while the downstream request is still incomplete, else 504).
//! Once response headers went downstream, an expiring [`IdleBody`] drops the upstream body (which
//! resets the upstream stream) and fails the downstream body, which makes hyper reset the
//! downstream stream (HTTP/2 `RST_STREAM`, HTTP/1 connection close), as Envoy does.
//!
//! Cost: when no timer applies, callers skip all of this (no wrapper, no timer, no allocation).
//! When one does, activity is a timestamp stored per body frame, and each phase has one sleep
//! that is only re-armed when it fires early (activity moved its deadline), so a busy stream
//! touches the timer wheel about once per timeout period rather than once per frame.

use super::router::selected_route;
use crate::route::Action;
use crate::stats::HttpStats;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use mecha_config::HttpConnectionManager;
use mecha_filters::{local_reply, Body, BoxError};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why a watched body was cut off (the error hyper sees; it resets the downstream stream).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub &'static str);

/// Progress of a request body, shared between the body (polled by the upstream connection) and
/// the timers that must not fire while the request is still moving. (A timed-out stream needs
/// no abort signal here: dropping the upstream attempt makes hyper give up the request, body
/// included, over HTTP/1 and HTTP/2 alike; tests/resilience/timeouts.rs checks both.)
pub struct Progress {
    base: Instant,
    /// Microseconds after `base` of the last request frame.
    last_us: AtomicU64,
    done: AtomicBool,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: crate::clock::now(),
            last_us: AtomicU64::new(0),
            done: AtomicBool::new(false),
        })
    }

    fn touch(&self) {
        let us = crate::clock::now()
            .saturating_duration_since(self.base)
            .as_micros()
            .min(u64::MAX as u128) as u64;
        self.last_us.store(us, Ordering::Relaxed);
    }

    /// When the request body last moved (its creation counts as movement).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_micros(self.last_us.load(Ordering::Relaxed))
    }

    /// Whether the whole request body has been read.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

pin_project_lite::pin_project! {
    /// A request body that records its progress.
    pub struct Watched<B> {
        #[pin]
        inner: B,
        progress: Arc<Progress>,
    }
}

/// Wraps `body` so that `progress` follows it.
pub fn watch<B>(body: B, progress: &Arc<Progress>) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        progress.done.store(true, Ordering::Release);
    }
    Watched {
        inner: body,
        progress: progress.clone(),
    }
    .boxed_unsync()
}

impl<B> HttpBody for Watched<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let res = ready!(this.inner.as_mut().poll_frame(cx));
        match &res {
            Some(Ok(_)) => {
                this.progress.touch();
                if this.inner.is_end_stream() {
                    this.progress.done.store(true, Ordering::Release);
                }
            }
            // End of body, or a failed one: either way nothing more will arrive.
            None | Some(Err(_)) => this.progress.done.store(true, Ordering::Release),
        }
        Poll::Ready(res.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body that fails with [`TimedOut`] when no frame arrives for `timeout` (and the
    /// request body, if watched, did not move either). On expiry it drops the inner body first,
    /// which resets the upstream stream, and calls `on_timeout` once (stats, outlier report).
    pub struct IdleBody<B, F> {
        #[pin]
        inner: Option<B>,
        #[pin]
        sleep: Option<Sleep>,
        timeout: Duration,
        last: Instant,
        request: Option<Arc<Progress>>,
        on_timeout: Option<F>,
        reason: &'static str,
    }
}

impl<B, F> IdleBody<B, F>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    F: FnOnce() + Send + 'static,
{
    /// Wraps `body`; the idle period starts now (response headers count as activity).
    pub fn wrap(
        body: B,
        timeout: Duration,
        request: Option<Arc<Progress>>,
        reason: &'static str,
        on_timeout: F,
    ) -> Body {
        IdleBody {
            inner: Some(body),
            sleep: None,
            timeout,
            last: crate::clock::now(),
            request,
            on_timeout: Some(on_timeout),
            reason,
        }
        .boxed_unsync()
    }
}

impl<B, F> HttpBody for IdleBody<B, F>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: FnOnce(),
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(res) = inner.poll_frame(cx) {
            if matches!(res, Some(Ok(_))) {
                *this.last = crate::clock::now();
            }
            return Poll::Ready(res.map(|r| r.map_err(Into::into)));
        }
        // The body is waiting: make sure a timer will wake us at the idle deadline. The first
        // deadline may be stale (activity since); it is checked and moved only when it fires.
        if this.sleep.is_none() {
            this.sleep
                .set(Some(tokio::time::sleep_until(*this.last + *this.timeout)));
        }
        loop {
            let Some(mut sleep) = this.sleep.as_mut().as_pin_mut() else {
                return Poll::Pending;
            };
            ready!(sleep.as_mut().poll(cx));
            let mut last = *this.last;
            if let Some(p) = this.request.as_ref() {
                last = last.max(p.last());
            }
            let deadline = last + *this.timeout;
            if crate::clock::now() < deadline {
                sleep.reset(deadline);
                continue;
            }
            // Idle for the whole period: drop the upstream body now (resetting the upstream
            // stream) rather than when hyper gets round to dropping us.
            this.inner.set(None);
            if let Some(f) = this.on_timeout.take() {
                f();
            }
            return Poll::Ready(Some(Err(Box::new(TimedOut(this.reason)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

/// Waits for an attempt's response headers under `per_try_idle_timeout`: `None` when the attempt
/// stayed idle (no request body movement, no response) for `timeout`. While the request body is
/// still streaming the timer does not fire: like Envoy, which starts the per-try idle timer once
/// the request is complete, the clock runs from the last request byte.
pub async fn await_headers<T>(
    sent: impl Future<Output = T>,
    timeout: Duration,
    request: Option<&Progress>,
) -> Option<T> {
    tokio::pin!(sent);
    let start = crate::clock::now();
    let sleep = tokio::time::sleep_until(start + timeout);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            r = &mut sent => return Some(r),
            _ = &mut sleep => {
                let deadline = match request {
                    Some(p) if !p.done() => crate::clock::now() + timeout,
                    Some(p) => p.last().max(start) + timeout,
                    None => start + timeout,
                };
                if crate::clock::now() >= deadline {
                    return None;
                }
                sleep.as_mut().reset(deadline);
            }
        }
    }
}

/// The connection manager's stream timers (`stream_idle_timeout`, `request_timeout`).
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamTimeouts {
    /// `None` when disabled (`0s`).
    pub idle: Option<Duration>,
    pub request: Option<Duration>,
}

/// The route's `idle_timeout`: `None` = not set (the connection manager's applies),
/// `Some(None)` = `0s` (no stream idle timer on this route).
fn route_idle(req: &Request<Body>) -> Option<Option<Duration>> {
    match &selected_route(req)?.action {
        Action::Route(a) => a.idle_timeout,
        _ => None,
    }
}

/// A stream-timeout local reply; gRPC requests get Envoy's HTTP→gRPC status mapping
/// (504 → UNAVAILABLE 14, 408 → UNKNOWN 2) in a trailers-only response.
fn timeout_reply(request_done: bool, text: &str, grpc: bool) -> Response<Body> {
    // Envoy's maybeRequestTimeoutCode: 504 if the request was fully received, else 408.
    let (status, grpc_status) = if request_done {
        (StatusCode::GATEWAY_TIMEOUT, 14)
    } else {
        (StatusCode::REQUEST_TIMEOUT, 2)
    };
    if grpc {
        super::retry::grpc_reply(grpc_status, text)
    } else {
        local_reply(status, text)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl StreamTimeouts {
    pub fn new(cfg: &HttpConnectionManager) -> Self {
        Self {
            // Envoy's default stream idle timeout is 5 minutes; 0 disables it.
            idle: match cfg.stream_idle_timeout {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d.0),
                None => Some(Duration::from_secs(300)),
            },
            request: cfg.request_timeout.filter(|d| !d.is_zero()).map(|d| d.0),
        }
    }

    /// Prepares the downstream request body: boxes it (as the connection manager always does)
    /// and, when a stream timer is configured and a body follows, records its progress.
    pub fn watch_request<B>(&self, req: Request<B>) -> (Request<Body>, Option<Arc<Progress>>)
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if req.body().is_end_stream() {
            // Nothing will arrive (a GET): a zero-sized empty body needs no allocation.
            return (req.map(|_| mecha_filters::empty()), None);
        }
        if self.idle.is_none() && self.request.is_none() {
            return (req.map(|b| b.map_err(Into::into).boxed_unsync()), None);
        }
        let progress = Progress::new();
        (req.map(|b| watch(b, &progress)), Some(progress))
    }

    /// Runs `chain` under the stream timers. Expiry before the response is ready drops the
    /// chain (and with it any upstream attempt, which resets that stream) and answers
    /// "stream timeout" / "request timeout"; after that, the response body is watched.
    pub async fn run<F>(
        &self,
        req: Request<Body>,
        mut progress: Option<Arc<Progress>>,
        stats: &HttpStats,
        chain: impl FnOnce(Request<Body>) -> F,
    ) -> Response<Body>
    where
        F: Future<Output = Response<Body>>,
    {
        let idle = route_idle(&req).unwrap_or(self.idle);
        if idle.is_none() && self.request.is_none() {
            return chain(req).await;
        }
        let mut req = req;
        if progress.is_none() && !req.body().is_end_stream() {
            // Only the route enables a timer here (the connection manager has none), so the
            // body was not watched up front.
            let p = Progress::new();
            req = req.map(|b| watch(b, &p));
            progress = Some(p);
        }
        let request_done = |p: &Option<Arc<Progress>>| p.as_ref().is_none_or(|p| p.done());
        let grpc = super::headers::request_is_grpc(&req);
        let start = crate::clock::now();
        let chain = chain(req);
        tokio::pin!(chain);
        let mut idle_at = idle.map(|t| start + t);
        // Envoy disarms the request timer once the whole request is received.
        let mut request_at = self
            .request
            .filter(|_| !request_done(&progress))
            .map(|t| start + t);
        let resp = loop {
            tokio::select! {
                biased;
                resp = &mut chain => break resp,
                _ = sleep_until(idle_at), if idle_at.is_some() => {
                    let last = progress.as_ref().map_or(start, |p| p.last().max(start));
                    let deadline = idle.map(|t| last + t);
                    if deadline.is_some_and(|d| crate::clock::now() < d) {
                        idle_at = deadline;
                        continue;
                    }
                    stats.downstream_rq_idle_timeout.inc();
                    return timeout_reply(request_done(&progress), "stream timeout", grpc);
                }
                _ = sleep_until(request_at), if request_at.is_some() => {
                    if request_done(&progress) {
                        request_at = None;
                        continue;
                    }
                    stats.downstream_rq_timeout.inc();
                    return timeout_reply(false, "request timeout", grpc);
                }
            }
        };
        match idle {
            Some(t) if !resp.body().is_end_stream() => {
                let counter = stats.downstream_rq_idle_timeout.clone();
                resp.map(|b| {
                    IdleBody::wrap(b, t, progress, "stream idle timeout", move || counter.inc())
                })
            }
            _ => resp,
        }
    }
}
