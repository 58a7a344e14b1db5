//! The peer plane's server side: `/_internal/*` on `server.internal`, and the apply rules.
//!
//! Apply rules (replication.md): a body whose BLAKE3 does not match its entry is rejected (422)
//! and nothing of it is stored; versions are compared last-writer-wins on `(version_ms, origin)`
//! by the store's one publish path ([`Provenance::remote`]); a clean removes what it predates
//! and blocks older versions arriving later. Applying is idempotent, so a sender that retries
//! after a lost acknowledgement does no harm.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use super::wire::{Entry, FrameReader, WireError};
use super::{ACCOUNT_HEADER, Mesh};
use crate::context::NodeContext;
use crate::http::error::ApiError;
use crate::layers::{AdmissionLayer, ObserveLayer, RequestIdLayer};
use crate::storage::{
    ArtifactKey, BodyStream, IndexEntry, Kind, NewArtifact, Outcome, Provenance, StoreError,
    WriteMode,
};

#[derive(Clone)]
struct Plane {
    node: Arc<NodeContext>,
    mesh: Arc<Mesh>,
}

/// The internal listener's router: only `/_internal/*`, under the shared layers.
pub fn router(node: Arc<NodeContext>, mesh: Arc<Mesh>) -> Router {
    let admission = AdmissionLayer::new(
        node.lifecycle.clone(),
        node.config.limits.max_in_flight_requests,
        crate::http::layers::HttpRefusals,
    );
    Router::new()
        .route("/_internal/status", get(status))
        .route("/_internal/replicate/batch", post(receive_frames))
        .route("/_internal/replicate/artifact", put(receive_frames))
        .route("/_internal/replicate/delete_project", post(receive_frames))
        .route("/_internal/catch_up", post(catch_up))
        .route("/_internal/index", get(index))
        .route("/_internal/artifact", get(artifact))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no_route", "No such route").into_response()
        })
        .layer(admission)
        .layer(ObserveLayer::new(
            "internal",
            crate::http::layers::MatchedRoute,
        ))
        .layer(RequestIdLayer)
        .with_state(Plane { node, mesh })
}

/// Who this node is: what a peer checks before it admits it.
async fn status(State(plane): State<Plane>) -> Response {
    Json(plane.mesh.identity()).into_response()
}

/// `POST /_internal/catch_up` (`{"writer": "<node id>"}`): the writer's log no longer holds
/// records this node lacks. 202 once the promise to walk the writer's index is persisted; the
/// writer moves this node's cursor only then (see `catch_up.rs`).
async fn catch_up(
    State(plane): State<Plane>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    same_account(&plane, &headers)?;
    let request: super::catch_up::CatchUpRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_catch_up",
            format!("expected {{\"writer\": \"<node id>\"}}: {e}"),
        )
    })?;
    if request.writer.is_empty() || request.writer == plane.mesh.identity().node_id {
        return Err(ApiError::bad_request(
            "bad_catch_up",
            "writer must be another node's id",
        ));
    }
    super::catch_up::promise(plane.mesh.clone(), request.writer).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Refuses a request whose sender says it replicates another account (403 `wrong_account`).
fn same_account(plane: &Plane, headers: &HeaderMap) -> Result<(), ApiError> {
    let account = headers
        .get(ACCOUNT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if account == plane.node.account {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "wrong_account",
        format!("This node serves account {}", plane.node.account),
    ))
}

/// `GET /_internal/index?after=<hex key>&limit=<n>`: a page of this node's artifacts in key
/// order, and every project's last clean (what a bootstrapping peer needs to compare).
async fn index(
    State(plane): State<Plane>,
    Query(query): Query<IndexQuery>,
) -> Result<Json<IndexPage>, ApiError> {
    let after = match &query.after {
        Some(after) => Some(hex::decode(after).map_err(|_| {
            ApiError::bad_request("bad_cursor", "after must be a key from a previous page")
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(INDEX_PAGE).clamp(1, INDEX_PAGE_MAX);
    let store = plane.node.store.clone();
    let entries = tokio::task::spawn_blocking(move || store.index_after(after.as_deref(), limit))
        .await
        .map_err(|_| ApiError::internal())??;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| hex::encode(&e.key)))
        .flatten();
    Ok(Json(IndexPage {
        entries: entries.into_iter().map(IndexItem::from).collect(),
        next,
        tombstones: plane.node.store.tombstones(),
    }))
}

/// `GET /_internal/artifact?key=<hex key>`: one frame (see `wire.rs`) with the artifact's
/// current version, its body streamed from disk through the node's bandwidth limit.
async fn artifact(
    State(plane): State<Plane>,
    Query(query): Query<ArtifactQuery>,
) -> Result<Response, ApiError> {
    let key = hex::decode(&query.key)
        .ok()
        .and_then(|bytes| ArtifactKey::decode(&bytes))
        .ok_or_else(|| ApiError::bad_request("bad_key", "key must be a key from the index"))?;
    let store = &plane.node.store;
    let Some(found) = store.peek(&key)? else {
        return Err(ApiError::not_found());
    };
    let origin = found.origin().to_owned();
    let Some(stored) = store.open_found(&key, found).await? else {
        return Err(ApiError::not_found());
    };
    let info = stored.info.clone();
    let entry = Entry::upsert(&key, &info, origin);
    let header = futures_util::stream::once(async move { Ok(entry.encode_header()) });
    let body: futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>> = match stored
        .into_body(0, info.size)
    {
        BodyStream::Bytes(bytes) => Box::pin(futures_util::stream::once(async move { Ok(bytes) })),
        BodyStream::Stream(stream) => stream,
    };
    let mesh = plane.mesh.clone();
    let limited = header.chain(body).then(move |chunk| {
        let mesh = mesh.clone();
        async move {
            if let Ok(bytes) = &chunk {
                mesh.throttle_serving(bytes.len()).await;
            }
            chunk
        }
    });
    Ok(Body::from_stream(limited).into_response())
}

/// Entries per index page, by default and at most.
const INDEX_PAGE: usize = 500;
const INDEX_PAGE_MAX: usize = 5000;

#[derive(Debug, Deserialize)]
struct IndexQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct ArtifactQuery {
    key: String,
}

/// A page of the index as JSON (keys and digests in hex).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct IndexPage {
    pub(super) entries: Vec<IndexItem>,
    /// The `after` of the next page; `None` on the last one.
    pub(super) next: Option<String>,
    pub(super) tombstones: Vec<(String, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct IndexItem {
    pub(super) key: String,
    pub(super) size: u64,
    pub(super) blake3: String,
    pub(super) version_ms: u64,
    pub(super) origin: String,
}

impl From<IndexEntry> for IndexItem {
    fn from(entry: IndexEntry) -> Self {
        IndexItem {
            key: hex::encode(&entry.key),
            size: entry.size,
            blake3: hex::encode(entry.blake3),
            version_ms: entry.version_ms,
            origin: entry.origin,
        }
    }
}

/// What a write request applied, entry by entry.
#[derive(Debug, Default, Serialize)]
struct Applied {
    applied: u64,
    stale: u64,
    tombstoned: u64,
    too_large: u64,
}

/// One handler for the three write endpoints: a stream of frames (see `wire.rs`), applied in
/// order. The first entry that fails stops the request; what came before it stays applied (the
/// sender retries the whole request, and applying again is harmless).
async fn receive_frames(State(plane): State<Plane>, headers: HeaderMap, body: Body) -> Response {
    if let Err(refused) = same_account(&plane, &headers) {
        return refused.into_response();
    }
    let mut reader = FrameReader::new(body.into_data_stream());
    let mut applied = Applied::default();
    loop {
        let entry = match reader.next_entry().await {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(error) => return wire_error(error),
        };
        match apply(&plane.mesh, entry, &mut reader, Delivery::Pushed).await {
            Ok(ApplyResult::Applied) => applied.applied += 1,
            Ok(ApplyResult::Stale) => applied.stale += 1,
            Ok(ApplyResult::Tombstoned) => applied.tombstoned += 1,
            Ok(ApplyResult::TooLarge) => applied.too_large += 1,
            Err(refusal) => {
                plane.mesh.count_rejected();
                return refusal.into_response();
            }
        }
    }
    Json(applied).into_response()
}

fn wire_error(error: WireError) -> Response {
    bad_frame(error).into_response()
}

fn bad_frame(error: WireError) -> ApiError {
    ApiError::bad_request("bad_frame", error.to_string())
}

/// What became of an entry that was not rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ApplyResult {
    Applied,
    /// Not newer than the stored version.
    Stale,
    /// Older than its project's last clean.
    Tombstoned,
    /// Larger than this node's whole capacity: it can never be stored here, and is
    /// acknowledged without being stored so that it does not stop every later entry of the
    /// sender's log (the sender would resend it forever).
    TooLarge,
}

impl ApplyResult {
    pub(super) fn label(self) -> &'static str {
        match self {
            ApplyResult::Applied => "applied",
            ApplyResult::Stale => "stale",
            ApplyResult::Tombstoned => "tombstoned",
            ApplyResult::TooLarge => "too_large",
        }
    }
}

/// How an entry reached this node, which decides whose writes it may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Pushed by the node that wrote it. The mesh is full: never this node's own write.
    Pushed,
    /// Fetched from a peer's index by bootstrap or catch-up. It may be this node's own write:
    /// a node that lost its data (a wiped disk under the same `node.id`) gets back from its
    /// peers what it had written and replicated.
    Fetched,
}

/// Applies one entry, reading its body from `reader`.
pub(super) async fn apply<S, E>(
    mesh: &Mesh,
    entry: Entry,
    reader: &mut FrameReader<S>,
    delivery: Delivery,
) -> Result<ApplyResult, ApiError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let store = &mesh.store;
    match entry {
        Entry::DeleteProject {
            project,
            version_ms,
            origin,
        } => {
            check_origin(mesh, &origin, delivery)?;
            store.apply_remote_clean(&project, version_ms).await?;
            mesh.count_applied(ApplyResult::Applied, 0);
            Ok(ApplyResult::Applied)
        }
        Entry::Upsert {
            kind,
            project,
            key,
            size,
            blake3,
            sha256,
            content_type,
            version_ms,
            origin,
        } => {
            check_origin(mesh, &origin, delivery)?;
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind)
                .ok_or_else(|| {
                    ApiError::bad_request("bad_kind", format!("Unknown artifact kind {kind:?}"))
                })?;
            let artifact = ArtifactKey::new_checked(&project, kind, &key).ok_or_else(|| {
                ApiError::bad_request("bad_key", "project and key must not contain NUL")
            })?;
            if size > store.capacity() {
                while reader.body_chunk().await.map_err(bad_frame)?.is_some() {}
                // What this node holds of the key is older: it goes, rather than be served as
                // the key's current bytes for good.
                let superseded =
                    store.forget_superseded(&artifact, version_ms, &origin, &blake3)?;
                tracing::warn!(
                    %project, key, size, capacity = store.capacity(), superseded,
                    "a peer's artifact is larger than this node's capacity: not stored"
                );
                mesh.count_applied(ApplyResult::TooLarge, 0);
                return Ok(ApplyResult::TooLarge);
            }
            // A peer's push obeys the disk floor like a client's upload; it is sent again later.
            store.check_room(size)?;
            let mut writer = store.writer(size, sha256.is_some());
            while let Some(chunk) = reader.body_chunk().await.map_err(bad_frame)? {
                writer.write(&chunk).await?;
            }
            let staged = writer.finish(sha256).await.map_err(mismatch)?;
            if staged.blake3 != blake3 {
                return Err(mismatch(StoreError::ChecksumMismatch));
            }
            let committed = store
                .commit(
                    &artifact,
                    staged,
                    NewArtifact { content_type },
                    WriteMode::Overwrite,
                    Provenance::remote(version_ms, origin),
                )
                .await?;
            let result = match committed.outcome {
                Outcome::Published { .. } => ApplyResult::Applied,
                Outcome::Stale => ApplyResult::Stale,
                Outcome::Tombstoned => ApplyResult::Tombstoned,
            };
            let stored = if result == ApplyResult::Applied {
                size
            } else {
                0
            };
            mesh.count_applied(result, stored);
            Ok(result)
        }
    }
}

/// Every entry names the node that wrote it, and a push never carries the receiver's own write
/// (see [`Delivery`]).
fn check_origin(mesh: &Mesh, origin: &str, delivery: Delivery) -> Result<(), ApiError> {
    if origin.is_empty() {
        return Err(ApiError::bad_request(
            "bad_origin",
            "An entry must name the node that wrote it",
        ));
    }
    if origin == mesh.store.node_id() && delivery == Delivery::Pushed {
        return Err(ApiError::bad_request(
            "bad_origin",
            "A pushed entry's origin must be another node",
        ));
    }
    Ok(())
}

/// A body that does not match its entry's digest: 422, nothing stored.
fn mismatch(error: StoreError) -> ApiError {
    match error {
        StoreError::ChecksumMismatch => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "digest_mismatch",
            "An artifact's bytes do not match the digest of its entry",
        ),
        other => other.into(),
    }
}
