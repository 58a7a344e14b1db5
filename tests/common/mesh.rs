//! Meshes of real nodes for the replication tests.
//!
//! Each node runs on its own loopback address `127.0.0.<octet>`, with its peer plane on
//! [`PEER_PORT`] there (static peers must know each other's address before they start) and its
//! public listeners on port 0. Each test takes its own octets, so tests run in parallel without
//! sharing a port: the allotment is in `tests/mesh.rs`.

use std::time::{Duration, Instant};

use super::{Node, NodeOptions, client};

/// The peer plane's port on every mesh node's address.
pub const PEER_PORT: u16 = 7443;
/// The account every mesh test's nodes serve.
pub const ACCOUNT: &str = "acme";

/// The peer plane URL of the node on `127.0.0.<octet>`.
pub fn peer_url(octet: u8) -> String {
    format!("http://127.0.0.{octet}:{PEER_PORT}")
}

/// The options of the node on `127.0.0.<octet>` whose static peers are the nodes on `peers`.
pub fn mesh_options(octet: u8, peers: &[u8]) -> NodeOptions {
    let peers: Vec<String> = peers.iter().map(|p| peer_url(*p)).collect();
    node_options(octet, PEER_PORT, &peers)
}

/// The options of the node on `127.0.0.<octet>`, its peer plane on `internal_port`, with
/// `peers` (URLs) as static peers.
pub fn node_options(octet: u8, internal_port: u16, peers: &[String]) -> NodeOptions {
    let options = NodeOptions::default();
    let options = if peers.is_empty() {
        options
    } else {
        options.env("KURA_REPLICATION_PEERS", peers.join(","))
    };
    options
        .env("KURA_SERVER_HTTP", format!("127.0.0.{octet}:0"))
        .env("KURA_SERVER_GRPC", format!("127.0.0.{octet}:0"))
        .env(
            "KURA_SERVER_INTERNAL",
            format!("127.0.0.{octet}:{internal_port}"),
        )
        .env("KURA_NODE_ACCOUNT", ACCOUNT)
        .env("KURA_NODE_ID", format!("node-{octet}"))
        .env("KURA_REPLICATION_INSECURE", "true")
}

/// Nodes on `octets`, each with all the others as static peers, once every node has admitted
/// every other.
pub async fn start_mesh(octets: &[u8]) -> Vec<Node> {
    start_mesh_with(octets, |options| options).await
}

/// [`start_mesh`] with options of the test's own added to every node.
pub async fn start_mesh_with(
    octets: &[u8],
    customize: impl Fn(NodeOptions) -> NodeOptions,
) -> Vec<Node> {
    let nodes: Vec<Node> = octets
        .iter()
        .map(|octet| {
            let others: Vec<u8> = octets.iter().copied().filter(|o| o != octet).collect();
            Node::start_with(customize(mesh_options(*octet, &others)))
        })
        .collect();
    for node in &nodes {
        wait_admitted(node, octets.len() - 1).await;
    }
    // Each started empty: done bootstrapping before the test writes, so that what a test
    // counts arrived by replication.
    for node in &nodes {
        wait_ready(node).await;
    }
    nodes
}

/// Waits until `/ready` answers 200 on `node`.
pub async fn wait_ready(node: &Node) {
    let ready = eventually(Duration::from_secs(30), || async {
        let response = client().get(node.url("/ready")).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "{} never ready: {}",
        node.addr,
        node.status().await
    );
}

/// The name the discovery tests' DNS server answers for (the peer Service's, as in Kubernetes).
pub const PEER_SERVICE: &str = "kura-acme-peers.kura.svc.cluster.local";

/// Options of the node on `127.0.0.<octet>` that finds its peers through `dns` only.
pub fn discovered_options(octet: u8, dns: &super::dns::DnsServer) -> NodeOptions {
    node_options(octet, PEER_PORT, &[])
        .env("KURA_REPLICATION_DISCOVERY_DNS_NAME", PEER_SERVICE)
        .env("KURA_REPLICATION_DISCOVERY_NAMESERVERS", dns.nameserver())
        .env("KURA_REPLICATION_DISCOVERY_INTERVAL", "200ms")
}

/// Nodes on `octets` that find each other through a DNS server on loopback only, once every
/// node has admitted every other and finished bootstrapping; the server is returned too.
pub async fn start_discovered_mesh(octets: &[u8]) -> (Vec<Node>, super::dns::DnsServer) {
    let addresses: Vec<std::net::Ipv4Addr> = octets
        .iter()
        .map(|o| std::net::Ipv4Addr::new(127, 0, 0, *o))
        .collect();
    let dns = super::dns::DnsServer::start(PEER_SERVICE, &addresses).await;
    let nodes: Vec<Node> = octets
        .iter()
        .map(|octet| Node::start_with(discovered_options(*octet, &dns)))
        .collect();
    for node in &nodes {
        wait_admitted(node, octets.len() - 1).await;
    }
    for node in &nodes {
        wait_ready(node).await;
    }
    (nodes, dns)
}

/// Waits until `node` has admitted `count` peers.
pub async fn wait_admitted(node: &Node, count: usize) {
    let admitted = eventually(Duration::from_secs(30), || async {
        let status = node.status().await;
        let peers = status["peers"].as_array().cloned().unwrap_or_default();
        let admitted = peers.iter().filter(|p| p["state"] == "admitted").count();
        (admitted == count).then_some(())
    })
    .await;
    assert!(
        admitted.is_some(),
        "{} did not admit {count} peers: {}\n{}",
        node.addr,
        node.status().await,
        node.logs()
    );
}

/// Polls `check` every 20 ms until it gives a value or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The body at `path` on `node`, `None` unless it answers 200.
pub async fn body_at(node: &Node, path: &str) -> Option<Vec<u8>> {
    let response = client().get(node.url(path)).send().await.ok()?;
    if response.status() != reqwest::StatusCode::OK {
        return None;
    }
    Some(response.bytes().await.ok()?.to_vec())
}

/// Waits until `path` serves exactly `expected` on `node`; panics with what it serves instead.
pub async fn assert_replicated(node: &Node, path: &str, expected: &[u8]) {
    let found = eventually(Duration::from_secs(30), || async {
        body_at(node, path)
            .await
            .filter(|body| body == expected)
            .map(|_| ())
    })
    .await;
    if found.is_none() {
        let now = body_at(node, path).await.map(|b| b.len());
        panic!(
            "{path} did not reach {} (it serves {now:?} bytes, want {}); status: {}",
            node.addr,
            expected.len(),
            node.status().await
        );
    }
}

/// A Gradle path of project `project` for `key`.
pub fn gradle_path(project: &str, key: &str) -> String {
    format!("/api/cache/gradle/{ACCOUNT}/{project}/{key}")
}

/// Writes `body` under `path` with PUT and checks it was stored.
pub async fn put(node: &Node, path: &str, body: Vec<u8>) {
    put_with(&client(), node, path, body).await;
}

/// [`put`] through `client` (a benchmark's, which keeps its connections).
pub async fn put_with(client: &reqwest::Client, node: &Node, path: &str, body: Vec<u8>) {
    let status = client
        .put(node.url(path))
        .body(body)
        .send()
        .await
        .expect("PUT")
        .status();
    assert!(status.is_success(), "PUT {path}: {status}");
}
