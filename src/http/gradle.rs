//! Gradle HTTP build cache: `/api/cache/gradle/{key}` (query form) and
//! `/api/cache/gradle/{account}/{project}/{key}` (path form for stock `HttpBuildCache`).
//!
//! Gradle turns its remote cache off on unexpected statuses, so in normal operation these
//! answer only 200/201/404 (and 413 for bodies over the limit).

use axum::Router;
use axum::routing::get;

use super::AppState;
use super::access::{PathScope, QueryScope};
use super::artifacts::{self, BlobRoute, KeyRule, Stored, Surface};
use super::transfer::ContentType;
use crate::storage::{Kind, WriteMode};

const GRADLE: Surface = Surface {
    kind: Kind::Gradle,
    content_type: ContentType::UploadsOr("application/vnd.gradle.build-cache-artifact.v2"),
    limit: |limits| limits.gradle.0,
    write_mode: WriteMode::Overwrite,
    stored: Stored::CreatedOrOk,
    keys: KeyRule::Any,
};

/// `/api/cache/gradle/{key}?account_handle=...`
struct QueryForm;

impl BlobRoute for QueryForm {
    const SURFACE: Surface = GRADLE;
    type Scope = QueryScope;
}

/// `/api/cache/gradle/{account}/{project}/{key}`
struct PathForm;

impl BlobRoute for PathForm {
    const SURFACE: Surface = GRADLE;
    type Scope = PathScope;
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/cache/gradle/{key}",
            get(artifacts::load::<QueryForm>).put(artifacts::save::<QueryForm>),
        )
        .route(
            "/api/cache/gradle/{account}/{project}/{key}",
            get(artifacts::load::<PathForm>).put(artifacts::save::<PathForm>),
        )
}
