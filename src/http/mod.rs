//! The public HTTP listener: one router per protocol surface, all on the same layers.
//!
//! A request flows through the shared layers of `crate::layers` and one of HTTP's own:
//! request id → error shape (uniform JSON errors, plain text for Nx) → route → observe
//! (metrics, logs) → admission (drain, overload) → [`access::Authorized`] (account, project,
//! token) → handler → [`transfer`] → storage.

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

use axum::Router;
use axum::response::IntoResponse;

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

/// The full public service: the routes, each wrapped in observation and admission (which need
/// the matched route), inside the two layers that apply to the whole listener. Those two wrap
/// the router once rather than every route, so a request pays for each layer once.
pub fn router(
    state: AppState,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let routes = Router::new()
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
        // One `layer` call for both: the router wraps every route in a boxed service per call,
        // and each box costs every request an allocation and an indirect call.
        .layer(
            tower::ServiceBuilder::new()
                .layer(ObserveLayer::new("http", layers::MatchedRoute))
                .layer(AdmissionLayer::new(
                    state.lifecycle.clone(),
                    state.config.limits.max_in_flight_requests,
                    layers::HttpRefusals,
                )),
        )
        .with_state(state);
    tower::ServiceBuilder::new()
        .layer(RequestIdLayer)
        .layer(layers::ErrorShapeLayer)
        .service(routes)
}
