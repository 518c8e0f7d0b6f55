//! Integration tests of the data plane core: the real `mecha` binary against real upstreams.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod downstream_h1;
mod drain;
mod failures;
mod filters;
mod lb;
mod protocols;
mod routing;
mod tcp;
mod upstream_h1;
mod validate;
