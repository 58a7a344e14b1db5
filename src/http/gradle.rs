//! Gradle HTTP build cache: `/api/cache/gradle/{key}` (query form) and
//! `/api/cache/gradle/{account}/{project}/{key}` (path form for stock `HttpBuildCache`).
//!
//! Gradle turns its remote cache off on unexpected statuses, so in normal operation these
//! answer only 200/201/404 (and 413 for bodies over the limit).

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use http::{HeaderMap, Method, StatusCode};

use super::AppState;
use super::access::{Authorized, KeyParam, ScopeRule};
use super::error::ApiError;
use super::transfer::{self, ServeOptions};
use crate::storage::{ArtifactKey, Kind, WriteMode};

const CONTENT_TYPE: &str = "application/vnd.gradle.build-cache-artifact.v2";

pub fn routes() -> Router<AppState> {
    let query_form = Router::new()
        .route("/api/cache/gradle/{key}", get(load).put(save))
        .route_layer(Extension(ScopeRule::Query));
    let path_form = Router::new()
        .route(
            "/api/cache/gradle/{account}/{project}/{key}",
            get(load).put(save),
        )
        .route_layer(Extension(ScopeRule::Path));
    query_form.merge(path_form)
}

async fn load(
    State(app): State<AppState>,
    method: Method,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = ArtifactKey::new(auth.project, Kind::Gradle, key);
    let options = ServeOptions {
        default_content_type: CONTENT_TYPE,
        head: method == Method::HEAD,
    };
    transfer::serve(&app, &key, &headers, options).await
}

async fn save(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = ArtifactKey::new(auth.project, Kind::Gradle, key);
    let committed = transfer::store(
        &app,
        &key,
        &headers,
        body,
        app.config.limits.gradle.0,
        WriteMode::Overwrite,
    )
    .await?;
    let status = if committed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(status.into_response())
}
