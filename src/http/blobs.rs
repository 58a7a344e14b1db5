//! The simple key → blob caches: Nx (`/v1/cache/{key}`, write-once, project `nx`), Metro
//! (`/api/metro/cache/{key}`, project `metro`) and the Bazel HTTP cache
//! (`/bazel/{account}/{project}/ac|cas/{key}`, also ccache's `layout=bazel`).

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router, middleware};
use http::{HeaderMap, Method, StatusCode};

use super::access::{Authorized, KeyParam, ScopeRule};
use super::error::ApiError;
use super::transfer::{self, ServeOptions};
use super::{AppState, layers};
use crate::names;
use crate::storage::{ArtifactKey, Kind, WriteMode};

pub fn routes() -> Router<AppState> {
    let nx = Router::new()
        .route("/v1/cache/{key}", get(nx_load).put(nx_save))
        .route_layer(Extension(ScopeRule::Fixed("nx")))
        .route_layer(middleware::from_fn(layers::plain_text_errors));
    let metro = Router::new()
        .route("/api/metro/cache/{key}", get(metro_load).put(metro_save))
        .route_layer(Extension(ScopeRule::Fixed("metro")));
    let bazel = Router::new()
        .route(
            "/bazel/{account}/{project}/ac/{key}",
            get(ac_load).put(ac_save),
        )
        .route(
            "/bazel/{account}/{project}/cas/{key}",
            get(cas_load).put(cas_save),
        )
        .route_layer(Extension(ScopeRule::Path));
    nx.merge(metro).merge(bazel)
}

const OCTET_STREAM: &str = "application/octet-stream";

async fn load(
    app: &AppState,
    method: Method,
    key: ArtifactKey,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let options = ServeOptions {
        default_content_type: OCTET_STREAM,
        head: method == Method::HEAD,
    };
    transfer::serve(app, &key, headers, options).await
}

async fn nx_load(
    State(app): State<AppState>,
    method: Method,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    load(
        &app,
        method,
        ArtifactKey::new(auth.project, Kind::Nx, key),
        &headers,
    )
    .await
}

async fn nx_save(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = ArtifactKey::new(auth.project, Kind::Nx, key);
    // Nx entries are write-once: an existing entry answers 409 before the body is read.
    if app.store.head(&key)?.is_some() {
        return Err(ApiError::from(crate::storage::StoreError::AlreadyExists));
    }
    transfer::store(
        &app,
        &key,
        &headers,
        body,
        app.config.limits.blob.0,
        WriteMode::WriteOnce,
    )
    .await?;
    Ok(StatusCode::OK.into_response())
}

async fn metro_load(
    State(app): State<AppState>,
    method: Method,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    load(
        &app,
        method,
        ArtifactKey::new(auth.project, Kind::Metro, key),
        &headers,
    )
    .await
}

async fn metro_save(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = ArtifactKey::new(auth.project, Kind::Metro, key);
    transfer::store(
        &app,
        &key,
        &headers,
        body,
        app.config.limits.blob.0,
        WriteMode::Overwrite,
    )
    .await?;
    Ok(StatusCode::OK.into_response())
}

/// Bazel keys are SHA-256 digests: 64 lowercase hex characters.
fn bazel_key(key: String) -> Result<String, ApiError> {
    if names::is_lower_hex(&key, 64) {
        Ok(key)
    } else {
        Err(ApiError::bad_request(
            "invalid_key",
            "Bazel cache keys are 64 lowercase hex characters (SHA-256)",
        ))
    }
}

async fn ac_load(
    State(app): State<AppState>,
    method: Method,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    load(
        &app,
        method,
        ArtifactKey::new(auth.project, Kind::ActionCache, bazel_key(key)?),
        &headers,
    )
    .await
}

async fn ac_save(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = ArtifactKey::new(auth.project, Kind::ActionCache, bazel_key(key)?);
    transfer::store(
        &app,
        &key,
        &headers,
        body,
        app.config.limits.blob.0,
        WriteMode::Overwrite,
    )
    .await?;
    Ok(StatusCode::OK.into_response())
}

async fn cas_load(
    State(app): State<AppState>,
    method: Method,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    load(
        &app,
        method,
        ArtifactKey::new(auth.project, Kind::CasSha256, bazel_key(key)?),
        &headers,
    )
    .await
}

async fn cas_save(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let hash = bazel_key(key)?;
    let expected = names::parse_sha256_hex(&hash).ok_or_else(ApiError::internal)?;
    let key = ArtifactKey::new(auth.project, Kind::CasSha256, hash);
    let staged = transfer::receive(&app, &headers, body, app.config.limits.blob.0, true).await?;
    if staged.sha256 != Some(expected) {
        return Err(ApiError::from(crate::storage::StoreError::ChecksumMismatch));
    }
    transfer::commit(&app, &key, staged, None, WriteMode::Overwrite).await?;
    Ok(StatusCode::OK.into_response())
}
