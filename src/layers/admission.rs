//! Admission: while the node drains, new work is refused; past `limits.max_in_flight_requests`
//! it is shed. Probes always pass. Admitted work counts as in flight until its response body
//! is done (a download until its last byte); a drain waits for that, and for the listeners to
//! have sent what those bodies gave them (`listener.rs`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response, Uri};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::guarded::{GuardedBody, GuardedFuture};
use crate::lifecycle::{InFlight, Lifecycle, State};

/// How a protocol answers work the node does not admit (HTTP: JSON 503/429; gRPC: status
/// codes in trailers), and which of its requests are probes that are always admitted.
pub trait Refusals<R>: Clone {
    /// The node is draining: go elsewhere.
    fn draining(&self) -> Response<R>;
    /// The node is at its limit of work in flight: retry shortly.
    fn overloaded(&self) -> Response<R>;
    fn is_probe(&self, uri: &Uri) -> bool;
}

/// Admits requests against the node's lifecycle and in-flight limit.
#[derive(Clone)]
pub struct AdmissionLayer<P> {
    lifecycle: Lifecycle,
    max_in_flight: usize,
    refusals: P,
}

impl<P> AdmissionLayer<P> {
    pub fn new(lifecycle: Lifecycle, max_in_flight: usize, refusals: P) -> Self {
        AdmissionLayer {
            lifecycle,
            max_in_flight,
            refusals,
        }
    }
}

impl<S, P: Clone> Layer<S> for AdmissionLayer<P> {
    type Service = AdmissionService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            lifecycle: self.lifecycle.clone(),
            max_in_flight: self.max_in_flight,
            refusals: self.refusals.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdmissionService<S, P> {
    inner: S,
    lifecycle: Lifecycle,
    max_in_flight: usize,
    refusals: P,
}

impl<S, P, B, R> Service<Request<B>> for AdmissionService<S, P>
where
    S: Service<Request<B>, Response = Response<R>>,
    P: Refusals<R>,
{
    type Response = Response<TrackedBody<R>>;
    type Error = S::Error;
    type Future = AdmissionFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.refusals.is_probe(request.uri()) {
            return AdmissionFuture::Admitted {
                inner: GuardedFuture::new(self.inner.call(request), None),
            };
        }
        if self.lifecycle.state() == State::Draining {
            return AdmissionFuture::Refused {
                response: Some(self.refusals.draining()),
            };
        }
        let in_flight = self.lifecycle.track();
        if self.lifecycle.in_flight() > self.max_in_flight {
            return AdmissionFuture::Refused {
                response: Some(self.refusals.overloaded()),
            };
        }
        // The guard moves into the body: a download counts until its last byte.
        AdmissionFuture::Admitted {
            inner: GuardedFuture::new(self.inner.call(request), Some(in_flight)),
        }
    }
}

pin_project! {
    #[project = AdmissionProjection]
    pub enum AdmissionFuture<F, R> {
        Admitted {
            #[pin]
            inner: GuardedFuture<F, InFlight>,
        },
        Refused {
            response: Option<Response<R>>,
        },
    }
}

impl<F, R, E> Future for AdmissionFuture<F, R>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<TrackedBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AdmissionProjection::Admitted { inner } => inner.poll(cx),
            AdmissionProjection::Refused { response } => match response.take() {
                Some(response) => {
                    Poll::Ready(Ok(response.map(|body| TrackedBody::new(body, None))))
                }
                // Polled again after it completed: never ready again.
                None => Poll::Pending,
            },
        }
    }
}

/// A response body that keeps its request counted as in flight until it is done (or dropped,
/// when the client goes away).
pub type TrackedBody<B> = GuardedBody<B, InFlight>;

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use super::*;

    #[derive(Clone)]
    struct Plain;

    impl Refusals<Full<Bytes>> for Plain {
        fn draining(&self) -> Response<Full<Bytes>> {
            let mut response = Response::new(Full::from("draining"));
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            response
        }

        fn overloaded(&self) -> Response<Full<Bytes>> {
            let mut response = Response::new(Full::from("overloaded"));
            *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
            response
        }

        fn is_probe(&self, uri: &Uri) -> bool {
            uri.path() == "/up"
        }
    }

    fn ok()
    -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone {
        tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::from("body")))
        })
    }

    fn get(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn work_counts_until_its_body_is_done_and_past_the_limit_is_shed() {
        let lifecycle = Lifecycle::default();
        lifecycle.set_serving();
        let layer = AdmissionLayer::new(lifecycle.clone(), 1, Plain);
        let first = layer.layer(ok()).oneshot(get("/a")).await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(
            lifecycle.in_flight(),
            1,
            "the unread body keeps it in flight"
        );

        let second = layer.layer(ok()).oneshot(get("/b")).await.unwrap();
        assert_eq!(second.status(), 429);
        let probe = layer.layer(ok()).oneshot(get("/up")).await.unwrap();
        assert_eq!(probe.status(), 200, "probes are never shed");

        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "body");
        assert_eq!(lifecycle.in_flight(), 0);
        let third = layer.layer(ok()).oneshot(get("/c")).await.unwrap();
        assert_eq!(third.status(), 200);
    }

    #[tokio::test]
    async fn a_draining_node_refuses_new_work_but_answers_probes() {
        let lifecycle = Lifecycle::default();
        lifecycle.set_serving();
        lifecycle.start_draining();
        let layer = AdmissionLayer::new(lifecycle.clone(), 100, Plain);
        let refused = layer.layer(ok()).oneshot(get("/a")).await.unwrap();
        assert_eq!(refused.status(), 503);
        let probe = layer.layer(ok()).oneshot(get("/up")).await.unwrap();
        assert_eq!(probe.status(), 200);
        assert_eq!(lifecycle.in_flight(), 0);
    }
}
