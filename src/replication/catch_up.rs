//! Catch-up: a peer whose records this node's log no longer holds gets them from an index.
//!
//! The log only holds what some live peer still needs, up to `outbox.max_entries`. A peer
//! whose cursor is below the log's floor has missed records: the bound overtook it while it was
//! away, or it was admitted (for the first time, or again after it expired) once the log had
//! been trimmed without it. Its sender then asks it to catch up (`POST /_internal/catch_up`)
//! and, once the peer has promised to, moves the peer's cursor to the head of the log as it was
//! *before* asking: everything up to there is in this node's index, everything after it still
//! travels through the log. Client writes never wait for any of it.
//!
//! The peer persists its promise, then walks the writer's index and fetches every artifact the
//! writer wrote that it lacks or holds older (bootstrap's walk, kept to the writer's own writes:
//! the other nodes send theirs themselves). A promise survives restarts, and only a pass that
//! began after the latest promise from that writer removes it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::backoff::Backoff;
use super::bootstrap::{Budget, Tally, pull};
use super::{Mesh, PeerState, PeerStatus};
use crate::storage::StoreError;

/// How often owed catch-ups are looked at again when nothing wakes the worker and no pass
/// failed (a writer not yet admitted). After a failed pass the wait grows (`backoff.rs`): each
/// pass walks the writer's whole index again.
const RETRY: Duration = Duration::from_secs(1);

/// `POST /_internal/catch_up`'s body: who this node must catch up from.
#[derive(Debug, Serialize, Deserialize)]
pub struct CatchUpRequest {
    /// The writer's node id; the catching-up node finds it among its admitted peers.
    pub writer: String,
}

/// The catching-up side's state.
pub(super) struct CatchUps {
    /// Orders a new promise against the check that removes a kept one.
    promises: Mutex<()>,
    wake: Notify,
    completed: AtomicU64,
    tally: Tally,
}

impl Default for CatchUps {
    fn default() -> CatchUps {
        CatchUps {
            promises: Mutex::new(()),
            wake: Notify::new(),
            completed: AtomicU64::new(0),
            tally: Tally::new("catch_up"),
        }
    }
}

impl CatchUps {
    /// For `/status`: the writers still owed, and what the passes fetched.
    pub(super) fn to_json(&self, mesh: &Mesh) -> serde_json::Value {
        let owed: Vec<String> = mesh
            .store
            .catch_ups()
            .unwrap_or_default()
            .into_iter()
            .map(|(writer, _)| writer)
            .collect();
        let mut json = self.tally.to_json();
        json["owed_to"] = owed.into();
        json["completed"] = self.completed.load(Ordering::Relaxed).into();
        json
    }
}

/// Records (durably) that this node will catch up from `writer`, and wakes the worker.
pub(super) async fn promise(mesh: Arc<Mesh>, writer: String) -> Result<(), StoreError> {
    let recorder = mesh.clone();
    tokio::task::spawn_blocking(move || {
        let _order = lock(&recorder.catch_ups.promises);
        let generation = generation_of(&recorder, &writer)?.map_or(1, |g| g + 1);
        recorder.store.set_catch_up(&writer, generation)
    })
    .await
    .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
    mesh.catch_ups.wake.notify_one();
    Ok(())
}

/// Keeps the promises this node made, until the process exits.
pub(super) async fn run(mesh: Arc<Mesh>) {
    let mut backoff = Backoff::default();
    loop {
        let store = mesh.store.clone();
        let owed = tokio::task::spawn_blocking(move || store.catch_ups()).await;
        let owed = match owed {
            Ok(Ok(owed)) => owed,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading the owed catch-ups failed");
                Vec::new()
            }
            Err(error) => {
                tracing::error!(%error, "reading the owed catch-ups panicked");
                Vec::new()
            }
        };
        metrics::gauge!(crate::metrics::REPLICATION_CATCH_UPS_OWED).set(owed.len() as f64);
        let mut failed = false;
        for (writer, generation) in owed {
            failed |= catch_up_from(&mesh, &writer, generation).await == Pass::Failed;
        }
        let wait = if failed {
            backoff.next()
        } else {
            backoff.reset();
            RETRY
        };
        tokio::select! {
            _ = mesh.catch_ups.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How a pass over a writer's index went.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// Made, or not due (the writer is not an admitted peer now).
    Done,
    Failed,
}

/// One pass over `writer`'s index, if it is an admitted peer now.
async fn catch_up_from(mesh: &Arc<Mesh>, writer: &str, generation: u64) -> Pass {
    let Some(peer) = admitted(mesh, writer) else {
        tracing::debug!(
            writer,
            "catch-up owed to a node that is not an admitted peer yet"
        );
        return Pass::Done;
    };
    tracing::info!(peer = %peer.label(), writer, "catching up from a peer's index");
    let passes = |result: &'static str| {
        metrics::counter!(crate::metrics::REPLICATION_CATCH_UP_PASSES_TOTAL, "result" => result)
            .increment(1);
    };
    let mut budget = Budget::of(mesh);
    let walk = pull(
        mesh,
        &peer,
        Some(writer),
        &mut budget,
        &mesh.catch_ups.tally,
    );
    if let Err(error) = walk.await {
        passes("failed");
        tracing::warn!(peer = %peer.label(), %error, "catch-up pass failed; trying again");
        return Pass::Failed;
    }
    passes("completed");
    let kept = {
        let mesh = mesh.clone();
        let writer = writer.to_owned();
        tokio::task::spawn_blocking(move || {
            let _order = lock(&mesh.catch_ups.promises);
            // A promise renewed during the pass asks for a pass that starts after it.
            if generation_of(&mesh, &writer)? == Some(generation) {
                mesh.store.clear_catch_up(&writer)?;
            }
            Ok::<_, StoreError>(())
        })
        .await
    };
    match kept {
        Ok(Ok(())) => {
            mesh.catch_ups.completed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %peer.label(), writer, progress = %mesh.catch_ups.tally.to_json(), "caught up from a peer's index");
        }
        Ok(Err(error)) => tracing::error!(%error, "recording a finished catch-up failed"),
        Err(error) => tracing::error!(%error, "recording a finished catch-up panicked"),
    }
    Pass::Done
}

/// The admitted peer whose node id is `node_id`.
fn admitted(mesh: &Mesh, node_id: &str) -> Option<Arc<PeerStatus>> {
    mesh.peer_list().into_iter().find(|peer| {
        peer.state() == PeerState::Admitted && peer.node_id().as_deref() == Some(node_id)
    })
}

fn generation_of(mesh: &Mesh, writer: &str) -> Result<Option<u64>, StoreError> {
    Ok(mesh
        .store
        .catch_ups()?
        .into_iter()
        .find(|(owed, _)| owed == writer)
        .map(|(_, generation)| generation))
}

fn lock(mutex: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
