//! Listeners: bind, accept, recover the original destination and run the listener filters
//! (transparent capture, `capture.rs`), select the filter chain (`filter_chain_match`), run the
//! network filters, hand the connection to the terminal filter (HTTP connection manager or TCP
//! proxy).

use crate::capture::{handoff_target, CaptureRuntime};
use crate::drain::Drain;
use crate::filter_chain_match::{ChainMatcher, ConnMeta};
use crate::http::{ConnInfo, Hcm};
use crate::listener_filters::{inspect, Detected, Outcome};
use crate::stats::ListenerStats;
use crate::tcp_proxy::TcpProxy;
use arc_swap::ArcSwap;
use mecha_filters::{ConnectionInfo, NetworkAction, NetworkFilter};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

pub enum Terminal {
    Http(Arc<Hcm>),
    Tcp(Arc<TcpProxy>),
}

pub struct FilterChainRuntime {
    pub network_filters: Vec<Arc<dyn NetworkFilter>>,
    pub terminal: Terminal,
}

/// The built form of one `Listener`; swappable as a whole.
pub struct ListenerRuntime {
    pub name: String,
    pub address: SocketAddr,
    /// `socket_address.ipv4_compat`: an IPv6 listener also accepts IPv4 (mapped) connections.
    pub ipv4_compat: bool,
    pub chains: Vec<FilterChainRuntime>,
    pub stats: ListenerStats,
    /// Chain selection over `chains` (Envoy's `filter_chain_match` order).
    pub matcher: ChainMatcher,
    /// Serves connections no chain matches.
    pub default_chain: Option<FilterChainRuntime>,
    pub capture: CaptureRuntime,
}

/// Keeps `downstream_cx_active` right on every exit path.
struct ActiveCx<'a>(&'a ListenerStats);

impl Drop for ActiveCx<'_> {
    fn drop(&mut self) {
        self.0.downstream_cx_active.dec();
        self.0.downstream_cx_destroy.inc();
    }
}

/// Binds a listening socket. An IPv6 address is IPv6-only unless `ipv4_compat`, as in Envoy
/// (whatever the host's `net.ipv6.bindv6only` default).
pub fn bind(addr: SocketAddr, ipv4_compat: bool) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(!ipv4_compat)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until draining starts; each connection is served on its own task.
pub async fn run(listener: TcpListener, runtime: Arc<ArcSwap<ListenerRuntime>>, drain: Drain) {
    let mut stop = drain.accept_stopped();
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let rt = runtime.load_full();
        let drain = drain.clone();
        tokio::spawn(crate::clock::Fresh::new(async move {
            let _tracker = drain.track();
            serve_connection(rt, stream, remote, drain).await;
        }));
    }
}

/// Serves one accepted connection on `rt` (also used by listeners that xDS replaces).
pub async fn serve_connection(
    mut rt: Arc<ListenerRuntime>,
    stream: TcpStream,
    remote: SocketAddr,
    drain: Drain,
) {
    let _ = stream.set_nodelay(true);
    let mut local = stream.local_addr().unwrap_or(rt.address);
    if rt.capture.restore_original_dst {
        match crate::original_dst::original_dst(&stream, local) {
            Ok(Some(dst)) => {
                if dst != local && rt.capture.use_original_dst {
                    if let Some(target) = handoff_target(&rt, dst) {
                        tracing::trace!(%remote, %dst, from = %rt.name, to = %target.name, "handing off to the original destination's listener");
                        rt = target;
                    }
                }
                local = dst;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(%remote, error = %e, "SO_ORIGINAL_DST failed"),
        }
    }
    rt.stats.downstream_cx_total.inc();
    rt.stats.downstream_cx_active.inc();
    let _active = ActiveCx(&rt.stats);
    let started = Instant::now();
    let detected = match &rt.capture.inspectors {
        None => Detected::default(),
        Some(insp) => match inspect(&stream, insp).await {
            Outcome::Done(d) => d,
            Outcome::TimedOut(d) => {
                if let Some(c) = &rt.capture.pre_cx_timeout {
                    c.inc();
                }
                if !insp.continue_on_timeout {
                    tracing::debug!(%remote, "listener filters timed out; closing");
                    return;
                }
                d
            }
            Outcome::Close(reason) => {
                tracing::debug!(%remote, reason, "connection closed by a listener filter");
                return;
            }
        },
    };
    let meta = ConnMeta {
        destination: local,
        source: remote,
        direct_source: remote,
        server_name: detected.server_name.as_deref(),
        transport: detected.transport,
        application_protocols: &detected.application_protocols,
    };
    let chain = rt
        .matcher
        .select(&meta)
        .and_then(|i| rt.chains.get(i))
        .or(rt.default_chain.as_ref());
    let Some(chain) = chain else {
        rt.stats.no_filter_chain_match.inc();
        tracing::debug!(%remote, %local, sni = ?detected.server_name, "no filter chain matches");
        return;
    };
    let info = ConnectionInfo {
        remote,
        local,
        listener: rt.name.clone(),
    };
    for f in &chain.network_filters {
        if let NetworkAction::Close(reason) = f.on_new_connection(&info) {
            tracing::debug!(%remote, %reason, "connection closed by network filter");
            return;
        }
    }
    match &chain.terminal {
        Terminal::Http(hcm) => {
            hcm.clone()
                .serve(stream, ConnInfo { remote, local }, drain)
                .await
        }
        Terminal::Tcp(tp) => tp.clone().serve(stream, local).await,
    }
    rt.stats
        .downstream_cx_length_ms
        .record_duration_ms(started.elapsed());
}
