//! Gathering an HTTP/2 connection's frames into fewer, larger socket writes.
//!
//! h2 writes one DATA frame at a time and flushes the socket after each: with the 16 KiB frames
//! that gRPC clients allow (grpc-java and tonic never raise `SETTINGS_MAX_FRAME_SIZE`), a
//! 256 MiB ByteStream read is 16,384 `writev` calls, each waking the reader on the other side,
//! where HTTP/1.1 sends the same bytes in a thousand. [`Coalesced`] copies what h2 writes into
//! one buffer and sends it when the buffer is full or when h2 has nothing more to add.
//!
//! When h2 has nothing more to add is what h2 does not say: it flushes after every frame and
//! again when its queue is empty, the same call both times. So a flush right after a write is
//! put off once: the call returns at once, and the task is woken so that it runs again. If h2
//! had another frame ready it writes it on (into the buffer); a flush with no write since the
//! one put off is the end of what h2 had, and sends the buffer. h2 flushes on every poll of its
//! connection (its `poll_complete` ends with one), so a flush put off is always followed by a
//! real one within one more poll of the task: no bytes wait for the peer.
//!
//! HTTP/1.1 connections are not gathered (hyper already writes a response's head and body
//! chunks in one `writev`, and putting off its flush would cost a small GET a task poll).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before they are sent without waiting for h2 to finish: about sixteen
/// 16 KiB frames per write. A connection holds at most this much, and nothing once its burst
/// is sent (the buffer is freed; with the node's malloc settings it comes from the heap, not
/// from `mmap`).
const GATHER_MAX: usize = 256 * 1024;

/// A socket whose writes can be gathered (once [`Coalesced::gather`] is called).
pub(super) struct Coalesced<I> {
    inner: I,
    gathering: bool,
    /// Bytes written by h2 and not yet sent; `sent` of them already went out.
    pending: Vec<u8>,
    sent: usize,
    /// Whether something was written since the last flush (which is then put off).
    written_since_flush: bool,
}

impl<I> Coalesced<I> {
    pub(super) fn new(inner: I) -> Coalesced<I> {
        Coalesced {
            inner,
            gathering: false,
            pending: Vec::new(),
            sent: 0,
            written_since_flush: false,
        }
    }

    /// Gathers writes from now on: the connection speaks HTTP/2.
    pub(super) fn gather(&mut self) {
        self.gathering = true;
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Coalesced<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> Coalesced<I> {
    /// Sends every pending byte; `Pending` while the socket is full.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends every pending byte and gives the buffer back: an idle connection holds none.
    fn poll_send_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_pending(cx))?;
        self.pending = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Copies `bufs` behind the pending bytes, making room first if they would not fit.
    fn poll_gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|buf| buf.len()).sum();
        if self.pending.len() + len > GATHER_MAX {
            ready!(self.poll_send_pending(cx))?;
            if len >= GATHER_MAX {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
        }
        if self.pending.capacity() == 0 {
            self.pending.reserve_exact(GATHER_MAX);
        }
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        self.written_since_flush = true;
        Poll::Ready(Ok(len))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Coalesced<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.gathering {
            this.poll_gather(cx, &[io::IoSlice::new(buf)])
        } else {
            Pin::new(&mut this.inner).poll_write(cx, buf)
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.gathering {
            this.poll_gather(cx, bufs)
        } else {
            Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.gathering || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written_since_flush && this.pending.len() < GATHER_MAX {
            // Put off (module docs): the task runs again and the next flush sends.
            this.written_since_flush = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        this.written_since_flush = false;
        ready!(this.poll_send_all(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_all(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    /// A socket that takes up to `room` bytes per write and records each write.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        room: Option<usize>,
        shut: bool,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.room.map_or(buf.len(), |room| room.min(buf.len()));
            if n == 0 {
                return Poll::Pending;
            }
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Harness {
        io: Coalesced<Socket>,
        wakes: Arc<Wakes>,
        waker: Waker,
    }

    impl Harness {
        fn gathering() -> Harness {
            let mut io = Coalesced::new(Socket::default());
            io.gather();
            let wakes = Arc::new(Wakes::default());
            let waker = Waker::from(wakes.clone());
            Harness { io, wakes, waker }
        }

        fn write(&mut self, bytes: &[u8]) -> Poll<io::Result<usize>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.io).poll_write(&mut cx, bytes)
        }

        fn flush(&mut self) -> Poll<io::Result<()>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.io).poll_flush(&mut cx)
        }

        fn shutdown(&mut self) -> Poll<io::Result<()>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.io).poll_shutdown(&mut cx)
        }

        fn sent(&self) -> Vec<u8> {
            self.io.inner.writes.concat()
        }

        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn frames_flushed_one_by_one_go_out_in_one_write_when_h2_has_no_more() {
        let mut h = Harness::gathering();
        for frame in [b"frame one;".as_slice(), b"frame two;", b"frame three"] {
            assert!(matches!(h.write(frame), Poll::Ready(Ok(n)) if n == frame.len()));
            // h2 flushes after each frame: put off, and the task is woken to come back.
            assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        }
        assert!(
            h.io.inner.writes.is_empty(),
            "nothing sent while h2 kept writing"
        );
        assert_eq!(h.wakes(), 3, "every put-off flush wakes the task");
        // The next poll of the connection finds nothing more to write and flushes again.
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(
            h.io.inner.writes.len(),
            1,
            "one socket write for the three frames"
        );
        assert_eq!(h.sent(), b"frame one;frame two;frame three");
        assert_eq!(
            h.io.pending.capacity(),
            0,
            "an idle connection holds no buffer"
        );
    }

    #[test]
    fn a_full_buffer_is_sent_without_waiting_for_the_flush() {
        let mut h = Harness::gathering();
        let frame = vec![7u8; 16 * 1024];
        let frames = GATHER_MAX / frame.len() + 1;
        for _ in 0..frames {
            assert!(matches!(h.write(&frame), Poll::Ready(Ok(_))));
        }
        assert_eq!(h.io.inner.writes.len(), 1, "the buffer went out when full");
        assert_eq!(h.sent().len(), GATHER_MAX);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(
            h.sent().len(),
            frames * frame.len(),
            "every byte sent, in order"
        );
    }

    #[test]
    fn a_write_larger_than_the_buffer_goes_straight_to_the_socket_after_what_is_pending() {
        let mut h = Harness::gathering();
        assert!(matches!(h.write(b"head"), Poll::Ready(Ok(4))));
        let large = vec![1u8; GATHER_MAX + 1];
        assert!(matches!(h.write(&large), Poll::Ready(Ok(n)) if n == large.len()));
        let mut expected = b"head".to_vec();
        expected.extend_from_slice(&large);
        assert_eq!(h.sent(), expected);
    }

    #[test]
    fn a_full_socket_keeps_the_bytes_until_it_has_room() {
        let mut h = Harness::gathering();
        assert!(matches!(h.write(b"0123456789"), Poll::Ready(Ok(10))));
        h.io.inner.room = Some(0);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))), "put off");
        assert!(h.flush().is_pending(), "the socket is full");
        h.io.inner.room = Some(4);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.sent(), b"0123456789");
    }

    #[test]
    fn shutdown_sends_what_is_pending_first() {
        let mut h = Harness::gathering();
        assert!(matches!(h.write(b"GOAWAY"), Poll::Ready(Ok(6))));
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))), "put off");
        assert!(matches!(h.shutdown(), Poll::Ready(Ok(()))));
        assert_eq!(h.sent(), b"GOAWAY");
        assert!(h.io.inner.shut);
    }

    #[test]
    fn a_connection_not_gathering_writes_at_once() {
        let mut h = Harness::gathering();
        h.io.gathering = false;
        assert!(matches!(h.write(b"HTTP/1.1 200 OK"), Poll::Ready(Ok(15))));
        assert_eq!(h.sent(), b"HTTP/1.1 200 OK");
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.wakes(), 0, "no flush put off");
    }
}
