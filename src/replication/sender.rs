//! One worker per peer: admit it, then send it the replication log after its cursor.
//!
//! Records are grouped into requests in log order: small artifacts (and cleans) batched up to
//! [`BATCH_BYTES`], a large artifact alone in a streamed request. Up to [`IN_FLIGHT`] requests
//! travel at once; acknowledgements are taken in order and the cursor moves, persisted, to the
//! last record of each acknowledged request. A failure drops the requests after it and starts
//! again from the cursor after a backoff: a peer may see an entry twice, which it applies as a
//! no-op.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};

use super::backoff::Backoff;
use super::catch_up::CatchUpRequest;
use super::wire::Entry;
use super::{ACCOUNT_HEADER, Identity, Mesh, PeerState, PeerStatus};
use crate::storage::{BodyStream, LogRecord, LogSlice, Store, StoreError, now_ms};

/// Body bytes a batched request carries at most (replication.md: ≤ 4 MiB).
const BATCH_BYTES: u64 = 4 << 20;
/// Artifacts larger than this travel alone, streamed.
const STREAM_OVER: u64 = 1 << 20;
/// Records read from the log at a time.
const READ_AHEAD: usize = 1024;
/// Requests to one peer at once.
const IN_FLIGHT: usize = 2;
/// How long a worker that has sent everything waits for the next publish before it looks at
/// the log again anyway (its floor may have moved, and the peer's status is refreshed).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Runs until the process exits.
pub(super) async fn run(mesh: Arc<Mesh>, peer: Arc<PeerStatus>) {
    let mut backoff = Backoff::default();
    loop {
        let failure = match admit(&mesh, &peer).await {
            Ok(Admission::Admitted(node_id)) => {
                peer.set_state(PeerState::Admitted);
                replicate(&mesh, &peer, &node_id, &mut backoff).await
            }
            Ok(Admission::Itself) => {
                // A node finds its own address among its peers (discovery resolves it too).
                mesh.remove_peer(&peer);
                tracing::debug!(peer = %peer.label(), "this node's own address: not a peer");
                return;
            }
            Ok(Admission::Refused(why)) => {
                peer.set_state(PeerState::Refused);
                tracing::warn!(peer = %peer.label(), why, "peer refused: not replicating to it");
                Failure::new("refused")
            }
            Err(failure) => failure,
        };
        if failure.reason != "refused" {
            peer.set_state(PeerState::Unreachable);
        }
        peer.record_error(failure.reason);
        record_backlog_while_away(&mesh, &peer).await;
        let wait = backoff.next();
        tracing::debug!(peer = %peer.label(), reason = failure.reason, detail = %failure.detail, ?wait, "replication paused");
        tokio::time::sleep(wait).await;
    }
}

/// What a peer at `cursor` lacks, `slice` being the read after it: how many records (exact while
/// the log fits one read; beyond, sequence numbers count, and they have gaps: writes received
/// from peers take numbers and are not logged), and the age of the oldest in milliseconds.
fn backlog(store: &Store, slice: &LogSlice, cursor: u64) -> (u64, u64) {
    let pending = if slice.records.len() < READ_AHEAD {
        slice.records.len() as u64
    } else {
        store.stable_seq().saturating_sub(cursor)
    };
    let lag_ms = slice.records.first().map_or(0, |(_, record)| {
        now_ms().saturating_sub(record.version_ms())
    });
    (pending, lag_ms)
}

/// What `peer` still lacks, measured from its stored cursor, so that its lag keeps growing on
/// `/metrics` and `/status` while it cannot be reached instead of freezing at what it was when
/// it went away (an alert on lag would never fire). Nothing is known of a peer never admitted.
async fn record_backlog_while_away(mesh: &Mesh, peer: &PeerStatus) {
    let Some(node_id) = peer.node_id() else {
        return;
    };
    let measured = blocking(&mesh.store, move |store| {
        let cursor = store.cursor(&node_id)?;
        let slice = store.log_after(cursor, READ_AHEAD)?;
        Ok(backlog(store, &slice, cursor))
    })
    .await;
    if let Ok((pending, lag_ms)) = measured {
        peer.record_progress(pending, lag_ms);
    }
}

/// Why a round of sending stopped.
#[derive(Debug)]
struct Failure {
    /// A bounded label: `connect`, `tls`, `status`, `rejected`, `refused`, `storage`,
    /// `catch_up`, `log_dropped`.
    reason: &'static str,
    detail: String,
}

impl Failure {
    fn new(reason: &'static str) -> Self {
        Failure {
            reason,
            detail: String::new(),
        }
    }

    fn with(reason: &'static str, detail: impl ToString) -> Self {
        Failure {
            reason,
            detail: detail.to_string(),
        }
    }
}

impl Failure {
    /// A request that got no answer: `tls` when the handshake refused the peer (another
    /// account's CA, no certificate, a name it is not valid for), `connect` otherwise.
    fn from_request(error: reqwest::Error) -> Failure {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(current) = next {
            if current.downcast_ref::<rustls::Error>().is_some() {
                return Failure::with("tls", format!("{error}: {current}"));
            }
            // An `io::Error` that wraps another error does not name it as its source.
            next = match current
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => current.source(),
            };
        }
        let cause = std::error::Error::source(&error)
            .map(|cause| format!(": {cause}"))
            .unwrap_or_default();
        Failure::with("connect", format!("{error}{cause}"))
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::with("storage", error)
    }
}

enum Admission {
    Admitted(String),
    /// The address is this node's own.
    Itself,
    Refused(&'static str),
}

/// Asks the peer who it is: the same account and another node id are admitted.
async fn admit(mesh: &Mesh, peer: &PeerStatus) -> Result<Admission, Failure> {
    let client = mesh
        .client_for(peer)
        .map_err(|e| Failure::with("connect", e))?;
    let request = client
        .get(peer.url("/_internal/status"))
        .timeout(Duration::from_secs(5));
    let response = succeed(request, "status").await?;
    let identity: Identity = response
        .json()
        .await
        .map_err(|e| Failure::with("status", e))?;
    if identity.account != mesh.identity.account {
        return Ok(Admission::Refused("it serves another account"));
    }
    if identity.node_id == mesh.identity.node_id {
        if identity.instance.is_some() && identity.instance != mesh.identity.instance {
            // Another node under this node's id: each would take the other's writes for its
            // own, and the other nodes keep one cursor for the two.
            tracing::error!(peer = %peer.label(), node_id = %identity.node_id, "a peer runs under this node's node.id (a copied data dir or config?): not replicating to it; give one of them another node.id");
            return Ok(Admission::Refused("it runs under this node's node.id"));
        }
        return Ok(Admission::Itself);
    }
    peer.set_node_id(&identity.node_id);
    Ok(Admission::Admitted(identity.node_id))
}

/// Sends the log after the peer's cursor until a send fails. The backoff starts over only
/// once the peer acknowledged a request: a peer that answers its status but refuses what it is
/// sent (a full disk, an error of its own) is retried ever more slowly, not ten times a second.
async fn replicate(
    mesh: &Arc<Mesh>,
    peer: &Arc<PeerStatus>,
    node_id: &str,
    backoff: &mut Backoff,
) -> Failure {
    match replicate_until_failure(mesh, peer, node_id, backoff).await {
        Ok(never) => match never {},
        Err(failure) => failure,
    }
}

async fn replicate_until_failure(
    mesh: &Arc<Mesh>,
    peer: &Arc<PeerStatus>,
    node_id: &str,
    backoff: &mut Backoff,
) -> Result<std::convert::Infallible, Failure> {
    let store = mesh.store.clone();
    let mut cursor = blocking(&store, {
        let node_id = node_id.to_owned();
        move |store| store.admit_peer(&node_id)
    })
    .await?;
    let mut logged = store.watch_log();
    loop {
        // Seen before the log is read, so a publish that lands during the read wakes the wait.
        logged.borrow_and_update();
        let records = blocking(&store, move |store| store.log_for_peer(cursor, READ_AHEAD)).await?;
        let Some(slice) = records else {
            // The log no longer holds records this peer lacks: it catches up from this node's
            // index instead (catch_up.rs).
            cursor = hand_over_to_catch_up(mesh, peer, node_id, cursor).await?;
            continue;
        };
        let (pending, lag_ms) = backlog(&store, &slice, cursor);
        peer.record_progress(pending, lag_ms);
        if slice.records.is_empty() {
            // Caught up: whatever failed before is over.
            backoff.reset();
            // Nothing logged through `upto`: the peer has all of it. (Persisted with the next
            // acknowledgement; until then a restart merely reads the empty stretch again.)
            cursor = slice.upto;
            if tokio::time::timeout(IDLE_RECHECK, logged.changed())
                .await
                .is_ok_and(|changed| changed.is_err())
            {
                // The store is going away (a node shutting down): nothing to wait for.
                tokio::time::sleep(IDLE_RECHECK).await;
            }
            continue;
        }
        let requests = group(slice.records);
        let mut acknowledged = stream::iter(requests)
            .map(|request| send(mesh, peer, request))
            .buffered(IN_FLIGHT);
        while let Some(result) = acknowledged.next().await {
            let sent = result?;
            backoff.reset();
            cursor = sent.last_seq;
            let node_id = node_id.to_owned();
            blocking(&store, move |store| store.set_cursor(&node_id, cursor)).await?;
            peer.record_sent(sent.entries, sent.bytes);
        }
    }
}

/// Asks `peer` to catch up from this node's index, then moves its cursor to the head of the log
/// as it was before asking: the index covers everything up to there.
async fn hand_over_to_catch_up(
    mesh: &Mesh,
    peer: &PeerStatus,
    node_id: &str,
    cursor: u64,
) -> Result<u64, Failure> {
    let head = mesh.store.stable_seq();
    let client = mesh
        .client_for(peer)
        .map_err(|e| Failure::with("connect", e))?;
    let request = client
        .post(peer.url("/_internal/catch_up"))
        .header(ACCOUNT_HEADER, &mesh.identity.account)
        .json(&CatchUpRequest {
            writer: mesh.identity.node_id.clone(),
        })
        .timeout(Duration::from_secs(10));
    succeed(request, "catch_up").await?;
    let peer_id = node_id.to_owned();
    blocking(&mesh.store, move |store| store.set_cursor(&peer_id, head)).await?;
    peer.record_catch_up();
    if cursor > 0 {
        peer.record_error("log_dropped");
        tracing::warn!(
            peer = %peer.label(), from = cursor, to = head,
            "the log's bound (replication.outbox.max_entries) dropped records this peer lacked; it catches up from this node's index"
        );
    } else {
        tracing::info!(peer = %peer.label(), to = head, "peer admitted after the log was trimmed without it; it catches up from this node's index");
    }
    Ok(head)
}

/// Sends a control request to a peer; an answer other than 2xx is the failure `reason`.
async fn succeed(
    request: reqwest::RequestBuilder,
    reason: &'static str,
) -> Result<reqwest::Response, Failure> {
    let response = request.send().await.map_err(Failure::from_request)?;
    if !response.status().is_success() {
        return Err(Failure::with(reason, response.status()));
    }
    Ok(response)
}

/// Runs a store call on a blocking thread.
async fn blocking<T: Send + 'static>(
    store: &Store,
    call: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Failure> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || call(&store))
        .await
        .map_err(|e| Failure::with("storage", e))?
        .map_err(Failure::from)
}

/// Records that travel in one request.
struct Request {
    records: Vec<(u64, LogRecord)>,
    /// A single large artifact, streamed to the artifact endpoint.
    streamed: bool,
}

/// Groups records, in log order, into requests.
fn group(records: Vec<(u64, LogRecord)>) -> Vec<Request> {
    let mut requests = Vec::new();
    let mut batch: Vec<(u64, LogRecord)> = Vec::new();
    let mut batch_bytes = 0;
    for (seq, record) in records {
        let size = match &record {
            LogRecord::Upsert { size, .. } => *size,
            LogRecord::DeleteProject { .. } => 0,
        };
        if size > STREAM_OVER {
            if !batch.is_empty() {
                requests.push(Request {
                    records: std::mem::take(&mut batch),
                    streamed: false,
                });
                batch_bytes = 0;
            }
            requests.push(Request {
                records: vec![(seq, record)],
                streamed: true,
            });
            continue;
        }
        if batch_bytes + size > BATCH_BYTES && !batch.is_empty() {
            requests.push(Request {
                records: std::mem::take(&mut batch),
                streamed: false,
            });
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push((seq, record));
    }
    if !batch.is_empty() {
        requests.push(Request {
            records: batch,
            streamed: false,
        });
    }
    requests
}

/// What a peer acknowledged.
struct Sent {
    last_seq: u64,
    entries: u64,
    bytes: u64,
}

/// Sends one request and waits for the peer's acknowledgement.
async fn send(mesh: &Arc<Mesh>, peer: &Arc<PeerStatus>, request: Request) -> Result<Sent, Failure> {
    let last_seq = request.records.last().map_or(0, |(seq, _)| *seq);
    let mut frames: Vec<BoxStream<'static, std::io::Result<Bytes>>> = Vec::new();
    let mut entries = 0;
    let mut bytes = 0;
    for (_, record) in &request.records {
        let Some((entry, body)) = open(mesh, record).await? else {
            continue;
        };
        entries += 1;
        bytes += entry.body_len();
        frames.push(stream::once(async move { Ok(entry.encode_header()) }).boxed());
        match body {
            Some(BodyStream::Bytes(chunk)) => {
                frames.push(stream::once(async move { Ok(chunk) }).boxed())
            }
            Some(BodyStream::Stream(body)) => frames.push(body),
            None => {}
        }
    }
    if entries == 0 {
        // Everything in it was skipped: nothing to send, the cursor moves on.
        return Ok(Sent {
            last_seq,
            entries: 0,
            bytes: 0,
        });
    }
    let (method, path) = if request.streamed {
        (reqwest::Method::PUT, "artifact")
    } else {
        (reqwest::Method::POST, "batch")
    };
    let (throttle_mesh, throttle_peer) = (mesh.clone(), peer.clone());
    let limited = stream::iter(frames).flatten().then(move |chunk| {
        let (mesh, peer) = (throttle_mesh.clone(), throttle_peer.clone());
        async move {
            if let Ok(bytes) = &chunk {
                mesh.throttle(&peer, bytes.len()).await;
            }
            chunk
        }
    });
    let body = reqwest::Body::wrap_stream(limited);
    let client = mesh
        .client_for(peer)
        .map_err(|e| Failure::with("connect", e))?;
    let response = client
        .request(method, peer.url(&format!("/_internal/replicate/{path}")))
        .header(ACCOUNT_HEADER, &mesh.identity.account)
        .timeout(request_timeout(
            bytes,
            slowest_rate(
                mesh.config.bandwidth_limit.0,
                mesh.config.per_peer_limit.0,
                mesh.peer_list().len(),
            ),
        ))
        .body(body)
        .send()
        .await
        .map_err(Failure::from_request)?;
    let status = response.status();
    if status == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
        return Err(Failure::with(
            "rejected",
            "the peer found a body that does not match its digest",
        ));
    }
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(Failure::with("status", format!("{status}: {text}")));
    }
    Ok(Sent {
        last_seq,
        entries,
        bytes,
    })
}

/// Long enough for the body at `rate` bytes/s (see [`slowest_rate`]); a peer that stops
/// answering is given up, and HTTP/2 pings find a dead one sooner (`Mesh::client_for`).
fn request_timeout(bytes: u64, rate: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs(bytes / rate.max(1))
}

/// The slowest a request to a peer may go: 1 MiB/s, or less when the bandwidth limits hold it
/// there (the node's limit shared by the requests in flight to every peer, the peer's own by
/// its requests in flight). A timeout that assumed 1 MiB/s under a lower limit cut every
/// large artifact short, and resent it forever.
fn slowest_rate(node_limit: u64, per_peer_limit: u64, peers: usize) -> u64 {
    let share = |limit: u64, ways: u64| (limit > 0).then(|| (limit / ways.max(1)).max(1));
    let in_flight = IN_FLIGHT as u64;
    [
        share(node_limit, in_flight * peers as u64),
        share(per_peer_limit, in_flight),
    ]
    .into_iter()
    .flatten()
    .fold(1 << 20, u64::min)
}

/// The frame of a log record and the body that follows it; `None` when the record is skipped:
/// its artifact is gone (evicted or cleaned before it was sent) or was replaced since (the
/// newer version has its own record).
async fn open(
    mesh: &Mesh,
    record: &LogRecord,
) -> Result<Option<(Entry, Option<BodyStream>)>, Failure> {
    let origin = mesh.identity.node_id.clone();
    let (key, version_ms, blake3) = match record {
        LogRecord::DeleteProject {
            project,
            version_ms,
        } => {
            let entry = Entry::DeleteProject {
                project: project.clone(),
                version_ms: *version_ms,
                origin,
            };
            return Ok(Some((entry, None)));
        }
        LogRecord::Upsert {
            version_ms, blake3, ..
        } => match record.artifact() {
            Some(key) => (key, *version_ms, *blake3),
            None => return Ok(None),
        },
    };
    let Some(found) = mesh.store.peek(&key)? else {
        skipped("gone");
        return Ok(None);
    };
    if found.info.version_ms != version_ms || found.info.blake3 != blake3 {
        skipped("superseded");
        return Ok(None);
    }
    let Some(artifact) = mesh.store.open_found(&key, found).await? else {
        skipped("gone");
        return Ok(None);
    };
    let info = artifact.info.clone();
    let entry = Entry::upsert(&key, &info, origin);
    Ok(Some((entry, Some(artifact.into_body(0, info.size)))))
}

fn skipped(reason: &'static str) {
    metrics::counter!(crate::metrics::REPLICATION_SKIPPED_TOTAL, "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(size: u64) -> LogRecord {
        LogRecord::Upsert {
            key: b"p\0gradle\0k".to_vec(),
            version_ms: 1,
            blake3: [0; 32],
            size,
        }
    }

    #[test]
    fn small_records_batch_up_to_the_limit_and_large_ones_go_alone_in_order() {
        let records = vec![
            (1, upsert(10)),
            (2, upsert(3 << 20)),
            (3, upsert(1 << 20)),
            (4, upsert(1 << 20)),
            (5, upsert(1 << 20)),
            (6, upsert(1 << 20)),
            (7, upsert(1)),
            (
                8,
                LogRecord::DeleteProject {
                    project: "p".into(),
                    version_ms: 2,
                },
            ),
        ];
        let requests = group(records);
        let shape: Vec<(Vec<u64>, bool)> = requests
            .iter()
            .map(|r| (r.records.iter().map(|(s, _)| *s).collect(), r.streamed))
            .collect();
        assert_eq!(
            shape,
            vec![
                (vec![1], false),
                (vec![2], true),
                (vec![3, 4, 5, 6], false),
                (vec![7, 8], false),
            ]
        );
    }

    #[test]
    fn a_request_may_last_as_long_as_the_bandwidth_limits_make_it() {
        const MIB: u64 = 1 << 20;
        // Unlimited, or limits above 1 MiB/s per request: 1 MiB/s is assumed.
        assert_eq!(slowest_rate(0, 0, 3), MIB);
        assert_eq!(slowest_rate(100 * MIB, 0, 3), MIB);
        // The node's limit is shared by the requests in flight to every peer.
        assert_eq!(slowest_rate(4 * MIB, 0, 4), MIB / 2);
        // A peer's own limit by its requests in flight.
        assert_eq!(slowest_rate(0, MIB, 1), MIB / 2);
        assert_eq!(slowest_rate(1, 0, 10), 1);
        // 64 MiB at 0.5 MiB/s: 128 s of body, plus the 30 s any request gets.
        assert_eq!(request_timeout(64 * MIB, MIB / 2), Duration::from_secs(158));
    }
}
