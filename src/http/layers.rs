//! The HTTP listener's side of request handling: how the shared layers of `crate::layers` name
//! an HTTP route and refuse HTTP work, and the two concerns that only HTTP has (uniform JSON
//! errors for the framework's own answers, plain-text errors for Nx).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Request, Uri, header};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::error::{ApiError, ErrorBody};
use crate::layers::observe_labels;
use crate::layers::{Refusals, RouteOf};

/// Names a request by the router's template for the route it matched (a closed set).
#[derive(Clone, Copy, Debug, Default)]
pub struct MatchedRoute;

impl RouteOf for MatchedRoute {
    fn route_of<B>(&self, request: &http::Request<B>) -> &'static str {
        match request.extensions().get::<MatchedPath>() {
            Some(matched) => interned(matched.as_str()),
            None => "unmatched",
        }
    }
}

/// [`observe_labels::intern`] of a matched template, remembered per thread by the template's
/// address: the router hands every request of a route the same string, so after the first
/// request of each route a thread finds it without the interner's shared lock (which both
/// workers would otherwise take on every request) or hashing. The text is compared too, so a
/// template freed and its address reused (a router dropped in tests) cannot get another's label.
fn interned(template: &str) -> &'static str {
    interned_at(template.as_ptr() as usize, template)
}

fn interned_at(address: usize, template: &str) -> &'static str {
    thread_local! {
        static SEEN: std::cell::RefCell<Vec<(usize, &'static str)>> = const {
            std::cell::RefCell::new(Vec::new())
        };
    }
    SEEN.with_borrow_mut(|seen| {
        if let Some((_, label)) = seen
            .iter()
            .find(|(at, label)| *at == address && *label == template)
        {
            return *label;
        }
        let label = observe_labels::intern(template);
        // Routes are a closed set; the bound only guards against a router rebuilt many times.
        if seen.len() >= 256 {
            seen.clear();
        }
        seen.push((address, label));
        label
    })
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

/// Shapes the error answers that handlers did not: the framework's own bare ones (405 for a
/// known route with another method, for one) get the JSON shape of every other error, and on
/// Nx's routes every error is re-rendered as `text/plain` (Nx reports JSON error bodies as a
/// misconfigured endpoint). Wraps the whole router, outside every layer that can answer an
/// error (drain, overload, 405), so none of them reaches Nx as JSON.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorShapeLayer;

impl<S> Layer<S> for ErrorShapeLayer {
    type Service = ErrorShape<S>;

    fn layer(&self, inner: S) -> ErrorShape<S> {
        ErrorShape { inner }
    }
}

#[derive(Clone, Debug)]
pub struct ErrorShape<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for ErrorShape<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ErrorShapeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let plain_text = request.uri().path().starts_with("/v1/cache/");
        ErrorShapeFuture {
            inner: self.inner.call(request),
            plain_text,
        }
    }
}

pin_project! {
    pub struct ErrorShapeFuture<F> {
        #[pin]
        inner: F,
        plain_text: bool,
    }
}

impl<F, E> Future for ErrorShapeFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = uniform(ready!(this.inner.poll(cx))?);
        Poll::Ready(Ok(if *this.plain_text {
            as_plain_text(response)
        } else {
            response
        }))
    }
}

/// A bare framework error answer in the JSON shape of every other error.
fn uniform(response: Response) -> Response {
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

/// An error answer (one carrying its [`ErrorBody`]) re-rendered as `text/plain`.
fn as_plain_text(response: Response) -> Response {
    let Some(error) = response.extensions().get::<ErrorBody>().cloned() else {
        return response;
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_gets_its_own_label_whatever_its_address() {
        let label = interned_at(0x1000, "/api/cache/gradle/{key}");
        assert_eq!(label, "/api/cache/gradle/{key}");
        assert!(std::ptr::eq(
            label,
            interned_at(0x1000, "/api/cache/gradle/{key}")
        ));
        // Another template at an address the first one had (freed and reused) keeps its own.
        assert_eq!(
            interned_at(0x1000, "/api/cache/nx/{hash}"),
            "/api/cache/nx/{hash}"
        );
        // The same template at another address gets the same label.
        assert!(std::ptr::eq(
            label,
            interned(&String::from("/api/cache/gradle/{key}"))
        ));
    }
}
