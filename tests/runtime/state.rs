//! State API over HTTP: the seed's example verbatim in zero-config mode, durability across a
//! restart, and one conformance suite run against state.in-memory, state.sqlite and state.redis.

use crate::common::TempDir;
use crate::{component, post_json, req, resources, Redis, Sidecar};
use std::time::Duration;

#[tokio::test]
async fn seed_example_and_state_sqlite_survives_restart() {
    let data = TempDir::new();
    let dir = data.0.display().to_string();
    let m = Sidecar::start("myapp", &[], &[("MECHA_DATA_DIR", &dir)]).await;
    // The seed's curl example, verbatim apart from the port.
    let r = post_json(
        &format!("{}/v1.0/state/statestore", m.url()),
        r#"[{ "key": "name", "value": "Bruce Wayne"}]"#,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = crate::common::get(&format!("{}/v1.0/state/statestore/name", m.url()))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "\"Bruce Wayne\"");
    assert_eq!(r.header("etag"), Some("1"));
    // A graceful stop, then a crash: the value is still there each time.
    let m = m.restart(false).await;
    let r = crate::common::get(&format!("{}/v1.0/state/statestore/name", m.url()))
        .await
        .unwrap();
    assert_eq!(r.text(), "\"Bruce Wayne\"");
    post_json(
        &format!("{}/v1.0/state/statestore", m.url()),
        r#"[{"key": "after", "value": {"n": 1}}]"#,
    )
    .await;
    let m = m.restart(true).await;
    let r = crate::common::get(&format!("{}/v1.0/state/statestore/after", m.url()))
        .await
        .unwrap();
    assert_eq!(r.json(), serde_json::json!({"n": 1}));
    assert!(data.0.join("state.db").exists());
    // The metadata API lists the embedded components.
    let md = crate::common::get(&format!("{}/v1.0/metadata", m.url()))
        .await
        .unwrap()
        .json();
    assert_eq!(md["id"], "myapp");
    let types: Vec<&str> = md["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"state.sqlite") && types.contains(&"pubsub.in-memory"));
}

/// The shared suite: every store must pass it unchanged.
async fn conformance(base: &str, store: &str) {
    let s = format!("{base}/v1.0/state/{store}");
    let get = |k: &str| {
        let u = format!("{s}/{k}");
        async move { crate::common::get(&u).await.unwrap() }
    };
    // Absent key: 204.
    assert_eq!(get("missing").await.status, 204, "{store}");
    // Save and read back, with an etag.
    let r = post_json(
        &s,
        r#"[{"key":"k1","value":{"a":1}},{"key":"k2","value":"two"}]"#,
    )
    .await;
    assert_eq!(r.status, 204, "{store}: {}", r.text());
    let r = get("k1").await;
    assert_eq!(r.json(), serde_json::json!({"a": 1}), "{store}");
    let etag = r.header("etag").expect("etag").to_string();
    // Wrong etag: 409 ERR_STATE_SAVE; right etag: saved, new etag.
    let r = post_json(&s, r#"[{"key":"k1","value":2,"etag":"999"}]"#).await;
    assert_eq!(r.status, 409, "{store}: {}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_STATE_SAVE");
    let r = post_json(
        &s,
        &format!(r#"[{{"key":"k1","value":2,"etag":"{etag}"}}]"#),
    )
    .await;
    assert_eq!(r.status, 204, "{store}: {}", r.text());
    let r = get("k1").await;
    assert_eq!(r.text(), "2");
    assert_ne!(r.header("etag").unwrap(), etag, "{store}: etag must change");
    // Malformed etag: 400.
    let r = post_json(&s, r#"[{"key":"k1","value":3,"etag":"not-a-version"}]"#).await;
    assert_eq!(r.status, 400, "{store}: {}", r.text());
    // first-write: a write without etag to an existing key fails.
    let r = post_json(
        &s,
        r#"[{"key":"k1","value":4,"options":{"concurrency":"first-write"}}]"#,
    )
    .await;
    assert_eq!(r.status, 409, "{store}: {}", r.text());
    let r = post_json(
        &s,
        r#"[{"key":"fresh","value":4,"options":{"concurrency":"first-write"}}]"#,
    )
    .await;
    assert_eq!(r.status, 204, "{store}: {}", r.text());
    // Bulk get.
    let r = post_json(
        &format!("{s}/bulk"),
        r#"{"keys":["k1","k2","missing"],"parallelism":2}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let items = r.json();
    assert_eq!(items[0]["data"], 2, "{store}: {items}");
    assert_eq!(items[1]["data"], "two");
    assert!(items[2].get("data").is_none());
    // Delete with a wrong If-Match: 409 ERR_STATE_DELETE; then a plain delete.
    let r = req("DELETE", &format!("{s}/k2"), "", &[("if-match", "12345")]).await;
    assert_eq!(r.status, 409, "{store}: {}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_STATE_DELETE");
    let r = req("DELETE", &format!("{s}/k2"), "", &[]).await;
    assert_eq!(r.status, 204);
    assert_eq!(get("k2").await.status, 204);
    // Transactions are atomic: one stale etag and nothing is applied.
    let r = post_json(
        &format!("{s}/transaction"),
        r#"{"operations":[{"operation":"upsert","request":{"key":"t1","value":"x"}},
                          {"operation":"delete","request":{"key":"k1","etag":"999"}}]}"#,
    )
    .await;
    assert_eq!(r.status, 409, "{store}: {}", r.text());
    assert_eq!(
        get("t1").await.status,
        204,
        "{store}: transaction was not atomic"
    );
    let r = post_json(
        &format!("{s}/transaction"),
        r#"{"operations":[{"operation":"upsert","request":{"key":"t1","value":"x"}},
                          {"operation":"delete","request":{"key":"k1"}}]}"#,
    )
    .await;
    assert_eq!(r.status, 204, "{store}: {}", r.text());
    assert_eq!(get("t1").await.text(), "\"x\"");
    assert_eq!(get("k1").await.status, 204);
    // TTL.
    let r = post_json(
        &s,
        r#"[{"key":"ttl","value":1,"metadata":{"ttlInSeconds":"1"}}]"#,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(get("ttl").await.status, 200);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(get("ttl").await.status, 204, "{store}: TTL did not expire");
    // Bad input: malformed JSON, wrong types, unknown store.
    let r = post_json(&s, "[{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["errorCode"], "ERR_MALFORMED_REQUEST");
    let r = post_json(&s, r#"{"key":"x"}"#).await;
    assert_eq!(r.status, 400);
    let r = post_json(
        &format!("{base}/v1.0/state/nosuchstore"),
        r#"[{"key":"a","value":1}]"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["errorCode"], "ERR_STATE_STORE_NOT_FOUND");
}

#[tokio::test]
async fn conformance_in_memory_sqlite_redis() {
    let redis = Redis::start().await;
    let data = TempDir::new();
    let host = format!("127.0.0.1:{}", redis.port);
    let db = data.0.join("s.db").display().to_string();
    let res = resources(&[
        ("mem.yaml", component("mem", "state.in-memory", &[])),
        (
            "sql.yaml",
            component("sql", "state.sqlite", &[("connectionString", &db)]),
        ),
        (
            "red.yaml",
            component("red", "state.redis", &[("redisHost", &host)]),
        ),
    ]);
    let m = Sidecar::start(
        "conf",
        &["--resources-path", &res.0.display().to_string()],
        &[],
    )
    .await;
    let base = m.url();
    tokio::join!(
        conformance(&base, "mem"),
        conformance(&base, "sql"),
        conformance(&base, "red"),
    );
    // Dapr's Redis layout: a hash with data and version under "<appid>||<key>".
    post_json(
        &format!("{base}/v1.0/state/red"),
        r#"[{"key":"layout","value":"v"}]"#,
    )
    .await;
    let out = redis.cli(&["HGETALL", "conf||layout"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"data") && lines.contains(&"\"v\"") && lines.contains(&"version"),
        "{out}"
    );
    // A value written by a Dapr app in that layout reads back.
    redis.cli(&[
        "HSET",
        "conf||fromdapr",
        "data",
        "{\"x\":1}",
        "version",
        "7",
    ]);
    let r = crate::common::get(&format!("{base}/v1.0/state/red/fromdapr"))
        .await
        .unwrap();
    assert_eq!(r.json(), serde_json::json!({"x": 1}));
    assert_eq!(r.header("etag"), Some("7"));
}

#[tokio::test]
async fn redis_down_is_a_clear_500_and_recovers() {
    let redis = Redis::start().await;
    let port = redis.port;
    let host = format!("127.0.0.1:{port}");
    let res = resources(&[(
        "red.yaml",
        component("red", "state.redis", &[("redisHost", &host)]),
    )]);
    let m = Sidecar::start(
        "down",
        &["--resources-path", &res.0.display().to_string()],
        &[],
    )
    .await;
    let s = format!("{}/v1.0/state/red", m.url());
    assert_eq!(
        post_json(&s, r#"[{"key":"a","value":1}]"#).await.status,
        204
    );
    drop(redis);
    let r = post_json(&s, r#"[{"key":"a","value":2}]"#).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_STATE_SAVE");
    let r = crate::common::get(&format!("{s}/a")).await.unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["errorCode"], "ERR_STATE_GET");
    // Redis back on the same port: requests succeed again without restarting mecha.
    let dir = TempDir::new();
    let mut child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
        ])
        .arg(&dir.0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if post_json(&s, r#"[{"key":"a","value":3}]"#).await.status == 204 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reads use their own connection (see runtime-api's `state::resp`): it recovers too.
    let r = crate::common::get(&format!("{s}/a")).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "mecha did not recover when Redis came back");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "3");
}

/// `redisPassword` and `redisDB`: reads and writes authenticate and use the database. A wrong
/// password is a startup error naming the file; a password changed under a running mecha is a
/// clear 500 for reads and writes, which recover when it is changed back.
#[tokio::test]
async fn redis_password_and_db() {
    let redis = Redis::start_with(&["--requirepass", "pa ss"]).await;
    let host = format!("127.0.0.1:{}", redis.port);
    let res = resources(&[(
        "good.yaml",
        component(
            "good",
            "state.redis",
            &[
                ("redisHost", &host),
                ("redisPassword", "pa ss"),
                ("redisDB", "3"),
            ],
        ),
    )]);
    let m = Sidecar::start(
        "authed",
        &["--resources-path", &res.0.display().to_string()],
        &[],
    )
    .await;
    let good = format!("{}/v1.0/state/good", m.url());
    let r = post_json(&good, r#"[{"key":"k","value":{"n":1}}]"#).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let key_url = format!("{good}/k");
    let get = || crate::common::get(&key_url);
    let r = get().await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"n": 1}));
    assert_eq!(r.header("etag"), Some("1"));
    assert_eq!(
        redis.cli(&["-n", "3", "HGET", "authed||k", "data"]).trim(),
        r#"{"n":1}"#
    );
    assert_eq!(redis.cli(&["-n", "0", "EXISTS", "authed||k"]).trim(), "0");

    // The password changes and mecha's connections are dropped: its new ones are refused.
    redis.cli(&["CONFIG", "SET", "requirepass", "other"]);
    redis.cli(&[
        "-a", "other", "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes",
    ]);
    let mut statuses = vec![];
    for _ in 0..3 {
        let r = get().await.unwrap();
        statuses.push(r.status);
        if r.status == 500 {
            assert_eq!(r.json()["errorCode"], "ERR_STATE_GET");
        }
    }
    assert_eq!(statuses, [500, 500, 500]);
    let r = post_json(&good, r#"[{"key":"k","value":2}]"#).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.json()["errorCode"], "ERR_STATE_SAVE");
    // Changed back: reads recover.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--no-auth-warning",
            "-a",
            "other",
        ])
        .args(["CONFIG", "SET", "requirepass", "pa ss"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut back = None;
    for _ in 0..50 {
        let r = get().await.unwrap();
        if r.status == 200 {
            back = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = back.expect("reads did not recover when the password was changed back");
    assert_eq!(r.json(), serde_json::json!({"n": 1}));
    drop(m);

    // A wrong password at startup is an error naming the component's file.
    let res = resources(&[(
        "bad.yaml",
        component(
            "bad",
            "state.redis",
            &[("redisHost", &host), ("redisPassword", "wrong")],
        ),
    )]);
    let out = std::process::Command::new(crate::common::mecha_bin())
        .args(["run", "--app-id", "bad", "--dapr-http-port", "0"])
        .args(["--dapr-grpc-port", "0", "--resources-path"])
        .arg(&res.0)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("uthentication"),
        "{err}"
    );
}

/// `enableTLS: true` against a real `redis-server --tls-port` with a self-signed certificate
/// (Dapr's Redis client does not verify the server certificate with enableTLS, nor does mecha):
/// state.redis and pubsub.redis both connect over TLS; the plaintext port is closed.
#[tokio::test]
async fn redis_enable_tls() {
    let dir = TempDir::new();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.0.join("redis.crt");
    let key = dir.0.join("redis.key");
    std::fs::write(&cert, pem("CERTIFICATE", ck.cert.der())).unwrap();
    std::fs::write(&key, pem("PRIVATE KEY", &ck.key_pair.serialize_der())).unwrap();
    let port = crate::common::free_port();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .arg("--dir")
        .arg(&dir.0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server (TLS) did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host = format!("127.0.0.1:{port}");
    let res = resources(&[
        (
            "s.yaml",
            component(
                "tls",
                "state.redis",
                &[("redisHost", &host), ("enableTLS", "true")],
            ),
        ),
        (
            "p.yaml",
            component(
                "tlsps",
                "pubsub.redis",
                &[("redisHost", &host), ("enableTLS", "true")],
            ),
        ),
    ]);
    let data = TempDir::new();
    let m = Sidecar::start(
        "tlsapp",
        &["--resources-path", &res.0.display().to_string()],
        &[("MECHA_DATA_DIR", &data.0.display().to_string())],
    )
    .await;
    let r = post_json(
        &format!("{}/v1.0/state/tls", m.url()),
        r#"[{"key": "k", "value": "over tls"}]"#,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = crate::common::get(&format!("{}/v1.0/state/tls/k", m.url()))
        .await
        .unwrap();
    assert_eq!(r.text(), "\"over tls\"");
    let r = post_json(&format!("{}/v1.0/publish/tlsps/t", m.url()), r#"{"a":1}"#).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let _ = redis.kill();
    let _ = redis.wait();
}

/// PEM text for DER bytes (rcgen is built without its `pem` feature here).
fn pem(label: &str, der: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
