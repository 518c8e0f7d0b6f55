//! App health checks (`--enable-app-health-check`), as daprd: the app is probed every interval;
//! after `--app-health-threshold` failures subscriptions stop pulling (messages stay in the broker)
//! and invocations of the app are refused with ERR_DIRECT_INVOKE; one good probe resumes both.
//! The sidecar's `/v1.0/healthz` stays 204 throughout (it is the sidecar's health, not the app's).

use crate::common::{Handler, Resp, TempDir, Upstream};
use crate::{component, post_json, req, resources, Redis, Sidecar};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Polls `f` until it is true (20 s at most).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP app: `/healthz` answers 200 or 503 from `healthy`, `/dapr/subscribe` subscribes
/// `orders` to `/orders` (deliveries counted), anything else echoes 200.
async fn http_app(healthy: Arc<AtomicBool>, delivered: Arc<AtomicUsize>) -> Upstream {
    let h: Handler = Arc::new(move |r: http::Request<hyper::body::Incoming>| {
        let healthy = healthy.clone();
        let delivered = delivered.clone();
        Box::pin(async move {
            let path = r.uri().path().to_string();
            let _ = r.into_body().collect().await;
            let (status, body) = match path.as_str() {
                "/healthz" if healthy.load(Ordering::SeqCst) => (200, ""),
                "/healthz" => (503, ""),
                "/dapr/subscribe" => (
                    200,
                    r#"[{"pubsubname":"ps","topic":"orders","route":"/orders"}]"#,
                ),
                "/orders" => {
                    delivered.fetch_add(1, Ordering::SeqCst);
                    (200, r#"{"status":"SUCCESS"}"#)
                }
                _ => (200, "pong"),
            };
            let mut resp: Resp = http::Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            resp
        })
    });
    Upstream::start(h).await
}

#[tokio::test]
async fn http_app_health_pauses_subscriptions_and_invocation() {
    let redis = Redis::start().await;
    let host = format!("127.0.0.1:{}", redis.port);
    let healthy = Arc::new(AtomicBool::new(true));
    let delivered = Arc::new(AtomicUsize::new(0));
    let app = http_app(healthy.clone(), delivered.clone()).await;
    let res = resources(&[(
        "ps.yaml",
        component("ps", "pubsub.redis", &[("redisHost", &host)]),
    )]);
    let data = TempDir::new();
    let m = Sidecar::start(
        "hcapp",
        &[
            "--app-port",
            &app.addr.port().to_string(),
            "--resources-path",
            &res.0.display().to_string(),
            "--enable-app-health-check",
            "--app-health-check-path",
            "/healthz",
            "--app-health-probe-interval",
            "1",
            "--app-health-probe-timeout",
            "500",
            "--app-health-threshold",
            "2",
        ],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    let invoke_url = format!("{}/v1.0/invoke/hcapp/method/ping", m.url());
    let publish = |n: u32| {
        let url = format!("{}/v1.0/publish/ps/orders", m.url());
        async move {
            let r = post_json(&url, &format!(r#"{{"n":{n}}}"#)).await;
            assert_eq!(r.status, 204, "{}", r.text());
        }
    };
    // Healthy after the first probe: delivery and invocation work.
    crate::grpc_app::wait_subscriptions(&m, 1).await;
    publish(1).await;
    eventually("first delivery", || async {
        delivered.load(Ordering::SeqCst) == 1
    })
    .await;
    let r = req("GET", &invoke_url, "", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Unhealthy after two failed probes: invocation refused, the sidecar itself still healthy.
    healthy.store(false, Ordering::SeqCst);
    eventually("invocation refused", || async {
        req("GET", &invoke_url, "", &[]).await.status == 500
    })
    .await;
    let r = req("GET", &invoke_url, "", &[]).await;
    assert_eq!(r.json()["errorCode"], "ERR_DIRECT_INVOKE");
    assert!(
        r.text().contains("app is not in a healthy state"),
        "{}",
        r.text()
    );
    let r = crate::common::get(&format!("{}/v1.0/healthz", m.url()))
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    // Published while unhealthy: stays in the stream, not pulled, not delivered.
    publish(2).await;
    publish(3).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        delivered.load(Ordering::SeqCst),
        1,
        "delivered while unhealthy"
    );
    assert!(
        redis.cli(&["XLEN", "orders"]).trim() == "3",
        "{}",
        redis.cli(&["XLEN", "orders"])
    );

    // Healthy again: both messages delivered, invocation forwarded.
    healthy.store(true, Ordering::SeqCst);
    eventually("delivery after recovery", || async {
        delivered.load(Ordering::SeqCst) == 3
    })
    .await;
    let r = req("GET", &invoke_url, "", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "pong");
    let pending = redis.cli(&["XPENDING", "orders", "hcapp"]);
    assert!(pending.starts_with('0'), "still pending: {pending}");

    // `?appid=` that is not this sidecar's: Dapr's ERR_HEALTH_APPID_NOT_MATCH.
    let r = crate::common::get(&format!("{}/v1.0/healthz?appid=other", m.url()))
        .await
        .unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["errorCode"], "ERR_HEALTH_APPID_NOT_MATCH");
    let r = crate::common::get(&format!("{}/v1.0/healthz?appid=hcapp", m.url()))
        .await
        .unwrap();
    assert_eq!(r.status, 204);
}

/// A gRPC app is probed with `AppCallbackHealthCheck.HealthCheck`. It starts unhealthy: mecha
/// treats it as unhealthy until a probe succeeds, so nothing is delivered and `InvokeService` to
/// it fails; once healthy, the queued in-memory message is delivered.
#[tokio::test]
async fn grpc_app_health_check() {
    use dapr::dapr::proto::common::v1 as common_v1;
    use dapr::dapr::proto::runtime::v1 as rtv1;
    let app = crate::grpc_app::App::default();
    let healthy = Arc::new(AtomicBool::new(false));
    let port = crate::grpc_app::start_grpc_app_with_health(
        app.clone(),
        crate::grpc_app::Health(healthy.clone()),
    )
    .await;
    let data = TempDir::new();
    let m = Sidecar::start(
        "ghc",
        &[
            "--app-port",
            &port.to_string(),
            "--app-protocol",
            "grpc",
            "--enable-app-health-check",
            "--app-health-probe-interval",
            "1",
            "--app-health-threshold",
            "1",
        ],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    crate::grpc_app::wait_subscriptions(&m, 1).await;
    let r = post_json(
        &format!("{}/v1.0/publish/pubsub/orders", m.url()),
        r#"{"id":1}"#,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let mut c = rtv1::dapr_client::DaprClient::connect(format!("http://127.0.0.1:{}", m.grpc_port))
        .await
        .unwrap();
    let invoke = || rtv1::InvokeServiceRequest {
        id: "ghc".into(),
        message: Some(common_v1::InvokeRequest {
            method: "echo".into(),
            ..Default::default()
        }),
    };
    let err = c.invoke_service(invoke()).await.expect_err("unhealthy app");
    assert!(err.message().contains("not in a healthy state"), "{err:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(app.events("orders").is_empty(), "delivered while unhealthy");

    healthy.store(true, Ordering::SeqCst);
    let ev = app.wait_events("orders", 1).await;
    assert_eq!(ev[0].data, br#"{"id":1}"#);
    eventually("InvokeService forwarded", || {
        let mut c = c.clone();
        async move { c.invoke_service(invoke()).await.is_ok() }
    })
    .await;
}
