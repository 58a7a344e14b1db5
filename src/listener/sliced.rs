//! HTTP/2 response bodies handed to hyper in slices of at most [`SLICE`] bytes.
//!
//! The stalled-reader rule of HTTP/2 (see the module docs of `listener.rs`) times how long a
//! response waits, after handing hyper a frame, to be asked for the next one. hyper asks again
//! once h2 has room for more of the stream, which is when the reader has taken most of what was
//! handed over. With a 1 MiB frame (a ByteStream chunk) that wait is the time the reader takes
//! for a whole MiB, so a client reading slowly but steadily (a hundred calls sharing a thin
//! link) would look stalled; with slices of 256 KiB a reader must take less than that per
//! `idle_timeout` (about 4 KiB/s at the default minute) to be cut. Slicing a `Bytes` copies
//! nothing, and h2 splits data into frames of the peer's `SETTINGS_MAX_FRAME_SIZE` anyway, so
//! the wire does not change. A slice is not smaller because each costs the stream a round
//! through hyper and h2: at 64 KiB, ByteStream reads of 128 KiB blobs lost about a tenth of
//! their rate. HTTP/1 responses pass through whole: its rule watches the socket.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// The most bytes of a response handed to hyper at once over HTTP/2.
pub(super) const SLICE: usize = 256 * 1024;

pin_project! {
    /// A response body whose data frames are cut to at most `slice` bytes (`None`: whole).
    pub(crate) struct Sliced<B> {
        #[pin]
        inner: B,
        slice: Option<usize>,
        // What is left of the last frame the inner body gave.
        rest: Bytes,
    }
}

impl<B> Sliced<B> {
    pub(super) fn new(inner: B, slice: Option<usize>) -> Sliced<B> {
        Sliced {
            inner,
            slice,
            rest: Bytes::new(),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Sliced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let Some(slice) = *this.slice else {
            return this.inner.poll_frame(cx);
        };
        if this.rest.is_empty() {
            let frame = match ready!(this.inner.poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            match frame.into_data() {
                Ok(data) => *this.rest = data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            }
            if this.rest.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::new()))));
            }
        }
        let take = slice.min(this.rest.len());
        Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(take)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        // Upper first: `set_lower` asserts it is not above the upper bound.
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(inner.lower().saturating_add(rest));
        hint
    }
}

pin_project! {
    /// A response future whose body comes out [`Sliced`].
    pub(super) struct SlicedFuture<F> {
        #[pin]
        inner: F,
        slice: Option<usize>,
    }
}

impl<F> SlicedFuture<F> {
    pub(super) fn new(inner: F, slice: Option<usize>) -> SlicedFuture<F> {
        SlicedFuture { inner, slice }
    }
}

impl<F, B, E> Future for SlicedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Sliced<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let slice = *this.slice;
        Poll::Ready(Ok(response.map(|body| Sliced::new(body, slice))))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn frames_come_out_in_slices_with_every_byte_and_the_trailers() {
        let data: Vec<u8> = (0..800_000u32).map(|i| i as u8).collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from(data.clone()))),
            Ok(Frame::data(Bytes::from_static(b"tail"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let mut sliced = Sliced::new(body, Some(SLICE));
        let mut received = Vec::new();
        let mut sizes = Vec::new();
        let mut seen_trailers = None;
        while let Some(frame) = sliced.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(bytes) => {
                    sizes.push(bytes.len());
                    received.extend_from_slice(&bytes);
                }
                Err(frame) => seen_trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(sizes, vec![SLICE, SLICE, SLICE, 800_000 - 3 * SLICE, 4]);
        let mut expected = data;
        expected.extend_from_slice(b"tail");
        assert_eq!(received, expected);
        assert_eq!(seen_trailers, Some(trailers));
    }

    /// The inner body's hint is exact (0 left) while slices of its frame wait: the hint must
    /// count them without tripping `SizeHint`'s lower-above-upper assertion.
    #[tokio::test]
    async fn the_size_hint_counts_the_slices_still_to_come() {
        let mut sliced = Sliced::new(Full::new(Bytes::from(vec![1u8; 600_000])), Some(SLICE));
        assert_eq!(sliced.size_hint().exact(), Some(600_000));
        let first = sliced.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), SLICE);
        assert_eq!(sliced.size_hint().exact(), Some((600_000 - SLICE) as u64));
        assert!(!sliced.is_end_stream());
    }

    #[tokio::test]
    async fn without_a_slice_a_body_passes_whole() {
        let body = Full::new(Bytes::from(vec![7u8; 300_000]));
        let mut whole = Sliced::new(body, None);
        let frame = whole.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().len(), 300_000);
        assert!(whole.frame().await.is_none());
    }
}
