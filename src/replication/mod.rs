//! The account mesh: every node sends the writes made on it to every other node of the account.
//!
//! - `storage::outbox` is the replication log: one record per local publish, written in the
//!   publish's own batch, and one persisted cursor per peer.
//! - `sender.rs`: one worker per peer admits it (`GET /_internal/status`: same account, another
//!   node id), then sends the log after its cursor, small artifacts batched and large ones
//!   streamed, and moves the cursor only once the peer acknowledged.
//! - `receive.rs`: the peer plane's routes and the apply rules (verify, last writer wins,
//!   tombstones).
//! - `wire.rs`: the frame format both write endpoints speak.
//! - `discovery.rs`: peers from the A and AAAA records of the account's peer Service.
//! - `tls.rs`: the peer plane's mTLS; `limit.rs`: the bandwidth limit.
//!
//! Replication never sits on a client's path: a client write returns once it is published
//! locally; the log record it carries is sent later by a worker that only reads the store.

mod backoff;
mod bootstrap;
mod catch_up;
mod discovery;
mod limit;
mod receive;
mod sender;
pub mod tls;
pub mod wire;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Counter;
use serde::{Deserialize, Serialize};

use crate::config::ReplicationConfig;
use crate::storage::Store;
use receive::ApplyResult;

pub use receive::router;
pub use tls::PeerTls;

/// Header naming the sender's account on every peer-plane write (a misrouted node of another
/// account is refused even without TLS).
pub const ACCOUNT_HEADER: &str = "x-kura-account";

/// How often the log is trimmed below the slowest peer's cursor and held to its bound.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// How often a connection to a peer is pinged, and how long an unanswered ping is waited for
/// before the connection (and whatever it carries) is given up.
const PEER_PING_INTERVAL: Duration = Duration::from_secs(10);
const PEER_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// What `GET /_internal/status` answers: enough for a peer to admit this node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub account: String,
    pub node_id: String,
    pub region: String,
    /// Bumped when the peer plane changes incompatibly.
    pub protocol: u32,
    /// Random per process: tells this node's own address (the same instance) from another
    /// node started with the same `node.id` (a copied data dir or config). Absent from nodes
    /// of earlier releases.
    #[serde(default)]
    pub instance: Option<String>,
}

/// The version of the peer plane this release speaks.
pub const PROTOCOL: u32 = 1;

/// A node's view of its mesh: its peers and their progress. Shared by the workers, the peer
/// plane and `/status`.
pub struct Mesh {
    store: Store,
    identity: Identity,
    config: ReplicationConfig,
    /// The peer plane's mTLS; `None` on an insecure (plain HTTP) plane.
    tls: Option<Arc<PeerTls>>,
    peers: Mutex<BTreeMap<String, Arc<PeerStatus>>>,
    applied: AppliedCounters,
    /// `replication.bandwidth_limit`: every body byte sent to any peer passes it.
    bandwidth: limit::Bandwidth,
    limiter_wait: metrics::Histogram,
    /// Total time sends waited for the limits, in microseconds (for `/status`).
    limiter_waited_us: AtomicU64,
    /// The peer plane's port, which discovered peers listen on too.
    internal_port: u16,
    /// Bootstrap's progress (`/ready` waits for it).
    bootstrap: bootstrap::Progress,
    /// The catch-ups this node owes to writers whose logs passed it by.
    catch_ups: catch_up::CatchUps,
}

/// Counters of what peers sent here, resolved once.
struct AppliedCounters {
    applied: Counter,
    stale: Counter,
    tombstoned: Counter,
    too_large: Counter,
    rejected: Counter,
    bytes: Counter,
}

impl AppliedCounters {
    fn resolve() -> Self {
        let result = |label: &'static str| metrics::counter!(crate::metrics::REPLICATION_APPLIED_TOTAL, "result" => label);
        AppliedCounters {
            applied: result(ApplyResult::Applied.label()),
            stale: result(ApplyResult::Stale.label()),
            tombstoned: result(ApplyResult::Tombstoned.label()),
            too_large: result(ApplyResult::TooLarge.label()),
            rejected: result("rejected"),
            bytes: metrics::counter!(crate::metrics::REPLICATION_APPLIED_BYTES_TOTAL),
        }
    }
}

impl Mesh {
    /// The mesh of a node, or `None` when it has no peers configured.
    pub fn new(
        store: Store,
        account: &str,
        region: &str,
        config: &ReplicationConfig,
        tls: Option<Arc<PeerTls>>,
        internal_port: u16,
    ) -> anyhow::Result<Option<Arc<Mesh>>> {
        if !config.enabled() {
            return Ok(None);
        }
        // A node that starts with nothing pulls its peers' artifacts before it is ready.
        let store_was_empty = store.stats().artifacts == 0;
        let identity = Identity {
            account: account.to_owned(),
            node_id: store.node_id().to_owned(),
            region: region.to_owned(),
            protocol: PROTOCOL,
            instance: Some(format!("{:016x}", rand::random::<u64>())),
        };
        let mut peers = BTreeMap::new();
        for url in &config.peers {
            let target = Target::static_peer(url, config.tls.server_name.as_deref())?;
            let per_peer = limit::Bandwidth::new(config.per_peer_limit.0);
            peers.insert(
                target.label.clone(),
                Arc::new(PeerStatus::new(target, per_peer)),
            );
        }
        Ok(Some(Arc::new(Mesh {
            store,
            identity,
            config: config.clone(),
            tls,
            peers: Mutex::new(peers),
            applied: AppliedCounters::resolve(),
            bandwidth: limit::Bandwidth::new(config.bandwidth_limit.0),
            limiter_wait: metrics::histogram!(crate::metrics::REPLICATION_LIMITER_WAIT_SECONDS),
            limiter_waited_us: AtomicU64::new(0),
            internal_port,
            bootstrap: bootstrap::Progress::new(store_was_empty),
            catch_ups: catch_up::CatchUps::default(),
        })))
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Starts a worker per static peer, discovery, and the log trimmer.
    pub fn start(self: &Arc<Self>) {
        for peer in self.peer_list() {
            tokio::spawn(sender::run(self.clone(), peer));
        }
        if let Some(name) = &self.config.discovery.dns_name {
            tokio::spawn(discovery::run(
                self.clone(),
                name.clone(),
                self.internal_port,
            ));
        }
        tokio::spawn(trim_log(self.clone()));
        tokio::spawn(bootstrap::run(self.clone()));
        tokio::spawn(catch_up::run(self.clone()));
    }

    /// Whether `/ready` must still say `bootstrapping`.
    pub fn bootstrapping(&self) -> bool {
        self.bootstrap.phase() == bootstrap::Phase::Running
    }

    /// Waits until `bytes` more may be served to a bootstrapping peer (the node's limit).
    async fn throttle_serving(&self, bytes: usize) {
        let waited = self.bandwidth.take(bytes as u64).await;
        if !waited.is_zero() {
            self.limiter_wait.record(waited.as_secs_f64());
            self.limiter_waited_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// Adds a discovered peer (its worker is the caller's to start).
    fn add_peer(&self, target: Target) -> Arc<PeerStatus> {
        let per_peer = limit::Bandwidth::new(self.config.per_peer_limit.0);
        let peer = Arc::new(PeerStatus::new(target, per_peer));
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.insert(peer.label().to_owned(), peer.clone());
        peer
    }

    /// Forgets a peer: it leaves `/status`, and its cursor no longer holds the log back. Its
    /// series stay on `/metrics` (the exporter keeps every series it saw) but read 0: an expired
    /// pod's address must not count as an unreachable peer, or lag, until the node restarts.
    fn remove_peer(&self, peer: &PeerStatus) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.remove(peer.label());
        drop(peers);
        peer.clear_gauges();
    }

    /// Drops an expired peer with its pending records (replication.md: it catches up by
    /// bootstrap when it returns).
    async fn expire_peer(&self, peer: &PeerStatus) {
        self.remove_peer(peer);
        let node_id = peer.node_id();
        tracing::info!(peer = %peer.label(), node_id = ?node_id, "peer expired: gone from discovery for replication.peer_expiry");
        let Some(node_id) = node_id else {
            return;
        };
        // Discovery tracks addresses: a node that came back on another address is a live peer
        // under the same id, and its cursor still holds what it lacks.
        if self
            .peer_list()
            .iter()
            .any(|live| live.node_id().as_deref() == Some(node_id.as_str()))
        {
            return;
        }
        let store = self.store.clone();
        let forgotten = tokio::task::spawn_blocking(move || store.forget_cursor(&node_id)).await;
        if !matches!(forgotten, Ok(Ok(()))) {
            tracing::error!(peer = %peer.label(), "could not forget an expired peer's cursor");
        }
    }

    fn peer_list(&self) -> Vec<Arc<PeerStatus>> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.values().cloned().collect()
    }

    /// Waits until `bytes` more may be sent to `peer` under the node's and the peer's limits.
    async fn throttle(&self, peer: &PeerStatus, bytes: usize) {
        let bytes = bytes as u64;
        let waited = self.bandwidth.take(bytes).await + peer.bandwidth.take(bytes).await;
        if !waited.is_zero() {
            self.limiter_wait.record(waited.as_secs_f64());
            self.limiter_waited_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// The client for `peer`, built again after the TLS files were reloaded.
    fn client_for(&self, peer: &PeerStatus) -> anyhow::Result<reqwest::Client> {
        let generation = self.tls.as_ref().map_or(0, |tls| tls.generation());
        let mut slot = peer.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built, client)) = slot.as_ref()
            && *built == generation
        {
            return Ok(client.clone());
        }
        // HTTP/2 pings find a peer that died or hung mid-exchange (a bootstrap or catch-up
        // fetch has no overall timeout: its length depends on the bandwidth limit); the kernel
        // alone would take a quarter of an hour to give up on a peer that vanished.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .http2_prior_knowledge()
            .http2_keep_alive_interval(PEER_PING_INTERVAL)
            .http2_keep_alive_timeout(PEER_PING_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            builder = builder
                .use_preconfigured_tls((*tls.client_config()).clone())
                .https_only(true);
        }
        if let Some((name, address)) = &peer.target.resolve {
            builder = builder.resolve(name, *address);
        }
        let client = builder.build()?;
        *slot = Some((generation, client.clone()));
        Ok(client)
    }

    fn count_applied(&self, result: ApplyResult, bytes: u64) {
        let counter = match result {
            ApplyResult::Applied => &self.applied.applied,
            ApplyResult::Stale => &self.applied.stale,
            ApplyResult::Tombstoned => &self.applied.tombstoned,
            ApplyResult::TooLarge => &self.applied.too_large,
        };
        counter.increment(1);
        self.applied.bytes.increment(bytes);
    }

    /// An entry refused (a body that does not match its digest, a bad frame, a store error).
    fn count_rejected(&self) {
        self.applied.rejected.increment(1);
    }

    /// The node's side of replication, for `/status`.
    pub fn node_status(&self) -> serde_json::Value {
        let waited = self.limiter_waited_us.load(Ordering::Relaxed) as f64 / 1e6;
        serde_json::json!({
            "bandwidth_limit_bytes_per_second": self.config.bandwidth_limit.0,
            "limiter_wait_seconds": waited,
            "bootstrap": self.bootstrap.to_json(),
            "catch_up": self.catch_ups.to_json(self),
            "log": self.log_status(),
        })
    }

    /// The replication log's extent, for `/status`: `floor` is the last sequence number it may
    /// no longer hold (a peer below it catches up from an index).
    fn log_status(&self) -> serde_json::Value {
        serde_json::json!({
            "oldest_seq": self.store.log_oldest().ok().flatten(),
            "newest_seq": self.store.stable_seq(),
            "floor": self.store.log_floor().ok(),
        })
    }

    /// Every peer's progress, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let peers: Vec<serde_json::Value> =
            self.peer_list().iter().map(|peer| peer.to_json()).collect();
        serde_json::Value::Array(peers)
    }
}

/// A peer's state as `/status` and the metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerState {
    /// Not reached yet.
    Unknown = 0,
    /// Answered its status with this account and another node id: replicating.
    Admitted = 1,
    /// Not answering, or answering with errors.
    Unreachable = 2,
    /// Answered as another account: never replicated to.
    Refused = 3,
}

impl PeerState {
    const ALL: [PeerState; 4] = [
        PeerState::Unknown,
        PeerState::Admitted,
        PeerState::Unreachable,
        PeerState::Refused,
    ];

    fn label(self) -> &'static str {
        match self {
            PeerState::Unknown => "unknown",
            PeerState::Admitted => "admitted",
            PeerState::Unreachable => "unreachable",
            PeerState::Refused => "refused",
        }
    }
}

/// Where a peer is and the name it is verified by.
#[derive(Clone, Debug)]
struct Target {
    /// How `/status` and the metrics name it: the URL it was configured or discovered as.
    label: String,
    /// The base URL requests go to; its host is the TLS server name.
    base: String,
    /// The address to connect to when the base URL's host is a name to verify rather than to
    /// resolve.
    resolve: Option<(String, std::net::SocketAddr)>,
}

impl Target {
    /// A peer of `replication.peers`, verified by its URL's host, or by `server_name` when set
    /// (then the URL's host must be an IP address, which is what is connected to).
    fn static_peer(url: &str, server_name: Option<&str>) -> anyhow::Result<Target> {
        let label = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&label)
            .map_err(|e| anyhow::anyhow!("replication.peers: {label}: {e}"))?;
        let port = parsed.port_or_known_default().unwrap_or(7443);
        let host = parsed
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("replication.peers: {label}: no host"))?
            .trim_matches(|c| c == '[' || c == ']');
        let (Some(name), Ok(ip)) = (server_name, host.parse::<std::net::IpAddr>()) else {
            return Ok(Target {
                base: label.clone(),
                label,
                resolve: None,
            });
        };
        Ok(Target {
            base: format!("{}://{name}:{port}", parsed.scheme()),
            resolve: Some((name.to_owned(), std::net::SocketAddr::new(ip, port))),
            label,
        })
    }
}

impl Target {
    /// An address of the discovery name: connected to by address, verified by the name (or by
    /// `replication.tls.server_name`).
    fn discovered(mesh: &Mesh, dns_name: &str, address: std::net::SocketAddr) -> Target {
        if mesh.tls.is_none() {
            let base = format!("http://{address}");
            return Target {
                label: base.clone(),
                base,
                resolve: None,
            };
        }
        let name = mesh
            .config
            .tls
            .server_name
            .clone()
            .unwrap_or_else(|| dns_name.trim_end_matches('.').to_owned());
        Target {
            label: format!("https://{address}"),
            base: format!("https://{name}:{}", address.port()),
            resolve: Some((name, address)),
        }
    }
}

/// One peer's progress, updated by its worker.
pub struct PeerStatus {
    target: Target,
    /// `replication.per_peer_limit`.
    bandwidth: limit::Bandwidth,
    /// The client its worker uses, and the TLS generation it was built with.
    client: Mutex<Option<(u64, reqwest::Client)>>,
    node_id: Mutex<Option<String>>,
    state: AtomicU8,
    pending: AtomicU64,
    lag_ms: AtomicU64,
    sent_bytes: AtomicU64,
    sent_entries: AtomicU64,
    /// Times this node asked the peer to catch up from its index.
    catch_ups: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl PeerStatus {
    fn new(target: Target, bandwidth: limit::Bandwidth) -> Self {
        PeerStatus {
            target,
            bandwidth,
            client: Mutex::new(None),
            node_id: Mutex::new(None),
            state: AtomicU8::new(PeerState::Unknown as u8),
            pending: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            sent_entries: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// How logs, `/status` and metrics name the peer.
    fn label(&self) -> &str {
        &self.target.label
    }

    /// The URL of `path` on the peer's plane.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.base)
    }

    fn state(&self) -> PeerState {
        let value = self.state.load(Ordering::Relaxed);
        PeerState::ALL
            .into_iter()
            .find(|s| *s as u8 == value)
            .unwrap_or(PeerState::Unknown)
    }

    fn set_state(&self, state: PeerState) {
        self.state.store(state as u8, Ordering::Relaxed);
        self.publish_state(Some(state));
    }

    /// Sets the state gauges: 1 for `current`, 0 for the others (all of them for `None`).
    fn publish_state(&self, current: Option<PeerState>) {
        for each in PeerState::ALL {
            let value = if Some(each) == current { 1.0 } else { 0.0 };
            metrics::gauge!(crate::metrics::REPLICATION_PEER_STATE, "peer" => self.target.label.clone(), "state" => each.label()).set(value);
        }
    }

    /// Sets every gauge of this peer to 0 (it is no longer a peer).
    fn clear_gauges(&self) {
        self.publish_state(None);
        self.record_progress(0, 0);
    }

    /// The node id the peer answered its admission with.
    fn node_id(&self) -> Option<String> {
        self.node_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_node_id(&self, node_id: &str) {
        let mut slot = self.node_id.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(node_id.to_owned());
    }

    fn record_error(&self, reason: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(reason).or_default() += 1;
        metrics::counter!(crate::metrics::REPLICATION_ERRORS_TOTAL, "peer" => self.target.label.clone(), "reason" => reason).increment(1);
    }

    fn record_progress(&self, pending: u64, lag_ms: u64) {
        self.pending.store(pending, Ordering::Relaxed);
        self.lag_ms.store(lag_ms, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::REPLICATION_PENDING_ENTRIES, "peer" => self.target.label.clone())
            .set(pending as f64);
        metrics::gauge!(crate::metrics::REPLICATION_LAG_SECONDS, "peer" => self.target.label.clone())
            .set(lag_ms as f64 / 1000.0);
    }

    fn record_catch_up(&self) {
        self.catch_ups.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::REPLICATION_CATCH_UPS_REQUESTED_TOTAL, "peer" => self.target.label.clone())
            .increment(1);
    }

    fn record_sent(&self, entries: u64, bytes: u64) {
        self.sent_entries.fetch_add(entries, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!(crate::metrics::REPLICATION_SENT_ENTRIES_TOTAL, "peer" => self.target.label.clone())
            .increment(entries);
        metrics::counter!(crate::metrics::REPLICATION_SENT_BYTES_TOTAL, "peer" => self.target.label.clone())
            .increment(bytes);
    }

    fn to_json(&self) -> serde_json::Value {
        let node_id = self
            .node_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        serde_json::json!({
            "url": self.target.label,
            "node_id": node_id,
            "state": self.state().label(),
            "pending_entries": self.pending.load(Ordering::Relaxed),
            "lag_seconds": self.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            "sent_entries": self.sent_entries.load(Ordering::Relaxed),
            "sent_bytes": self.sent_bytes.load(Ordering::Relaxed),
            "catch_ups_requested": self.catch_ups.load(Ordering::Relaxed),
            "errors": errors,
        })
    }
}

/// Trims the log below the slowest live peer's persisted cursor and holds it to its bound.
async fn trim_log(mesh: Arc<Mesh>) {
    let dropped = metrics::counter!(crate::metrics::REPLICATION_LOG_DROPPED_TOTAL);
    let max_entries = mesh.config.outbox.max_entries;
    let mut ticker = tokio::time::interval(TRIM_INTERVAL);
    let owners = Arc::new(Mutex::new(CursorOwners::new(mesh.config.peer_expiry.0)));
    loop {
        ticker.tick().await;
        // `None` while some peer was not admitted since the start: its cursor is unknown.
        let live: Option<Vec<String>> =
            mesh.peer_list().iter().map(|peer| peer.node_id()).collect();
        let (store, owners) = (mesh.store.clone(), owners.clone());
        let pass = tokio::task::spawn_blocking(move || {
            let saved = store.cursors()?;
            let expired = owners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .expired(&saved, live.as_deref(), Instant::now());
            for node_id in &expired {
                tracing::info!(
                    node_id,
                    "forgetting the replication cursor of a node that was no peer's for replication.peer_expiry"
                );
                store.forget_cursor(node_id)?;
            }
            let slowest = saved
                .into_iter()
                .filter(|(node_id, _)| !expired.contains(node_id))
                .map(|(_, seq)| seq)
                .min();
            store.trim_log(slowest, max_entries)
        })
        .await;
        match pass {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                dropped.increment(n);
                tracing::warn!(
                    dropped = n,
                    max_entries,
                    "replication log over replication.outbox.max_entries: dropped its oldest records; the peers that lacked them catch up from an index"
                );
            }
            Ok(Err(error)) => tracing::error!(%error, "trimming the replication log failed"),
            Err(error) => tracing::error!(%error, "trimming the replication log panicked"),
        }
    }
}

/// When each saved cursor's node was last one of this node's peers. A cursor holds the log back
/// for its node (the log keeps what it lacks), so one whose node is gone for good (a node wiped
/// and back under a new id, a static peer removed from the configuration) kept the log at its
/// bound forever, its oldest records dropped with a warning every second. replication.md drops
/// a peer missing for `replication.peer_expiry` with its pending entries: a cursor whose node
/// was no peer's for that long (counted from when the trimmer first saw it) is forgotten. Only
/// while every peer's node id is known (each was admitted since the start): a static peer down
/// since before a restart may own any cursor, so until then every cursor counts as its node's.
/// If a forgotten node does return, it catches up from an index.
struct CursorOwners {
    expiry: Duration,
    last_seen: HashMap<String, Instant>,
}

impl CursorOwners {
    fn new(expiry: Duration) -> Self {
        CursorOwners {
            expiry,
            last_seen: HashMap::new(),
        }
    }

    /// The node ids among `saved` whose nodes were no peer's (not in `live`, the peers' node
    /// ids, `None` while some are unknown) for the expiry.
    fn expired(
        &mut self,
        saved: &[(String, u64)],
        live: Option<&[String]>,
        now: Instant,
    ) -> Vec<String> {
        let Some(live) = live else {
            for (node_id, _) in saved {
                self.last_seen.insert(node_id.clone(), now);
            }
            return Vec::new();
        };
        for node_id in live {
            self.last_seen.insert(node_id.clone(), now);
        }
        let mut expired = Vec::new();
        for (node_id, _) in saved {
            // A cursor first met now counts from now: one a peer admitted since `live` was read
            // has just been created. At the first pass (the start) that is the start.
            let seen = *self.last_seen.entry(node_id.clone()).or_insert(now);
            if now.saturating_duration_since(seen) >= self.expiry {
                expired.push(node_id.clone());
                self.last_seen.remove(node_id);
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_forgotten_once_its_node_was_no_peers_for_the_expiry() {
        let expiry = Duration::from_secs(600);
        let mut owners = CursorOwners::new(expiry);
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let saved = vec![("gone".to_string(), 5), ("live".to_string(), 9)];
        let live = vec!["live".to_string()];
        // Every peer known: a cursor of no peer's lasts the expiry from the first pass.
        assert!(owners.expired(&saved, Some(&live), at(0)).is_empty());
        assert!(owners.expired(&saved, Some(&live), at(599)).is_empty());
        assert_eq!(owners.expired(&saved, Some(&live), at(600)), vec!["gone"]);
        // A node that leaves the peers keeps its cursor for the expiry...
        let saved = vec![("live".to_string(), 9)];
        assert!(owners.expired(&saved, Some(&[]), at(1199)).is_empty());
        // ...unless some peer's id is unknown meanwhile (it may be the owner): that resets it.
        assert!(owners.expired(&saved, None, at(1000)).is_empty());
        assert!(owners.expired(&saved, Some(&[]), at(1599)).is_empty());
        assert_eq!(owners.expired(&saved, Some(&[]), at(1600)), vec!["live"]);
        // A cursor that appears later (a peer admitted between two passes) starts its own clock.
        let saved = vec![("new".to_string(), 1)];
        assert!(owners.expired(&saved, Some(&[]), at(5000)).is_empty());
        assert_eq!(owners.expired(&saved, Some(&[]), at(5600)), vec!["new"]);
    }
}
