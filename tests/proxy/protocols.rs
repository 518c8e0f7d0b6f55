//! Protocols end to end: HTTP/2 both sides, gRPC unary / server streaming / bidi streaming,
//! WebSocket upgrade, trailers, and large streamed bodies with bounded proxy memory.

use crate::common::*;
use crate::routing::vhost_routes;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use std::sync::Arc;
use std::time::Duration;

const H2_OPTS: &str = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n";

#[tokio::test]
async fn h2c_downstream_to_h1_and_h2_upstreams() {
    let h1 = Upstream::echo("h1").await;
    let h2 = Upstream::echo("h2").await;
    let (admin, port) = (free_port(), free_port());
    let routes = "              - match: { prefix: \"/h2\" }\n                route: { cluster: up_h2 }\n              - match: { prefix: \"/\" }\n                route: { cluster: up_h1 }\n";
    let clusters = format!(
        "{}{}",
        static_cluster("up_h1", &[h1.addr], "ROUND_ROBIN", ""),
        static_cluster("up_h2", &[h2.addr], "ROUND_ROBIN", H2_OPTS)
    );
    let m = Mecha::start(
        &http_bootstrap(admin, port, "", &vhost_routes(routes), &clusters),
        admin,
    )
    .await;
    let c = h2_client();
    let r = send(
        &c,
        http::Request::get(format!("http://127.0.0.1:{port}/x"))
            .body(Default::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    assert_eq!(
        r.json()["headers"]["host"][0],
        format!("127.0.0.1:{port}"),
        "the h2 :authority becomes the h1 Host"
    );
    let r = send(
        &c,
        http::Request::get(format!("http://127.0.0.1:{port}/h2"))
            .body(Default::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["version"], "HTTP/2.0");
    // HTTP/1.1 downstream to the h2 upstream too.
    let r = get(&format!("http://127.0.0.1:{port}/h2")).await.unwrap();
    assert_eq!(
        (r.version, r.json()["version"].as_str()),
        (http::Version::HTTP_11, Some("HTTP/2.0"))
    );
    assert_eq!(
        m.stat("http.ingress_http.downstream_rq_http2_total").await,
        Some(2)
    );
    // Many concurrent streams share one upstream h2 connection.
    let mut tasks = vec![];
    for _ in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &c,
                http::Request::get(format!("http://127.0.0.1:{port}/h2"))
                    .body(Default::default())
                    .unwrap(),
            )
            .await
            .unwrap()
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(m.stat("cluster.up_h2.upstream_cx_total").await, Some(1));
}

mod grpc {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    };
    use std::pin::Pin;
    use tonic::{Request, Response, Status, Streaming};

    /// A bidi-streaming service: answers each request with a response echoing its version.
    struct Echo;

    type Out<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Echo {
        type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
        type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

        async fn stream_aggregated_resources(
            &self,
            req: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
            let mut inbound = req.into_inner();
            let out = async_stream_like(move |tx| async move {
                while let Some(Ok(r)) = inbound.next().await {
                    if r.version_info == "fail" {
                        let _ = tx
                            .send(Err(Status::resource_exhausted("told to fail")))
                            .await;
                        return;
                    }
                    let _ = tx
                        .send(Ok(DiscoveryResponse {
                            version_info: format!("echo:{}", r.version_info),
                            ..Default::default()
                        }))
                        .await;
                }
            });
            Ok(Response::new(out))
        }

        async fn delta_aggregated_resources(
            &self,
            _req: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            Err(Status::unimplemented("delta"))
        }
    }

    fn async_stream_like<T: Send + 'static, F, Fut>(f: F) -> Out<T>
    where
        F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(f(tx));
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|x| (x, rx))
        }))
    }

    async fn start_grpc_backend() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<AggregatedDiscoveryServiceServer<Echo>>()
            .await;
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(AggregatedDiscoveryServiceServer::new(Echo))
                .serve_with_incoming(tokio_stream_wrapper(listener))
                .await
                .unwrap();
        });
        addr
    }

    fn tokio_stream_wrapper(
        l: tokio::net::TcpListener,
    ) -> impl futures_util::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
        futures_util::stream::unfold(l, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        })
    }

    #[tokio::test]
    async fn grpc_unary_server_streaming_and_bidi_through_mecha() {
        let backend = start_grpc_backend().await;
        let (admin, port) = (free_port(), free_port());
        let routes = "              - match: { prefix: \"/\", grpc: {} }\n                route: { cluster: grpc, timeout: 0s }\n";
        let cfg = http_bootstrap(
            admin,
            port,
            "",
            &vhost_routes(routes),
            &static_cluster("grpc", &[backend], "ROUND_ROBIN", H2_OPTS),
        );
        let m = Mecha::start(&cfg, admin).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();

        // Unary.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "envoy.service.discovery.v3.AggregatedDiscoveryService".into(),
            })
            .await
            .unwrap();
        assert_eq!(
            resp.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        // A gRPC error status arrives intact (it travels in trailers or trailers-only headers).
        let err = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "unknown".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);

        // Server streaming.
        let mut watch = health
            .watch(tonic_health::pb::HealthCheckRequest { service: "".into() })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            first.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        drop(watch);

        // Bidirectional streaming: interleaved request/response pairs on one stream.
        let mut ads = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(4);
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
            );
        let mut inbound = ads
            .stream_aggregated_resources(outbound)
            .await
            .unwrap()
            .into_inner();
        for i in 0..5 {
            tx.send(DiscoveryRequest {
                version_info: format!("v{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
            let r = tokio::time::timeout(Duration::from_secs(5), inbound.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(r.version_info, format!("echo:v{i}"));
        }
        tx.send(DiscoveryRequest {
            version_info: "fail".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), inbound.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), "told to fail");
        assert!(m.stat("cluster.grpc.upstream_rq_total").await.unwrap() >= 4);
    }
}

#[tokio::test]
async fn websocket_upgrade_echo() {
    // A WebSocket echo upstream.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let (admin, port) = (free_port(), free_port());
    let routes =
        "              - match: { prefix: \"/\" }\n                route: { cluster: ws }\n";
    let hcm = "          upgrade_configs: [{ upgrade_type: websocket }]\n";
    let cfg = http_bootstrap(
        admin,
        port,
        hcm,
        &vhost_routes(routes),
        &static_cluster("ws", &[ws_addr], "ROUND_ROBIN", ""),
    );
    let _m = Mecha::start(&cfg, admin).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..10 {
        let text = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let big = vec![7u8; 1 << 20];
    ws.send(tokio_tungstenite::tungstenite::Message::binary(big.clone()))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_data().as_ref(), &big[..]);
}

#[tokio::test]
async fn websocket_refused_without_upgrade_config() {
    let up = Upstream::echo("x").await;
    let (admin, port) = (free_port(), free_port());
    let routes =
        "              - match: { prefix: \"/\" }\n                route: { cluster: x }\n";
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(routes),
        &static_cluster("x", &[up.addr], "ROUND_ROBIN", ""),
    );
    let _m = Mecha::start(&cfg, admin).await;
    let err = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        })
        .unwrap()
}

#[tokio::test]
async fn hundred_megabyte_bodies_stream_both_ways_with_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    // Upstream: GET streams SIZE bytes; POST counts the bytes it receives.
    let up = Upstream::start(Arc::new(|req: http::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            if req.method() == http::Method::POST {
                let mut body = req.into_body();
                let mut n = 0u64;
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(d) = frame.data_ref() {
                        n += d.len() as u64;
                    }
                }
                return http::Response::new(http_body_util::Full::new(Bytes::from(n.to_string())));
            }
            http::Response::new(http_body_util::Full::new(Bytes::new()))
        })
    }))
    .await;
    // A separate raw upstream for the big download so the body is generated as a stream.
    let dl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dl_addr = dl.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = dl.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let chunks = futures_util::stream::iter((0..(SIZE / 65536)).map(|_| {
                        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![
                            1u8;
                            65536
                        ])))
                    }));
                    Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(chunks)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let (admin, port) = (free_port(), free_port());
    let routes = "              - match: { prefix: \"/download\" }\n                route: { cluster: dl }\n              - match: { prefix: \"/\" }\n                route: { cluster: up }\n";
    let clusters = format!(
        "{}{}",
        static_cluster("up", &[up.addr], "ROUND_ROBIN", ""),
        static_cluster("dl", &[dl_addr], "ROUND_ROBIN", "")
    );
    let m = Mecha::start(
        &http_bootstrap(admin, port, "", &vhost_routes(routes), &clusters),
        admin,
    )
    .await;
    let pid = m.child.id();
    let base_rss = rss_kb(pid);

    // Download, reading slowly at first so back-pressure must hold the data upstream.
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>()
        .get(format!("http://127.0.0.1:{port}/download").parse().unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut n = 0u64;
    let mut peak = 0;
    let mut frames = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(d) = frame.data_ref() {
            n += d.len() as u64;
        }
        frames += 1;
        if frames.is_multiple_of(200) {
            peak = peak.max(rss_kb(pid));
        }
        if frames == 50 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            peak = peak.max(rss_kb(pid));
        }
    }
    assert_eq!(n, SIZE);

    // Upload a streamed 100 MB request body.
    let chunks =
        futures_util::stream::iter((0..(SIZE / 65536)).map(|_| {
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![2u8; 65536])))
        }));
    let upload = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>()
        .request(
            http::Request::post(format!("http://127.0.0.1:{port}/upload"))
                .body(StreamBody::new(chunks))
                .unwrap(),
        )
        .await
        .unwrap();
    let got = upload.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&got), SIZE.to_string());
    peak = peak.max(rss_kb(pid));
    // 100 MB went through each way; the proxy must not have buffered it.
    assert!(
        peak < base_rss + 40 * 1024,
        "RSS grew from {base_rss} kB to {peak} kB"
    );
}
