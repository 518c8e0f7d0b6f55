//! HTTP/1.1 Upgrade (WebSocket) tunnelling: once both sides have switched protocols, bytes are
//! copied both ways until either side closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use mecha_filters::stats::Gauge;

pub fn spawn_tunnel(downstream: OnUpgrade, upstream: OnUpgrade, active: Gauge) {
    tokio::spawn(async move {
        let (d, u) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        active.inc();
        let mut d = TokioIo::new(d);
        let mut u = TokioIo::new(u);
        if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
        active.dec();
    });
}
