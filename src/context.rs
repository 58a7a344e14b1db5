//! What every listener of a node shares: the configuration, the store, the authorizer, the
//! lifecycle (drain) and the metrics handle.
//!
//! Built once in `node.rs` and handed to each plane: the public HTTP and gRPC routers and the
//! peer plane. Protocol code reads it; none of it belongs to one protocol.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::Authorizer;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::memory::BodyMemory;
use crate::storage::Store;

/// The shared state of a running node; cheap to share behind an `Arc`.
pub struct NodeContext {
    pub store: Store,
    pub auth: Authorizer,
    pub config: Arc<Config>,
    pub lifecycle: Lifecycle,
    /// What transfers may hold in memory, together (`limits.body_memory`).
    pub body_memory: BodyMemory,
    /// Renders `/metrics`; `None` when no recorder is installed (unit tests).
    pub metrics: Option<PrometheusHandle>,
    /// Per-kind cache counters, resolved at start (see [`crate::metrics::KindCounters`]).
    pub counters: crate::metrics::KindCounters,
    /// The node's account, lowercased.
    pub account: String,
    /// The account mesh, when the node has peers.
    pub mesh: Option<Arc<crate::replication::Mesh>>,
}

impl NodeContext {
    pub fn new(
        config: Config,
        store: Store,
        auth: Authorizer,
        lifecycle: Lifecycle,
        metrics: Option<PrometheusHandle>,
        mesh: Option<Arc<crate::replication::Mesh>>,
    ) -> Arc<NodeContext> {
        let body_memory = BodyMemory::new(
            config.limits.body_memory.0,
            config.limits.body_memory_wait.0,
        );
        Arc::new(NodeContext {
            account: config.node.account.to_ascii_lowercase(),
            body_memory,
            store,
            auth,
            config: Arc::new(config),
            lifecycle,
            metrics,
            counters: crate::metrics::KindCounters::resolve(),
            mesh,
        })
    }

    /// Whether the node takes traffic, and if not why: what `/ready` and the gRPC health check
    /// both answer, so a load balancer reads the same state whichever it probes.
    pub fn readiness(&self) -> Result<(), &'static str> {
        match self.lifecycle.state() {
            crate::lifecycle::State::Serving
                if self.mesh.as_ref().is_some_and(|mesh| mesh.bootstrapping()) =>
            {
                Err("bootstrapping")
            }
            crate::lifecycle::State::Serving => Ok(()),
            other => Err(other.as_str()),
        }
    }
}
