//! `--app-protocol grpc`: a real tonic `dapr.proto.runtime.v1.AppCallback` server written here
//! (the protos from the `dapr` crate) behind mecha. Subscription discovery with
//! `ListTopicSubscriptions`, delivery with `OnTopicEvent` (RETRY then SUCCESS, DROP to the
//! dead-letter topic), bulk delivery with `OnBulkTopicEvent`, and invocation with `OnInvoke` from
//! the HTTP API and from gRPC `InvokeService`. Also bulk delivery to an HTTP app.

use crate::common::{Handler, Resp, TempDir, Upstream};
use crate::{post_json, Sidecar};
use bytes::Bytes;
use dapr::dapr::proto::common::v1 as common_v1;
use dapr::dapr::proto::runtime::v1 as rt;
use http_body_util::{BodyExt, Full};
use rt::app_callback_server::{AppCallback, AppCallbackServer};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Seen {
    events: Vec<rt::TopicEventRequest>,
    per_topic: HashMap<String, usize>,
    /// Entry data of each bulk call.
    bulk_calls: Vec<Vec<String>>,
}

#[derive(Clone, Default)]
pub(crate) struct App(Arc<Mutex<Seen>>);

impl App {
    pub(crate) fn events(&self, topic: &str) -> Vec<rt::TopicEventRequest> {
        let s = self.0.lock().unwrap();
        s.events
            .iter()
            .filter(|e| e.topic == topic)
            .cloned()
            .collect()
    }

    pub(crate) async fn wait_events(&self, topic: &str, n: usize) -> Vec<rt::TopicEventRequest> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.events(topic);
            if v.len() >= n {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{topic}: {} of {n} events",
                v.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sub(topic: &str) -> rt::TopicSubscription {
    rt::TopicSubscription {
        pubsub_name: "pubsub".into(),
        topic: topic.into(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AppCallback for App {
    async fn on_invoke(
        &self,
        r: Request<common_v1::InvokeRequest>,
    ) -> Result<Response<common_v1::InvokeResponse>, Status> {
        let x_test = r
            .metadata()
            .get("x-test")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let m = r.into_inner();
        if m.method == "missing" {
            return Err(Status::not_found("no such method"));
        }
        let ext = m.http_extension.unwrap_or_default();
        let body = m.data.map(|a| a.value).unwrap_or_default();
        let out = format!(
            "{}|{}|{}|{}|{}|{}",
            m.method,
            ext.verb,
            ext.querystring,
            m.content_type,
            String::from_utf8_lossy(&body),
            x_test
        );
        Ok(Response::new(common_v1::InvokeResponse {
            data: Some(prost_types::Any {
                type_url: String::new(),
                value: out.into_bytes(),
            }),
            content_type: "text/plain".into(),
        }))
    }

    async fn list_topic_subscriptions(
        &self,
        _r: Request<()>,
    ) -> Result<Response<rt::ListTopicSubscriptionsResponse>, Status> {
        Ok(Response::new(rt::ListTopicSubscriptionsResponse {
            subscriptions: vec![
                sub("orders"),
                rt::TopicSubscription {
                    routes: Some(rt::TopicRoutes {
                        rules: vec![],
                        default: "flaky-handler".into(),
                    }),
                    ..sub("flaky")
                },
                rt::TopicSubscription {
                    dead_letter_topic: "dead".into(),
                    ..sub("dropme")
                },
                sub("dead"),
                rt::TopicSubscription {
                    bulk_subscribe: Some(rt::BulkSubscribeConfig {
                        enabled: true,
                        max_messages_count: 10,
                        max_await_duration_ms: 300,
                    }),
                    ..sub("bulk")
                },
            ],
        }))
    }

    async fn on_topic_event(
        &self,
        r: Request<rt::TopicEventRequest>,
    ) -> Result<Response<rt::TopicEventResponse>, Status> {
        use rt::topic_event_response::TopicEventResponseStatus as S;
        let ev = r.into_inner();
        let mut s = self.0.lock().unwrap();
        let n = {
            let c = s.per_topic.entry(ev.topic.clone()).or_default();
            *c += 1;
            *c
        };
        let status = match ev.topic.as_str() {
            "flaky" if n == 1 => S::Retry,
            "dropme" => S::Drop,
            _ => S::Success,
        };
        s.events.push(ev);
        Ok(Response::new(rt::TopicEventResponse {
            status: status as i32,
        }))
    }

    async fn list_input_bindings(
        &self,
        _r: Request<()>,
    ) -> Result<Response<rt::ListInputBindingsResponse>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn on_binding_event(
        &self,
        _r: Request<rt::BindingEventRequest>,
    ) -> Result<Response<rt::BindingEventResponse>, Status> {
        Err(Status::unimplemented("no bindings"))
    }

    /// The first bulk call answers RETRY for its first entry: that entry alone comes back.
    async fn on_bulk_topic_event(
        &self,
        r: Request<rt::TopicEventBulkRequest>,
    ) -> Result<Response<rt::TopicEventBulkResponse>, Status> {
        use rt::topic_event_response::TopicEventResponseStatus as S;
        let req = r.into_inner();
        let mut s = self.0.lock().unwrap();
        let first_call = s.bulk_calls.is_empty();
        let mut data = vec![];
        let mut statuses = vec![];
        for (i, e) in req.entries.iter().enumerate() {
            let d = match &e.event {
                Some(rt::topic_event_bulk_request_entry::Event::CloudEvent(ce)) => {
                    String::from_utf8_lossy(&ce.data).into_owned()
                }
                _ => String::new(),
            };
            data.push(d);
            let st = if first_call && i == 0 {
                S::Retry
            } else {
                S::Success
            };
            statuses.push(rt::TopicEventBulkResponseEntry {
                entry_id: e.entry_id.clone(),
                status: st as i32,
            });
        }
        s.bulk_calls.push(data);
        Ok(Response::new(rt::TopicEventBulkResponse { statuses }))
    }

    async fn on_job_event(
        &self,
        _r: Request<rt::JobEventRequest>,
    ) -> Result<Response<rt::JobEventResponse>, Status> {
        Err(Status::unimplemented("no jobs"))
    }
}

/// `AppCallbackHealthCheck` answering OK or UNAVAILABLE from a switch the test flips.
#[derive(Clone)]
pub(crate) struct Health(pub Arc<std::sync::atomic::AtomicBool>);

#[tonic::async_trait]
impl rt::app_callback_health_check_server::AppCallbackHealthCheck for Health {
    async fn health_check(
        &self,
        _r: Request<()>,
    ) -> Result<Response<rt::HealthCheckResponse>, Status> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(Response::new(rt::HealthCheckResponse {}))
        } else {
            Err(Status::unavailable("not ready"))
        }
    }
}

/// The test app with its health check service.
pub(crate) async fn start_grpc_app_with_health(app: App, health: Health) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AppCallbackServer::new(app))
            .add_service(
                rt::app_callback_health_check_server::AppCallbackHealthCheckServer::new(health),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    port
}

async fn start_grpc_app(app: App) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AppCallbackServer::new(app))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    port
}

pub(crate) async fn wait_subscriptions(m: &Sidecar, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = crate::common::get(&format!("{}/v1.0/metadata", m.url()))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        let got = v["subscriptions"].as_array().map(|a| a.len()).unwrap_or(0);
        if got >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{got} of {n} subscriptions");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn grpc_app_subscriptions_delivery_bulk_and_invoke() {
    let app = App::default();
    let port = start_grpc_app(app.clone()).await;
    let data = TempDir::new();
    let res = crate::resources(&[(
        "pubsub.yaml",
        crate::component(
            "pubsub",
            "pubsub.in-memory",
            &[("backOffDuration", "50ms"), ("backOffMaxRetries", "5")],
        ),
    )]);
    let m = Sidecar::start(
        "gapp",
        &[
            "--app-port",
            &port.to_string(),
            "--app-protocol",
            "grpc",
            "--resources-path",
            &res.0.display().to_string(),
        ],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    wait_subscriptions(&m, 5).await;
    let publish = |topic: &str, body: &str| {
        let url = format!("{}/v1.0/publish/pubsub/{topic}", m.url());
        let body = body.to_string();
        async move {
            let r = post_json(&url, &body).await;
            assert_eq!(r.status, 204, "{}", r.text());
        }
    };

    // Discovery + delivery: no routes = the empty path, JSON data as its bytes.
    publish("orders", r#"{"id":7}"#).await;
    let ev = app.wait_events("orders", 1).await;
    assert_eq!(ev[0].data, br#"{"id":7}"#);
    assert_eq!(ev[0].pubsub_name, "pubsub");
    assert_eq!(ev[0].path, "");
    assert_eq!(ev[0].spec_version, "1.0");
    assert_eq!(ev[0].source, "gapp");
    assert!(ev[0]
        .extensions
        .as_ref()
        .is_some_and(|x| x.fields.contains_key("topic")));

    // RETRY, then SUCCESS: delivered exactly twice, to the default route.
    publish("flaky", r#"{"n":1}"#).await;
    let ev = app.wait_events("flaky", 2).await;
    assert_eq!(ev[0].id, ev[1].id, "the same event is redelivered");
    assert_eq!(ev[1].path, "flaky-handler");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.events("flaky").len(), 2);

    // DROP goes to the dead-letter topic, once.
    publish("dropme", r#"{"bad":true}"#).await;
    app.wait_events("dropme", 1).await;
    let dead = app.wait_events("dead", 1).await;
    assert_eq!(dead[0].data, br#"{"bad":true}"#);
    assert_eq!(app.events("dropme").len(), 1);

    // Bulk: five messages in well under maxAwaitDurationMs arrive batched; the entry the app
    // answered RETRY comes back alone.
    for i in 0..5 {
        publish("bulk", &format!("{{\"b\":{i}}}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let calls = loop {
        let calls = app.0.lock().unwrap().bulk_calls.clone();
        let mut seen: Vec<String> = calls.iter().flatten().cloned().collect();
        seen.sort();
        seen.dedup();
        if seen.len() == 5 && calls.iter().map(Vec::len).sum::<usize>() >= 6 {
            break calls;
        }
        assert!(Instant::now() < deadline, "bulk calls so far: {calls:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    assert!(
        calls.iter().map(Vec::len).max().unwrap_or(0) >= 2,
        "messages were batched: {calls:?}"
    );
    let retried = &calls[0][0];
    assert!(
        calls[1..].iter().any(|c| c == &vec![retried.clone()]),
        "only the RETRY entry is redelivered: {calls:?}"
    );
    assert!(
        app.events("bulk").is_empty(),
        "bulk topics use OnBulkTopicEvent"
    );

    // HTTP invocation of the gRPC app: OnInvoke with verb and query string in http_extension.
    let r = crate::req(
        "POST",
        &format!("{}/v1.0/invoke/gapp/method/echo?a=1&b=2", m.url()),
        "hi",
        &[("content-type", "text/plain"), ("x-test", "yes")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "echo|3|a=1&b=2|text/plain|hi|yes");
    assert_eq!(
        r.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("text/plain")
    );
    // The app's NOT_FOUND status is HTTP 404, as Dapr maps it.
    let r = crate::req(
        "GET",
        &format!("{}/v1.0/invoke/gapp/method/missing", m.url()),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("no such method"), "{}", r.text());

    // gRPC InvokeService for the local app id: the InvokeRequest reaches OnInvoke as sent.
    let mut c = rt::dapr_client::DaprClient::connect(format!("http://127.0.0.1:{}", m.grpc_port))
        .await
        .unwrap();
    let mut req = tonic::Request::new(rt::InvokeServiceRequest {
        id: "gapp".into(),
        message: Some(common_v1::InvokeRequest {
            method: "echo".into(),
            data: Some(prost_types::Any {
                type_url: String::new(),
                value: b"grpc-body".to_vec(),
            }),
            content_type: "application/octet-stream".into(),
            http_extension: Some(common_v1::HttpExtension {
                verb: common_v1::http_extension::Verb::Put as i32,
                querystring: "q=1".into(),
            }),
        }),
    });
    req.metadata_mut().insert("x-test", "meta".parse().unwrap());
    let resp = c.invoke_service(req).await.unwrap().into_inner();
    assert_eq!(
        resp.data.unwrap().value,
        b"echo|4|q=1|application/octet-stream|grpc-body|meta"
    );
    let err = c
        .invoke_service(rt::InvokeServiceRequest {
            id: "gapp".into(),
            message: Some(common_v1::InvokeRequest {
                method: "missing".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
}

/// Bulk delivery to an HTTP app: Dapr's envelope (`entries` with `entryId` and the CloudEvent
/// as `event`), answered per entry in `statuses`; a RETRY entry is redelivered alone and a DROP
/// entry goes to the dead-letter topic.
#[tokio::test]
async fn http_bulk_subscribe() {
    #[derive(Default)]
    struct Rec {
        bulk: Vec<Vec<serde_json::Value>>,
        dead: Vec<serde_json::Value>,
    }
    let rec = Arc::new(Mutex::new(Rec::default()));
    let r2 = rec.clone();
    let h: Handler = Arc::new(move |req: http::Request<hyper::body::Incoming>| {
        let rec = r2.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let ok = |s: String| -> Resp {
                let mut r = http::Response::new(Full::new(Bytes::from(s)));
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                r
            };
            if path == "/dapr/subscribe" {
                return ok(serde_json::json!([
                    {"pubsubname": "pubsub", "topic": "many", "route": "/many",
                     "deadLetterTopic": "dead",
                     "bulkSubscribe": {"enabled": true, "maxMessagesCount": 4, "maxAwaitDurationMs": 300}},
                    {"pubsubname": "pubsub", "topic": "dead", "route": "/dead"}
                ])
                .to_string());
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let mut rec = rec.lock().unwrap();
            if path == "/dead" {
                rec.dead.push(v);
                return ok(String::new());
            }
            assert_eq!(v["type"], "com.dapr.event.sent.bulk");
            assert_eq!(v["topic"], "many");
            let entries = v["entries"].as_array().cloned().unwrap_or_default();
            let first_call = rec.bulk.is_empty();
            let statuses: Vec<serde_json::Value> = entries
                .iter()
                .map(|e| {
                    let n = e["event"]["data"]["n"].as_i64().unwrap_or(-1);
                    let status = match n {
                        0 if first_call => "RETRY",
                        3 => "DROP",
                        _ => "SUCCESS",
                    };
                    serde_json::json!({"entryId": e["entryId"], "status": status})
                })
                .collect();
            rec.bulk.push(entries);
            ok(serde_json::json!({ "statuses": statuses }).to_string())
        })
    });
    let app = Upstream::start(h).await;
    let data = TempDir::new();
    let res = crate::resources(&[(
        "pubsub.yaml",
        crate::component(
            "pubsub",
            "pubsub.in-memory",
            &[("backOffDuration", "50ms"), ("backOffMaxRetries", "5")],
        ),
    )]);
    let m = Sidecar::start(
        "bulkapp",
        &[
            "--app-port",
            &app.addr.port().to_string(),
            "--resources-path",
            &res.0.display().to_string(),
        ],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    wait_subscriptions(&m, 2).await;
    for n in 0..4 {
        let r = post_json(
            &format!("{}/v1.0/publish/pubsub/many", m.url()),
            &format!("{{\"n\":{n}}}"),
        )
        .await;
        assert_eq!(r.status, 204);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        {
            let r = rec.lock().unwrap();
            if r.bulk.len() >= 2 && !r.dead.is_empty() {
                let first = &r.bulk[0];
                assert_eq!(
                    first.len(),
                    4,
                    "one batch of maxMessagesCount: {:?}",
                    r.bulk
                );
                assert_eq!(first[0]["contentType"], "application/cloudevents+json");
                assert_eq!(first[0]["event"]["specversion"], "1.0");
                // The RETRY entry, alone.
                assert_eq!(r.bulk[1].len(), 1, "{:?}", r.bulk);
                assert_eq!(r.bulk[1][0]["event"]["data"]["n"], 0);
                assert_eq!(r.dead[0]["data"]["n"], 3);
                break;
            }
        }
        assert!(Instant::now() < deadline, "bulk deliveries did not finish");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rec.lock().unwrap().bulk.len(),
        2,
        "nothing else redelivered"
    );
}

/// A bulk subscription with `rawPayload: "true"` metadata gets Dapr's raw entries: `event` is the
/// message bytes in base64 (not a CloudEvent with `data_base64`) and `contentType` is
/// `application/octet-stream`; a plain (non-bulk) raw subscription still gets the CloudEvent
/// wrapper with `data_base64`, as Dapr's `FromRawPayload`.
#[tokio::test]
async fn http_bulk_raw_payload() {
    let rec: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let r2 = rec.clone();
    let h: Handler = Arc::new(move |req: http::Request<hyper::body::Incoming>| {
        let rec = r2.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let ok = |s: String| -> Resp {
                let mut r = http::Response::new(Full::new(Bytes::from(s)));
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                r
            };
            if path == "/dapr/subscribe" {
                return ok(serde_json::json!([
                    {"pubsubname": "pubsub", "topic": "rawbulk", "route": "/rawbulk",
                     "metadata": {"rawPayload": "true"},
                     "bulkSubscribe": {"enabled": true, "maxMessagesCount": 2, "maxAwaitDurationMs": 2000}},
                    {"pubsubname": "pubsub", "topic": "rawone", "route": "/rawone",
                     "metadata": {"rawPayload": "true"}}
                ])
                .to_string());
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            rec.lock().unwrap().push((path.clone(), v.clone()));
            if path == "/rawbulk" {
                let statuses: Vec<serde_json::Value> = v["entries"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|e| serde_json::json!({"entryId": e["entryId"], "status": "SUCCESS"}))
                    .collect();
                return ok(serde_json::json!({ "statuses": statuses }).to_string());
            }
            ok(String::new())
        })
    });
    let app = Upstream::start(h).await;
    let data = TempDir::new();
    let m = Sidecar::start(
        "rawapp",
        &["--app-port", &app.addr.port().to_string()],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    wait_subscriptions(&m, 2).await;
    for (topic, body) in [
        ("rawbulk", "hello"),
        ("rawbulk", r#"{"a":1}"#),
        ("rawone", "bytes!"),
    ] {
        let r = crate::req(
            "POST",
            &format!(
                "{}/v1.0/publish/pubsub/{topic}?metadata.rawPayload=true",
                m.url()
            ),
            body,
            &[("content-type", "text/plain")],
        )
        .await;
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = rec.lock().unwrap().clone();
        let bulk: Vec<serde_json::Value> = got
            .iter()
            .filter(|(p, _)| p == "/rawbulk")
            .flat_map(|(_, v)| v["entries"].as_array().cloned().unwrap_or_default())
            .collect();
        let one: Vec<&serde_json::Value> = got
            .iter()
            .filter(|(p, _)| p == "/rawone")
            .map(|(_, v)| v)
            .collect();
        if bulk.len() >= 2 && !one.is_empty() {
            let events: Vec<&str> = bulk.iter().filter_map(|e| e["event"].as_str()).collect();
            // base64("hello"), base64("{\"a\":1}")
            assert!(events.contains(&"aGVsbG8="), "{bulk:?}");
            assert!(events.contains(&"eyJhIjoxfQ=="), "{bulk:?}");
            for e in &bulk {
                assert_eq!(e["contentType"], "application/octet-stream", "{e}");
                assert!(e["entryId"].as_str().is_some_and(|s| !s.is_empty()));
            }
            let envelope = &got.iter().find(|(p, _)| p == "/rawbulk").unwrap().1;
            assert_eq!(envelope["type"], "com.dapr.event.sent.bulk");
            assert_eq!(envelope["topic"], "rawbulk");
            assert_eq!(envelope["pubsubname"], "pubsub");
            assert_eq!(one[0]["data_base64"], "Ynl0ZXMh");
            assert_eq!(one[0]["specversion"], "1.0");
            break;
        }
        assert!(Instant::now() < deadline, "raw deliveries: {got:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}
