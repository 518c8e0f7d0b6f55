//! HTTP filters built into mecha, each with its Envoy `@type` and stats.

pub mod fault;
pub mod local_ratelimit;
