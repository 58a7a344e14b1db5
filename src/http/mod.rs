//! The public HTTP listener: one router per protocol surface, all on the same layers.
//!
//! A request flows: `request_id` → `observe` (metrics, logs) → `drain` → route →
//! [`access::Authorized`] (account/project/token check) → handler → [`transfer`] → storage.

pub mod access;
mod artifacts;
mod blobs;
mod clean;
pub mod error;
mod gradle;
pub mod layers;
mod module;
mod probes;
pub mod range;
pub mod transfer;
mod xcode;

use std::ops::Deref;
use std::sync::Arc;

use axum::response::IntoResponse;
use axum::{Router, middleware};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::Authorizer;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::storage::Store;

/// What every handler can reach.
pub struct App {
    pub store: Store,
    pub auth: Authorizer,
    pub config: Arc<Config>,
    pub lifecycle: Lifecycle,
    pub metrics: Option<PrometheusHandle>,
    /// The node's account, lowercased.
    pub account: String,
}

/// Shared handle to [`App`] used as the router state.
#[derive(Clone)]
pub struct AppState(pub Arc<App>);

impl Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
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
        .layer(middleware::from_fn_with_state(
            state.clone(),
            layers::admission,
        ))
        .layer(middleware::from_fn(layers::uniform_errors))
        .layer(middleware::from_fn(layers::plain_text_errors))
        .layer(middleware::from_fn(layers::observe))
        .layer(middleware::from_fn(layers::request_id))
        .with_state(state)
}
