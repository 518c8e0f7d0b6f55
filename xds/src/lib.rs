//! # mecha-xds
//!
//! The xDS client: one ADS stream (Envoy v3 protos over tonic, state-of-the-world or delta) that
//! receives listeners, routes, clusters and endpoints, translates them into `mecha-config` types
//! ([`translate`]), validates them with the same validator as static config, and ACKs or NACKs.
//!
//! This crate depends only on `mecha-config` among mecha's crates: accepted resources are handed,
//! as a whole [`mecha_config::XdsResources`], to an [`XdsSink`] that the binary wires to the proxy.
//! The sink builds a new snapshot off the hot path and swaps it in; if it refuses (e.g. a filter
//! the registry does not know), the response is NACKed and the previous config keeps serving.

pub mod client;
mod fast;
mod file;
pub mod translate;

pub use client::{AdsClient, XdsError, XdsEvent, XdsSink};
