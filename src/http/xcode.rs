//! The Tuist CLI's Xcode cache: CAS blobs (`/api/cache/cas/{id}`) and the keyvalue index
//! (`/api/cache/keyvalue`) that maps a CAS id to its entries.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::AppState;
use super::access::{Authorized, KeyParam, QueryScope, invalid_key};
use super::artifacts::{self, BlobRoute, KeyRule, Stored, Surface};
use super::error::ApiError;
use super::transfer::{self, ContentType, ServeOptions};
use crate::storage::{ArtifactKey, Kind, StoreError, WriteMode};

const XCODE_CAS: Surface = Surface {
    kind: Kind::XcodeCas,
    content_type: ContentType::Always("application/octet-stream"),
    limit: |limits| limits.xcode_cas.0,
    write_mode: WriteMode::Overwrite,
    stored: Stored::NoContent,
    keys: KeyRule::Any,
};

struct XcodeCas;

impl BlobRoute for XcodeCas {
    const SURFACE: Surface = XCODE_CAS;
    type Scope = QueryScope;
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/cache/cas/{key}",
            get(artifacts::load::<XcodeCas>).post(artifacts::save::<XcodeCas>),
        )
        .route("/api/cache/keyvalue", put(save_entries))
        .route("/api/cache/keyvalue/{key}", get(load_entries))
}

#[derive(Deserialize)]
struct PutEntries {
    cas_id: String,
    entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    value: String,
}

#[derive(Serialize)]
struct StoredEntries<'a> {
    entries: &'a [Entry],
}

async fn save_entries(
    State(app): State<AppState>,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = app.config.limits.keyvalue.0;
    transfer::check_declared_length(&headers, limit)?;
    let expected = transfer::client_checksum(&headers)?;
    let bytes = transfer::small_body(body, limit).await?;
    // The checksum covers the bytes sent. What is stored is the entries re-serialised, so a
    // later GET does not carry it (its body is not those bytes).
    if expected.is_some_and(|expected| <[u8; 32]>::from(Sha256::digest(&bytes)) != expected) {
        return Err(StoreError::ChecksumMismatch.into());
    }
    let request: PutEntries = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "bad_json",
            format!("Expected {{\"cas_id\": ..., \"entries\": [{{\"value\": ...}}]}}: {e}"),
        )
    })?;
    if !crate::names::valid_key(&request.cas_id) {
        return Err(invalid_key());
    }
    let document = serde_json::to_vec(&StoredEntries {
        entries: &request.entries,
    })
    .map_err(|_| ApiError::internal())?;
    let mut writer = app.store.writer(limit.max(document.len() as u64), false);
    writer.write(&document).await?;
    let staged = writer.finish(None).await?;
    let key = ArtifactKey::new(auth.project, Kind::KeyValue, request.cas_id);
    transfer::commit(
        &app,
        &key,
        staged,
        Some("application/json".into()),
        WriteMode::Overwrite,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn load_entries(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized,
    request: Request,
) -> Result<Response, ApiError> {
    let key = ArtifactKey::new(auth.project, Kind::KeyValue, key);
    let options = ServeOptions {
        content_type: ContentType::UploadsOr("application/json"),
        head: false,
    };
    transfer::serve(&app, &key, request.headers(), options).await
}
