//! The interface through which filters reach the cluster manager.

use crate::{Body, BoxFuture};
use http::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("unknown cluster \"{0}\"")]
    UnknownCluster(String),
    #[error("no healthy upstream in cluster \"{0}\"")]
    NoHealthyUpstream(String),
    #[error("upstream connect error or disconnect/reset before headers: {0}")]
    Connect(String),
    #[error("upstream request timeout")]
    Timeout,
    #[error("upstream overflow: {0}")]
    Overflow(String),
    /// The request's body failed while it was being sent: the downstream's fault (e.g. a
    /// malformed chunked body), not the upstream's.
    #[error("downstream request body error: {0}")]
    RequestBody(String),
}

/// A filter's own upstream call to a named cluster: load balancing, pools, stats and the
/// cluster's policies apply exactly as for routed traffic. The request's URI path and query are
/// sent as given; scheme and authority are filled in from the chosen host.
pub trait Upstream: Send + Sync + 'static {
    fn call(
        &self,
        cluster: &str,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, UpstreamError>>;

    /// Whether a cluster of this name exists in the current configuration.
    fn has_cluster(&self, cluster: &str) -> bool;
}
