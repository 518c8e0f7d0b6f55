//! Integration tests of the data plane core: the real `mecha` binary against real upstreams.

#[path = "../common/mod.rs"]
mod common;

mod routing;
