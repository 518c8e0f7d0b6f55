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

/// The resolver of one cluster. Without `respect_dns_ttl` Envoy asks again every refresh
/// interval whatever the records' TTL, so hickory's cache (which would answer from memory until
/// the TTL ends) is turned off: no entries, and none that outlive their insertion.
fn resolver(family: DnsLookupFamily, respect_ttl: bool) -> Result<TokioResolver, String> {
    let mut b = TokioResolver::builder_tokio()
        .map_err(|e| format!("cannot read the system DNS config: {e}"))?;
    let opts = b.options_mut();
    opts.ip_strategy = match family {
        DnsLookupFamily::V4_ONLY => LookupIpStrategy::Ipv4Only,
        DnsLookupFamily::V6_ONLY => LookupIpStrategy::Ipv6Only,
        DnsLookupFamily::V4_PREFERRED => LookupIpStrategy::Ipv4thenIpv6,
        DnsLookupFamily::ALL => LookupIpStrategy::Ipv4AndIpv6,
        // Envoy's AUTO prefers IPv6 and falls back to IPv4.
        DnsLookupFamily::AUTO => LookupIpStrategy::Ipv6thenIpv4,
    };
    if !respect_ttl {
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
    }
    Ok(b.build())
}

pub(super) async fn run(cluster: Weak<Cluster>) {
    let (family, refresh, respect_ttl) = match cluster.upgrade() {
        Some(c) => (
            c.config.dns_lookup_family,
            // Validation keeps it above 1 ms.
            c.config
                .dns_refresh_rate
                .map(|d| d.0)
                .unwrap_or(DEFAULT_REFRESH),
            c.config.respect_dns_ttl,
        ),
        None => return,
    };
    let resolver = match resolver(family, respect_ttl) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "DNS discovery disabled");
            return;
        }
    };
    // Each endpoint's last good addresses, in load-assignment order (the config of a cluster
    // never changes; a new config makes a new cluster).
    let mut last: Vec<Vec<IpAddr>> = vec![];
    let mut first = true;
    loop {
        let Some(c) = cluster.upgrade() else { return };
        c.stats.update_attempt.inc();
        let (results, ttl) = resolve_all(&resolver, &c).await;
        let failed = results.iter().any(Option::is_none);
        if failed {
            c.stats.update_failure.inc();
        } else {
            c.stats.update_success.inc();
        }
        // As Envoy, an endpoint whose lookup failed keeps its last result; the others update.
        // An unchanged answer leaves the host set (and its balancer's state) alone.
        if merge(&mut last, results) || first {
            c.update_hosts(specs(&c.config, &last));
            first = false;
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

/// Folds one round of per-endpoint results (`None`: the lookup failed) into the last good ones;
/// whether anything changed.
fn merge(last: &mut Vec<Vec<IpAddr>>, results: Vec<Option<Vec<IpAddr>>>) -> bool {
    let mut changed = last.len() != results.len();
    last.resize(results.len(), vec![]);
    for (slot, r) in last.iter_mut().zip(results) {
        if let Some(addrs) = r {
            if *slot != addrs {
                *slot = addrs;
                changed = true;
            }
        }
    }
    changed
}

/// The endpoints of a DNS cluster, in load-assignment order.
fn endpoints(
    cfg: &mecha_config::Cluster,
) -> impl Iterator<
    Item = (
        &mecha_config::LocalityLbEndpoints,
        &mecha_config::LbEndpoint,
    ),
> {
    cfg.load_assignment
        .iter()
        .flat_map(|la| &la.endpoints)
        .flat_map(|loc| loc.lb_endpoints.iter().map(move |ep| (loc, ep)))
}

/// Resolves every endpoint once: its addresses, or `None` when the lookup failed; and the
/// shortest TTL seen.
async fn resolve_all(
    resolver: &TokioResolver,
    c: &Cluster,
) -> (Vec<Option<Vec<IpAddr>>>, Option<Duration>) {
    let mut out = vec![];
    let mut ttl: Option<Duration> = None;
    for (_, ep) in endpoints(&c.config) {
        let sa = &ep.endpoint.address.socket_address;
        if let Ok(ip) = sa.address.parse::<IpAddr>() {
            out.push(Some(vec![ip]));
            continue;
        }
        match resolver.lookup_ip(sa.address.as_str()).await {
            Ok(lookup) => {
                let valid = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                ttl = Some(ttl.map_or(valid, |t| t.min(valid)));
                out.push(Some(lookup.iter().collect()));
            }
            Err(e) => {
                tracing::warn!(cluster = %c.name, host = %sa.address, error = %e, "DNS resolution failed");
                out.push(None);
            }
        }
    }
    (out, ttl)
}

/// Host specs from each endpoint's addresses (`addrs[i]` belongs to the i-th endpoint): every
/// address for STRICT_DNS, the first for LOGICAL_DNS.
fn specs(cfg: &mecha_config::Cluster, addrs: &[Vec<IpAddr>]) -> Vec<HostSpec> {
    use mecha_config::HealthStatus;
    let logical = cfg.discovery_type == DiscoveryType::LOGICAL_DNS;
    let mut out = vec![];
    for ((loc, ep), ips) in endpoints(cfg).zip(addrs) {
        let sa = &ep.endpoint.address.socket_address;
        let take = if logical { 1 } else { ips.len() };
        for ip in ips.iter().take(take) {
            out.push(HostSpec {
                addr: SocketAddr::new(*ip, sa.port_value),
                hostname: ep
                    .endpoint
                    .hostname
                    .clone()
                    .unwrap_or_else(|| sa.address.clone()),
                weight: ep.load_balancing_weight.unwrap_or(1),
                priority: loc.priority,
                locality: loc.locality.clone(),
                eds_unhealthy: matches!(
                    ep.health_status,
                    Some(HealthStatus::UNHEALTHY | HealthStatus::DRAINING | HealthStatus::TIMEOUT)
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_failed_endpoint_keeps_its_last_addresses() {
        let mut last = vec![];
        let round = vec![Some(vec![ip("10.0.0.1")]), Some(vec![ip("10.0.0.2")])];
        assert!(merge(&mut last, round.clone()));
        assert!(!merge(&mut last, round), "the same answer is no change");
        assert!(merge(&mut last, vec![Some(vec![ip("10.0.0.3")]), None]));
        assert_eq!(last, vec![vec![ip("10.0.0.3")], vec![ip("10.0.0.2")]]);
        assert!(
            !merge(&mut last, vec![None, None]),
            "failures change nothing"
        );
        // A name that never resolved contributes no host.
        let mut last = vec![];
        merge(&mut last, vec![None, Some(vec![ip("10.0.0.4")])]);
        assert_eq!(last, vec![vec![], vec![ip("10.0.0.4")]]);
    }

    #[test]
    fn the_cache_is_off_unless_respect_dns_ttl() {
        let r = resolver(DnsLookupFamily::V4_ONLY, false).expect("system DNS config");
        assert_eq!(r.options().cache_size, 0);
        assert_eq!(r.options().positive_max_ttl, Some(Duration::ZERO));
        let r = resolver(DnsLookupFamily::V4_ONLY, true).unwrap();
        assert!(r.options().cache_size > 0);
        assert_eq!(r.options().positive_max_ttl, None);
    }
}
