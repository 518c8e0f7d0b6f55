//! HTTP filters and the chain that runs them.
//!
//! A filter is middleware: it receives the request and the rest of the chain ([`Next`]). It can
//! answer by itself (never calling `next`), change the request, wrap its body to see data and
//! trailers as they stream, and change the response on its way back. The chain ends in a terminal
//! [`HttpService`] — the router.

use crate::{Body, BoxFuture};
use http::{HeaderMap, Request, Response};
use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

pub trait HttpFilter: Send + Sync + 'static {
    /// Handles one request. Call `next.run(req)` to pass it on.
    fn call<'a>(&'a self, req: Request<Body>, next: Next<'a>) -> BoxFuture<'a, Response<Body>>;
}

/// The end of a chain (the router), or any service a filter wants to wrap.
pub trait HttpService: Send + Sync + 'static {
    fn call<'a>(&'a self, req: Request<Body>) -> BoxFuture<'a, Response<Body>>;

    /// Whether a `method` request for `host` and `path_and_query` with `headers` would find a
    /// route now (the router answers from its current table, so the answer follows RDS updates);
    /// `None`: this service cannot tell.
    fn would_route(
        &self,
        _method: &http::Method,
        _host: &str,
        _path_and_query: &str,
        _headers: &HeaderMap,
    ) -> Option<bool> {
        None
    }
}

/// The rest of the chain after the current filter.
pub struct Next<'a> {
    filters: &'a [Arc<dyn HttpFilter>],
    terminal: &'a dyn HttpService,
}

impl<'a> Next<'a> {
    /// Asks the end of the chain whether it would route such a request (see
    /// [`HttpService::would_route`]). A filter that re-routes a request (with [`ClearRouteCache`])
    /// and has another way to send it can skip the re-routing pass when the answer is no.
    pub fn would_route(
        &self,
        method: &http::Method,
        host: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Option<bool> {
        self.terminal
            .would_route(method, host, path_and_query, headers)
    }

    pub fn run(self, req: Request<Body>) -> BoxFuture<'a, Response<Body>> {
        match self.filters.split_first() {
            Some((first, rest)) => first.call(
                req,
                Next {
                    filters: rest,
                    terminal: self.terminal,
                },
            ),
            None => self.terminal.call(req),
        }
    }
}

/// The filters of one HTTP connection manager, in order, and its terminal service.
pub struct FilterChain {
    filters: Vec<Arc<dyn HttpFilter>>,
    terminal: Arc<dyn HttpService>,
}

impl FilterChain {
    pub fn new(filters: Vec<Arc<dyn HttpFilter>>, terminal: Arc<dyn HttpService>) -> Self {
        Self { filters, terminal }
    }

    pub fn run<'a>(&'a self, req: Request<Body>) -> BoxFuture<'a, Response<Body>> {
        Next {
            filters: &self.filters,
            terminal: &*self.terminal,
        }
        .run(req)
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }
}

/// Inserted into a request's extensions by a filter that changed what routing depends on (path,
/// `Host`, headers): the router then selects the route again, as Envoy's `clearRouteCache()`.
/// The runtime API uses it to send service invocation through the mesh's routes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClearRouteCache;

/// Set by the router in the extensions of its 404 reply when no route matched, so a filter that
/// re-routed a request (see [`ClearRouteCache`]) can tell "no route" from an upstream's 404.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRoute;

/// Set by a filter that re-routes a request (with [`ClearRouteCache`]) and has another way to
/// send it when no route matches: the router then gives the request back, untouched, in its
/// reply's [`Unrouted`] extension (no 404 is built, no `no_route` is counted), so the filter
/// needs no copy of the request kept aside for that case.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandBackIfNoRoute;

/// The request the router gave back (see [`HandBackIfNoRoute`]). Extensions must be `Clone` and
/// `Sync`, hence the shared slot; only the filter that asked takes the request out.
#[derive(Clone)]
pub struct Unrouted(Arc<std::sync::Mutex<Option<Request<Body>>>>);

impl Unrouted {
    pub fn new(req: Request<Body>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(req))))
    }

    /// The request, once.
    pub fn take(&self) -> Option<Request<Body>> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// Facts about the downstream connection and request, set by the connection manager in the
/// request's extensions before the chain runs.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    /// The route's name (empty when unnamed or no route matched).
    pub route_name: Arc<str>,
    /// Per-filter config of the selected route (route overrides virtual host).
    pub per_filter: PerFilterConfig,
    /// The route the connection manager selected, for the router.
    pub route: RouteHandle,
    /// Whether the request, as received, is gRPC (`content-type: application/grpc…`): local
    /// replies (timeouts, upstream failures) then take gRPC's trailers-only form. Read once
    /// here rather than looked up again by each part that may answer.
    pub grpc: bool,
}

/// The connection manager's route selection, opaque here (the route type is the proxy's). It
/// rides in [`RequestInfo`] rather than in an extension of its own: one extension insert fewer
/// per request.
#[derive(Clone, Default)]
pub struct RouteHandle(pub Option<Arc<dyn Any + Send + Sync>>);

impl std::fmt::Debug for RouteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "RouteHandle(Some(..))",
            None => "RouteHandle(None)",
        })
    }
}

/// Per-route filter configs, keyed by the filter's `name` in `http_filters[]`, parsed once at
/// config time by the filter's factory.
#[derive(Clone, Default)]
pub struct PerFilterConfig(pub Option<Arc<HashMap<String, Arc<dyn Any + Send + Sync>>>>);

impl PerFilterConfig {
    /// The per-route config for `filter_name`, if the route (or its virtual host) has one of type `T`.
    pub fn get<T: Any + Send + Sync>(&self, filter_name: &str) -> Option<&T> {
        self.0.as_ref()?.get(filter_name)?.downcast_ref::<T>()
    }
}

impl std::fmt::Debug for PerFilterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self.0.iter().flat_map(|m| m.keys()).collect();
        f.debug_tuple("PerFilterConfig").field(&keys).finish()
    }
}
