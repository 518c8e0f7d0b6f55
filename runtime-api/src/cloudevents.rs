//! CloudEvents 1.0 envelopes as Dapr writes them (structured JSON mode).

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};

pub const CE_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The fields Dapr sets on every event it publishes.
pub struct Envelope<'a> {
    pub source: &'a str,
    pub topic: &'a str,
    pub pubsub: &'a str,
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

fn is_json(ct: &str) -> bool {
    let ct = ct.split(';').next().unwrap_or("").trim();
    ct == "application/json" || ct.ends_with("+json")
}

/// Puts `data` into the right field for its content type: JSON as JSON, text as a string, other
/// bytes as `data_base64`.
fn set_data(ev: &mut Map<String, Value>, data: &[u8], content_type: &str) -> Result<(), String> {
    if data.is_empty() {
        return Ok(());
    }
    if is_json(content_type) {
        let v: Value = serde_json::from_slice(data).map_err(|e| {
            format!("the body is not valid JSON ({e}) but Content-Type is {content_type}")
        })?;
        ev.insert("data".into(), v);
    } else if content_type.starts_with("text/") || content_type.is_empty() {
        match std::str::from_utf8(data) {
            Ok(s) => {
                ev.insert("data".into(), Value::String(s.to_string()));
            }
            Err(_) => {
                ev.insert(
                    "data_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(data)),
                );
            }
        }
    } else {
        ev.insert(
            "data_base64".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(data)),
        );
    }
    Ok(())
}

/// Builds the event for a publish. A body that already is a CloudEvent (content type
/// `application/cloudevents+json`, or JSON with `specversion`) is passed through, with Dapr's
/// fields filled in where missing and `topic` / `pubsubname` set.
pub fn wrap(data: &[u8], content_type: &str, env: &Envelope<'_>) -> Result<Bytes, String> {
    let ct = if content_type.is_empty() {
        "application/json"
    } else {
        content_type
    };
    let existing = if ct.starts_with(CE_CONTENT_TYPE) || is_json(ct) {
        match serde_json::from_slice::<Value>(data) {
            Ok(Value::Object(m)) if m.contains_key("specversion") => Some(m),
            Ok(_) if ct.starts_with(CE_CONTENT_TYPE) => {
                return Err("the body is not a CloudEvent JSON object".into())
            }
            Ok(_) => None,
            Err(e) if ct.starts_with(CE_CONTENT_TYPE) => {
                return Err(format!("the body is not valid CloudEvent JSON: {e}"))
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let mut ev = match existing {
        Some(m) => m,
        None => {
            let mut m = Map::new();
            m.insert("datacontenttype".into(), json!(ct));
            set_data(&mut m, data, ct)?;
            m
        }
    };
    let defaults = [
        ("specversion", json!("1.0")),
        ("id", json!(uuid::Uuid::new_v4().to_string())),
        ("source", json!(env.source)),
        ("type", json!("com.dapr.event.sent")),
        ("datacontenttype", json!("application/json")),
        ("time", json!(rfc3339_now())),
    ];
    for (k, v) in defaults {
        ev.entry(k).or_insert(v);
    }
    ev.insert("topic".into(), json!(env.topic));
    ev.insert("pubsubname".into(), json!(env.pubsub));
    if let Some(tp) = env.traceparent {
        ev.insert("traceparent".into(), json!(tp));
        ev.insert("traceid".into(), json!(tp));
    }
    if let Some(ts) = env.tracestate {
        ev.insert("tracestate".into(), json!(ts));
    }
    Ok(Bytes::from(Value::Object(ev).to_string()))
}

/// What a subscriber receives for a broker payload: a CloudEvent as-is, or raw bytes (a
/// `rawPayload` publish, or another producer) wrapped with `data_base64`, as Dapr does for raw
/// subscriptions. With `raw` (the subscription's `rawPayload` metadata) the payload is always
/// wrapped, even when it parses as a CloudEvent, as Dapr's `FromRawPayload`.
pub fn for_delivery(
    payload: &[u8],
    topic: &str,
    pubsub: &str,
    source: &str,
    raw: bool,
) -> Map<String, Value> {
    if !raw {
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) {
            if m.contains_key("specversion") {
                return m;
            }
        }
    }
    let mut m = Map::new();
    for (k, v) in [
        ("specversion", json!("1.0")),
        ("id", json!(uuid::Uuid::new_v4().to_string())),
        ("source", json!(source)),
        ("type", json!("com.dapr.event.sent")),
        ("datacontenttype", json!("application/octet-stream")),
        ("topic", json!(topic)),
        ("pubsubname", json!(pubsub)),
        ("time", json!(rfc3339_now())),
        (
            "data_base64",
            json!(base64::engine::general_purpose::STANDARD.encode(payload)),
        ),
    ] {
        m.insert(k.into(), v);
    }
    m
}

/// Whether metadata asks for raw payloads: Dapr reads `rawPayload` with Go's `ParseBool`.
pub fn is_raw_payload(metadata: &std::collections::BTreeMap<String, String>) -> bool {
    metadata
        .get("rawPayload")
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
}

/// The current UTC time in RFC 3339 (`2024-01-02T03:04:05Z`).
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Seconds since the Unix epoch in RFC 3339.
pub fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_json_and_passes_through_cloudevents() {
        let env = Envelope {
            source: "app",
            topic: "t",
            pubsub: "p",
            traceparent: None,
            tracestate: None,
        };
        let ev: Value =
            serde_json::from_slice(&wrap(br#"{"a":1}"#, "application/json", &env).unwrap())
                .unwrap();
        assert_eq!(ev["data"]["a"], 1);
        assert_eq!(ev["specversion"], "1.0");
        assert_eq!(ev["source"], "app");
        assert_eq!(ev["topic"], "t");
        let ce = br#"{"specversion":"1.0","id":"x","source":"s","type":"my.type","data":"hi"}"#;
        let ev: Value = serde_json::from_slice(&wrap(ce, CE_CONTENT_TYPE, &env).unwrap()).unwrap();
        assert_eq!(ev["id"], "x");
        assert_eq!(ev["type"], "my.type");
        assert_eq!(ev["pubsubname"], "p");
        let ev: Value =
            serde_json::from_slice(&wrap(&[0xff, 0], "application/octet-stream", &env).unwrap())
                .unwrap();
        assert_eq!(ev["data_base64"], "/wA=");
        assert!(wrap(b"{bad", "application/json", &env).is_err());
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
