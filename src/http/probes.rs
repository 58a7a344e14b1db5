//! Probes and ops routes; they never need a token: `/up`, `/ready`, `/status`, `/metrics`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::{HeaderValue, StatusCode, header};

use super::AppState;
use crate::auth::Authorizer;
use crate::auth::static_tokens::Health;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/up", get(up))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
}

/// Liveness: answers from memory only.
async fn up(State(app): State<AppState>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "node_id": app.store.node_id(),
        "account": app.account,
        "region": app.config.node.region,
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

async fn ready(State(app): State<AppState>) -> Response {
    match app.readiness() {
        Ok(()) => Json(serde_json::json!({ "state": "serving" })).into_response(),
        Err(state) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "state": state })),
        )
            .into_response(),
    }
}

async fn status(State(app): State<AppState>) -> Response {
    let stats = app.store.stats();
    let mut body = serde_json::json!({
        // What `/ready` says: `bootstrapping` while the mesh's first pass runs.
        "state": app.readiness().err().unwrap_or("serving"),
        "version": env!("CARGO_PKG_VERSION"),
        "node_id": app.store.node_id(),
        "account": app.account,
        "region": app.config.node.region,
        "disk": {
            "used_bytes": stats.used_bytes,
            "staged_bytes": stats.staged_bytes,
            "capacity_bytes": stats.capacity,
            // Non-zero after RocksDB failed a flush or compaction; see docs/storage.md.
            "background_errors": stats.background_errors,
        },
        "artifacts": stats.artifacts,
        "uploads_in_flight": app.store.uploads_in_flight(),
        "requests_in_flight": app.lifecycle.in_flight(),
        "peers": app.mesh.as_ref().map_or(serde_json::json!([]), |mesh| mesh.status()),
        "replication": app.mesh.as_ref().map(|mesh| mesh.node_status()),
    });
    if let Authorizer::Static(tokens) = &app.auth {
        body["static_tokens"] = static_tokens_status(tokens.health());
    }
    Json(body).into_response()
}

/// `ok`, or why not: `missing` (every static token revoked) or `invalid` (the last good tokens
/// kept while the file on disk says otherwise).
fn static_tokens_status(health: Health) -> serde_json::Value {
    serde_json::json!({
        "state": health.state.label(),
        "tokens": health.tokens,
        "error": health.error,
    })
}

async fn metrics(State(app): State<AppState>) -> Response {
    metrics::gauge!(crate::metrics::BODY_MEMORY_BYTES).set(app.body_memory.in_use() as f64);
    crate::metrics::sample(
        app.store.stats(),
        app.store.rocksdb_memory(),
        app.lifecycle.in_flight(),
    );
    let body = app
        .metrics
        .as_ref()
        .map(|handle| handle.render())
        .unwrap_or_default();
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
