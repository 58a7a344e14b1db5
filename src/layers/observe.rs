//! Observation: every request counted and timed by protocol, route, method and status, and
//! logged (debug, or warn for a server error). Every label value comes from a closed set (see
//! [`labels`]), so no request can add a series, and the series' handles are resolved once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::RequestId;

/// How a listener names the route of a request for metrics: a template from a closed set
/// (`/api/cache/gradle/{key}`, a gRPC method), or `unmatched`.
pub trait RouteOf: Clone {
    fn route_of<B>(&self, request: &Request<B>) -> &'static str;
}

/// Counts, times and logs every request of one listener.
#[derive(Clone, Debug)]
pub struct ObserveLayer<C> {
    protocol: &'static str,
    routes: C,
}

impl<C> ObserveLayer<C> {
    /// `protocol` labels the series (`http`, `grpc`, ...); `routes` names each request's route.
    pub fn new(protocol: &'static str, routes: C) -> Self {
        ObserveLayer { protocol, routes }
    }
}

impl<S, C: Clone> Layer<S> for ObserveLayer<C> {
    type Service = ObserveService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            protocol: self.protocol,
            routes: self.routes.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ObserveService<S, C> {
    inner: S,
    protocol: &'static str,
    routes: C,
}

impl<S, C, B, R> Service<Request<B>> for ObserveService<S, C>
where
    S: Service<Request<B>, Response = Response<R>>,
    C: RouteOf,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let seen = Seen {
            protocol: self.protocol,
            route: self.routes.route_of(&request),
            method: labels::method(request.method()),
            request_id: request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.clone()),
            started: Instant::now(),
        };
        ObserveFuture {
            inner: self.inner.call(request),
            seen: Some(seen),
        }
    }
}

/// What is known of a request before its response.
struct Seen {
    protocol: &'static str,
    route: &'static str,
    method: &'static str,
    request_id: Option<Arc<str>>,
    started: Instant,
}

pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        seen: Option<Seen>,
    }
}

impl<F, R, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let (Ok(response), Some(seen)) = (&result, this.seen.take()) {
            let status = response.status();
            let elapsed = seen.started.elapsed();
            labels::record(&seen, labels::status(status), elapsed);
            let request_id = seen.request_id.as_deref().unwrap_or("");
            if status.is_server_error() {
                tracing::warn!(
                    request_id,
                    method = seen.method,
                    route = seen.route,
                    status = status.as_u16(),
                    "request failed"
                );
            } else {
                tracing::debug!(
                    request_id,
                    method = seen.method,
                    route = seen.route,
                    status = status.as_u16(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "request"
                );
            }
        }
        Poll::Ready(result)
    }
}

/// Metric label values: each from a closed set, and none allocated per request.
pub(crate) mod labels {
    use std::cell::RefCell;
    use std::collections::{HashMap, HashSet};
    use std::sync::{OnceLock, RwLock};
    use std::time::Duration;

    use http::{Method, StatusCode};
    use metrics::{Counter, Histogram};

    use super::Seen;

    /// A route template, interned once for the life of the process. Only a listener's own
    /// templates (a closed set) may be passed here.
    pub(crate) fn intern(template: &str) -> &'static str {
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

    /// The method, or `other` for anything outside the standard ones.
    pub(crate) fn method(method: &Method) -> &'static str {
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
    pub(crate) fn status(status: StatusCode) -> &'static str {
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

    /// Counts a request and records its latency. The series' handles are resolved on first use
    /// and kept per thread, keyed by the addresses of the interned label values: after warm-up
    /// a request costs two lookups in a small map instead of two registry lookups, each hashing
    /// the metric name and building a label list.
    pub(super) fn record(seen: &Seen, status: &'static str, elapsed: Duration) {
        // A label's identity: its address and length (two static strings may share an address).
        type Label = (usize, usize);
        thread_local! {
            static REQUESTS: RefCell<HashMap<[Label; 4], Counter>> = RefCell::default();
            static DURATIONS: RefCell<HashMap<[Label; 2], Histogram>> = RefCell::default();
        }
        let address = |label: &'static str| (label.as_ptr() as usize, label.len());
        let (protocol, route, method) = (seen.protocol, seen.route, seen.method);
        let series = [address(protocol), address(route)];
        REQUESTS.with_borrow_mut(|requests| {
            requests
                .entry([series[0], series[1], address(method), address(status)])
                .or_insert_with(|| {
                    metrics::counter!(crate::metrics::HTTP_REQUESTS_TOTAL,
                        "protocol" => protocol, "route" => route, "method" => method, "status" => status)
                })
                .increment(1)
        });
        DURATIONS.with_borrow_mut(|durations| {
            durations
                .entry(series)
                .or_insert_with(|| {
                    metrics::histogram!(crate::metrics::HTTP_REQUEST_DURATION_SECONDS,
                        "protocol" => protocol, "route" => route)
                })
                .record(elapsed.as_secs_f64())
        });
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

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
        let first = labels::intern("/a/{key}");
        assert!(std::ptr::eq(
            first,
            labels::intern(&String::from("/a/{key}"))
        ));
    }
}
