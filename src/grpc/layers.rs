//! The gRPC listener's side of request handling: how the shared admission layer refuses gRPC
//! work, and the observation of calls. A gRPC call's outcome is its `grpc-status` (in the
//! trailers, or in the headers of a trailers-only answer), not the HTTP status, and a streamed
//! call lasts until its last message, not its response headers; so instead of the shared
//! `ObserveLayer`, [`CallMetricsLayer`] counts, times and logs each call when its response ends,
//! and counts its message bytes both ways.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use metrics::{Counter, Histogram};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::layers::{Refusals, RequestId};

/// Every method the listener serves: with `unmatched`, the closed set of metric labels.
const METHODS: [&str; 11] = [
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
];

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const UNMATCHED: &str = "unmatched";

/// One method's metric handles, resolved once for the life of the process: a call then costs
/// no registry lookup for its bytes and duration.
struct MethodMetrics {
    name: &'static str,
    received: Counter,
    sent: Counter,
    duration: Histogram,
}

/// The metrics of the method a request names (`unmatched` for anything else).
fn method_metrics(uri: &Uri) -> &'static MethodMetrics {
    static ALL: OnceLock<Vec<MethodMetrics>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        METHODS
            .iter()
            .chain([&UNMATCHED])
            .map(|&name| {
                let bytes = |direction: &'static str| {
                    metrics::counter!(crate::metrics::GRPC_MESSAGE_BYTES_TOTAL,
                        "method" => name, "direction" => direction)
                };
                MethodMetrics {
                    name,
                    received: bytes("received"),
                    sent: bytes("sent"),
                    duration: metrics::histogram!(
                        crate::metrics::GRPC_CALL_DURATION_SECONDS, "method" => name),
                }
            })
            .collect()
    });
    let path = uri.path();
    all.iter()
        .find(|method| method.name == path)
        .unwrap_or(&all[all.len() - 1])
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

/// Counts, times and logs every call by method and `grpc-status` once its response ends, and
/// counts the message bytes each way.
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
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = CallMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let call = Call {
            method: method_metrics(request.uri()),
            request_id: request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.clone()),
            started: Instant::now(),
        };
        let received = &call.method.received;
        let request = request.map(|body| {
            Body::new(Counted {
                inner: body,
                bytes: received,
                call: None,
            })
        });
        CallMetricsFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

/// What is known of a call before its end.
struct Call {
    method: &'static MethodMetrics,
    request_id: Option<Arc<str>>,
    started: Instant,
}

impl Call {
    /// Counts, times and logs the call; `code` is its status name.
    fn record(self, code: &'static str) {
        metrics::counter!(crate::metrics::GRPC_CALLS_TOTAL,
            "method" => self.method.name, "code" => code)
        .increment(1);
        let elapsed = self.started.elapsed();
        self.method.duration.record(elapsed.as_secs_f64());
        let request_id = self.request_id.as_deref().unwrap_or("");
        let method = self.method.name;
        if matches!(code, "internal" | "unknown" | "data_loss") {
            tracing::warn!(request_id, method, code, "call failed");
        } else {
            tracing::debug!(
                request_id,
                method,
                code,
                elapsed_ms = elapsed.as_millis() as u64,
                "call"
            );
        }
    }
}

pin_project! {
    /// The response of a call, its body wrapped to count it and record the call at its end.
    pub(crate) struct CallMetricsFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, E> Future for CallMetricsFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let Some(call) = this.call.take() else {
            return Poll::Ready(Ok(response));
        };
        // A trailers-only answer (every refusal and error before the first message) carries
        // its status in the headers.
        let early = status_code(response.headers());
        let sent = &call.method.sent;
        Poll::Ready(Ok(response.map(|body| {
            Body::new(Counted {
                inner: body,
                bytes: sent,
                call: Some((call, early)),
            })
        })))
    }
}

pin_project! {
    /// A body whose data bytes are counted; on the response side it also records the call once
    /// the status is known (trailers, headers, or the body dropped early).
    struct Counted {
        #[pin]
        inner: Body,
        bytes: &'static Counter,
        // On the response side until the call is recorded, with the status found in the
        // headers, if any.
        call: Option<(Call, Option<&'static str>)>,
    }

    impl PinnedDrop for Counted {
        fn drop(this: Pin<&mut Self>) {
            if let Some((call, early)) = this.project().call.take() {
                // Dropped before the end: the client went away (or the header status stands).
                call.record(early.unwrap_or("cancelled"));
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
                    this.bytes.increment(data.len() as u64);
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some((call, early)) = this.call.take()
                {
                    call.record(status_code(trailers).or(early).unwrap_or("unknown"));
                }
            }
            None => {
                if let Some((call, early)) = this.call.take() {
                    call.record(early.unwrap_or("unknown"));
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
        assert_eq!(
            method_metrics(&uri).name,
            "/google.bytestream.ByteStream/Read"
        );
        let uri: Uri = "/made.up.Service/Anything".parse().unwrap();
        assert_eq!(method_metrics(&uri).name, "unmatched");
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
