//! The gRPC API driven by the official Dapr Rust SDK (`dapr` crate): state, publish with delivery
//! to a test app, invoke, and metadata.

use crate::common::TempDir;
use crate::Sidecar;
use dapr::dapr::proto::common::v1 as common_v1;
use dapr::dapr::proto::runtime::v1 as rt;
use std::collections::HashMap;

#[tokio::test]
#[allow(deprecated)]
async fn dapr_sdk_state_publish_invoke() {
    let app = crate::invoke::echo_app("g").await;
    let (sub_app, rec) = crate::pubsub::test_app(
        serde_json::json!([{"pubsubname": "pubsub", "topic": "grpc-topic", "route": "/got"}]),
        |_, _| (200, ""),
    )
    .await;
    let _ = app;
    let data = TempDir::new();
    let m = Sidecar::start(
        "grpcapp",
        &["--app-port", &sub_app.addr.port().to_string()],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    let mut c = dapr::Client::<dapr::client::TonicClient>::connect_with_port(
        "http://127.0.0.1".into(),
        m.grpc_port.to_string(),
    )
    .await
    .expect("connect");
    c.save_state("statestore", "g1", b"\"hello\"".to_vec(), None, None, None)
        .await
        .unwrap();
    let got = c.get_state("statestore", "g1", None).await.unwrap();
    assert_eq!(got.data, b"\"hello\"");
    assert_eq!(got.etag, "1");
    // Written over gRPC, read over HTTP: one runtime core.
    let r = crate::common::get(&format!("{}/v1.0/state/statestore/g1", m.url()))
        .await
        .unwrap();
    assert_eq!(r.text(), "\"hello\"");
    // Stale etag: ABORTED, as Dapr.
    let err = c
        .save_state(
            "statestore",
            "g1",
            b"1".to_vec(),
            Some(common_v1::Etag { value: "99".into() }),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("Aborted"), "{err:?}");
    c.delete_state("statestore", "g1", None).await.unwrap();
    assert!(c
        .get_state("statestore", "g1", None)
        .await
        .unwrap()
        .data
        .is_empty());
    // Transaction through the SDK's generated client.
    let mut raw = rt::dapr_client::DaprClient::connect(format!("http://127.0.0.1:{}", m.grpc_port))
        .await
        .unwrap();
    let item = |k: &str, v: &[u8]| common_v1::StateItem {
        key: k.into(),
        value: v.to_vec(),
        ..Default::default()
    };
    raw.execute_state_transaction(rt::ExecuteStateTransactionRequest {
        store_name: "statestore".into(),
        operations: vec![
            rt::TransactionalStateOperation {
                operation_type: "upsert".into(),
                request: Some(item("t1", b"1")),
            },
            rt::TransactionalStateOperation {
                operation_type: "upsert".into(),
                request: Some(item("t2", b"2")),
            },
        ],
        metadata: HashMap::new(),
    })
    .await
    .unwrap();
    let bulk = raw
        .get_bulk_state(rt::GetBulkStateRequest {
            store_name: "statestore".into(),
            keys: vec!["t1".into(), "t2".into()],
            parallelism: 2,
            metadata: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bulk.items.len(), 2);
    assert_eq!(bulk.items[1].data, b"2");
    // Unknown store: INVALID_ARGUMENT.
    let err = c.get_state("nosuch", "k", None).await.unwrap_err();
    assert!(format!("{err:?}").contains("InvalidArgument"), "{err:?}");
    // Publish: delivered to the app as a CloudEvent.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while c.get_metadata().await.unwrap().subscriptions.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "subscription not loaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    c.publish_event(
        "pubsub",
        "grpc-topic",
        "application/json",
        br#"{"via":"grpc"}"#.to_vec(),
        None,
    )
    .await
    .unwrap();
    let got = rec.wait("/got", 1).await;
    assert_eq!(got[0]["data"]["via"], "grpc");
    assert_eq!(got[0]["source"], "grpcapp");
    // Invoke the local app.
    let resp = c
        .invoke_service("grpcapp", "some/method", Some(prost_types_any(b"x")))
        .await
        .unwrap();
    let _ = resp;
    let md = c.get_metadata().await.unwrap();
    assert_eq!(md.id, "grpcapp");
    assert!(md
        .registered_components
        .iter()
        .any(|c| c.r#type == "state.sqlite"));
}

fn prost_types_any(v: &[u8]) -> prost_types::Any {
    prost_types::Any {
        type_url: String::new(),
        value: v.to_vec(),
    }
}
