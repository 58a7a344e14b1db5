//! The HTTP listener's side of request handling: how the shared layers of `crate::layers` name
//! an HTTP route and refuse HTTP work, and the two concerns that only HTTP has (uniform JSON
//! errors for the framework's own answers, plain-text errors for Nx).

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Uri, header};

use super::error::{ApiError, ErrorBody};
use crate::layers::observe_labels;
use crate::layers::{Refusals, RouteOf};

/// Names a request by the router's template for the route it matched (a closed set).
#[derive(Clone, Copy, Debug, Default)]
pub struct MatchedRoute;

impl RouteOf for MatchedRoute {
    fn route_of<B>(&self, request: &http::Request<B>) -> &'static str {
        match request.extensions().get::<MatchedPath>() {
            Some(matched) => observe_labels::intern(matched.as_str()),
            None => "unmatched",
        }
    }
}

/// HTTP's answers to work the node does not admit: 503 `draining` with `Connection: close`,
/// 429 with `Retry-After`. The probes (`/up`, `/ready`, `/metrics`, `/status`) always pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpRefusals;

impl Refusals<Body> for HttpRefusals {
    fn draining(&self) -> Response {
        ApiError::draining().into_response()
    }

    fn overloaded(&self) -> Response {
        ApiError::overloaded(
            "The node is at its limit of requests in flight; retry shortly",
            1,
        )
        .into_response()
    }

    fn is_probe(&self, uri: &Uri) -> bool {
        matches!(uri.path(), "/up" | "/ready" | "/metrics" | "/status")
    }
}

/// Gives the framework's own bare error answers (405 for a known route with another method,
/// for one) the same JSON shape as every other error.
pub async fn uniform_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    // Bare framework answers carry no content type; handlers' own bodies (`/ready`'s 503, every
    // `ApiError`) do and are left alone.
    let bare = !response.headers().contains_key(header::CONTENT_TYPE);
    if !(status.is_client_error() || status.is_server_error()) || !bare {
        return response;
    }
    let (code, message) = match status {
        http::StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "This route does not accept that method",
        ),
        status if status.is_client_error() => ("bad_request", "The request was refused"),
        _ => ("internal", "Internal error; see the node's logs"),
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

/// Nx reports JSON error bodies as a misconfigured endpoint: re-render errors on its routes as
/// `text/plain`. Applied outside every layer that can answer an error (drain, overload, 405),
/// so none of them reaches Nx as JSON.
pub async fn plain_text_errors(request: Request, next: Next) -> Response {
    let is_nx = request.uri().path().starts_with("/v1/cache/");
    let response = next.run(request).await;
    if !is_nx {
        return response;
    }
    match response.extensions().get::<ErrorBody>().cloned() {
        Some(error) => {
            let (mut parts, _) = response.into_parts();
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(
                parts,
                Body::from(format!("{}: {}\n", error.code, error.message)),
            )
        }
        None => response,
    }
}
