//! Cross-cutting request handling, one middleware per concern, applied to every route:
//! request ids, metrics and logs, and drain.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::lifecycle::State as NodeState;

/// The request id of a request (`x-request-id`); shared, so layers and handlers that log it
/// copy a pointer, not the string.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

pub const REQUEST_ID: &str = "x-request-id";

/// Keeps a sane client-sent `x-request-id` (1–128 of `[A-Za-z0-9._:-]`), otherwise makes one, and
/// echoes it on the response.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_sane_request_id(v))
        .map(Arc::<str>::from)
        // The thread-local generator: no system call per request.
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()).into());
    let header = HeaderValue::from_str(&id);
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    if let Ok(value) = header {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Counts and times every request by route template and status, and logs it at debug. Every
/// label comes from a closed set (see [`labels`]), so no request can add a series.
pub async fn observe(request: Request, next: Next) -> Response {
    let route = labels::route(request.extensions().get::<MatchedPath>());
    let method = request.method().clone();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from(""));
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    let elapsed = started.elapsed();
    labels::record(
        route,
        labels::method(&method),
        labels::status(status),
        elapsed,
    );
    if status.is_server_error() {
        tracing::warn!(request_id = &*request_id, %method, route, status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(request_id = &*request_id, %method, route, status = status.as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request");
    }
    response
}

/// Admits cache requests: while draining refuses them (503 `draining`, `Connection: close`),
/// over `limits.max_in_flight_requests` sheds them (429 with `Retry-After`); probes always
/// answer. An admitted request counts as in flight until its response body is done, which is
/// what a drain waits for.
pub async fn admission(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let is_probe = matches!(
        request.uri().path(),
        "/up" | "/ready" | "/metrics" | "/status"
    );
    if is_probe {
        return next.run(request).await;
    }
    if app.lifecycle.state() == NodeState::Draining {
        return ApiError::draining().into_response();
    }
    let in_flight = app.lifecycle.track();
    if app.lifecycle.in_flight() > app.config.limits.max_in_flight_requests {
        return ApiError::overloaded(
            "The node is at its limit of requests in flight; retry shortly",
            1,
        )
        .into_response();
    }
    let response = next.run(request).await;
    // The guard moves into the body, so a streaming download counts until its last byte.
    response.map(move |body| super::transfer::hold_until_sent(body, in_flight))
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

/// Metric label values: each from a closed set, and none allocated per request.
mod labels {
    use std::collections::HashSet;
    use std::sync::{OnceLock, RwLock};

    use axum::extract::MatchedPath;
    use http::{Method, StatusCode};

    /// The route template a request matched, or `unmatched`. Templates are the router's own
    /// (a closed set), each interned once for the life of the process.
    pub(super) fn route(matched: Option<&MatchedPath>) -> &'static str {
        let Some(template) = matched.map(MatchedPath::as_str) else {
            return "unmatched";
        };
        static TEMPLATES: OnceLock<RwLock<HashSet<&'static str>>> = OnceLock::new();
        let templates = TEMPLATES.get_or_init(Default::default);
        if let Some(known) = templates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(template)
        {
            return known;
        }
        let mut templates = templates.write().unwrap_or_else(|p| p.into_inner());
        match templates.get(template) {
            Some(known) => known,
            None => {
                let interned: &'static str = Box::leak(template.into());
                templates.insert(interned);
                interned
            }
        }
    }

    /// Counts a request and records its latency. The series' handles are resolved on first use
    /// and kept per thread, keyed by the addresses of the interned label values: after warm-up
    /// a request costs two lookups in a small map instead of two registry lookups, each hashing
    /// the metric name and building a label list.
    pub(super) fn record(
        route: &'static str,
        method: &'static str,
        status: &'static str,
        elapsed: std::time::Duration,
    ) {
        use std::cell::RefCell;
        use std::collections::HashMap;

        use metrics::{Counter, Histogram};

        type RequestKey = (usize, usize, usize);
        thread_local! {
            static REQUESTS: RefCell<HashMap<RequestKey, Counter>> = RefCell::default();
            static DURATIONS: RefCell<HashMap<usize, Histogram>> = RefCell::default();
        }
        let key = (
            route.as_ptr() as usize,
            method.as_ptr() as usize,
            status.as_ptr() as usize,
        );
        REQUESTS.with_borrow_mut(|requests| {
            requests
                .entry(key)
                .or_insert_with(|| {
                    metrics::counter!(crate::metrics::HTTP_REQUESTS_TOTAL,
                        "protocol" => "http", "route" => route, "method" => method, "status" => status)
                })
                .increment(1)
        });
        DURATIONS.with_borrow_mut(|durations| {
            durations
                .entry(key.0)
                .or_insert_with(|| {
                    metrics::histogram!(crate::metrics::HTTP_REQUEST_DURATION_SECONDS, "route" => route)
                })
                .record(elapsed.as_secs_f64())
        });
    }

    /// The method, or `other` for anything outside the standard ones.
    pub(super) fn method(method: &Method) -> &'static str {
        match *method {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::PUT => "PUT",
            Method::POST => "POST",
            Method::DELETE => "DELETE",
            Method::OPTIONS => "OPTIONS",
            Method::PATCH => "PATCH",
            Method::TRACE => "TRACE",
            Method::CONNECT => "CONNECT",
            _ => "other",
        }
    }

    /// The status code as text; codes outside the registered ones are `other`.
    pub(super) fn status(status: StatusCode) -> &'static str {
        // `canonical_reason` is known exactly for the registered codes.
        if status.canonical_reason().is_none() {
            return "other";
        }
        static CODES: OnceLock<Vec<&'static str>> = OnceLock::new();
        let codes = CODES.get_or_init(|| {
            (0..1000u16)
                .map(|n| &*Box::leak(n.to_string().into_boxed_str()))
                .collect()
        });
        codes[usize::from(status.as_u16())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn metric_labels_come_from_closed_sets() {
        let odd = Method::from_bytes(b"XYZZY").unwrap();
        assert_eq!(labels::method(&odd), "other");
        assert_eq!(labels::method(&Method::PUT), "PUT");
        assert_eq!(labels::status(http::StatusCode::NOT_FOUND), "404");
        assert_eq!(
            labels::status(http::StatusCode::from_u16(599).unwrap()),
            "other"
        );
        assert_eq!(labels::route(None), "unmatched");
    }

    #[test]
    fn request_ids_must_be_plain_tokens() {
        assert!(is_sane_request_id("abc-123_x.y:z"));
        assert!(!is_sane_request_id(""));
        assert!(!is_sane_request_id("a b"));
        assert!(!is_sane_request_id("<script>"));
        assert!(!is_sane_request_id(&"a".repeat(129)));
    }
}
