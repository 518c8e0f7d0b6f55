//! The HTTP connection manager: serves one downstream connection (HTTP/1.1, HTTP/2 or detected),
//! prepares each request as Envoy does (hop-by-hop headers, `x-forwarded-*`, `x-request-id`),
//! selects the route, and runs the HTTP filter chain that ends in the router.

use super::h1_server::{Exit, H1Conn};
use super::headers::{append_via, strip_hop_by_hop, upgrade_type, uuid_v4_header};
use super::idle::StreamTimeouts;
use crate::drain::Drain;
use crate::route::RouteTable;
use crate::stats::HttpStats;
use arc_swap::ArcSwap;
use http::header::{Entry, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mecha_config::{CodecType, HttpConnectionManager, ServerHeaderTransformation};
use mecha_filters::{local_reply, Body, FilterChain, RequestInfo, RouteHandle};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");

#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// One configured connection manager (per filter chain). Its route table can be swapped (RDS).
pub struct Hcm {
    pub stat_prefix: String,
    pub stats: HttpStats,
    /// Shared with the router, which re-selects routes when a filter clears the route cache.
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub chain: FilterChain,
    pub(super) codec: CodecType,
    /// `http_protocol_options.accept_http_10`: otherwise HTTP/1.0 requests get 426.
    accept_http_10: bool,
    /// `http_protocol_options.default_host_for_http_10`.
    default_host_10: Option<HeaderValue>,
    pub(super) max_headers_bytes: usize,
    pub(super) max_headers_count: Option<usize>,
    use_remote_address: bool,
    skip_xff_append: bool,
    xff_num_trusted_hops: usize,
    generate_request_id: bool,
    preserve_external_request_id: bool,
    idle_timeout: Option<Duration>,
    max_connection_duration: Option<Duration>,
    server_header: ServerHeader,
    via: Option<HeaderValue>,
    websocket: bool,
    h2_stream_window: Option<u32>,
    h2_conn_window: Option<u32>,
    h2_max_streams: Option<u32>,
    drain_timeout: Duration,
    /// `stream_idle_timeout` and `request_timeout` (see `idle.rs`).
    timeouts: StreamTimeouts,
    /// The route name of requests whose route has none (shared, not allocated per request).
    no_name: Arc<str>,
}

/// `server_header_transformation` with its `server_name`, resolved once per connection manager.
enum ServerHeader {
    Overwrite(HeaderValue),
    AppendIfAbsent(HeaderValue),
    PassThrough,
}

impl ServerHeader {
    fn new(cfg: &HttpConnectionManager) -> Self {
        let name = || {
            cfg.server_name
                .as_deref()
                .and_then(|s| HeaderValue::from_str(s).ok())
                .unwrap_or(HeaderValue::from_static("mecha"))
        };
        match cfg.server_header_transformation {
            ServerHeaderTransformation::OVERWRITE => Self::Overwrite(name()),
            ServerHeaderTransformation::APPEND_IF_ABSENT => Self::AppendIfAbsent(name()),
            ServerHeaderTransformation::PASS_THROUGH => Self::PassThrough,
        }
    }
}

impl Hcm {
    pub fn new(
        cfg: &HttpConnectionManager,
        stats: HttpStats,
        routes: Arc<ArcSwap<RouteTable>>,
        chain: FilterChain,
    ) -> Self {
        let common = cfg.common_http_protocol_options.clone().unwrap_or_default();
        let h2 = cfg.http2_protocol_options.clone().unwrap_or_default();
        let h1 = cfg.http_protocol_options.clone().unwrap_or_default();
        Self {
            stat_prefix: cfg.stat_prefix.clone(),
            stats,
            routes,
            chain,
            codec: cfg.codec_type,
            accept_http_10: h1.accept_http_10,
            default_host_10: h1
                .default_host_for_http_10
                .as_deref()
                .filter(|h| !h.is_empty())
                .and_then(|h| HeaderValue::from_str(h).ok()),
            max_headers_bytes: cfg.max_request_headers_bytes(),
            max_headers_count: common.max_headers_count.map(|n| n as usize),
            use_remote_address: cfg.use_remote_address,
            skip_xff_append: cfg.skip_xff_append,
            xff_num_trusted_hops: cfg.xff_num_trusted_hops as usize,
            generate_request_id: cfg.generate_request_id(),
            preserve_external_request_id: cfg.preserve_external_request_id,
            // Envoy's default downstream idle timeout is 1 hour; 0 disables it.
            idle_timeout: match common.idle_timeout {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d.0),
                None => Some(Duration::from_secs(3600)),
            },
            max_connection_duration: common
                .max_connection_duration
                .filter(|d| !d.is_zero())
                .map(|d| d.0),
            server_header: ServerHeader::new(cfg),
            via: cfg
                .via
                .as_deref()
                .and_then(|s| HeaderValue::from_str(s).ok()),
            websocket: cfg.upgrade_enabled("websocket"),
            h2_stream_window: h2.initial_stream_window_size,
            h2_conn_window: h2.initial_connection_window_size,
            h2_max_streams: h2.max_concurrent_streams,
            drain_timeout: cfg
                .drain_timeout
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(5)),
            timeouts: StreamTimeouts::new(cfg),
            no_name: Arc::from(""),
        }
    }

    /// Serves one downstream connection until it closes, idles out, or the server drains.
    /// HTTP/1.1 starts in our own codec (`h1_server.rs`), which hands the connection to hyper
    /// for anything it does not serve itself; HTTP/2 goes to hyper from the start.
    pub async fn serve<IO>(self: Arc<Self>, io: IO, info: ConnInfo, drain: Drain)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.stats.downstream_cx_total.inc();
        self.stats.downstream_cx_active.inc();
        let activity = Arc::new(Activity::default());
        activity.epoch();
        let mut sup = Supervisor::new(&self, &drain);
        if self.codec == CodecType::HTTP2 {
            self.serve_hyper(io, info, &activity, &mut sup).await;
        } else {
            let mut conn = H1Conn::new(io);
            let stop = AtomicBool::new(false);
            let exit = {
                let serving = conn.serve(&self, info, &stop, &activity);
                tokio::pin!(serving);
                loop {
                    let event = std::future::poll_fn(|cx| {
                        if sup.shutting_down {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if let Poll::Ready(exit) = serving.as_mut().poll(cx) {
                            return Poll::Ready(Event::Closed(exit));
                        }
                        sup.poll_side(cx, &self, &activity).map(Event::Side)
                    })
                    .await;
                    match event {
                        Event::Closed(exit) => break Some(exit),
                        Event::Side(Side::Abort) => break None,
                        // Seen at the next poll, which comes right away.
                        Event::Side(Side::Shutdown) => {}
                    }
                }
            };
            if let Some(Exit::Handoff) = exit {
                self.serve_hyper(conn.into_rewind(), info, &activity, &mut sup)
                    .await;
            }
        }
        self.stats.downstream_cx_active.dec();
        self.stats.downstream_cx_destroy.inc();
    }

    /// Serves the rest of a connection with hyper (HTTP/2, upgrades, everything unusual).
    async fn serve_hyper<IO>(
        self: &Arc<Self>,
        io: IO,
        info: ConnInfo,
        activity: &Arc<Activity>,
        sup: &mut Supervisor,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = auto::Builder::new(crate::clock::FreshExecutor);
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            // Envoy has no request-headers timeout unless `request_headers_timeout` is set; hyper's
            // default 30 s one would also arm a timer for every request.
            .header_read_timeout(None)
            .max_buf_size(self.max_headers_bytes.max(8192));
        if let Some(n) = self.max_headers_count {
            builder.http1().max_headers(n);
        }
        {
            let mut h2 = builder.http2();
            h2.timer(TokioTimer::new())
                .max_header_list_size(self.max_headers_bytes as u32);
            if let Some(w) = self.h2_stream_window {
                h2.initial_stream_window_size(w);
            }
            if let Some(w) = self.h2_conn_window {
                h2.initial_connection_window_size(w);
            }
            if let Some(n) = self.h2_max_streams {
                h2.max_concurrent_streams(n);
            }
        }
        let hcm = self.clone();
        let act = activity.clone();
        // hyper moves each stream's future several times on its way into a spawned task (the
        // stream wrapper, `spawn`, the task cell), and the request's future is kilobytes: built in
        // a pooled block, only a pointer moves (~2.5k fewer instructions per h2c request).
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let hcm = hcm.clone();
            let guard = act.begin();
            mecha_filters::boxed_in_place(move || async move {
                let resp = hcm.handle(req, info).await;
                drop(guard);
                Ok::<_, Infallible>(resp)
            })
        });
        // Drives a hyper connection until it ends, shutting it down gracefully (or dropping it)
        // as the supervisor says.
        macro_rules! drive {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                if sup.shutting_down {
                    conn.as_mut().graceful_shutdown();
                }
                sup.side.woken.store(true, Ordering::Release);
                loop {
                    let event = std::future::poll_fn(|cx| {
                        if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                            return Poll::Ready(Event::Closed(res));
                        }
                        sup.poll_side(cx, self, activity).map(Event::Side)
                    })
                    .await;
                    match event {
                        Event::Closed(Err(e)) => {
                            tracing::debug!(error = %e, remote = %info.remote, "downstream connection error");
                            break;
                        }
                        Event::Closed(Ok(())) | Event::Side(Side::Abort) => break,
                        Event::Side(Side::Shutdown) => conn.as_mut().graceful_shutdown(),
                    }
                }
            }};
        }
        match self.codec {
            // hyper-util's `serve_connection_with_upgrades` detects the version itself, whatever
            // `http2_only` says; `serve_connection` honours it (HTTP/2 needs no HTTP/1 upgrades).
            CodecType::HTTP2 => {
                let builder = builder.http2_only();
                drive!(builder.serve_connection(TokioIo::new(io), service))
            }
            // HTTP1: our codec answers an HTTP/2 preface 400 before a hand-off, and hyper's
            // HTTP/1 server never switches to HTTP/2 mid-connection.
            CodecType::AUTO | CodecType::HTTP1 => {
                drive!(builder.serve_connection_with_upgrades(TokioIo::new(io), service))
            }
        }
    }

    /// The next idle or max-duration deadline, for a connection last active at `last`.
    fn next_deadline_at(&self, last: Instant, started: Instant) -> Option<Instant> {
        let idle = self.idle_timeout.map(|t| last + t);
        let max = self.max_connection_duration.map(|d| started + d);
        match (idle, max) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn expired(&self, a: &Activity, started: Instant) -> bool {
        let now = crate::clock::now_std();
        if self
            .max_connection_duration
            .is_some_and(|d| now >= started + d)
        {
            return true;
        }
        a.active() == 0 && self.idle_timeout.is_some_and(|t| now >= a.last() + t)
    }

    /// Handles one request end to end; never fails (errors become local replies).
    /// (hyper's path: our codec makes these checks on the requests it reads itself.)
    pub async fn handle(&self, mut req: Request<Incoming>, info: ConnInfo) -> Response<Body> {
        if let Err(status) = self.check_codec(&mut req) {
            return self.codec_reply(status, req.version());
        }
        let req = self.accept(req);
        self.respond(req, info).await
    }

    /// What Envoy's codecs and connection manager check of a request before it becomes a stream,
    /// for requests hyper read: HTTP/1.0 (`accept_http_10`, `default_host_for_http_10`), a
    /// missing host, an HTTP/1 head over `max_request_headers_kb` (hyper's own limit is at least
    /// 8 KiB; HTTP/2's is `max_header_list_size`). Also drops `expect: 100-continue`, which
    /// hyper has answered (Envoy's `proxy_100_continue: false`).
    fn check_codec<B>(&self, req: &mut Request<B>) -> Result<(), StatusCode> {
        let version = req.version();
        let h1 = version != http::Version::HTTP_2;
        if version < http::Version::HTTP_11 {
            if !self.accept_http_10 {
                return Err(StatusCode::UPGRADE_REQUIRED);
            }
            if let Some(host) = &self.default_host_10 {
                if let Entry::Vacant(e) = req.headers_mut().entry(http::header::HOST) {
                    e.insert(host.clone());
                }
            }
        }
        // Only a limit below hyper's own 8 KiB needs the head's size: the usual request (and
        // every HTTP/2 one) pays two lookups, not a walk over its fields.
        if h1 && self.max_headers_bytes < 8192 {
            let size: usize = req
                .headers()
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum();
            let line = req.method().as_str().len()
                + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
                + 12;
            if size + line + 2 > self.max_headers_bytes {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            }
        }
        if req.uri().authority().is_none() && !req.headers().contains_key(http::header::HOST) {
            return Err(StatusCode::BAD_REQUEST);
        }
        let expect = req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expect {
            req.headers_mut().remove(http::header::EXPECT);
        }
        Ok(())
    }

    /// A local reply to a request rejected before it became a stream (by our codec or
    /// [`Self::check_codec`]): counted as a request, with the `server` header, and closing an
    /// HTTP/1 connection.
    pub(super) fn codec_reply(&self, status: StatusCode, version: http::Version) -> Response<Body> {
        self.count_codec_reply(status, version);
        let mut resp = local_reply(status, "");
        *resp.version_mut() = version;
        if version != http::Version::HTTP_2 {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.response_headers(resp.headers_mut());
        resp
    }

    /// The stats of a request rejected by a codec.
    pub(super) fn count_codec_reply(&self, status: StatusCode, version: http::Version) {
        let stats = &self.stats;
        stats.downstream_rq_total.inc();
        match version {
            http::Version::HTTP_2 => stats.downstream_rq_http2_total.inc(),
            _ => stats.downstream_rq_http1_total.inc(),
        }
        stats.record_status(status.as_u16());
    }

    /// The `server` header a local reply carries, if any.
    pub(super) fn server_value(&self) -> Option<&HeaderValue> {
        match &self.server_header {
            ServerHeader::Overwrite(v) | ServerHeader::AppendIfAbsent(v) => Some(v),
            ServerHeader::PassThrough => None,
        }
    }

    /// `server` and `via` on a response.
    fn response_headers(&self, h: &mut http::HeaderMap) {
        match &self.server_header {
            ServerHeader::Overwrite(v) => {
                h.insert(http::header::SERVER, v.clone());
            }
            ServerHeader::AppendIfAbsent(v) => {
                if !h.contains_key(http::header::SERVER) {
                    h.insert(http::header::SERVER, v.clone());
                }
            }
            ServerHeader::PassThrough => {}
        }
        if let Some(via) = &self.via {
            append_via(h, via);
        }
    }

    /// Counts a request and boxes its body (with stream timers configured, watching its
    /// progress). Generic over the codec's body type up to here only, so the request's future
    /// is one type whichever codec read it.
    pub(super) fn accept<B>(&self, req: Request<B>) -> Accepted
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<mecha_filters::BoxError>,
    {
        let start = crate::clock::now_std();
        let stats = &self.stats;
        stats.downstream_rq_total.inc();
        match req.version() {
            http::Version::HTTP_2 => stats.downstream_rq_http2_total.inc(),
            _ => stats.downstream_rq_http1_total.inc(),
        }
        let version = req.version();
        let (req, progress) = self.timeouts.watch_request(req);
        Accepted {
            req,
            progress,
            version,
            start,
        }
    }

    /// Handles one request end to end; never fails (errors become local replies).
    pub(super) async fn respond(&self, accepted: Accepted, info: ConnInfo) -> Response<Body> {
        let Accepted {
            mut req,
            progress,
            version,
            start,
        } = accepted;
        let stats = &self.stats;
        // Counted here and uncounted when this future ends, however it ends: a client that
        // hangs up drops it mid-request.
        stats.downstream_rq_active.inc();
        let _active = ActiveRq(&stats.downstream_rq_active);
        let mut resp = match self.prepare(&mut req, info) {
            Err(local) => local,
            Ok(()) => {
                let chain = |req| self.chain.run(req);
                self.timeouts.run(req, progress, stats, chain).await
            }
        };
        // The downstream codec decides the response version, whatever the upstream spoke.
        *resp.version_mut() = version;
        self.response_headers(resp.headers_mut());
        let status = resp.status().as_u16();
        stats.record_status(status);
        stats
            .downstream_rq_time
            .record_duration_ms(crate::clock::now_std().saturating_duration_since(start));
        stats.downstream_rq_completed.inc();
        resp
    }

    /// Envoy's request preparation; returns a local reply when the request must not proceed.
    // The local reply is returned by value: boxing it would cost an allocation, and the `Ok`
    // path (every proxied request) only moves a discriminant.
    #[allow(clippy::result_large_err)]
    pub fn prepare(&self, req: &mut Request<Body>, info: ConnInfo) -> Result<(), Response<Body>> {
        let mut upgrade = upgrade_type(req.headers());
        match upgrade.as_deref() {
            None => {}
            Some("websocket") if self.websocket => {
                self.stats.downstream_cx_upgrades_total.inc();
            }
            // Envoy ignores an HTTP/1.1 upgrade to h2c (`curl --http2`): the request goes on as
            // HTTP/1.1 without it.
            Some("h2c") => {
                req.headers_mut().remove(&HTTP2_SETTINGS);
                upgrade = None;
            }
            Some(_) => return Err(local_reply(StatusCode::FORBIDDEN, "")),
        }
        let headers = req.headers_mut();
        strip_hop_by_hop(headers, upgrade.is_some());
        if let Some(via) = &self.via {
            append_via(headers, via);
        }
        // Envoy's internal/external decision (ConnectionManagerUtility::mutateRequestHeaders): a
        // request is internal when, after the append below, `x-forwarded-for` holds one address
        // and it is internal (RFC 1918, 127.0.0.1, fd00::/8, ::1). A client's own
        // `x-envoy-internal` never counts. Without use_remote_address and without XFF a request
        // is external even from an internal peer, as in Envoy.
        headers.remove(&X_ENVOY_INTERNAL);
        let internal = if self.use_remote_address {
            !headers.contains_key(&X_FORWARDED_FOR) && is_internal(info.remote.ip())
        } else {
            headers
                .get(&X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.contains(','))
                .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok())
                .is_some_and(is_internal)
        };
        if internal {
            headers.insert(X_ENVOY_INTERNAL.clone(), HeaderValue::from_static("true"));
        } else {
            // A client outside must not steer retries and timeouts (cleanInternalHeaders).
            super::retry::clean_internal_headers(headers, self.use_remote_address);
        }
        if self.use_remote_address {
            if !self.skip_xff_append {
                // Envoy appends its own address for a loopback peer (a local sidecar hop).
                let ip = if info.remote.ip().is_loopback() {
                    info.local.ip().to_string()
                } else {
                    info.remote.ip().to_string()
                };
                let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                    Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
                    _ => ip,
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(X_FORWARDED_FOR.clone(), v);
                }
            }
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        } else if let Entry::Vacant(e) = headers.entry(&X_FORWARDED_PROTO) {
            // One hash for the test and the insert.
            e.insert(HeaderValue::from_static("http"));
        }
        if self.generate_request_id {
            // At the edge Envoy does not trust an external request id unless told to.
            let replace = self.use_remote_address && !self.preserve_external_request_id;
            match headers.entry(&X_REQUEST_ID) {
                Entry::Vacant(e) => {
                    e.insert(uuid_v4_header());
                }
                Entry::Occupied(mut e) if replace => {
                    e.insert(uuid_v4_header());
                }
                Entry::Occupied(_) => {}
            }
        }
        let table = self.routes.load();
        let host = authority(req);
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let route = table
            .route(req.method(), host, path, req.headers())
            .cloned();
        let per_filter = route
            .as_ref()
            .map(|r| r.per_filter.clone())
            .unwrap_or_default();
        let route_name = route
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_else(|| self.no_name.clone());
        let client = self.trusted_client(req.headers(), info.remote);
        let grpc = super::headers::is_grpc(req.headers());
        if req.extensions().is_empty() {
            *req.extensions_mut() = mecha_filters::spare::extensions();
        }
        req.extensions_mut().insert(RequestInfo {
            downstream_remote: client,
            downstream_local: info.local,
            route_name,
            per_filter,
            route: RouteHandle(route.map(|r| r as Arc<dyn std::any::Any + Send + Sync>)),
            grpc,
        });
        Ok(())
    }
}

impl Hcm {
    /// Envoy's trusted client address: without `use_remote_address` (or with trusted hops) it is
    /// the `x-forwarded-for` entry `xff_num_trusted_hops` from the right; else the peer address.
    fn trusted_client(&self, headers: &http::HeaderMap, peer: SocketAddr) -> SocketAddr {
        if self.use_remote_address && self.xff_num_trusted_hops == 0 {
            return peer;
        }
        let Some(xff) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) else {
            return peer;
        };
        let entries: Vec<&str> = xff.split(',').map(str::trim).collect();
        // With use_remote_address the peer was already appended, so it is the first entry from
        // the right in both modes.
        entries
            .len()
            .checked_sub(1 + self.xff_num_trusted_hops)
            .and_then(|i| entries[i].parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 0))
            .unwrap_or(peer)
    }
}

/// Envoy's default internal addresses (`Network::Utility::isInternalAddress`).
fn is_internal(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_private() || v4 == std::net::Ipv4Addr::LOCALHOST,
        std::net::IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST || v6.octets()[0] == 0xfd,
    }
}

/// The request's authority: the Host header (HTTP/1) or the URI authority (HTTP/2).
pub fn authority(req: &Request<Body>) -> &str {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
}

/// Uncounts an active request when dropped.
struct ActiveRq<'a>(&'a mecha_filters::stats::Gauge);

impl Drop for ActiveRq<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A request counted and with its body boxed, ready for the chain.
pub(super) struct Accepted {
    req: Request<Body>,
    progress: Option<Arc<super::idle::Progress>>,
    version: http::Version,
    start: Instant,
}

/// Watches a connection on behalf of the connection manager: the server's drain signal and the
/// idle / max-duration deadline become a graceful shutdown of the connection, and a drain that
/// outlasts `drain_timeout` ends it. It outlives a hand-off from our codec to hyper.
struct Supervisor {
    draining: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Set once the drain signal came; `draining` is then the drain timeout.
    drain_started: bool,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set once the connection was asked to shut down (drain or deadline).
    shutting_down: bool,
    started: Instant,
    side: Arc<SideWaker>,
    /// The task waker last registered with `side`: registering is atomic read-modify-writes,
    /// and the connection's task (hence its waker) seldom changes.
    registered: Option<Waker>,
}

enum Event<T> {
    Closed(T),
    Side(Side),
}

impl Supervisor {
    fn new(hcm: &Hcm, drain: &Drain) -> Self {
        let started = crate::clock::now_std();
        Self {
            draining: drain.signaled(),
            drain_started: false,
            deadline: hcm
                .next_deadline_at(started, started)
                .map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
            shutting_down: false,
            started,
            side: Arc::new(SideWaker::default()),
            registered: None,
        }
    }

    /// Polls the drain signal and the deadline, after their own wake-ups only (not on every
    /// wake-up of the connection, which happen several times per request). Ready when the
    /// connection must shut down gracefully, or be dropped.
    fn poll_side(&mut self, cx: &mut Context<'_>, hcm: &Hcm, activity: &Activity) -> Poll<Side> {
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.side.task.register(cx.waker());
            self.registered = Some(cx.waker().clone());
        }
        // A plain load first: the flag is almost always clear, and a swap is a locked write.
        while self.side.woken.load(Ordering::Acquire)
            && self.side.woken.swap(false, Ordering::AcqRel)
        {
            let waker = Waker::from(self.side.clone());
            let mut scx = Context::from_waker(&waker);
            if self.draining.as_mut().poll(&mut scx).is_ready() {
                if self.drain_started {
                    // The drain timeout passed with requests still in flight.
                    return Poll::Ready(Side::Abort);
                }
                self.drain_started = true;
                self.shutting_down = true;
                self.draining = Box::pin(tokio::time::sleep(hcm.drain_timeout));
                self.side.woken.store(true, Ordering::Release);
                return Poll::Ready(Side::Shutdown);
            }
            if let (Some(d), false) = (self.deadline.as_mut(), self.shutting_down) {
                if d.as_mut().poll(&mut scx).is_ready() {
                    if hcm.expired(activity, self.started) {
                        hcm.stats.downstream_cx_idle_timeout.inc();
                        self.shutting_down = true;
                        return Poll::Ready(Side::Shutdown);
                    }
                    if let Some(next) = hcm.next_deadline_at(activity.last(), self.started) {
                        d.as_mut().reset(next.into());
                        self.side.woken.store(true, Ordering::Release);
                    }
                }
            }
        }
        Poll::Pending
    }
}

/// What the supervisor asks of the connection.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Shutdown,
    Abort,
}

/// Wakes the connection task on behalf of its side futures (drain, deadline) and records that
/// they need polling.
struct SideWaker {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl Default for SideWaker {
    fn default() -> Self {
        Self {
            woken: AtomicBool::new(true),
            task: Default::default(),
        }
    }
}

impl std::task::Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Per-connection activity: in-flight requests and the time the last one ended.
#[derive(Default)]
pub(super) struct Activity {
    active: AtomicUsize,
    last_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

pub(super) struct ActivityGuard(Arc<Activity>);

impl Activity {
    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(crate::clock::now_std)
    }
    pub(super) fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActivityGuard(self.clone())
    }
    fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
    fn last(&self) -> Instant {
        self.epoch() + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let ms = crate::clock::now_std()
            .saturating_duration_since(self.0.epoch())
            .as_millis() as u64;
        self.0.last_ms.store(ms, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
