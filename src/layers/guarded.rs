//! A response body that carries a guard (a count of work in flight) and lets it go once the
//! body is done: at its last frame, or when it is dropped unfinished (the client went away).
//! The guard rides in the body, not the future, because a streaming download is work in flight
//! until its last byte, long after the handler returned. [`GuardedFuture`] holds the guard
//! while the response is being made and hands it to the body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// What a guard hears of its body's frames. Most guards only count work in flight and
/// ignore both calls.
pub trait BodyGuard {
    /// hyper asks the body for its next frame.
    fn asked(&self) {}
    /// The body handed hyper a frame that is not its end.
    fn handed(&self) {}
}

pin_project! {
    /// A response future whose guard moves into the response's body once the response is
    /// ready (or goes with the future, if it is dropped first).
    pub struct GuardedFuture<F, G> {
        #[pin]
        inner: F,
        guard: Option<G>,
    }
}

impl<F, G> GuardedFuture<F, G> {
    pub fn new(inner: F, guard: Option<G>) -> Self {
        GuardedFuture { inner, guard }
    }
}

impl<F, G, R, E> Future for GuardedFuture<F, G>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<GuardedBody<R, G>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| GuardedBody::new(body, guard))))
    }
}

pin_project! {
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> GuardedBody<B, G> {
    pub fn new(inner: B, guard: Option<G>) -> Self {
        GuardedBody { inner, guard }
    }
}

impl<B: Body, G: BodyGuard> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Some(guard) = this.guard.as_ref() {
            guard.asked();
        }
        let frame = ready!(this.inner.poll_frame(cx));
        match (&frame, this.guard.as_ref()) {
            (None, _) => drop(this.guard.take()),
            (Some(_), Some(guard)) => guard.handed(),
            (Some(_), None) => {}
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;

    /// Sets its flag when dropped.
    struct Flag(Arc<AtomicBool>);

    impl BodyGuard for Flag {}

    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn guarded(released: &Arc<AtomicBool>) -> GuardedBody<Full<Bytes>, Flag> {
        GuardedBody::new(
            Full::new(Bytes::from_static(b"abc")),
            Some(Flag(released.clone())),
        )
    }

    #[tokio::test]
    async fn the_guard_goes_at_the_end_of_the_body_not_before() {
        let released = Arc::new(AtomicBool::new(false));
        let mut body = guarded(&released);
        assert_eq!(body.size_hint().exact(), Some(3));
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&data[..], b"abc");
        assert!(!released.load(Ordering::SeqCst), "let go before the end");
        assert!(body.frame().await.is_none());
        assert!(
            released.load(Ordering::SeqCst),
            "held past the end while the body lives"
        );
    }

    #[test]
    fn the_guard_goes_when_an_unfinished_body_is_dropped() {
        let released = Arc::new(AtomicBool::new(false));
        drop(guarded(&released));
        assert!(released.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_ready_response_carries_the_guard_in_its_body() {
        let released = Arc::new(AtomicBool::new(false));
        let answer = async { Ok::<_, ()>(Response::new(Full::new(Bytes::from_static(b"ok")))) };
        let future = GuardedFuture::new(answer, Some(Flag(released.clone())));
        let response = future.await.unwrap();
        assert!(
            !released.load(Ordering::SeqCst),
            "released before the body ended"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        assert!(released.load(Ordering::SeqCst));
    }

    #[test]
    fn the_guard_goes_when_the_future_is_dropped_before_its_response() {
        let released = Arc::new(AtomicBool::new(false));
        let never = std::future::pending::<Result<Response<Full<Bytes>>, ()>>();
        drop(GuardedFuture::new(never, Some(Flag(released.clone()))));
        assert!(released.load(Ordering::SeqCst));
    }
}
