//! `filter_chain_match`: choosing a listener's filter chain for a connection, in Envoy's order.
//!
//! Criteria are applied one after another — destination port, destination IP (`prefix_ranges`),
//! `server_names`, `transport_protocol`, `application_protocols`, direct source IP,
//! `source_type`, source IP (`source_prefix_ranges`), `source_ports`. At each step only the
//! chains with the most specific match survive (a set criterion that matches beats an unset
//! one; a longer prefix or a longer wildcard suffix beats a shorter one; exact server names beat
//! wildcards); chains whose set criterion does not match drop out. If no chain survives, the
//! listener's `default_filter_chain` (if any) serves the connection.

use mecha_config::{ConnectionSourceType, FilterChainMatch};
use std::net::{IpAddr, SocketAddr};

/// One step of Envoy's match order: scores a chain for a connection (`None` = no match,
/// higher = more specific).
type Score<'a> = dyn Fn(&Compiled) -> Option<u32> + 'a;

/// What a connection offers to the matcher.
#[derive(Debug, Clone, Copy)]
pub struct ConnMeta<'a> {
    /// The (restored) destination.
    pub destination: SocketAddr,
    pub source: SocketAddr,
    /// The peer of the TCP connection (same as `source` without PROXY protocol).
    pub direct_source: SocketAddr,
    pub server_name: Option<&'a str>,
    pub transport: &'a str,
    pub application_protocols: &'a [String],
}

#[derive(Debug, Clone, Default)]
struct Compiled {
    destination_port: Option<u16>,
    prefix_ranges: Vec<(IpAddr, u8)>,
    server_names: Vec<String>,
    transport_protocol: Option<String>,
    application_protocols: Vec<String>,
    direct_source_prefix_ranges: Vec<(IpAddr, u8)>,
    source_type: ConnectionSourceType,
    source_prefix_ranges: Vec<(IpAddr, u8)>,
    source_ports: Vec<u16>,
}

/// The compiled matches of a listener's chains (index = chain index).
#[derive(Debug, Clone, Default)]
pub struct ChainMatcher {
    chains: Vec<Compiled>,
    /// Whether any chain looks at SNI / transport / ALPN (then inspection results matter).
    pub needs_inspection: bool,
}

fn ranges(r: &[mecha_config::CidrRange]) -> Vec<(IpAddr, u8)> {
    // Validation already rejected malformed ranges.
    r.iter().filter_map(|c| c.parse().ok()).collect()
}

impl ChainMatcher {
    pub fn new<'a>(matches: impl IntoIterator<Item = Option<&'a FilterChainMatch>>) -> Self {
        let chains: Vec<Compiled> = matches
            .into_iter()
            .map(|m| match m {
                None => Compiled::default(),
                Some(m) => Compiled {
                    destination_port: m.destination_port.and_then(|p| u16::try_from(p).ok()),
                    prefix_ranges: ranges(&m.prefix_ranges),
                    server_names: m
                        .server_names
                        .iter()
                        .map(|s| s.to_ascii_lowercase())
                        .collect(),
                    transport_protocol: (!m.transport_protocol.is_empty())
                        .then(|| m.transport_protocol.clone()),
                    application_protocols: m.application_protocols.clone(),
                    direct_source_prefix_ranges: ranges(&m.direct_source_prefix_ranges),
                    source_type: m.source_type,
                    source_prefix_ranges: ranges(&m.source_prefix_ranges),
                    source_ports: m
                        .source_ports
                        .iter()
                        .filter_map(|p| u16::try_from(*p).ok())
                        .collect(),
                },
            })
            .collect();
        let needs_inspection = chains.iter().any(|c| {
            !c.server_names.is_empty()
                || c.transport_protocol.is_some()
                || !c.application_protocols.is_empty()
        });
        Self {
            chains,
            needs_inspection,
        }
    }

    /// The index of the chain for `m`, or `None` (use the default chain, if any).
    pub fn select(&self, m: &ConnMeta<'_>) -> Option<usize> {
        if self.chains.len() == 1 && is_empty(&self.chains[0]) {
            return Some(0);
        }
        // Each step scores every surviving chain: None = no match, higher = more specific.
        let steps: [&Score; 9] = [
            &|c| exact(c.destination_port, m.destination.port()),
            &|c| prefix(&c.prefix_ranges, m.destination.ip()),
            &|c| server_name(&c.server_names, m.server_name),
            &|c| match &c.transport_protocol {
                None => Some(0),
                Some(t) => (t == m.transport).then_some(1),
            },
            &|c| {
                if c.application_protocols.is_empty() {
                    Some(0)
                } else {
                    c.application_protocols
                        .iter()
                        .any(|p| m.application_protocols.contains(p))
                        .then_some(1)
                }
            },
            &|c| prefix(&c.direct_source_prefix_ranges, m.direct_source.ip()),
            &|c| source_type(c.source_type, m),
            &|c| prefix(&c.source_prefix_ranges, m.source.ip()),
            &|c| {
                if c.source_ports.is_empty() {
                    Some(0)
                } else {
                    c.source_ports.contains(&m.source.port()).then_some(1)
                }
            },
        ];
        let mut alive: Vec<usize> = (0..self.chains.len()).collect();
        for step in steps {
            let scored: Vec<(usize, u32)> = alive
                .iter()
                .filter_map(|i| step(&self.chains[*i]).map(|s| (*i, s)))
                .collect();
            let best = scored.iter().map(|(_, s)| *s).max()?;
            alive = scored
                .into_iter()
                .filter(|(_, s)| *s == best)
                .map(|(i, _)| i)
                .collect();
        }
        alive.first().copied()
    }
}

fn is_empty(c: &Compiled) -> bool {
    c.destination_port.is_none()
        && c.prefix_ranges.is_empty()
        && c.server_names.is_empty()
        && c.transport_protocol.is_none()
        && c.application_protocols.is_empty()
        && c.direct_source_prefix_ranges.is_empty()
        && c.source_type == ConnectionSourceType::ANY
        && c.source_prefix_ranges.is_empty()
        && c.source_ports.is_empty()
}

fn exact(want: Option<u16>, got: u16) -> Option<u32> {
    match want {
        None => Some(0),
        Some(p) => (p == got).then_some(1),
    }
}

/// The longest matching prefix (+1, so that `/0` still beats "unset").
fn prefix(ranges: &[(IpAddr, u8)], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    let ip = canonical(ip);
    ranges
        .iter()
        .filter(|(net, len)| in_prefix(canonical(*net), *len, ip))
        .map(|(_, len)| *len as u32 + 1)
        .max()
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

pub fn in_prefix(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len.min(32) as u32)
            };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len.min(128) as u32)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Exact names score above any wildcard; longer wildcard suffixes score higher.
fn server_name(names: &[String], sni: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?.to_ascii_lowercase();
    names
        .iter()
        .filter_map(|n| {
            if *n == sni {
                Some(u32::MAX)
            } else if let Some(suffix) = n.strip_prefix('*') {
                // "*.example.com" matches "a.example.com" and "a.b.example.com".
                (sni.ends_with(suffix) && sni.len() > suffix.len()).then_some(suffix.len() as u32)
            } else {
                None
            }
        })
        .max()
}

fn source_type(t: ConnectionSourceType, m: &ConnMeta<'_>) -> Option<u32> {
    let local = {
        let s = canonical(m.source.ip());
        s.is_loopback() || s == canonical(m.destination.ip())
    };
    match t {
        ConnectionSourceType::ANY => Some(0),
        ConnectionSourceType::SAME_IP_OR_LOOPBACK => local.then_some(1),
        ConnectionSourceType::EXTERNAL => (!local).then_some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mecha_config::CidrRange;

    fn meta<'a>(
        dst: &str,
        src: &str,
        sni: Option<&'a str>,
        transport: &'a str,
        alpn: &'a [String],
    ) -> ConnMeta<'a> {
        ConnMeta {
            destination: dst.parse().unwrap(),
            source: src.parse().unwrap(),
            direct_source: src.parse().unwrap(),
            server_name: sni,
            transport,
            application_protocols: alpn,
        }
    }

    fn cidr(a: &str, l: u32) -> CidrRange {
        CidrRange {
            address_prefix: a.into(),
            prefix_len: Some(l),
        }
    }

    #[test]
    fn envoy_order_and_specificity() {
        let port80 = FilterChainMatch {
            destination_port: Some(80),
            ..Default::default()
        };
        let port80_net = FilterChainMatch {
            destination_port: Some(80),
            prefix_ranges: vec![cidr("10.0.0.0", 8)],
            ..Default::default()
        };
        let port80_host = FilterChainMatch {
            destination_port: Some(80),
            prefix_ranges: vec![cidr("10.1.2.3", 32)],
            ..Default::default()
        };
        let tls_sni = FilterChainMatch {
            transport_protocol: "tls".into(),
            server_names: vec!["*.example.com".into()],
            ..Default::default()
        };
        let tls_exact = FilterChainMatch {
            transport_protocol: "tls".into(),
            server_names: vec!["api.example.com".into()],
            ..Default::default()
        };
        let http = FilterChainMatch {
            application_protocols: vec!["http/1.1".into(), "h2c".into()],
            ..Default::default()
        };
        let src = FilterChainMatch {
            source_prefix_ranges: vec![cidr("192.168.0.0", 16)],
            ..Default::default()
        };
        let all = [
            Some(&port80),
            Some(&port80_net),
            Some(&port80_host),
            Some(&tls_sni),
            Some(&tls_exact),
            Some(&http),
            Some(&src),
            None,
        ];
        let m = ChainMatcher::new(all);
        assert!(m.needs_inspection);
        let none: Vec<String> = vec![];
        let h1 = vec!["http/1.1".to_string()];
        // Destination port first: the /32 beats the /8 beats no prefix.
        assert_eq!(
            m.select(&meta("10.1.2.3:80", "1.1.1.1:5", None, "raw_buffer", &none)),
            Some(2)
        );
        assert_eq!(
            m.select(&meta("10.9.9.9:80", "1.1.1.1:5", None, "raw_buffer", &none)),
            Some(1)
        );
        assert_eq!(
            m.select(&meta("11.0.0.1:80", "1.1.1.1:5", None, "raw_buffer", &none)),
            Some(0)
        );
        // Other ports: SNI exact beats wildcard.
        assert_eq!(
            m.select(&meta(
                "1.2.3.4:443",
                "1.1.1.1:5",
                Some("api.example.com"),
                "tls",
                &none
            )),
            Some(4)
        );
        assert_eq!(
            m.select(&meta(
                "1.2.3.4:443",
                "1.1.1.1:5",
                Some("www.example.com"),
                "tls",
                &none
            )),
            Some(3)
        );
        // Unknown SNI: server_names chains drop out, the rest continue.
        assert_eq!(
            m.select(&meta(
                "1.2.3.4:443",
                "1.1.1.1:5",
                Some("other.org"),
                "tls",
                &none
            )),
            Some(7)
        );
        assert_eq!(
            m.select(&meta("1.2.3.4:8080", "1.1.1.1:5", None, "raw_buffer", &h1)),
            Some(5)
        );
        assert_eq!(
            m.select(&meta(
                "1.2.3.4:9",
                "192.168.1.1:5",
                None,
                "raw_buffer",
                &none
            )),
            Some(6)
        );
        assert_eq!(
            m.select(&meta("1.2.3.4:9", "1.1.1.1:5", None, "raw_buffer", &none)),
            Some(7)
        );
    }

    #[test]
    fn no_match_means_default_chain() {
        let only = FilterChainMatch {
            destination_port: Some(80),
            server_names: vec!["a.com".into()],
            ..Default::default()
        };
        let any_port = FilterChainMatch::default();
        let m = ChainMatcher::new([Some(&only), Some(&any_port)]);
        let none: Vec<String> = vec![];
        // Port 80 narrows to chain 0, whose SNI then fails: no chain (Envoy semantics).
        assert_eq!(
            m.select(&meta(
                "1.2.3.4:80",
                "1.1.1.1:5",
                Some("b.com"),
                "tls",
                &none
            )),
            None
        );
        assert_eq!(
            m.select(&meta("1.2.3.4:81", "1.1.1.1:5", None, "raw_buffer", &none)),
            Some(1)
        );
    }

    #[test]
    fn mapped_v4_and_v6_prefixes() {
        assert!(in_prefix(
            "10.0.0.0".parse().unwrap(),
            8,
            "10.2.3.4".parse().unwrap()
        ));
        assert!(!in_prefix(
            "10.0.0.0".parse().unwrap(),
            8,
            "11.2.3.4".parse().unwrap()
        ));
        assert!(in_prefix(
            "fd00::".parse().unwrap(),
            8,
            "fd12::1".parse().unwrap()
        ));
        assert!(in_prefix(
            "0.0.0.0".parse().unwrap(),
            0,
            "8.8.8.8".parse().unwrap()
        ));
        let v = FilterChainMatch {
            prefix_ranges: vec![cidr("10.0.0.0", 8)],
            ..Default::default()
        };
        let m = ChainMatcher::new([Some(&v)]);
        let none: Vec<String> = vec![];
        assert_eq!(
            m.select(&meta(
                "[::ffff:10.0.0.1]:80",
                "[::1]:5",
                None,
                "raw_buffer",
                &none
            )),
            Some(0)
        );
    }
}
