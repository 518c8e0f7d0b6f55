//! Pub/sub: programmatic and declarative subscriptions, CloudEvents, and Dapr's delivery
//! semantics (SUCCESS / RETRY / DROP, 404, retries, dead letter) to a real test app, for
//! pubsub.in-memory and pubsub.redis (including a SIGKILL mid-delivery).

use crate::common::{Handler, Resp, Upstream};
use crate::{component, post_json, resources, Redis, Sidecar};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the test app received, by path.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<(String, serde_json::Value, String)>>>);

impl Received {
    pub fn on(&self, path: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, v, _)| v.clone())
            .collect()
    }
    pub async fn wait(&self, path: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.on(path);
            if v.len() >= n {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: got {} of {n} deliveries",
                v.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn resp(status: u16, body: &str) -> Resp {
    let mut r = http::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A Dapr app: `GET /dapr/subscribe` answers `subscribe`; other paths record the event and
/// answer by `behaviour(path, nth delivery on that path)`.
pub async fn test_app(
    subscribe: serde_json::Value,
    behaviour: fn(&str, usize) -> (u16, &'static str),
) -> (Upstream, Received) {
    let rec = Received::default();
    let r2 = rec.clone();
    let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let sub = subscribe.to_string();
    let h: Handler = Arc::new(move |req: http::Request<hyper::body::Incoming>| {
        let rec = r2.clone();
        let counts = counts.clone();
        let sub = sub.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            if path == "/dapr/subscribe" {
                return resp(200, &sub);
            }
            let ct = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            rec.0.lock().unwrap().push((path.clone(), v, ct));
            let n = {
                let mut c = counts.lock().unwrap();
                let e = c.entry(path.clone()).or_default();
                *e += 1;
                *e
            };
            let (status, body) = behaviour(&path, n);
            resp(status, body)
        })
    });
    (Upstream::start(h).await, rec)
}

fn behaviour(path: &str, n: usize) -> (u16, &'static str) {
    match path {
        // Fails its first 2 deliveries (an error status, then RETRY), then succeeds.
        "/flaky" if n == 1 => (500, ""),
        "/flaky" if n == 2 => (200, r#"{"status":"RETRY"}"#),
        "/always-retry" => (200, r#"{"status":"RETRY"}"#),
        "/gone" => (404, ""),
        "/drop" => (200, r#"{"status":"DROP"}"#),
        _ => (200, r#"{"status":"SUCCESS"}"#),
    }
}

fn subscriptions() -> serde_json::Value {
    serde_json::json!([
        {"pubsubname": "ps", "topic": "orders", "route": "/orders"},
        {"pubsubname": "ps", "topic": "flaky", "route": "/flaky"},
        {"pubsubname": "ps", "topic": "doomed", "route": "/always-retry", "deadLetterTopic": "dead"},
        {"pubsubname": "ps", "topic": "dead", "route": "/dead"},
        {"pubsubname": "ps", "topic": "gone", "route": "/gone"},
        {"pubsubname": "ps", "topic": "drop", "route": "/drop"},
        {"pubsubname": "ps", "topic": "typed", "routes": {
            "rules": [{"match": "event.type == \"widget\"", "path": "/widgets"}],
            "default": "/other"}}
    ])
}

const DECLARATIVE: &str = r#"apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata:
  name: decl
spec:
  topic: declared
  pubsubname: ps
  routes:
    default: /declared
"#;

async fn delivery_suite(
    ps: &[(&str, &str)],
    type_: &str,
    app_id: &str,
) -> (Sidecar, Received, Upstream) {
    let (app, rec) = test_app(subscriptions(), behaviour).await;
    let mut meta = vec![("backOffDuration", "50ms"), ("backOffMaxRetries", "3")];
    meta.extend_from_slice(ps);
    let res = resources(&[
        ("ps.yaml", component("ps", type_, &meta)),
        ("sub.yaml", DECLARATIVE.to_string()),
    ]);
    let m = Sidecar::start(
        app_id,
        &[
            "--app-port",
            &app.addr.port().to_string(),
            "--resources-path",
            &res.0.display().to_string(),
        ],
        &[],
    )
    .await;
    // Programmatic subscriptions are loaded once the app answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let md = crate::common::get(&format!("{}/v1.0/metadata", m.url()))
            .await
            .unwrap()
            .json();
        if md["subscriptions"].as_array().map(|a| a.len()).unwrap_or(0) >= 8 {
            break;
        }
        assert!(Instant::now() < deadline, "subscriptions not loaded: {md}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let p = |t: &str| format!("{}/v1.0/publish/ps/{t}", m.url());
    let r = crate::post_json(&p("orders"), r#"{"id": 42}"#).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let got = rec.wait("/orders", 1).await;
    let ev = &got[0];
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["source"], app_id);
    assert_eq!(ev["topic"], "orders");
    assert_eq!(ev["pubsubname"], "ps");
    assert_eq!(ev["datacontenttype"], "application/json");
    assert_eq!(ev["data"]["id"], 42);
    assert!(ev["id"].as_str().is_some_and(|s| !s.is_empty()));
    let ct = rec
        .0
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _, _)| p == "/orders")
        .map(|x| x.2.clone())
        .unwrap();
    assert_eq!(ct, "application/cloudevents+json");
    // Fails twice, then SUCCESS: delivered exactly 3 times.
    post_json(&p("flaky"), r#""f""#).await;
    rec.wait("/flaky", 3).await;
    // Always RETRY: 1 + 3 retries, then the dead-letter topic.
    post_json(&p("doomed"), r#""d""#).await;
    let dead = rec.wait("/dead", 1).await;
    assert_eq!(dead[0]["data"], "d");
    assert_eq!(rec.on("/always-retry").len(), 4);
    // 404 and DROP: no retries.
    post_json(&p("gone"), "1").await;
    post_json(&p("drop"), "1").await;
    rec.wait("/gone", 1).await;
    rec.wait("/drop", 1).await;
    // Routing rules on event.type; an app-sent CloudEvent passes through.
    crate::req(
        "POST",
        &p("typed"),
        r#"{"specversion":"1.0","id":"ce-1","source":"me","type":"widget","data":{"w":1}}"#,
        &[("content-type", "application/cloudevents+json")],
    )
    .await;
    post_json(&p("typed"), r#"{"other": true}"#).await;
    let w = rec.wait("/widgets", 1).await;
    assert_eq!(w[0]["id"], "ce-1");
    assert_eq!(w[0]["source"], "me");
    rec.wait("/other", 1).await;
    // Declarative subscription; rawPayload publish arrives as data_base64.
    crate::req(
        "POST",
        &format!("{}?metadata.rawPayload=true", p("declared")),
        "raw!",
        &[("content-type", "text/plain")],
    )
    .await;
    let d = rec.wait("/declared", 1).await;
    assert_eq!(d[0]["data_base64"], "cmF3IQ==");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.on("/gone").len(), 1, "404 must not be retried");
    assert_eq!(rec.on("/drop").len(), 1, "DROP must not be retried");
    assert_eq!(rec.on("/flaky").len(), 3);
    // Errors.
    let r = post_json(&format!("{}/v1.0/publish/nosuch/t", m.url()), "1").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["errorCode"], "ERR_PUBSUB_NOT_FOUND");
    let r = post_json(&p("orders"), "{bad json").await;
    assert_eq!(r.status, 400, "{}", r.text());
    (m, rec, app)
}

#[tokio::test]
async fn in_memory_delivery_semantics() {
    delivery_suite(&[], "pubsub.in-memory", "subapp").await;
}

#[tokio::test]
async fn redis_streams_delivery_semantics_and_sigkill_redelivery() {
    let redis = Redis::start().await;
    let host = format!("127.0.0.1:{}", redis.port);
    let (m, _rec, app) = delivery_suite(
        &[
            ("redisHost", &host),
            ("processingTimeout", "1s"),
            ("redeliverInterval", "200ms"),
        ],
        "pubsub.redis",
        "redisapp",
    )
    .await;
    // Messages stay in the stream, acked by the app's consumer group.
    let pending = redis.cli(&["XPENDING", "orders", "redisapp"]);
    assert!(pending.starts_with("0"), "orders still pending: {pending}");
    drop(m);
    drop(app);
    // At least once across a crash: the first app never answers, so every delivery is in
    // flight when mecha is SIGKILLed; after a restart against a working app, every message is
    // delivered and acknowledged.
    let (good_app, rec) = test_app(serde_json::json!([]), |_, _| {
        (200, r#"{"status":"SUCCESS"}"#)
    })
    .await;
    let blocker = Upstream::start(Arc::new(|_req| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            resp(200, "")
        })
    }))
    .await;
    let sub = "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata:\n  name: jobs\nspec:\n  topic: jobs\n  pubsubname: ps\n  routes:\n    default: /jobs\n";
    let res = resources(&[
        (
            "ps.yaml",
            component(
                "ps",
                "pubsub.redis",
                &[
                    ("redisHost", &host),
                    ("processingTimeout", "1s"),
                    ("redeliverInterval", "200ms"),
                ],
            ),
        ),
        ("sub.yaml", sub.to_string()),
    ]);
    let rp = res.0.display().to_string();
    let mut m = Sidecar::start(
        "jobsapp",
        &[
            "--app-port",
            &blocker.addr.port().to_string(),
            "--resources-path",
            &rp,
        ],
        &[],
    )
    .await;
    for i in 0..5 {
        let r = post_json(
            &format!("{}/v1.0/publish/ps/jobs", m.url()),
            &format!("{i}"),
        )
        .await;
        assert_eq!(r.status, 204);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = redis.cli(&["XPENDING", "jobs", "jobsapp"]);
        if p.lines().next().and_then(|l| l.trim().parse::<u32>().ok()) == Some(5) {
            break;
        }
        assert!(Instant::now() < deadline, "deliveries never started: {p}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let _ = m.child.kill();
    let _ = m.child.wait();
    drop(m);
    let m = Sidecar::start(
        "jobsapp",
        &[
            "--app-port",
            &good_app.addr.port().to_string(),
            "--resources-path",
            &rp,
        ],
        &[],
    )
    .await;
    let got = rec.wait("/jobs", 5).await;
    let mut data: Vec<i64> = got.iter().map(|e| e["data"].as_i64().unwrap()).collect();
    data.sort();
    data.dedup();
    assert_eq!(data, vec![0, 1, 2, 3, 4]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = redis.cli(&["XPENDING", "jobs", "jobsapp"]);
        if p.starts_with('0') {
            break;
        }
        assert!(Instant::now() < deadline, "messages not acknowledged: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(m);
}
