//! Bootstrap: a node that starts empty pulls what its peers hold before it says it is ready.
//!
//! Once a peer is admitted, the node walks that peer's index (`GET /_internal/index`, pages in
//! key order), applies its project cleans, and fetches (`GET /_internal/artifact`) every
//! artifact it holds an older version of, and those it lacks up to its low watermark in bytes
//! (see [`Budget`]), applying each by the same rules as a replicated write. Its own writes are
//! fetched too: a node whose disk was wiped gets back, under the same `node.id`, what it had
//! replicated. The peer serves those bytes through its bandwidth limit. `/ready` answers
//! 503 `bootstrapping` until one full pass over one peer is done or `bootstrap.timeout` passes;
//! the public API serves all along. Writes made meanwhile reach the node through the peers'
//! logs as usual, so nothing written during the pass is missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::receive::{ApplyResult, Delivery, IndexItem, IndexPage, apply};
use super::wire::FrameReader;
use super::{Mesh, PeerState, PeerStatus};
use crate::storage::{ArtifactKey, meta};

/// Index entries asked for per page.
const PAGE: usize = 500;

/// Where bootstrap is, for `/ready` and `/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The node had artifacts when it started: nothing to pull.
    NotNeeded = 0,
    Running = 1,
    Done = 2,
    /// `bootstrap.timeout` passed before a pass completed; the node serves what it has.
    TimedOut = 3,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::NotNeeded => "not_needed",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::TimedOut => "timed_out",
        }
    }
}

/// Bootstrap's progress.
pub struct Progress {
    phase: AtomicU8,
    tally: Tally,
}

/// What walks of peers' indexes examined and fetched (also counted in `/metrics` by walk).
pub(super) struct Tally {
    /// `bootstrap` or `catch_up`: the metrics' `walk` label.
    walk: &'static str,
    examined: AtomicU64,
    artifacts: AtomicU64,
    bytes: AtomicU64,
    /// Artifacts this node lacked and left unfetched: the pass had fetched its budget.
    over_budget: AtomicU64,
}

impl Tally {
    pub(super) fn new(walk: &'static str) -> Tally {
        Tally {
            walk,
            examined: AtomicU64::new(0),
            artifacts: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
        }
    }

    fn fetched(&self, bytes: u64) {
        self.artifacts.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let walk = self.walk;
        metrics::counter!(crate::metrics::REPLICATION_WALK_FETCHED_TOTAL, "walk" => walk)
            .increment(1);
        metrics::counter!(crate::metrics::REPLICATION_WALK_FETCHED_BYTES_TOTAL, "walk" => walk)
            .increment(bytes);
    }

    fn left_over_budget(&self, artifacts: u64) {
        self.over_budget.fetch_add(artifacts, Ordering::Relaxed);
        metrics::counter!(crate::metrics::REPLICATION_WALK_OVER_BUDGET_TOTAL, "walk" => self.walk)
            .increment(artifacts);
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "examined": self.examined.load(Ordering::Relaxed),
            "fetched_artifacts": self.artifacts.load(Ordering::Relaxed),
            "fetched_bytes": self.bytes.load(Ordering::Relaxed),
            "over_budget": self.over_budget.load(Ordering::Relaxed),
        })
    }
}

impl Progress {
    pub fn new(needed: bool) -> Progress {
        let phase = if needed {
            Phase::Running
        } else {
            Phase::NotNeeded
        };
        Progress {
            phase: AtomicU8::new(phase as u8),
            tally: Tally::new("bootstrap"),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::NotNeeded,
            1 => Phase::Running,
            2 => Phase::Done,
            _ => Phase::TimedOut,
        }
    }

    fn finish(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self.tally.to_json();
        json["state"] = self.phase().label().into();
        json
    }
}

/// Runs one bootstrap pass (when the node started empty), bounded by `bootstrap.timeout`.
pub(super) async fn run(mesh: Arc<Mesh>) {
    if mesh.bootstrap.phase() != Phase::Running {
        return;
    }
    let timeout = mesh.config.bootstrap.timeout.0;
    let running = metrics::gauge!(crate::metrics::REPLICATION_BOOTSTRAPPING);
    running.set(1.0);
    let pass = tokio::time::timeout(timeout, pass_over_one_peer(&mesh)).await;
    running.set(0.0);
    match pass {
        Ok(()) => {
            mesh.bootstrap.finish(Phase::Done);
            tracing::info!(progress = %mesh.bootstrap.to_json(), "bootstrap finished");
        }
        Err(_) => {
            mesh.bootstrap.finish(Phase::TimedOut);
            tracing::warn!(progress = %mesh.bootstrap.to_json(), "bootstrap timed out (replication.bootstrap.timeout); serving what arrived");
        }
    }
}

/// Tries admitted peers until a pass over one of them completes.
async fn pass_over_one_peer(mesh: &Mesh) {
    loop {
        let admitted = mesh
            .peer_list()
            .into_iter()
            .find(|peer| peer.state() == PeerState::Admitted);
        match admitted {
            Some(peer) => match pull(
                mesh,
                &peer,
                None,
                &mut Budget::room(mesh),
                &mesh.bootstrap.tally,
            )
            .await
            {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(peer = %peer.label(), %error, "bootstrap pass failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Artifacts fetched at once during a walk.
const FETCHES_AT_ONCE: usize = 4;

/// Walks `peer`'s index and fetches what this node lacks or holds older: every artifact, or
/// (`only_origin`) those one node wrote. The project cleans it lists are applied first.
///
/// Artifacts this node lacks are fetched while `budget` lasts. Newer versions of artifacts
/// held here are always fetched: they replace what they supersede.
pub(super) async fn pull(
    mesh: &Mesh,
    peer: &PeerStatus,
    only_origin: Option<&str>,
    budget: &mut Budget,
    tally: &Tally,
) -> anyhow::Result<()> {
    let client = mesh.client_for(peer)?;
    let mut after: Option<String> = None;
    let mut cleans_applied = false;
    let mut over_budget = 0;
    loop {
        let mut request = client
            .get(peer.url("/_internal/index"))
            .query(&[("limit", PAGE.to_string())])
            .timeout(Duration::from_secs(30));
        if let Some(after) = &after {
            request = request.query(&[("after", after)]);
        }
        let response = request.send().await?.error_for_status()?;
        let page: IndexPage = response.json().await?;
        if !cleans_applied {
            for (project, at) in &page.tombstones {
                mesh.store.apply_remote_clean(project, *at).await?;
            }
            cleans_applied = true;
        }
        let mut wanted = Vec::new();
        for item in &page.entries {
            tally.examined.fetch_add(1, Ordering::Relaxed);
            match wants(mesh, item, only_origin, budget)? {
                Want::Fetch { charged } => wanted.push((item.key.clone(), item.size, charged)),
                Want::Skip => {}
                Want::OverBudget => over_budget += 1,
            }
        }
        // A few fetches at once hide the round trips; the serving peer's limit paces the bytes.
        let fetch_one = |(key, size, charged): (String, u64, u64)| {
            let client = &client;
            async move {
                let stored = fetch(mesh, client, peer, &key).await?;
                anyhow::Ok((stored, size, charged))
            }
        };
        settle_all(
            wanted,
            FETCHES_AT_ONCE,
            fetch_one,
            |fetched| match fetched {
                (true, size, _) => tally.fetched(size),
                // Gone from the peer, or not newer after all: what it took goes back.
                (false, _, charged) => budget.left = budget.left.saturating_add(charged),
            },
        )
        .await?;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    tally.left_over_budget(over_budget);
    if over_budget > 0 {
        tracing::info!(
            peer = %peer.label(), over_budget, budget = mesh.store.low_watermark(),
            "a walk of a peer's index left artifacts this node lacks unfetched: they are more than it keeps (storage.low_watermark of capacity)"
        );
    }
    Ok(())
}

/// Runs `work` on each of `items`, `at_once` at a time, and hands what each returns to `done`.
///
/// After the first failure it starts no more, but lets the work in flight finish before it
/// returns that failure. A fetch dropped half-way can still land: its commit runs on a blocking
/// thread that outlives the future. It would then land unseen by the budget that the walk's
/// next try measures from what is stored, and that try would fetch past the low watermark.
async fn settle_all<I, F, Fut, T>(
    items: I,
    at_once: usize,
    mut work: F,
    mut done: impl FnMut(T),
) -> anyhow::Result<()>
where
    I: IntoIterator,
    F: FnMut(I::Item) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut items = items.into_iter();
    let mut running = FuturesUnordered::new();
    let mut failure = None;
    loop {
        while failure.is_none() && running.len() < at_once {
            let Some(item) = items.next() else { break };
            running.push(work(item));
        }
        match running.next().await {
            Some(Ok(value)) => done(value),
            Some(Err(error)) => {
                failure.get_or_insert(error);
            }
            None => return failure.map_or(Ok(()), Err),
        }
    }
}

/// What the artifacts this node lacks that a walk may still fetch can cost against capacity
/// (the capacity budget of `replication.md`), bounded by the node's low watermark, what
/// eviction leaves stored: a peer may hold more than this node keeps, and fetching past that
/// would only evict what the walk itself fetched, or what clients wrote meanwhile.
pub(super) struct Budget {
    left: u64,
}

impl Budget {
    /// A whole low watermark: a catch-up pass on a node that may be full (it then evicts its
    /// least recently used artifacts, as the pushes it missed would have made it).
    pub(super) fn of(mesh: &Mesh) -> Budget {
        Budget {
            left: mesh.store.low_watermark(),
        }
    }

    /// What is left below the low watermark: bootstrap, whose tries after a failed one keep
    /// what it fetched.
    fn room(mesh: &Mesh) -> Budget {
        Budget {
            left: mesh
                .store
                .low_watermark()
                .saturating_sub(mesh.store.stats().used_bytes),
        }
    }
}

/// What a walk does with one entry of a peer's index.
enum Want {
    /// `charged`: what it took from the budget (nothing for a newer version of a held key).
    Fetch { charged: u64 },
    /// Held here at that version or newer, out of the walk's scope, or too large ever to fit.
    Skip,
    /// Lacked here, but the budget is spent.
    OverBudget,
}

/// Whether a walk fetches `item`, taking a lacked artifact's size from `budget`.
fn wants(
    mesh: &Mesh,
    item: &IndexItem,
    only_origin: Option<&str>,
    budget: &mut Budget,
) -> anyhow::Result<Want> {
    let Some(key) = hex::decode(&item.key)
        .ok()
        .and_then(|bytes| ArtifactKey::decode(&bytes))
    else {
        return Ok(Want::Skip);
    };
    // Larger than this node can ever hold: not worth a transfer (`receive::apply` would drop
    // it as too_large).
    let too_large = item.size > mesh.store.capacity();
    if only_origin.is_some_and(|origin| item.origin != origin) || too_large {
        return Ok(Want::Skip);
    }
    // What it will count against capacity, metadata included (its content type, not in the
    // index, aside): bodies alone would take a walk of many small artifacts past the low
    // watermark, and the background eviction pass would then evict what the walk fetched.
    let cost = meta::charge(item.size, key.encoded_len(), 0);
    Ok(match mesh.store.version_of(&key)? {
        Some((version_ms, origin)) => {
            let newer = (item.version_ms, item.origin.as_str()) > (version_ms, origin.as_str());
            if newer {
                Want::Fetch { charged: 0 }
            } else {
                Want::Skip
            }
        }
        None if cost <= budget.left => {
            budget.left -= cost;
            Want::Fetch { charged: cost }
        }
        None => Want::OverBudget,
    })
}

/// Fetches one artifact and applies it like a replicated write; whether it was stored.
async fn fetch(
    mesh: &Mesh,
    client: &reqwest::Client,
    peer: &PeerStatus,
    key_hex: &str,
) -> anyhow::Result<bool> {
    let response = client
        .get(peer.url("/_internal/artifact"))
        .query(&[("key", key_hex)])
        .send()
        .await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        // Evicted or replaced on the peer since its index page was read.
        return Ok(false);
    }
    let response = response.error_for_status()?;
    let mut reader = FrameReader::new(response.bytes_stream());
    let Some(entry) = reader.next_entry().await? else {
        anyhow::bail!("the peer sent no artifact");
    };
    let applied = apply(mesh, entry, &mut reader, Delivery::Fetched)
        .await
        .map_err(|refusal| anyhow::anyhow!("{}: {}", refusal.code, refusal.message))?;
    Ok(applied == ApplyResult::Applied)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Item 0 fails at once; the others take a while and record that they finished.
    async fn slow_unless_first(item: usize, started: &Mutex<Vec<usize>>) -> anyhow::Result<usize> {
        started.lock().unwrap().push(item);
        if item == 0 {
            anyhow::bail!("the peer went away");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(item)
    }

    #[tokio::test]
    async fn a_failed_walk_lets_its_fetches_in_flight_land_and_starts_no_more() {
        let started = Mutex::new(Vec::new());
        let mut finished = Vec::new();
        let result = settle_all(
            0..8,
            4,
            |item| slow_unless_first(item, &started),
            |item| finished.push(item),
        )
        .await;
        assert_eq!(result.unwrap_err().to_string(), "the peer went away");
        // The three beside the failed one ran to their end and were counted; none began after.
        finished.sort();
        assert_eq!(finished, [1, 2, 3]);
        assert_eq!(*started.lock().unwrap(), [0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn a_walk_without_failures_hands_on_every_result_with_at_most_its_limit_at_once() {
        let running = std::sync::atomic::AtomicUsize::new(0);
        let most = std::sync::atomic::AtomicUsize::new(0);
        let mut finished = Vec::new();
        let work = |item: usize| {
            let (running, most) = (&running, &most);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                anyhow::Ok(item * 10)
            }
        };
        settle_all(0..10, 3, work, |value| finished.push(value))
            .await
            .unwrap();
        finished.sort();
        assert_eq!(finished, (0..10).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }
}
