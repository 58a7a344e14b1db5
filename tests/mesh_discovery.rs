//! Peers found through DNS only: a DNS server started by the test on loopback answers for the
//! peer Service's name, as Kubernetes' headless Service would.
//!
//! Loopback octets: 100–103, and 104–105 for a resolver that fails.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::common::dns::DnsServer;
use crate::common::mesh::{
    PEER_PORT, assert_replicated, discovered_options, eventually, gradle_path, node_options, put,
    wait_admitted,
};
use crate::common::{Node, payload};

const SERVICE: &str = crate::common::mesh::PEER_SERVICE;

fn loopback(octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, octet)
}

/// The peers `node` lists in `/status`, by URL.
async fn peer_urls(node: &Node) -> Vec<String> {
    let status = node.status().await;
    let mut urls: Vec<String> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["url"].as_str().unwrap().to_string())
        .collect();
    urls.sort();
    urls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_found_through_dns_replicate_an_expired_one_catches_up_and_a_new_one_bootstraps() {
    let octets = [100u8, 101, 102];
    let dns = DnsServer::start(SERVICE, &octets.map(loopback)).await;
    // One leaf for the whole mesh, valid for the Service's name (as in Kubernetes).
    let dir = tempfile::tempdir().unwrap();
    kura::certs::create_ca("acme", &dir.path().join("ca")).unwrap();
    let certs = dir.path().join("leaf");
    kura::certs::issue_leaf(&dir.path().join("ca"), &certs, &[SERVICE.to_string()], 1).unwrap();
    let file = |name: &str| certs.join(name).display().to_string();
    let start = |octet: u8| {
        Node::start_with(
            node_options(octet, PEER_PORT, &[])
                .env("KURA_REPLICATION_INSECURE", "false")
                .env("KURA_REPLICATION_TLS_CA", file("ca.crt"))
                .env("KURA_REPLICATION_TLS_CERT", file("tls.crt"))
                .env("KURA_REPLICATION_TLS_KEY", file("tls.key"))
                .env("KURA_REPLICATION_DISCOVERY_DNS_NAME", SERVICE)
                .env("KURA_REPLICATION_DISCOVERY_NAMESERVERS", dns.nameserver())
                .env("KURA_REPLICATION_DISCOVERY_INTERVAL", "200ms")
                .env("KURA_REPLICATION_PEER_EXPIRY", "2s"),
        )
    };
    let nodes: Vec<Node> = octets.iter().map(|octet| start(*octet)).collect();
    for (node, octet) in nodes.iter().zip(octets) {
        wait_admitted(node, 2).await;
        // Its own address resolved too, and was dropped: only the other two are peers.
        let expected: Vec<String> = octets
            .iter()
            .filter(|o| **o != octet)
            .map(|o| format!("https://127.0.0.{o}:{PEER_PORT}"))
            .collect();
        assert_eq!(peer_urls(node).await, expected);
    }
    let mut written = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let body = payload(600 + i as u64, 2000);
        let path = gradle_path("ios", &format!("dns{i}"));
        put(node, &path, body.clone()).await;
        for other in &nodes {
            assert_replicated(other, &path, &body).await;
        }
        written.push((path, body));
    }
    // The third node leaves the Service: after peer_expiry the others forget it.
    dns.set(&[loopback(100), loopback(101)]);
    let gone = format!("https://127.0.0.102:{PEER_PORT}");
    for node in &nodes[..2] {
        let expired = eventually(Duration::from_secs(15), || async {
            (!peer_urls(node).await.contains(&gone)).then_some(())
        })
        .await;
        assert!(expired.is_some(), "{:?}", peer_urls(node).await);
        assert!(node.logs().contains("peer expired"));
        // Its series read 0: an expired address is no admitted (or unreachable) peer, and an
        // alert on either must not fire for it until the node restarts.
        let metrics = node.metrics().await;
        for state in ["admitted", "unreachable"] {
            let series =
                format!("kura_replication_peer_state{{peer=\"{gone}\",state=\"{state}\"}}");
            let line = metrics.lines().find(|line| line.starts_with(&series));
            assert!(
                line.is_some_and(|line| line.ends_with(" 0")),
                "{series}: {line:?}"
            );
        }
    }
    // Written while the third node was gone: the log is trimmed once the second has them,
    // without waiting for the expired one.
    let mut away = Vec::new();
    for i in 0..20 {
        let body = payload(700 + i, 3000);
        let path = gradle_path("ios", &format!("away{i}"));
        put(&nodes[0], &path, body.clone()).await;
        away.push((path, body));
    }
    for (path, body) in &away {
        assert_replicated(&nodes[1], path, body).await;
    }
    let trimmed = eventually(Duration::from_secs(10), || async {
        let log = nodes[0].status().await["replication"]["log"].clone();
        log["oldest_seq"].is_null().then_some(())
    })
    .await;
    assert!(trimmed.is_some(), "{}", nodes[0].status().await);
    // The third node returns: it catches up from the writer's index.
    dns.set(&[loopback(100), loopback(101), loopback(102)]);
    for (path, body) in &away {
        assert_replicated(&nodes[2], path, body).await;
    }
    let returned = format!("https://127.0.0.102:{PEER_PORT}");
    let writer = nodes[0].status().await;
    let peer = writer["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["url"] == returned.as_str())
        .cloned();
    assert!(
        peer.as_ref()
            .is_some_and(|p| p["catch_ups_requested"].as_u64() >= Some(1)),
        "{writer}"
    );
    written.extend(away);
    // A fourth node joins: it is ready only once it holds what the mesh holds.
    dns.set(&[loopback(100), loopback(101), loopback(102), loopback(103)]);
    let late = start(103);
    let ready = eventually(Duration::from_secs(30), || async {
        let response = crate::common::client()
            .get(late.url("/ready"))
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    assert!(ready.is_some(), "{}", late.status().await);
    for (path, body) in &written {
        let served = crate::common::mesh::body_at(&late, path).await;
        assert_eq!(
            served.as_ref(),
            Some(body),
            "{path} missing when /ready said 200"
        );
    }
    let bootstrap = late.status().await["replication"]["bootstrap"].clone();
    assert_eq!(bootstrap["state"], "done", "{bootstrap}");
    assert!(bootstrap["examined"].as_u64() >= Some(3), "{bootstrap}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_cannot_answer_does_not_make_the_peers_expire() {
    let octets = [104u8, 105];
    let dns = DnsServer::start(SERVICE, &octets.map(loopback)).await;
    let nodes: Vec<Node> = octets
        .iter()
        .map(|octet| {
            Node::start_with(
                discovered_options(*octet, &dns).env("KURA_REPLICATION_PEER_EXPIRY", "2s"),
            )
        })
        .collect();
    for node in &nodes {
        wait_admitted(node, 1).await;
    }
    // SERVFAIL for three times the peer expiry: the resolver cannot say, so the peers stay,
    // and what is written meanwhile replicates.
    dns.fail(true);
    tokio::time::sleep(Duration::from_secs(6)).await;
    for node in &nodes {
        assert!(node.logs().contains("peer discovery lookup failed"));
        assert!(!node.logs().contains("peer expired"), "{}", node.logs());
        assert_eq!(peer_urls(node).await.len(), 1);
    }
    let body = payload(800, 2000);
    let path = gradle_path("ios", "servfail");
    put(&nodes[0], &path, body.clone()).await;
    assert_replicated(&nodes[1], &path, &body).await;
    // An answer without the other node's address is an answer: it expires.
    dns.fail(false);
    dns.set(&[loopback(104)]);
    let expired = eventually(Duration::from_secs(15), || async {
        peer_urls(&nodes[0]).await.is_empty().then_some(())
    })
    .await;
    assert!(expired.is_some(), "{:?}", peer_urls(&nodes[0]).await);
}
