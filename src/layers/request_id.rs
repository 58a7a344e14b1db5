//! Request ids: every request carries one (`x-request-id`), the client's when it is sane, and
//! every response echoes it, so a client's report and the node's logs meet.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pub const REQUEST_ID: &str = "x-request-id";
/// [`REQUEST_ID`] as a ready header name: inserting a `&str` name would allocate one per response.
static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(REQUEST_ID);

/// The request id of a request, in its extensions; shared, so whoever logs it copies a
/// pointer, not the string.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// Adds [`RequestId`] to every request and `x-request-id` to every response.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let mut generated = [0u8; 32];
        let id: Arc<str> = Arc::from(
            request
                .headers()
                .get(&REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| is_sane(v))
                // The thread-local generator: no system call per request.
                .unwrap_or_else(|| generate(&mut generated)),
        );
        let header = HeaderValue::from_str(&id).ok();
        request.extensions_mut().insert(RequestId(id));
        RequestIdFuture {
            inner: self.inner.call(request),
            header,
        }
    }
}

pin_project! {
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        header: Option<HeaderValue>,
    }
}

impl<F, R, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(value) = this.header.take() {
            response
                .headers_mut()
                .insert(REQUEST_ID_HEADER.clone(), value);
        }
        Poll::Ready(Ok(response))
    }
}

/// A fresh id, for an answer written outside the layers (the listener's refusal at its
/// connection limit): every response carries one (00-overview.md).
pub(crate) fn fresh() -> String {
    generate(&mut [0u8; 32]).to_owned()
}

/// A fresh id: 32 hex digits of a random 128-bit number, written into `buffer`.
fn generate(buffer: &mut [u8; 32]) -> &str {
    let random = rand::random::<u128>().to_be_bytes();
    // 16 bytes always fit 32 hex digits, and hex digits are ASCII.
    if hex::encode_to_slice(random, buffer).is_err() {
        return "0";
    }
    std::str::from_utf8(buffer).unwrap_or("0")
}

/// 1–128 of `[A-Za-z0-9._:-]`: safe in a header, a log line and a URL.
fn is_sane(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::ServiceExt;

    use super::*;

    /// A service that answers with the request id it was given, as its body.
    fn echo() -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> {
        RequestIdLayer.layer(tower::service_fn(|request: Request<()>| async move {
            let id = request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.to_string());
            Ok::<_, Infallible>(Response::new(id.unwrap_or_default()))
        }))
    }

    #[tokio::test]
    async fn a_sane_client_id_is_kept_and_echoed() {
        let request = Request::builder()
            .header(REQUEST_ID, "build-42:step.7")
            .body(())
            .unwrap();
        let response = echo().oneshot(request).await.unwrap();
        assert_eq!(response.headers()[REQUEST_ID], "build-42:step.7");
        assert_eq!(response.body(), "build-42:step.7");
    }

    #[tokio::test]
    async fn a_missing_or_unsafe_id_is_replaced() {
        for sent in [None, Some("<script>"), Some("a b")] {
            let mut request = Request::builder();
            if let Some(sent) = sent {
                request = request.header(REQUEST_ID, sent);
            }
            let response = echo().oneshot(request.body(()).unwrap()).await.unwrap();
            let id = response.headers()[REQUEST_ID].to_str().unwrap().to_string();
            assert_eq!(id.len(), 32, "{sent:?}");
            assert_eq!(response.body(), &id);
        }
    }

    #[test]
    fn request_ids_must_be_plain_tokens() {
        assert!(is_sane("abc-123_x.y:z"));
        assert!(!is_sane(""));
        assert!(!is_sane("a b"));
        assert!(!is_sane("<script>"));
        assert!(!is_sane(&"a".repeat(129)));
    }
}
