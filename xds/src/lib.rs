//! # mecha-xds
//!
//! The xDS client: an ADS stream (Envoy v3 protos over tonic, state-of-the-world and delta) that
//! receives listeners, routes, clusters and endpoints, translates them into `mecha-config` types,
//! validates them with the same validator as static config, and ACKs or NACKs. Accepted
//! resources become a new snapshot that the proxy swaps in. (Being filled in by the xDS issue.)
