//! Gradle HTTP build cache: `/api/cache/gradle/{key}` (query form) and
//! `/api/cache/gradle/{account}/{project}/{key}` (path form for stock `HttpBuildCache`).
//!
//! Gradle turns its remote cache off on unexpected statuses, so in normal operation these
//! answer only 200/201/404 (and 413 for bodies over the limit).

use axum::routing::get;
use axum::{Extension, Router};

use super::AppState;
use super::access::ScopeRule;
use super::artifacts::{self, KeyRule, Stored, Surface};
use crate::storage::{Kind, WriteMode};

const GRADLE: Surface = Surface {
    kind: Kind::Gradle,
    content_type: "application/vnd.gradle.build-cache-artifact.v2",
    limit: |limits| limits.gradle.0,
    write_mode: WriteMode::Overwrite,
    stored: Stored::CreatedOrOk,
    keys: KeyRule::Any,
};

pub fn routes() -> Router<AppState> {
    let query_form = Router::new()
        .route(
            "/api/cache/gradle/{key}",
            get(artifacts::load).put(artifacts::save),
        )
        .route_layer(Extension(ScopeRule::Query));
    let path_form = Router::new()
        .route(
            "/api/cache/gradle/{account}/{project}/{key}",
            get(artifacts::load).put(artifacts::save),
        )
        .route_layer(Extension(ScopeRule::Path));
    query_form.merge(path_form).route_layer(Extension(GRADLE))
}
