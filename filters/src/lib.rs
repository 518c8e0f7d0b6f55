//! # mecha-filters
//!
//! The seam every capability plugs into. This crate defines
//!
//! - the HTTP filter trait ([`HttpFilter`]) and the chain that runs filters in order and ends in a
//!   terminal service (the router, which lives in `mecha-proxy`);
//! - the network filter trait ([`NetworkFilter`]) for connection-level decisions;
//! - the factory [`Registry`] that builds filters from a bootstrap's `@type` URL (or `name`),
//!   including per-route config from `typed_per_filter_config`;
//! - the [`Upstream`] interface through which a filter makes its own call to a named cluster
//!   (service invocation and pub/sub delivery use it);
//! - the stats store ([`stats`]) shared by every component, with Envoy's stat names.
//!
//! It depends only on `mecha-config`; the proxy and the runtime API depend on it.

pub mod body;
pub mod builtin;
pub mod chain;
pub mod network;
pub mod pooled;
pub mod registry;
pub mod spare;
pub mod stats;
pub mod upstream;

pub use body::{empty, full, local_reply, Body, BoxError};
pub use chain::{
    ClearRouteCache, FilterChain, HandBackIfNoRoute, HttpFilter, HttpService, Next, NoRoute,
    PerFilterConfig, RequestInfo, RouteHandle, Unrouted,
};
pub use network::{ConnectionInfo, NetworkAction, NetworkFilter};
pub use registry::{FactoryContext, HttpFilterFactory, NetworkFilterFactory, Registry};
pub use upstream::{Upstream, UpstreamError};

/// A boxed, `Send` future, the return type of filter calls.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// `Box::pin(make())` with the allocation made first, so the future is written straight into
/// it. `Box::pin(fut)` builds the future on the stack and then copies all of it, and the
/// futures of a filter or the router are kilobytes: that copy was ~600 instructions of a
/// proxied request. Futures of a kilobyte or more live in per-thread pooled blocks
/// ([`pooled`]), so a request makes no large allocation. Filters should box their futures
/// with this.
pub fn boxed_in_place<'a, F>(make: impl FnOnce() -> F) -> BoxFuture<'a, F::Output>
where
    F: std::future::Future + Send + 'a,
{
    match pooled::Pooled::new_in_place(make) {
        Ok(fut) => Box::pin(fut),
        Err(make) => {
            let mut slot = Box::<F>::new_uninit();
            slot.write(make());
            // SAFETY: written just above.
            Box::into_pin(unsafe { slot.assume_init() })
        }
    }
}
