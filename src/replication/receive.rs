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
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http::{HeaderMap, StatusCode};
use serde::Serialize;

use super::wire::{Entry, FrameReader, WireError};
use super::{ACCOUNT_HEADER, Mesh};
use crate::context::NodeContext;
use crate::http::error::ApiError;
use crate::layers::{AdmissionLayer, ObserveLayer, RequestIdLayer};
use crate::storage::{ArtifactKey, Kind, NewArtifact, Outcome, Provenance, StoreError, WriteMode};

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

/// What a write request applied, entry by entry.
#[derive(Debug, Default, Serialize)]
struct Applied {
    applied: u64,
    stale: u64,
    tombstoned: u64,
}

/// One handler for the three write endpoints: a stream of frames (see `wire.rs`), applied in
/// order. The first entry that fails stops the request; what came before it stays applied (the
/// sender retries the whole request, and applying again is harmless).
async fn receive_frames(State(plane): State<Plane>, headers: HeaderMap, body: Body) -> Response {
    let account = headers
        .get(ACCOUNT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if account != plane.node.account {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_account",
            format!("This node serves account {}", plane.node.account),
        )
        .into_response();
    }
    let mut reader = FrameReader::new(body.into_data_stream());
    let mut applied = Applied::default();
    loop {
        let entry = match reader.next_entry().await {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(error) => return wire_error(error),
        };
        match apply(&plane, entry, &mut reader).await {
            Ok(ApplyResult::Applied) => applied.applied += 1,
            Ok(ApplyResult::Stale) => applied.stale += 1,
            Ok(ApplyResult::Tombstoned) => applied.tombstoned += 1,
            Err(refusal) => {
                plane.mesh.count_applied("rejected", 0);
                return refusal.into_response();
            }
        }
    }
    Json(applied).into_response()
}

fn wire_error(error: WireError) -> Response {
    ApiError::bad_request("bad_frame", error.to_string()).into_response()
}

/// What became of an entry that was not rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ApplyResult {
    Applied,
    /// Not newer than the stored version.
    Stale,
    /// Older than its project's last clean.
    Tombstoned,
}

impl ApplyResult {
    fn label(self) -> &'static str {
        match self {
            ApplyResult::Applied => "applied",
            ApplyResult::Stale => "stale",
            ApplyResult::Tombstoned => "tombstoned",
        }
    }
}

/// Applies one entry, reading its body from `reader`.
async fn apply<S, E>(
    plane: &Plane,
    entry: Entry,
    reader: &mut FrameReader<S>,
) -> Result<ApplyResult, ApiError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let store = &plane.node.store;
    match entry {
        Entry::DeleteProject {
            project,
            version_ms,
            origin,
        } => {
            check_origin(plane, &origin)?;
            store.apply_remote_clean(&project, version_ms).await?;
            plane.mesh.count_applied(ApplyResult::Applied.label(), 0);
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
            check_origin(plane, &origin)?;
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind)
                .ok_or_else(|| {
                    ApiError::bad_request("bad_kind", format!("Unknown artifact kind {kind:?}"))
                })?;
            let artifact = ArtifactKey::new(project, kind, key);
            let mut writer = store.writer(size, sha256.is_some());
            while let Some(chunk) = reader
                .body_chunk()
                .await
                .map_err(|e| ApiError::bad_request("bad_frame", e.to_string()))?
            {
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
            plane.mesh.count_applied(result.label(), stored);
            Ok(result)
        }
    }
}

/// The mesh is full: a node only ever receives writes made on the sender, never its own back.
fn check_origin(plane: &Plane, origin: &str) -> Result<(), ApiError> {
    if origin.is_empty() || origin == plane.node.store.node_id() {
        return Err(ApiError::bad_request(
            "bad_origin",
            "An entry's origin must be another node",
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
