//! DNS discovery: the peers are the addresses of the account's headless Service.
//!
//! Every `replication.discovery.interval` the node resolves `replication.discovery.dns_name`
//! for A and AAAA records with hickory-resolver (through `replication.discovery.nameservers`
//! when set, the system's resolver otherwise). Each address becomes a candidate
//! `<scheme>://<ip>:<this node's peer port>`, verified by the DNS name over TLS, and gets a
//! worker, which admits it or refuses it like a static peer (`sender.rs`); the node's own
//! address is dropped once its status says it is this node. An address missing from the
//! answers for `replication.peer_expiry` is dropped with its worker and its cursor, so its
//! pending records no longer hold the log back; when it comes back it starts over as a new
//! peer (bootstrap brings it what it missed).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};

use super::{Mesh, PeerStatus, Target};

/// A discovered peer: when its address was last in an answer, and its worker.
struct Discovered {
    last_seen: Instant,
    peer: Arc<PeerStatus>,
    worker: tokio::task::JoinHandle<()>,
}

/// Builds the resolver `nameservers` (`ip:port`, port 53 when left out) or the system's.
fn resolver(nameservers: &[String]) -> anyhow::Result<TokioResolver> {
    let mut builder = if nameservers.is_empty() {
        Resolver::builder_tokio()?
    } else {
        let mut config = ResolverConfig::new();
        for server in nameservers {
            let address = parse_nameserver(server)?;
            config.add_name_server(NameServerConfig::new(address, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(address, Protocol::Tcp));
        }
        Resolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Every round asks again: a cached answer would hide a pod that came or went.
    options.cache_size = 0;
    options.timeout = Duration::from_secs(2);
    Ok(builder.build())
}

fn parse_nameserver(server: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(address) = server.parse::<SocketAddr>() {
        return Ok(address);
    }
    let ip: IpAddr = server.parse().map_err(|_| {
        anyhow::anyhow!("replication.discovery.nameservers: {server:?} is not an ip or ip:port")
    })?;
    Ok(SocketAddr::new(ip, 53))
}

/// Runs discovery for the life of the process.
pub(super) async fn run(mesh: Arc<Mesh>, dns_name: String, port: u16) {
    let resolver = match resolver(&mesh.config.discovery.nameservers) {
        Ok(resolver) => resolver,
        Err(error) => {
            tracing::error!(%error, "DNS discovery cannot start");
            return;
        }
    };
    let interval = mesh.config.discovery.interval.0;
    let expiry = mesh.config.peer_expiry.0;
    // The name as an absolute one, so that no search domain is appended.
    let query = format!("{}.", dns_name.trim_end_matches('.'));
    let mut discovered: HashMap<IpAddr, Discovered> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        match resolver.lookup_ip(query.as_str()).await {
            Ok(answer) => {
                for ip in answer.iter() {
                    if let Some(known) = discovered.get_mut(&ip) {
                        known.last_seen = now;
                        continue;
                    }
                    let target = Target::discovered(&mesh, &dns_name, SocketAddr::new(ip, port));
                    let peer = mesh.add_peer(target);
                    let worker = tokio::spawn(super::sender::run(mesh.clone(), peer.clone()));
                    discovered.insert(
                        ip,
                        Discovered {
                            last_seen: now,
                            peer,
                            worker,
                        },
                    );
                }
            }
            // An answer without addresses: the peers are gone from the name, and age.
            Err(error) if says_no_addresses(&error) => {}
            // The resolver could not say (a timeout, SERVFAIL, no nameserver reachable): the
            // peers keep their age, or a resolver outage longer than `peer_expiry` would drop
            // every peer, reachable or not, and have them all catch up once it ends.
            Err(error) => {
                tracing::warn!(%error, name = %dns_name, "peer discovery lookup failed; the peers found before are kept");
                for known in discovered.values_mut() {
                    known.last_seen = now;
                }
                continue;
            }
        }
        let expired: Vec<IpAddr> = discovered
            .iter()
            .filter(|(_, known)| now.duration_since(known.last_seen) >= expiry)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in expired {
            if let Some(gone) = discovered.remove(&ip) {
                gone.worker.abort();
                mesh.expire_peer(&gone.peer).await;
            }
        }
    }
}

/// Whether a failed lookup is the name server's answer that the name has no addresses
/// (NXDOMAIN, or no A/AAAA records), rather than a failure to answer.
fn says_no_addresses(error: &hickory_resolver::ResolveError) -> bool {
    use hickory_resolver::proto::ProtoErrorKind;
    use hickory_resolver::proto::op::ResponseCode;
    error.proto().is_some_and(|proto| {
        matches!(
            proto.kind(),
            ProtoErrorKind::NoRecordsFound {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                ..
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_take_an_optional_port() {
        assert_eq!(
            parse_nameserver("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("10.0.0.10").unwrap(),
            "10.0.0.10:53".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("[::1]:53").unwrap(),
            "[::1]:53".parse().unwrap()
        );
        assert!(parse_nameserver("dns.example").is_err());
    }
}
