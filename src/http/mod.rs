//! The public HTTP listener: one router per protocol surface, all on the same layers.
//!
//! A request flows through the shared layers of `crate::layers` and two of HTTP's own:
//! request id → observe (metrics, logs) → plain-text errors (Nx) → uniform JSON errors →
//! admission (drain, overload) → route → [`access::Authorized`] (account, project, token) →
//! handler → [`transfer`] → storage.

pub(crate) mod access;
mod artifacts;
mod blobs;
mod clean;
pub(crate) mod error;
mod gradle;
pub(crate) mod layers;
mod module;
mod probes;
pub mod range;
pub(crate) mod transfer;
mod xcode;

use std::ops::Deref;
use std::sync::Arc;

use axum::response::IntoResponse;
use axum::{Router, middleware};

use crate::context::NodeContext;
use crate::layers::{AdmissionLayer, ObserveLayer, RequestIdLayer};

/// The router state: the node's shared context (see `context.rs`).
#[derive(Clone)]
pub struct AppState(pub Arc<NodeContext>);

impl Deref for AppState {
    type Target = NodeContext;

    fn deref(&self) -> &NodeContext {
        &self.0
    }
}

/// The full public router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(probes::routes())
        .merge(gradle::routes())
        .merge(xcode::routes())
        .merge(module::routes())
        .merge(clean::routes())
        .merge(blobs::routes())
        .fallback(|| async {
            error::ApiError::new(http::StatusCode::NOT_FOUND, "no_route", "No such route")
                .into_response()
        })
        .layer(AdmissionLayer::new(
            state.lifecycle.clone(),
            state.config.limits.max_in_flight_requests,
            layers::HttpRefusals,
        ))
        .layer(middleware::from_fn(layers::uniform_errors))
        .layer(middleware::from_fn(layers::plain_text_errors))
        .layer(ObserveLayer::new("http", layers::MatchedRoute))
        .layer(RequestIdLayer)
        .with_state(state)
}
