//! # mecha-proxy
//!
//! The data plane engine. It turns a validated [`mecha_config::Bootstrap`] into a [`Snapshot`]
//! (listeners with their filter chains, route tables, clusters) and serves it:
//!
//! config → [`Snapshot`] → [`listener`] → network filters → [`http::Hcm`] → HTTP filters →
//! [`http::Router`] → [`cluster::Cluster`] → per-host pool.
//!
//! The request path reads shared state through `arc-swap` and atomics only; building a snapshot
//! (and anything that parses config) happens off the request path.

pub mod admin;
pub mod body;
pub mod build;
pub mod capture;
pub mod clock;
pub mod cluster;
pub mod drain;
pub mod filter_chain_match;
pub mod http;
mod http1;
pub mod listener;
pub mod listener_filters;
pub mod original_dst;
pub mod route;
pub mod server;
pub mod stats;
pub mod tcp_proxy;
pub mod timer_anchor;
pub mod xds_apply;

pub use build::{build, BuildContext, Snapshot};
pub use server::{LogControl, LogLevelError, Server, ServerOptions};

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] mecha_config::ConfigErrors),
    #[error("listener \"{name}\": cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}
