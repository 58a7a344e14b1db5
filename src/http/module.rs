//! The Tuist CLI's module cache: multipart uploads (`start`, `part`, `complete`) and reads of
//! the assembled artifact (`/api/cache/module/{hash}`).
//!
//! A module artifact is addressed by `(cache_category, hash, name)` inside its project; the
//! storage key joins them with `/`, which no component may contain.

use std::borrow::Cow;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use serde::Deserialize;

use super::AppState;
use super::access::{Authorized, invalid_key, query_value};
use super::error::ApiError;
use super::transfer::{self, ContentType, ServeOptions};
use crate::names;
use crate::storage::{ArtifactKey, Kind, StoreError, UploadLimits};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/cache/module/start", post(start))
        .route("/api/cache/module/part", post(part))
        .route("/api/cache/module/complete", post(complete))
        .route("/api/cache/module/{hash}", get(load))
}

/// The query string of a module request, read by name.
struct Params(String);

impl FromRequestParts<AppState> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Params(parts.uri.query().unwrap_or("").to_owned()))
    }
}

impl Params {
    fn required(&self, name: &'static str) -> Result<Cow<'_, str>, ApiError> {
        query_value(&self.0, name, name).ok_or_else(|| {
            ApiError::bad_request(
                "missing_parameter",
                format!("The {name} query parameter is required"),
            )
        })
    }

    /// The artifact key of `(cache_category, hash, name)`.
    fn module_key(&self, project: String, hash: &str) -> Result<ArtifactKey, ApiError> {
        let name = self.required("name")?;
        let category =
            query_value(&self.0, "cache_category", "cache_category").unwrap_or("builds".into());
        if ![hash, &name, &category]
            .iter()
            .all(|part| names::valid_key(part))
        {
            return Err(invalid_key());
        }
        Ok(ArtifactKey::new(
            project,
            Kind::Module,
            format!("{category}/{hash}/{name}"),
        ))
    }

    /// The upload id, checked to be one this node could have issued.
    fn upload_id(&self) -> Result<Cow<'_, str>, ApiError> {
        let id = self.required("upload_id")?;
        if !names::is_lower_hex(&id, 32) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "upload_not_found",
                "Unknown or expired upload",
            ));
        }
        Ok(id)
    }
}

async fn start(
    State(app): State<AppState>,
    params: Params,
    auth: Authorized,
) -> Result<Response, ApiError> {
    let key = params.module_key(auth.project, &params.required("hash")?)?;
    if app.store.head(&key)?.is_some() {
        return Ok(Json(serde_json::json!({ "upload_id": null })).into_response());
    }
    let (store, limits) = (app.store.clone(), upload_limits(&app));
    let id = tokio::task::spawn_blocking(move || store.start_upload(&key, &limits))
        .await
        .map_err(|_| ApiError::internal())??;
    Ok(Json(serde_json::json!({ "upload_id": id })).into_response())
}

/// The bounds of a module upload, from the config.
fn upload_limits(app: &AppState) -> UploadLimits {
    UploadLimits {
        max_in_flight: app.config.uploads.max_in_flight,
        max_parts: app.config.uploads.max_parts,
        max_bytes: app.config.limits.module_assembled.0,
    }
}

/// Checks that an upload exists and belongs to the project the caller is authorized for.
fn owned_upload(app: &AppState, id: &str, auth: &Authorized) -> Result<(), ApiError> {
    match app.store.upload_target(id)? {
        Some(target) if target.project == auth.project => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "upload_not_found",
            "Unknown or expired upload",
        )),
    }
}

async fn part(
    State(app): State<AppState>,
    params: Params,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = params.upload_id()?;
    let limits = upload_limits(&app);
    // Checked before the body is read: a bad part number costs the client no upload.
    let number: u32 = params
        .required("part_number")?
        .parse()
        .ok()
        .filter(|n| (1..=limits.max_parts).contains(n))
        .ok_or(StoreError::BadPartNumber(limits.max_parts))?;
    owned_upload(&app, &id, &auth)?;
    let staged =
        transfer::receive(&app, &headers, body, app.config.limits.module_part.0, false).await?;
    app.store.put_part(&id, number, staged, &limits).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct CompleteRequest {
    parts: Vec<u32>,
    #[serde(default)]
    checksum_sha256: Option<String>,
}

/// The most a completion request's JSON may take: 10,000 part numbers take under 60 KiB.
const COMPLETION_BODY_MAX: u64 = 1 << 20;

async fn complete(
    State(app): State<AppState>,
    params: Params,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = params.upload_id()?;
    owned_upload(&app, &id, &auth)?;
    transfer::check_declared_length(&headers, COMPLETION_BODY_MAX)?;
    let bytes = transfer::small_body(body, COMPLETION_BODY_MAX).await?;
    let request: CompleteRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "bad_json",
            format!("Expected {{\"parts\": [1, 2, ...]}}: {e}"),
        )
    })?;
    let limits = upload_limits(&app);
    if request.parts.is_empty()
        || request
            .parts
            .iter()
            .any(|n| !(1..=limits.max_parts).contains(n))
    {
        return Err(ApiError::bad_request(
            "bad_parts",
            format!(
                "parts must list part numbers from 1 to {}",
                limits.max_parts
            ),
        ));
    }
    let checksum = request
        .checksum_sha256
        .as_deref()
        .map(|hex| {
            names::parse_sha256_hex(hex).ok_or_else(|| {
                ApiError::bad_request(
                    "bad_checksum",
                    "checksum_sha256 must be 64 lowercase hex characters",
                )
            })
        })
        .transpose()?;
    let committed = app
        .store
        .complete_upload(&id, &request.parts, checksum, &limits)
        .await?;
    app.counters.written(Kind::Module, committed.info.size);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn load(
    State(app): State<AppState>,
    method: Method,
    hash: HashParam,
    params: Params,
    auth: Authorized,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = params.module_key(auth.project, &hash.0)?;
    if method == Method::HEAD {
        // The module API answers HEAD with 204 when the artifact exists, with the validators
        // every artifact's HEAD carries.
        return match app.store.head(&key)? {
            Some(info) => Ok(transfer::exists(&info, &headers)),
            None => Err(ApiError::not_found()),
        };
    }
    let options = ServeOptions {
        content_type: ContentType::UploadsOr("application/zip"),
        head: false,
    };
    transfer::serve(&app, &key, &headers, options).await
}

/// The `{hash}` path segment.
struct HashParam(String);

impl FromRequestParts<AppState> for HashParam {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        super::access::path_param(parts, app, "hash")
            .await
            .map(HashParam)
    }
}
