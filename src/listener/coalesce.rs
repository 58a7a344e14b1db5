//! Gathering an HTTP/2 connection's frames into fewer, larger socket writes.
//!
//! h2 writes one DATA frame at a time and flushes the socket after each: with the 16 KiB frames
//! that gRPC clients allow (grpc-java and tonic never raise `SETTINGS_MAX_FRAME_SIZE`), a
//! 256 MiB ByteStream read is 16,384 `writev` calls, each waking the reader on the other side,
//! where HTTP/1.1 sends the same bytes in a thousand. [`Coalesced`] copies what h2 writes into
//! one buffer and sends it when the buffer is full or when h2 has nothing more to add.
//!
//! h2 does not tell which of its flushes is the last one: `FramedWrite::flush` flushes the
//! socket after every frame, and `Streams::poll_complete` flushes again once its queue is empty.
//! So while a burst is under way (at least one full frame gathered, [`DEFER_FROM`]), a flush
//! that follows a write is put off: it returns at once and wakes the task. If h2 had another
//! frame ready it writes it on, into the buffer; a flush with no write since the one put off
//! is the end of what h2 had, and sends the buffer. Every poll of an open h2 connection ends in
//! `poll_complete`, and so in a flush, so a flush put off is followed by a real one within one
//! more poll of the task; a closing connection goes through `poll_shutdown`, which sends first.
//! Smaller writes with no burst under way (a unary call's answer, a WINDOW_UPDATE) go straight
//! to the socket, uncopied, and never wait for a second trip through the run queue.
//!
//! Gathered bytes are lost only with the connection itself: when hyper drops it without a
//! shutdown (an I/O error, a peer that vanished, the listener cutting it after the drain
//! timeout), as the bytes h2 still held would be.
//!
//! Memory: a connection holds up to [`GATHER_MAX`] while it sends a burst, and nothing once
//! the burst is out (the buffer is freed; with the node's malloc settings it comes from the
//! heap, not from `mmap`). h2 itself buffers up to 400 KiB per stream besides.
//!
//! HTTP/1.1 connections are not gathered (hyper already writes a response's head and body
//! chunks in one `writev`, and putting off its flush would cost a small GET a task poll).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before they are sent without waiting for h2 to finish: sixteen 16 KiB frames
/// per write.
const GATHER_MAX: usize = 256 * 1024;

/// Gathered bytes from which a flush is put off: one full DATA frame at the default frame size.
/// Below it the connection is answering small calls, and sends at once.
const DEFER_FROM: usize = 16 * 1024;

/// A socket whose writes can be gathered (once [`Coalesced::gather`] is called).
pub(super) struct Coalesced<I> {
    inner: I,
    gathering: bool,
    /// Bytes written by h2 and not yet sent; `sent` of them already went out.
    pending: Vec<u8>,
    sent: usize,
    /// Whether a write came since the last flush, so that the next flush may be put off.
    defer_next_flush: bool,
    /// Bytes the socket has taken, gathered or not: what tells a reader's progress (a write
    /// into the buffer is not).
    socket_took: u64,
}

impl<I> Coalesced<I> {
    pub(super) fn new(inner: I) -> Coalesced<I> {
        Coalesced {
            inner,
            gathering: false,
            pending: Vec::new(),
            sent: 0,
            defer_next_flush: false,
            socket_took: 0,
        }
    }

    /// Bytes the socket has taken so far.
    pub(super) fn socket_took(&self) -> u64 {
        self.socket_took
    }

    /// Gathers writes from now on: the connection speaks HTTP/2.
    pub(super) fn gather(&mut self) {
        self.gathering = true;
    }

    /// Whether gathered bytes wait to be sent (after a flush that was put off).
    pub(super) fn holds_bytes(&self) -> bool {
        self.sent < self.pending.len()
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
            self.socket_took += n as u64;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends every pending byte and gives the buffer back: an idle connection holds none.
    fn poll_send_and_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_pending(cx))?;
        self.pending = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Writes `bufs` to the socket as they are, counting what it took.
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(written)
    }

    /// Counts what a write straight to the socket took.
    fn count(&mut self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written {
            self.socket_took += n as u64;
        }
        written
    }

    /// Copies `bufs` behind the pending bytes, making room first if they would not fit.
    fn poll_gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|buf| buf.len()).sum();
        if self.pending.is_empty() && len < DEFER_FROM {
            // No burst under way: a small answer (h2 writes a unary call's frames in one go)
            // goes to the socket as before, without a copy or a buffer.
            return self.poll_write_through(cx, bufs);
        }
        if self.pending.len() + len > GATHER_MAX {
            ready!(self.poll_send_pending(cx))?;
            if len >= GATHER_MAX {
                return self.poll_write_through(cx, bufs);
            }
        }
        if self.pending.capacity() == 0 {
            // A burst begins: room for all of it at once.
            self.pending.reserve_exact(GATHER_MAX);
        }
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        self.defer_next_flush = true;
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
            let written = Pin::new(&mut this.inner).poll_write(cx, buf);
            this.count(written)
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
            this.poll_write_through(cx, bufs)
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.gathering || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let burst = (DEFER_FROM..GATHER_MAX).contains(&this.pending.len());
        if this.defer_next_flush && burst {
            // Put off (module docs): the task runs again and the next flush sends.
            this.defer_next_flush = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        this.defer_next_flush = false;
        ready!(this.poll_send_and_release(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_and_release(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    /// A socket that takes up to `room` bytes per write and records each write and flush.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        room: Option<usize>,
        flushes: usize,
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

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
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

    /// A DATA frame as h2 writes it: 16 KiB of `byte`.
    fn frame(byte: u8) -> Vec<u8> {
        vec![byte; 16 * 1024]
    }

    /// What tells a reader's progress is what the socket took, not what went into the buffer.
    #[test]
    fn only_bytes_the_socket_took_count_as_taken() {
        let mut h = Harness::gathering();
        assert!(matches!(h.write(&frame(1)), Poll::Ready(Ok(_))));
        assert_eq!(h.io.socket_took(), 0, "gathered, not sent");
        assert!(matches!(h.flush(), Poll::Ready(Ok(())))); // put off
        h.io.inner.room = Some(1000);
        assert!(matches!(h.flush(), Poll::Ready(Ok(())) | Poll::Pending));
        let sent = h.sent().len() as u64;
        assert!(sent > 0);
        assert_eq!(h.io.socket_took(), sent);
        h.io.inner.room = None;
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.io.socket_took(), 16 * 1024);
        // A small answer written straight through counts as it goes.
        assert!(matches!(h.write(b"small"), Poll::Ready(Ok(5))));
        assert_eq!(h.io.socket_took(), 16 * 1024 + 5);
    }

    #[test]
    fn frames_flushed_one_by_one_go_out_in_one_write_when_h2_has_no_more() {
        let mut h = Harness::gathering();
        let frames = [frame(1), frame(2), frame(3)];
        for frame in &frames {
            assert!(matches!(h.write(frame), Poll::Ready(Ok(n)) if n == frame.len()));
            // h2 flushes after each frame: put off, and the task is woken to come back.
            assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        }
        assert!(
            h.io.inner.writes.is_empty(),
            "nothing sent while h2 kept writing"
        );
        assert_eq!(h.io.inner.flushes, 0);
        assert_eq!(h.wakes(), 3, "every put-off flush wakes the task");
        // The next poll of the connection finds nothing more to write and flushes again.
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(
            h.io.inner.writes.len(),
            1,
            "one socket write for the three frames"
        );
        assert_eq!(h.sent(), frames.concat());
        assert_eq!(
            h.io.inner.flushes, 1,
            "the real flush reaches the socket (TLS needs it)"
        );
        assert_eq!(
            h.io.pending.capacity(),
            0,
            "an idle connection holds no buffer"
        );
    }

    #[test]
    fn a_small_answer_is_sent_at_its_first_flush() {
        let mut h = Harness::gathering();
        assert!(matches!(
            h.write(b"HEADERS DATA TRAILERS"),
            Poll::Ready(Ok(21))
        ));
        assert!(
            h.io.pending.capacity() < DEFER_FROM,
            "no burst-sized buffer for it"
        );
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.sent(), b"HEADERS DATA TRAILERS");
        assert_eq!(
            h.wakes(),
            0,
            "not put off: no second trip through the run queue"
        );
    }

    #[test]
    fn a_full_buffer_is_sent_without_waiting_for_the_flush() {
        let mut h = Harness::gathering();
        let frame = frame(7);
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
    fn a_full_buffer_and_a_full_socket_take_no_more_bytes() {
        let mut h = Harness::gathering();
        let frame = frame(9);
        for _ in 0..GATHER_MAX / frame.len() {
            assert!(matches!(h.write(&frame), Poll::Ready(Ok(_))));
        }
        h.io.inner.room = Some(0);
        assert!(
            h.write(&frame).is_pending(),
            "no room anywhere: h2 must wait"
        );
        h.io.inner.room = Some(100_000);
        assert!(matches!(h.write(&frame), Poll::Ready(Ok(n)) if n == frame.len()));
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(
            h.sent().len(),
            GATHER_MAX + frame.len(),
            "nothing lost, nothing twice"
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
        let frame = frame(4);
        assert!(matches!(h.write(&frame), Poll::Ready(Ok(_))));
        h.io.inner.room = Some(0);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))), "put off");
        assert!(h.flush().is_pending(), "the socket is full");
        h.io.inner.room = Some(4000);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.sent(), frame);
    }

    #[test]
    fn shutdown_sends_what_is_pending_first() {
        let mut h = Harness::gathering();
        let frame = frame(5);
        assert!(matches!(h.write(&frame), Poll::Ready(Ok(_))));
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))), "put off");
        assert!(matches!(h.shutdown(), Poll::Ready(Ok(()))));
        assert_eq!(h.sent(), frame);
        assert!(h.io.inner.shut);
    }

    #[test]
    fn a_connection_not_gathering_writes_at_once() {
        let mut h = Harness::gathering();
        h.io.gathering = false;
        assert!(matches!(h.write(&frame(3)), Poll::Ready(Ok(_))));
        assert_eq!(h.sent(), frame(3));
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.wakes(), 0, "no flush put off");
    }
}
