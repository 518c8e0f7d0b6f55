//! DNS discovery for STRICT_DNS (every address of every endpoint is a host) and LOGICAL_DNS
//! (the first address of the single endpoint), re-resolved every `dns_refresh_rate` or, with
//! `respect_dns_ttl`, when the records expire.

use super::{Cluster, HostSpec};
use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::TokioResolver;
use mecha_config::{DiscoveryType, DnsLookupFamily};
use std::net::{IpAddr, SocketAddr};
use std::sync::Weak;
use std::time::Duration;

const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// After a failed resolution, try again sooner than the refresh rate.
const FAILURE_RETRY: Duration = Duration::from_secs(1);

fn resolver(family: DnsLookupFamily) -> Result<TokioResolver, String> {
    let mut b = TokioResolver::builder_tokio()
        .map_err(|e| format!("cannot read the system DNS config: {e}"))?;
    b.options_mut().ip_strategy = match family {
        DnsLookupFamily::V4_ONLY => LookupIpStrategy::Ipv4Only,
        DnsLookupFamily::V6_ONLY => LookupIpStrategy::Ipv6Only,
        DnsLookupFamily::V4_PREFERRED => LookupIpStrategy::Ipv4thenIpv6,
        DnsLookupFamily::ALL => LookupIpStrategy::Ipv4AndIpv6,
        // Envoy's AUTO prefers IPv6 and falls back to IPv4.
        DnsLookupFamily::AUTO => LookupIpStrategy::Ipv6thenIpv4,
    };
    Ok(b.build())
}

pub(super) async fn run(cluster: Weak<Cluster>) {
    let (family, refresh, respect_ttl) = match cluster.upgrade() {
        Some(c) => (
            c.config.dns_lookup_family,
            c.config
                .dns_refresh_rate
                .map(|d| d.0)
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_REFRESH),
            c.config.respect_dns_ttl,
        ),
        None => return,
    };
    let resolver = match resolver(family) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "DNS discovery disabled");
            return;
        }
    };
    loop {
        let Some(c) = cluster.upgrade() else { return };
        c.stats.update_attempt.inc();
        let (specs, ttl, failed) = resolve_all(&resolver, &c).await;
        if failed {
            c.stats.update_failure.inc();
        } else {
            c.stats.update_success.inc();
        }
        // A failed lookup keeps the last good hosts rather than emptying the cluster.
        if !failed || !specs.is_empty() {
            c.update_hosts(specs);
        }
        drop(c);
        let wait = if failed {
            FAILURE_RETRY
        } else if respect_ttl {
            ttl.unwrap_or(refresh).max(Duration::from_millis(100))
        } else {
            refresh
        };
        tokio::time::sleep(wait).await;
    }
}

async fn resolve_all(
    resolver: &TokioResolver,
    c: &Cluster,
) -> (Vec<HostSpec>, Option<Duration>, bool) {
    let mut specs = vec![];
    let mut ttl: Option<Duration> = None;
    let mut failed = false;
    let logical = c.config.discovery_type == DiscoveryType::LOGICAL_DNS;
    for loc in c.config.load_assignment.iter().flat_map(|la| &la.endpoints) {
        for ep in &loc.lb_endpoints {
            let sa = &ep.endpoint.address.socket_address;
            let addrs: Vec<IpAddr> = if let Ok(ip) = sa.address.parse::<IpAddr>() {
                vec![ip]
            } else {
                match resolver.lookup_ip(sa.address.as_str()).await {
                    Ok(lookup) => {
                        let valid = lookup
                            .valid_until()
                            .saturating_duration_since(std::time::Instant::now());
                        ttl = Some(ttl.map_or(valid, |t| t.min(valid)));
                        lookup.iter().collect()
                    }
                    Err(e) => {
                        tracing::warn!(cluster = %c.name, host = %sa.address, error = %e, "DNS resolution failed");
                        failed = true;
                        vec![]
                    }
                }
            };
            let take = if logical { 1 } else { addrs.len() };
            for ip in addrs.into_iter().take(take) {
                specs.push(HostSpec {
                    addr: SocketAddr::new(ip, sa.port_value),
                    hostname: ep
                        .endpoint
                        .hostname
                        .clone()
                        .unwrap_or_else(|| sa.address.clone()),
                    weight: ep.load_balancing_weight.unwrap_or(1),
                    priority: loc.priority,
                    locality: loc.locality.clone(),
                    eds_unhealthy: false,
                });
            }
        }
    }
    (specs, ttl, failed)
}
