//! Active health checking (`health_checks[0]`): HTTP, TCP and gRPC (`grpc.health.v1.Health/Check`).
//!
//! One task per cluster checks each host when it is due, on its own connections (health-check
//! traffic does not count as upstream requests). Transitions follow Envoy: a new host starts with
//! `FAILED_ACTIVE_HC` and its first passing check makes it healthy; a healthy host becomes
//! unhealthy after `unhealthy_threshold` consecutive network failures (connect error, timeout) or
//! at once on an active failure (unexpected HTTP status, gRPC `NOT_SERVING`, TCP payload
//! mismatch); an unhealthy host needs `healthy_threshold` consecutive passes. A host's next check
//! follows Envoy's schedule (`interval`, `unhealthy_interval`, the edge intervals while a change is
//! pending, the no-traffic intervals until the cluster has made a connection), plus jitter.
//! Stats: `health_check.*`.

use super::host::health;
use super::Cluster;
use crate::stats::HealthCheckStats;
use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mecha_config::{AppendAction, Cluster as ClusterConfig, HealthCheck};
use mecha_filters::stats::{Scope, Store};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

enum Kind {
    Http {
        path: String,
        host: String,
        expected: Vec<(i64, i64)>,
        http2: bool,
        /// `request_headers_to_remove`, then `request_headers_to_add` (as Envoy's HeaderParser).
        remove: Vec<http::HeaderName>,
        add: Vec<(http::HeaderName, http::HeaderValue, AppendAction)>,
    },
    Tcp {
        send: Vec<u8>,
        receive: Vec<Vec<u8>>,
    },
    Grpc {
        service: String,
        authority: String,
    },
}

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// The host answered, wrongly: unhealthy at once.
    Active,
    /// No usable answer (connect error, timeout, protocol error): counts toward the threshold.
    Network,
}

pub struct HealthChecker {
    cfg: HealthCheck,
    kind: Kind,
    stats: HealthCheckStats,
    cluster: Weak<Cluster>,
}

struct HostHc {
    successes: u32,
    failures: u32,
    checked: bool,
    next_due: Instant,
}

impl Default for HostHc {
    fn default() -> Self {
        Self {
            successes: 0,
            failures: 0,
            checked: false,
            next_due: Instant::now(),
        }
    }
}

/// Decodes an Envoy health-check payload (`text` is hex, as Envoy's `Payload.text`).
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl HealthChecker {
    pub fn new(
        hc: &HealthCheck,
        cluster_cfg: &ClusterConfig,
        store: &Store,
        scope: &Scope,
        owner: Weak<Cluster>,
    ) -> Self {
        let kind = if let Some(h) = &hc.grpc_health_check {
            Kind::Grpc {
                service: h.service_name.clone(),
                authority: h
                    .authority
                    .clone()
                    .unwrap_or_else(|| cluster_cfg.name.clone()),
            }
        } else if let Some(t) = &hc.tcp_health_check {
            // Payloads are validated at config load (validate_health_checks).
            let hex = |p: &mecha_config::HcPayload| {
                p.text.as_deref().and_then(decode_hex).unwrap_or_default()
            };
            Kind::Tcp {
                send: t.send.as_ref().map(hex).unwrap_or_default(),
                receive: t.receive.iter().map(hex).collect(),
            }
        } else {
            let h = hc.http_health_check.clone().unwrap_or_default();
            Kind::Http {
                expected: if h.expected_statuses.is_empty() {
                    vec![(200, 201)]
                } else {
                    h.expected_statuses
                        .iter()
                        .map(|r| (r.start, r.end))
                        .collect()
                },
                http2: h.codec_client_type.as_deref() == Some("HTTP2"),
                // Names and values are validated at config load (validate_health_checks).
                remove: h
                    .request_headers_to_remove
                    .iter()
                    .filter_map(|n| {
                        http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok()
                    })
                    .collect(),
                add: h
                    .request_headers_to_add
                    .iter()
                    .filter_map(|a| {
                        Some((
                            http::HeaderName::from_bytes(
                                a.header.key.to_ascii_lowercase().as_bytes(),
                            )
                            .ok()?,
                            http::HeaderValue::from_str(&a.header.value).ok()?,
                            a.action(),
                        ))
                    })
                    .collect(),
                host: h.host.clone().unwrap_or_else(|| cluster_cfg.name.clone()),
                path: h.path,
            }
        };
        Self {
            cfg: hc.clone(),
            kind,
            stats: HealthCheckStats::new(store, &scope.sub("health_check")),
            cluster: owner,
        }
    }

    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.run().await })
    }

    async fn run(self: Arc<Self>) {
        let mut states: HashMap<SocketAddr, HostHc> = HashMap::new();
        if let Some(j) = self.cfg.initial_jitter.filter(|d| !d.is_zero()) {
            tokio::time::sleep(jitter(j.0)).await;
        }
        loop {
            let Some(cluster) = self.cluster.upgrade() else {
                return;
            };
            let hosts = cluster.hosts.load().all.clone();
            // Each host has its own schedule (Envoy's intervals depend on the host's last result
            // and on whether its state is about to change); a new host is due at once.
            let now = Instant::now();
            let due: Vec<_> = hosts
                .iter()
                .filter(|h| states.get(&h.addr).is_none_or(|s| s.next_due <= now))
                .cloned()
                .collect();
            let verdicts =
                futures_util::future::join_all(due.iter().map(|h| self.check(h.addr))).await;
            // Envoy uses the no-traffic intervals until the cluster has made a connection.
            let no_traffic = cluster.stats.upstream_cx_total.value() == 0;
            for (h, v) in due.iter().zip(verdicts) {
                self.stats.attempt.inc();
                let st = states.entry(h.addr).or_default();
                let flagged =
                    h.health_flags.load(Ordering::Acquire) & health::FAILED_ACTIVE_HC != 0;
                let pending = match v {
                    Verdict::Pass => {
                        self.stats.success.inc();
                        st.failures = 0;
                        st.successes += 1;
                        if flagged && (!st.checked || st.successes >= self.cfg.healthy_threshold) {
                            h.health_flags
                                .fetch_and(!health::FAILED_ACTIVE_HC, Ordering::AcqRel);
                            tracing::info!(host = %h.addr, "health check: healthy");
                            false
                        } else {
                            flagged
                        }
                    }
                    Verdict::Active | Verdict::Network => {
                        self.stats.failure.inc();
                        if v == Verdict::Network {
                            self.stats.network_failure.inc();
                        }
                        st.successes = 0;
                        st.failures += 1;
                        if !flagged
                            && (v == Verdict::Active || st.failures >= self.cfg.unhealthy_threshold)
                        {
                            h.health_flags
                                .fetch_or(health::FAILED_ACTIVE_HC, Ordering::AcqRel);
                            tracing::warn!(host = %h.addr, ?v, "health check: unhealthy");
                            false
                        } else {
                            !flagged
                        }
                    }
                };
                st.checked = true;
                st.next_due =
                    Instant::now() + self.next_interval(no_traffic, v == Verdict::Pass, pending);
            }
            states.retain(|a, _| hosts.iter().any(|h| h.addr == *a));
            self.stats.healthy.set(
                hosts
                    .iter()
                    .filter(|h| {
                        h.health_flags.load(Ordering::Acquire) & health::FAILED_ACTIVE_HC == 0
                    })
                    .count() as i64,
            );
            cluster.refresh_health_stats();
            drop(cluster);
            // Wake for the next due host, and at least every `interval` to pick up new hosts.
            let now = Instant::now();
            let wake = states
                .values()
                .map(|s| s.next_due)
                .min()
                .unwrap_or(now)
                .min(now + self.cfg.interval.0.max(Duration::from_millis(1)));
            tokio::time::sleep_until(wake.max(now + Duration::from_millis(1)).into()).await;
        }
    }

    /// Envoy's `HealthCheckerImplBase::interval`: `passed` is this check's result, `pending`
    /// whether it goes against the host's current state without flipping it yet.
    fn next_interval(&self, no_traffic: bool, passed: bool, pending: bool) -> Duration {
        let c = &self.cfg;
        let d = |o: Option<mecha_config::PbDuration>| o.map(|d| d.0).filter(|d| !d.is_zero());
        let interval = c.interval.0;
        let unhealthy = d(c.unhealthy_interval).unwrap_or(interval);
        let base = if no_traffic {
            let no_traffic = d(c.no_traffic_interval).unwrap_or(Duration::from_secs(60));
            match d(c.no_traffic_healthy_interval) {
                Some(h) if passed => h,
                _ => no_traffic,
            }
        } else {
            match (passed, pending) {
                (true, true) => d(c.healthy_edge_interval).unwrap_or(interval),
                (true, false) => interval,
                (false, true) => d(c.unhealthy_edge_interval).unwrap_or(unhealthy),
                (false, false) => unhealthy,
            }
        };
        let mut extra = Duration::ZERO;
        if let Some(j) = c.interval_jitter.filter(|d| !d.is_zero()) {
            extra += jitter(j.0);
        }
        if let Some(p) = c.interval_jitter_percent.filter(|p| *p > 0) {
            extra += jitter(base.mul_f64(p as f64 / 100.0));
        }
        (base + extra).max(Duration::from_millis(1))
    }

    async fn check(&self, addr: SocketAddr) -> Verdict {
        match tokio::time::timeout(self.cfg.timeout.0, self.check_inner(addr)).await {
            Ok(v) => v,
            Err(_) => Verdict::Network,
        }
    }

    async fn check_inner(&self, addr: SocketAddr) -> Verdict {
        let Ok(stream) = TcpStream::connect(addr).await else {
            return Verdict::Network;
        };
        let _ = stream.set_nodelay(true);
        match &self.kind {
            Kind::Tcp { send, receive } => tcp_check(stream, send, receive).await,
            Kind::Http {
                path,
                host,
                expected,
                http2,
                remove,
                add,
            } => {
                let req = http::Request::get(path.as_str())
                    .header(http::header::HOST, host.as_str())
                    .header(http::header::USER_AGENT, "Envoy/HC")
                    .body(Empty::<Bytes>::new());
                let Ok(mut req) = req else {
                    return Verdict::Active;
                };
                apply_headers(req.headers_mut(), remove, add);
                let status = if *http2 {
                    *req.uri_mut() = match format!("http://{host}{path}").parse() {
                        Ok(u) => u,
                        Err(_) => return Verdict::Active,
                    };
                    req.headers_mut().remove(http::header::HOST);
                    let Ok((mut send, conn)) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await
                    else {
                        return Verdict::Network;
                    };
                    tokio::spawn(conn);
                    send.send_request(req).await.map(|r| r.status())
                } else {
                    let Ok((mut send, conn)) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                    else {
                        return Verdict::Network;
                    };
                    tokio::spawn(conn);
                    send.send_request(req).await.map(|r| r.status())
                };
                match status {
                    Ok(s) => {
                        let s = s.as_u16() as i64;
                        if expected.iter().any(|(a, b)| (*a..*b).contains(&s)) {
                            Verdict::Pass
                        } else {
                            Verdict::Active
                        }
                    }
                    Err(_) => Verdict::Network,
                }
            }
            Kind::Grpc { service, authority } => grpc_check(stream, service, authority).await,
        }
    }
}

fn apply_headers(
    h: &mut http::HeaderMap,
    remove: &[http::HeaderName],
    add: &[(http::HeaderName, http::HeaderValue, AppendAction)],
) {
    for n in remove {
        h.remove(n);
    }
    for (n, v, action) in add {
        match action {
            AppendAction::APPEND_IF_EXISTS_OR_ADD => {
                h.append(n.clone(), v.clone());
            }
            AppendAction::ADD_IF_ABSENT => {
                if !h.contains_key(n) {
                    h.insert(n.clone(), v.clone());
                }
            }
            AppendAction::OVERWRITE_IF_EXISTS_OR_ADD => {
                h.insert(n.clone(), v.clone());
            }
            AppendAction::OVERWRITE_IF_EXISTS => {
                if h.contains_key(n) {
                    h.insert(n.clone(), v.clone());
                }
            }
        }
    }
}

fn jitter(max: Duration) -> Duration {
    let us = max.as_micros() as u64;
    if us == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rand::random_range(0..us))
}

async fn tcp_check(mut stream: TcpStream, send: &[u8], receive: &[Vec<u8>]) -> Verdict {
    if !send.is_empty() && stream.write_all(send).await.is_err() {
        return Verdict::Network;
    }
    if receive.is_empty() {
        return Verdict::Pass;
    }
    // Envoy's fuzzy match: every receive payload appears in the data, in order.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if contains_in_order(&buf, receive) {
            return Verdict::Pass;
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Verdict::Active,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Verdict::Network,
        }
    }
}

fn contains_in_order(hay: &[u8], needles: &[Vec<u8>]) -> bool {
    let mut from = 0;
    for n in needles {
        match hay[from..]
            .windows(n.len().max(1))
            .position(|w| w == n.as_slice())
        {
            Some(p) => from += p + n.len(),
            None => return false,
        }
    }
    true
}

/// `grpc.health.v1.Health/Check`, encoded by hand (two small protobuf messages).
async fn grpc_check(stream: TcpStream, service: &str, authority: &str) -> Verdict {
    let Ok((mut send, conn)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await
    else {
        return Verdict::Network;
    };
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; }
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let Ok(uri) = format!("http://{authority}/grpc.health.v1.Health/Check").parse::<http::Uri>()
    else {
        return Verdict::Active;
    };
    let Ok(req) = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(http::header::USER_AGENT, "Envoy/HC")
        .body(Full::new(Bytes::from(framed)))
    else {
        return Verdict::Active;
    };
    let Ok(resp) = send.send_request(req).await else {
        return Verdict::Network;
    };
    if resp.status() != http::StatusCode::OK {
        return Verdict::Active;
    }
    let headers_status = grpc_status(resp.headers());
    let Ok(collected) = resp.into_body().collect().await else {
        return Verdict::Network;
    };
    let trailers_status = collected.trailers().and_then(grpc_status);
    if headers_status.or(trailers_status) != Some(0) {
        return Verdict::Active;
    }
    let mut body = collected.to_bytes();
    if body.len() < 5 {
        return Verdict::Active;
    }
    body.advance(5);
    // HealthCheckResponse { ServingStatus status = 1; } SERVING = 1.
    if parse_status(&body) == Some(1) {
        Verdict::Pass
    } else {
        Verdict::Active
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Reads field 1 (varint) of a `HealthCheckResponse`, skipping unknown fields.
fn parse_status(b: &[u8]) -> Option<u64> {
    let mut i = 0;
    let mut status = Some(0);
    while i < b.len() {
        let key = get_varint(b, &mut i)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = Some(get_varint(b, &mut i)?),
            (_, 0) => {
                get_varint(b, &mut i)?;
            }
            (_, 2) => {
                let len = get_varint(b, &mut i)? as usize;
                i = i.checked_add(len)?;
            }
            (_, 1) => i += 8,
            (_, 5) => i += 4,
            _ => return None,
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_fuzzy_match() {
        assert_eq!(decode_hex("50494e47"), Some(b"PING".to_vec()));
        assert_eq!(decode_hex("5"), None);
        assert!(contains_in_order(
            b"xxPONGyyOK",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
        assert!(!contains_in_order(
            b"OKxxPONG",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
    }

    #[test]
    fn health_response_parsing() {
        assert_eq!(parse_status(&[0x08, 0x01]), Some(1));
        assert_eq!(parse_status(&[0x08, 0x02]), Some(2));
        assert_eq!(parse_status(&[]), Some(0));
        assert_eq!(parse_status(&[0x12, 0x01, 0x41, 0x08, 0x01]), Some(1));
    }
}
