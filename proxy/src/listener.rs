//! Listeners: bind, accept, run the network filters, hand the connection to the terminal filter
//! (HTTP connection manager or TCP proxy).

use crate::drain::Drain;
use crate::http::{ConnInfo, Hcm};
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
    pub chains: Vec<FilterChainRuntime>,
    pub stats: ListenerStats,
}

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Accepts until draining starts; each connection is served on its own task.
pub async fn run(listener: TcpListener, runtime: Arc<ArcSwap<ListenerRuntime>>, drain: Drain) {
    let mut stop = drain.signaled();
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
        tokio::spawn(async move {
            let _tracker = drain.track();
            serve_connection(rt, stream, remote, drain).await;
        });
    }
}

/// Serves one accepted connection on `rt` (also used by listeners that xDS replaces).
pub async fn serve_connection(
    rt: Arc<ListenerRuntime>,
    stream: TcpStream,
    remote: SocketAddr,
    drain: Drain,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(rt.address);
    rt.stats.downstream_cx_total.inc();
    rt.stats.downstream_cx_active.inc();
    let started = Instant::now();
    let Some(chain) = rt.chains.first() else {
        rt.stats.no_filter_chain_match.inc();
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
            rt.stats.downstream_cx_active.dec();
            rt.stats.downstream_cx_destroy.inc();
            return;
        }
    }
    match &chain.terminal {
        Terminal::Http(hcm) => {
            hcm.clone()
                .serve(stream, ConnInfo { remote, local }, drain)
                .await
        }
        Terminal::Tcp(tp) => tp.clone().serve(stream).await,
    }
    rt.stats.downstream_cx_active.dec();
    rt.stats.downstream_cx_destroy.inc();
    rt.stats
        .downstream_cx_length_ms
        .record_duration_ms(started.elapsed());
}
