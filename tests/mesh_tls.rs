//! The peer plane over mutual TLS with per-account CAs made by `kura certs`.
//!
//! Loopback octets by test: 90–92 a three-node mTLS mesh, 93–94 two CAs, 95 a client without a
//! certificate, 96 rotation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::mesh::{
    PEER_PORT, assert_replicated, eventually, gradle_path, node_options, put, wait_admitted,
};
use crate::common::{Node, NodeOptions, payload};

/// Runs `kura certs ...` and checks it succeeded.
fn kura_certs(args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("certs")
        .args(args)
        .output()
        .expect("run kura certs");
    assert!(
        output.status.success(),
        "kura certs {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An account CA in `dir/name`.
fn ca(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    kura_certs(&[
        "ca",
        "--account",
        "acme",
        "--out",
        &out.display().to_string(),
    ]);
    out
}

/// A leaf of `ca` for the node on 127.0.0.<octet>, in `dir/<name>`.
fn leaf(ca: &Path, dir: &Path, name: &str, octet: u8) -> PathBuf {
    let out = dir.join(name);
    kura_certs(&[
        "leaf",
        "--ca",
        &ca.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--san",
        &format!("127.0.0.{octet}"),
    ]);
    out
}

/// Mesh options with the peer plane on TLS with the files in `certs`.
fn tls_options(octet: u8, peers: &[u8], certs: &Path) -> NodeOptions {
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("https://127.0.0.{p}:{PEER_PORT}"))
        .collect();
    let file = |name: &str| certs.join(name).display().to_string();
    node_options(octet, PEER_PORT, &peers)
        .env("KURA_REPLICATION_INSECURE", "false")
        .env("KURA_REPLICATION_TLS_CA", file("ca.crt"))
        .env("KURA_REPLICATION_TLS_CERT", file("tls.crt"))
        .env("KURA_REPLICATION_TLS_KEY", file("tls.key"))
}

/// A client of the peer plane that trusts `ca_dir`'s CA and presents the leaf in `leaf_dir`,
/// if any.
fn peer_client(ca_dir: &Path, leaf_dir: Option<&Path>) -> reqwest::Client {
    let ca = std::fs::read(ca_dir.join("ca.crt")).unwrap();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .pool_max_idle_per_host(0)
        .https_only(true);
    if let Some(leaf) = leaf_dir {
        let mut pem = std::fs::read(leaf.join("tls.crt")).unwrap();
        pem.extend(std::fs::read(leaf.join("tls.key")).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

async fn status_over_tls(client: &reqwest::Client, octet: u8) -> Result<u16, String> {
    client
        .get(format!(
            "https://127.0.0.{octet}:{PEER_PORT}/_internal/status"
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_mtls_replicate_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "ca");
    let octets = [90u8, 91, 92];
    let nodes: Vec<Node> = octets
        .iter()
        .map(|octet| {
            let certs = leaf(&ca, dir.path(), &format!("n{octet}"), *octet);
            let others: Vec<u8> = octets.iter().copied().filter(|o| o != octet).collect();
            Node::start_with(tls_options(*octet, &others, &certs))
        })
        .collect();
    for node in &nodes {
        wait_admitted(node, 2).await;
    }
    for (i, node) in nodes.iter().enumerate() {
        let body = payload(200 + i as u64, 3000);
        let path = gradle_path("ios", &format!("tls{i}"));
        put(node, &path, body.clone()).await;
        for other in &nodes {
            assert_replicated(other, &path, &body).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_of_another_accounts_ca_is_refused_at_the_handshake_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ours = ca(dir.path(), "ours");
    let theirs = ca(dir.path(), "theirs");
    let a = Node::start_with(tls_options(93, &[94], &leaf(&ours, dir.path(), "a", 93)));
    let b = Node::start_with(tls_options(94, &[93], &leaf(&theirs, dir.path(), "b", 94)));
    put(&a, &gradle_path("ios", "secret"), payload(12, 100)).await;
    for node in [&a, &b] {
        let refused = eventually(Duration::from_secs(30), || async {
            let status = node.status().await;
            let peer = status["peers"][0].clone();
            (peer["errors"]["tls"].as_u64().unwrap_or(0) >= 2).then_some(peer)
        })
        .await;
        let Some(peer) = refused else {
            panic!("no TLS refusal: {}", node.status().await);
        };
        assert_ne!(peer["state"], "admitted", "{peer}");
        assert_eq!(peer["node_id"], serde_json::Value::Null, "{peer}");
        assert_eq!(peer["sent_entries"], 0);
        // The listener refused the other side's handshakes too.
        let closed = node
            .metric("kura_connections_closed_total{listener=\"internal\",reason=\"tls_handshake\"}")
            .await;
        assert!(closed >= 1, "{}", node.metrics().await);
    }
    assert!(
        crate::common::mesh::body_at(&b, &gradle_path("ios", "secret"))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "ca");
    let certs = leaf(&ca, dir.path(), "node", 95);
    let other = leaf(&ca, dir.path(), "client", 95);
    let _node = Node::start_with(tls_options(95, &[99], &certs));
    let anonymous = status_over_tls(&peer_client(&ca, None), 95).await;
    assert!(
        anonymous.is_err(),
        "answered without a client certificate: {anonymous:?}"
    );
    let with_leaf = status_over_tls(&peer_client(&ca, Some(&other)), 95).await;
    assert_eq!(with_leaf, Ok(200));
    // Plain HTTP on the TLS port gets nowhere either.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.95:{PEER_PORT}/_internal/status"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_replaced_in_place_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = ca(dir.path(), "old-ca");
    let new_ca = ca(dir.path(), "new-ca");
    let live = leaf(&old_ca, dir.path(), "live", 96);
    let old_client = leaf(&old_ca, dir.path(), "old-client", 96);
    let new_client = leaf(&new_ca, dir.path(), "new-client", 96);
    let node = Node::start_with(tls_options(96, &[99], &live));
    assert_eq!(
        status_over_tls(&peer_client(&old_ca, Some(&old_client)), 96).await,
        Ok(200)
    );
    // Rotate: a leaf of the new CA (and the new CA) written over the files the node reads.
    let rotated = leaf(&new_ca, dir.path(), "rotated", 96);
    for name in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::copy(rotated.join(name), live.join(name)).unwrap();
    }
    let picked_up = eventually(Duration::from_secs(15), || async {
        status_over_tls(&peer_client(&new_ca, Some(&new_client)), 96)
            .await
            .ok()
            .filter(|status| *status == 200)
    })
    .await;
    assert!(
        picked_up.is_some(),
        "rotation not picked up: {}",
        node.logs()
    );
    assert!(
        status_over_tls(&peer_client(&old_ca, Some(&old_client)), 96)
            .await
            .is_err(),
        "the old CA is still trusted"
    );
    assert!(node.logs().contains("peer TLS certificates reloaded"));
}
