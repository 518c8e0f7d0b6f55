//! Transparent capture on the listener side: the per-listener runtime of `use_original_dst`,
//! the `original_dst` / `tls_inspector` / `http_inspector` listener filters and
//! `bind_to_port`, and the hand-off of a redirected connection to the listener that owns its
//! original destination (Envoy's `use_original_dst` semantics: an exact `ip:port` listener
//! first, then a wildcard `0.0.0.0:port` / `[::]:port` one; otherwise the accepting listener
//! keeps the connection).

use crate::listener::ListenerRuntime;
use crate::listener_filters::{InspectorStats, Inspectors};
use mecha_config::{ListenerCapture, ListenerFilterKind};
use mecha_filters::stats::Store;
use mecha_filters::stats::{Counter, Scope};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};

#[derive(Default)]
pub struct CaptureRuntime {
    pub use_original_dst: bool,
    /// Restore the local address from SO_ORIGINAL_DST (the `original_dst` listener filter, or
    /// implied by `use_original_dst` as in Envoy).
    pub restore_original_dst: bool,
    pub bind_to_port: bool,
    pub inspectors: Option<Inspectors>,
    /// The snapshot's listeners, set once after the snapshot is built (only for
    /// `use_original_dst` listeners); read lock-free on accept. Weak: a listener is in its own
    /// list, and a strong reference would keep every replaced snapshot alive.
    pub handoff: OnceLock<Vec<Weak<ListenerRuntime>>>,
    /// `listener.<address>.downstream_pre_cx_timeout`: listener filters timed out.
    pub pre_cx_timeout: Option<Counter>,
}

impl CaptureRuntime {
    pub fn new(cfg: &ListenerCapture, store: &Store, scope: &Scope) -> Self {
        let tls = cfg.has(ListenerFilterKind::TlsInspector);
        let http = cfg.has(ListenerFilterKind::HttpInspector);
        Self {
            use_original_dst: cfg.use_original_dst,
            restore_original_dst: cfg.use_original_dst || cfg.has(ListenerFilterKind::OriginalDst),
            bind_to_port: cfg.bind_to_port,
            inspectors: (tls || http).then(|| Inspectors {
                tls,
                http,
                timeout: cfg.listener_filters_timeout(),
                continue_on_timeout: cfg.continue_on_listener_filters_timeout,
                stats: InspectorStats::new(store),
            }),
            handoff: OnceLock::new(),
            pre_cx_timeout: Some(store.counter(scope, "downstream_pre_cx_timeout")),
        }
    }

    /// A plain listener (no capture), bound to its port.
    pub fn plain() -> Self {
        Self {
            bind_to_port: true,
            ..Default::default()
        }
    }
}

/// Gives every `use_original_dst` listener the list of listeners it may hand connections to.
pub fn link_handoff(listeners: &[Arc<ListenerRuntime>]) {
    for l in listeners.iter().filter(|l| l.capture.use_original_dst) {
        let _ = l
            .capture
            .handoff
            .set(listeners.iter().map(Arc::downgrade).collect());
    }
}

/// The listener that owns `dst`, if it is not `from` itself. No allocation: this runs per
/// accepted connection.
pub fn handoff_target(
    from: &Arc<ListenerRuntime>,
    dst: SocketAddr,
) -> Option<Arc<ListenerRuntime>> {
    let all = from.capture.handoff.get()?;
    let mut wildcard = None;
    for l in all.iter().filter_map(Weak::upgrade) {
        if l.address == dst {
            return (!Arc::ptr_eq(&l, from)).then_some(l);
        }
        if wildcard.is_none()
            && l.address.port() == dst.port()
            && l.address.ip().is_unspecified()
            && l.address.is_ipv4() == dst.is_ipv4()
        {
            wildcard = Some(l);
        }
    }
    wildcard.filter(|l| !Arc::ptr_eq(l, from))
}
