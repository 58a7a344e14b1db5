//! Project clean: `DELETE /api/cache/clean` removes every artifact of one project on this node.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::delete;
use http::StatusCode;

use super::AppState;
use super::access::Authorized;
use super::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/cache/clean", delete(clean))
}

async fn clean(State(app): State<AppState>, auth: Authorized) -> Result<Response, ApiError> {
    if auth.project.is_empty() {
        return Err(ApiError::bad_request(
            "missing_project",
            "The project_handle (or namespace_id) query parameter is required",
        ));
    }
    let removed = app.store.delete_project(&auth.project).await?;
    tracing::info!(project = %auth.project, removed, principal = %auth.principal, "project cleaned");
    Ok(StatusCode::NO_CONTENT.into_response())
}
