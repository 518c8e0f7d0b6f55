//! HTTP: the connection manager (downstream codec, request preparation, route selection, filter
//! chain) and the router (the chain's terminal filter that forwards to a cluster).

mod h1_server;
pub mod hcm;
pub mod headers;
pub mod idle;
pub mod retry;
pub mod router;
pub mod upgrade;

pub use hcm::{ConnInfo, Hcm};
pub use router::Router;
