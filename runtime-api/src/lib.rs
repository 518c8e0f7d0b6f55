//! # mecha-runtime-api
//!
//! The multi-runtime half of mecha (the Dapr / Layotto role): Dapr-compatible state, pub/sub and
//! service invocation APIs over HTTP and gRPC, served as the HTTP filter
//! `mecha.filters.http.runtime_api` in the proxy's filter chain, backed by pluggable components.
//!
//! It plugs into the data plane only through `mecha-filters`: the filter traits and registry, and
//! the `Upstream` interface for calls to the app and to other sidecars. (Being filled in by the
//! runtime API issue.)
