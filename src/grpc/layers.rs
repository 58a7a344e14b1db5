//! The gRPC listener's side of request handling: how the shared layers of `crate::layers`
//! name a gRPC method and refuse gRPC work, and per-call metrics that only gRPC needs. A gRPC
//! call's outcome is its `grpc-status` (in the trailers, or in the headers of a trailers-only
//! answer), not the HTTP status, so [`CallMetricsLayer`] reads it from the response as it ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::layers::{Refusals, RouteOf};

/// Every method the listener serves: the closed set of metric labels.
pub(crate) const METHODS: [&str; 13] = [
    "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
    "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
    "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
    "/google.bytestream.ByteStream/Read",
    "/google.bytestream.ByteStream/Write",
    "/google.bytestream.ByteStream/QueryWriteStatus",
    HEALTH_CHECK,
    // Kept out of the closed set's count of real methods, but labelled all the same.
    "/grpc.health.v1.Health/Watch",
    "unmatched",
];

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Names a call by its method, or `unmatched`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GrpcMethod;

impl GrpcMethod {
    fn of(uri: &Uri) -> &'static str {
        let path = uri.path();
        METHODS
            .iter()
            .find(|method| **method == path)
            .copied()
            .unwrap_or("unmatched")
    }
}

impl RouteOf for GrpcMethod {
    fn route_of<B>(&self, request: &Request<B>) -> &'static str {
        GrpcMethod::of(request.uri())
    }
}

/// gRPC's answers to work the node does not admit: UNAVAILABLE while draining (the client
/// retries elsewhere), RESOURCE_EXHAUSTED at the in-flight limit. Health checks always pass.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GrpcRefusals;

impl Refusals<Body> for GrpcRefusals {
    fn draining(&self) -> Response<Body> {
        tonic::Status::unavailable("the node is draining; retry on another node").into_http()
    }

    fn overloaded(&self) -> Response<Body> {
        tonic::Status::resource_exhausted(
            "the node is at its limit of requests in flight; retry shortly",
        )
        .into_http()
    }

    fn is_probe(&self, uri: &Uri) -> bool {
        uri.path() == HEALTH_CHECK
    }
}

/// Counts every call by method and `grpc-status` once its response ends, times it, and counts
/// the message bytes each way.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CallMetricsLayer;

impl<S> Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct CallMetrics<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for CallMetrics<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let method = GrpcMethod::of(request.uri());
        let started = Instant::now();
        let request = request.map(|body| {
            Body::new(Counted {
                inner: body,
                call: None,
                method,
                direction: "received",
                started,
            })
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // A trailers-only answer (every refusal and error before the first message) carries
            // its status in the headers.
            let early = status_code(response.headers());
            Ok(response.map(|body| {
                Body::new(Counted {
                    inner: body,
                    call: Some(early),
                    method,
                    direction: "sent",
                    started,
                })
            }))
        })
    }
}

pin_project! {
    /// A body whose data bytes are counted; on the response side it also records the call once
    /// the status is known (trailers, headers, or the body dropped early).
    struct Counted {
        #[pin]
        inner: Body,
        // `Some` on the response side until the call is recorded; the inner `Option` is the
        // status found in the headers, if any.
        call: Option<Option<&'static str>>,
        method: &'static str,
        direction: &'static str,
        started: Instant,
    }

    impl PinnedDrop for Counted {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(early) = this.call.take() {
                // Dropped before the end: the client went away (or the header status stands).
                record_call(this.method, early.unwrap_or("cancelled"), *this.started);
            }
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    metrics::counter!(crate::metrics::GRPC_MESSAGE_BYTES_TOTAL,
                        "method" => *this.method, "direction" => *this.direction)
                    .increment(data.len() as u64);
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(early) = this.call.take()
                {
                    let code = status_code(trailers).or(early).unwrap_or("unknown");
                    record_call(this.method, code, *this.started);
                }
            }
            None => {
                if let Some(early) = this.call.take() {
                    record_call(this.method, early.unwrap_or("unknown"), *this.started);
                }
            }
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn record_call(method: &'static str, code: &'static str, started: Instant) {
    metrics::counter!(crate::metrics::GRPC_CALLS_TOTAL, "method" => method, "code" => code)
        .increment(1);
    metrics::histogram!(crate::metrics::GRPC_CALL_DURATION_SECONDS, "method" => method)
        .record(started.elapsed().as_secs_f64());
}

/// The `grpc-status` of a header block as its code name (a closed set).
fn status_code(headers: &HeaderMap) -> Option<&'static str> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(code_name(tonic::Code::from_i32(code)))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_closed_set_are_unmatched() {
        let uri: Uri = "/google.bytestream.ByteStream/Read".parse().unwrap();
        assert_eq!(GrpcMethod::of(&uri), "/google.bytestream.ByteStream/Read");
        let uri: Uri = "/made.up.Service/Anything".parse().unwrap();
        assert_eq!(GrpcMethod::of(&uri), "unmatched");
    }

    #[test]
    fn refusals_are_trailers_only_answers_with_the_right_code() {
        let draining = GrpcRefusals.draining();
        assert_eq!(status_code(draining.headers()), Some("unavailable"));
        let overloaded = GrpcRefusals.overloaded();
        assert_eq!(
            status_code(overloaded.headers()),
            Some("resource_exhausted")
        );
    }
}
