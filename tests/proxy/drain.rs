//! Graceful drain on SIGTERM: in-flight requests complete, new connections are refused, exit 0.

use crate::common::*;
use crate::routing::vhost_routes;
use std::time::Duration;

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let slow = Upstream::start(std::sync::Arc::new(|_req| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                b"done",
            )))
        })
    }))
    .await;
    let (admin, port) = (free_port(), free_port());
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: slow }\n",
        ),
        &static_cluster("slow", &[slow.addr], "ROUND_ROBIN", ""),
    );
    let mut m = Mecha::start(&cfg, admin).await;
    let mut inflight = vec![];
    for i in 0..8 {
        // Separate connections, so each must be drained on its own.
        inflight.push(tokio::spawn(async move {
            get(&format!("http://127.0.0.1:{port}/{i}")).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slow.hits(), 8);
    m.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused once draining has started.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "listener still accepting"
    );
    for t in inflight {
        let r = t
            .await
            .unwrap()
            .expect("in-flight request failed during drain");
        assert_eq!((r.status, r.text().as_str()), (200, "done"));
    }
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = m.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mecha did not exit after drain"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status}");
}
