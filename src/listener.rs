//! Accepting connections on one listener, with per-listener limits and a graceful drain.
//!
//! [`serve`] runs the accept loop of one TCP listener for one service: today the public HTTP
//! router, later the gRPC and internal listeners with services of their own. Connections are
//! served by hyper-util's auto builder (HTTP/1.1, and HTTP/2 with prior knowledge: h2c; an
//! HTTP/2 connection's writes are gathered by [`coalesce`]), and each is watched by a small clock
//! of its own ([`decide`]) that enforces the [`ListenerLimits`]:
//!
//! - **Header timeout.** Once the first byte of an HTTP/1 request arrives on a connection with no
//!   request in flight, the rest of the request line and headers must follow within
//!   `header_timeout`, or the connection is cut (slow-header clients, "slowloris").
//! - **Idle timeout.** A connection with no request in flight for `idle_timeout` is closed
//!   (HTTP/2 with GOAWAY). A request is in flight from the moment hyper hands it to the service
//!   until its response body has given hyper its last frame (or was dropped: the peer gone), so
//!   a long download is never idle, however slowly the client reads. (hyper drops a body in
//!   the same poll in which it yields its end, so the two moments coincide.) The end of a
//!   response still waiting in hyper's buffers for its reader counts too ([`Sending`]).
//! - **Stalled reader.** A connection whose response writes wait on a full socket, and whose
//!   socket took nothing of them for `idle_timeout`, is cut, request in flight or not (a gone
//!   peer, or one holding its connection, slot and body memory on purpose; nginx's
//!   `send_timeout` does the same). The socket reports room only once a third of its send
//!   buffer is free, so with a send buffer of a few MiB a reader slower than some tens of KiB
//!   a minute looks stalled.
//!   HTTP/2 holds a response's data for the peer's flow-control window, where no write of ours
//!   shows it: there a response that handed hyper a frame and was not asked for the next one
//!   for `idle_timeout` counts the same (h2 asks for more only once the window has room), and
//!   the clock looks at least once per `idle_timeout` while a request is in flight. Responses
//!   are handed over in slices of 256 KiB ([`sliced`]), so a reader slow but steady is not
//!   mistaken for a stalled one.
//! - **Connection limit.** At most `max_connections` connections are open (a semaphore; each
//!   connection task holds a permit). At the limit the connection idle the longest is closed to
//!   make room, so idle sockets never lock out probes or real clients; only when every
//!   connection has a request in flight (or a response still being sent) is a newcomer refused
//!   with a short 503. Running out of file descriptors in `accept()` is handled the same way:
//!   close the longest-idle connection, then retry.
//! - **Drain** ([`Phase`]). While draining the listener keeps accepting (probes must answer), but
//!   every connection closes once its current request is done: HTTP/1 without keep-alive,
//!   HTTP/2 with GOAWAY; idle ones close at once. A request is done for the clock when its body
//!   has given hyper its last frame, but the end of it may still wait in hyper's buffers for a
//!   slow reader: [`Watched`] tells when a write finds the socket full and when a flush leaves
//!   nothing waiting ([`Sending`]), the clock does not cut such a connection, and the node's
//!   drain waits for it as for a request (up to `shutdown.drain_timeout`; HTTP/2 connections
//!   are left to end by themselves after GOAWAY). When stopped the listener accepts no more and
//!   waits for the open connections to finish.
//!
//! Why our own clock rather than hyper's `http1::Builder::header_read_timeout`: hyper arms that
//! timer as soon as a keep-alive connection goes back to reading, so it would also close every
//! idle keep-alive connection after `header_timeout`, and it does not run while hyper-util is
//! still reading the first bytes to pick the protocol. And why not hyper-util's
//! `GracefulShutdown`: it takes ownership of each connection future to call
//! `graceful_shutdown` on its own signal, while the idle timer and evictions need to call it on
//! the same connection; the per-connection loop below calls it for all three, and the semaphore
//! tells when every connection is gone.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, timeout};
use tower::ServiceExt;

use crate::layers::{BodyGuard, GuardedBody, GuardedFuture};
use crate::lifecycle::Lifecycle;

mod coalesce;
mod sliced;

use coalesce::Coalesced;
use sliced::{SLICE, Sliced, SlicedFuture};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The limits of one listener.
#[derive(Clone, Debug)]
pub(crate) struct ListenerLimits {
    /// Names the listener in logs and metrics (`http`; later `grpc`, `internal`).
    pub name: &'static str,
    /// An HTTP/1 request's line and headers must arrive within this of its first byte.
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Where the node is in its shutdown, as a listener sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Serving,
    /// Keep accepting, but close each connection once its current request is done.
    Draining,
    /// Accept no more; close every connection once its requests are done.
    Stopped,
}

/// A connection asked to close gets this long to say so (GOAWAY, flush) before it is cut.
const CLOSE_GRACE: Duration = Duration::from_millis(100);
/// ...and at least this long after its last response went out (for the goodbye; HTTP/2 data
/// held back for the peer's flow-control window is not seen by the writes).
const FLUSH_GRACE: Duration = Duration::from_secs(1);
/// How long the accept loop waits for an evicted connection to give back its slot.
const EVICTION_WAIT: Duration = Duration::from_millis(1250);
/// Pause after an accept error that is not about one connection (out of descriptors or memory)
/// when no idle connection can be closed to make room, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Refusals in progress at once (each writes a short 503 and waits up to `REFUSAL_LINGER` for
/// the client to read it); beyond that a refused connection is closed without an answer.
const REFUSALS_AT_ONCE: usize = 64;
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Over HTTP/2, a request body the service dropped unread is still read and thrown away, up to
/// this much and this long, so that the stream ends cleanly (see [`RequestBody`]).
const DISCARD_MAX_BYTES: usize = 4 << 20;
const DISCARD_MAX_TIME: Duration = Duration::from_secs(5);
/// The first bytes of every HTTP/2 prior-knowledge connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Where a TLS listener gets its server configuration: called for each connection, so that
/// reloaded certificates apply to every connection accepted after the reload.
pub(crate) type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// Serves `service` on `listener` until `phase` reaches [`Phase::Stopped`] and every connection
/// has closed. Never fails: accept errors are logged and retried.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: ListenerLimits,
    tls: Option<TlsSource>,
    mut phase: watch::Receiver<Phase>,
    lifecycle: Lifecycle,
) where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(Shared::new(limits, tls));
    lifecycle.count_sending_with(Box::new({
        let shared = Arc::downgrade(&shared);
        move || {
            shared
                .upgrade()
                .map_or(0, |shared| shared.registry.drain_waits())
        }
    }));
    let mut acceptor = Acceptor {
        shared: shared.clone(),
        accept_errors: RateLimited::default(),
        refusals: RateLimited::default(),
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut phase) => break,
        };
        match accepted {
            Ok((stream, _peer)) => acceptor.admit(stream, &service, &phase).await,
            Err(error) => acceptor.accept_failed(error).await,
        }
    }
    drop(listener);
    shared.all_closed().await;
}

/// What the accept loop and every connection task of one listener share.
struct Shared {
    limits: ListenerLimits,
    builder: auto::Builder<TokioExecutor>,
    /// For connections accepted while draining: HTTP/1 without keep-alive, so the one response
    /// they get says `connection: close` (HTTP/2 gets GOAWAY after its first request).
    builder_draining: auto::Builder<TokioExecutor>,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    registry: Registry,
    /// TLS for every connection (the peer plane), or none (h2c and HTTP/1.1 in the clear).
    tls: Option<TlsSource>,
}

impl Shared {
    fn new(limits: ListenerLimits, tls: Option<TlsSource>) -> Shared {
        Shared {
            tls,
            builder: builder(&limits, true),
            builder_draining: builder(&limits, false),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            refusals: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
            registry: Registry::default(),
            limits,
        }
    }

    /// Resolves once every connection task has ended (given back its slot).
    async fn all_closed(&self) {
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }

    fn count_close(&self, reason: &'static str) {
        metrics::counter!(crate::metrics::CONNECTIONS_CLOSED_TOTAL,
            "listener" => self.limits.name, "reason" => reason)
        .increment(1);
    }
}

fn builder(limits: &ListenerLimits, keep_alive: bool) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Header reads are timed by our own clock (module docs): hyper's timer would also cut idle
    // keep-alive connections after `header_timeout`. Disabled explicitly so that giving HTTP/1
    // a timer one day does not silently turn on hyper's 30 s default.
    builder
        .http1()
        .header_read_timeout(None)
        .keep_alive(keep_alive);
    // HTTP/2 has no header timeout; a peer that stops answering pings is dropped instead, so a
    // vanished client cannot pin a stream (and its slot) forever. Idle connections, including
    // ones that trickle a request's headers in, are closed by the idle timer.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    builder
}

/// The accept loop's side: admission, refusal and accept errors.
struct Acceptor {
    shared: Arc<Shared>,
    accept_errors: RateLimited,
    refusals: RateLimited,
}

impl Acceptor {
    async fn admit<S, B>(&mut self, stream: TcpStream, service: &S, phase: &watch::Receiver<Phase>)
    where
        S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Small exchanges (probes, HEADs, 404s) must not wait on Nagle's algorithm.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let Some(slot) = self.slot().await else {
            self.refuse(stream);
            return;
        };
        let task = connection_task(
            self.shared.clone(),
            stream,
            service.clone(),
            phase.clone(),
            slot,
        );
        tokio::spawn(task);
    }

    /// A free slot, or one made by closing the connection idle the longest; `None` when every
    /// connection has a request in flight.
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.shared.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        self.shared.registry.evict_longest_idle()?;
        let freed = self.shared.slots.clone().acquire_owned();
        timeout(EVICTION_WAIT, freed).await.ok()?.ok()
    }

    /// At the limit with every connection busy: a short 503 rather than a silent hang.
    fn refuse(&mut self, mut stream: TcpStream) {
        self.shared.count_close("refused");
        if self.refusals.due() {
            tracing::warn!(
                listener = self.shared.limits.name,
                max_connections = self.shared.limits.max_connections,
                "every connection has a request in flight or a response being sent; refusing new ones with 503"
            );
        }
        let Ok(permit) = self.shared.refusals.clone().try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let _ = timeout(REFUSAL_LINGER, answer_busy(&mut stream)).await;
        });
    }

    async fn accept_failed(&mut self, error: io::Error) {
        // The peer gave up between SYN and accept: nothing is wrong with the listener.
        if matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            return;
        }
        if self.accept_errors.due() {
            tracing::warn!(listener = self.shared.limits.name, %error,
                "cannot accept connections; closing idle ones and retrying");
        }
        // Usually EMFILE/ENFILE: closing the longest-idle connection frees a descriptor.
        match self.shared.registry.evict_longest_idle() {
            Some(evicted) => {
                let _ = timeout(EVICTION_WAIT, evicted.gone()).await;
            }
            None => tokio::time::sleep(ACCEPT_ERROR_PAUSE).await,
        }
    }
}

/// Writes a 503 without reading the request, then reads and drops what the client sent until it
/// closes, so that our close does not turn into a reset that destroys the answer unread.
async fn answer_busy(stream: &mut TcpStream) -> io::Result<()> {
    let body = r#"{"error":"too_many_connections","message":"The node is at its connection limit; retry shortly"}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\nx-request-id: {}\r\ncontent-length: {}\r\n\r\n",
        crate::layers::fresh_request_id(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

/// Logs a recurring condition at most once a second.
#[derive(Default)]
struct RateLimited(Option<Instant>);

impl RateLimited {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .0
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1));
        if due {
            self.0 = Some(now);
        }
        due
    }
}

async fn stopped(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p == Phase::Stopped).await.is_err() {
        // The owner went away without stopping us: keep serving.
        std::future::pending::<()>().await;
    }
}

/// Serves one connection, closing it when [`decide`] says so.
async fn connection_task<S, B>(
    shared: Arc<Shared>,
    stream: TcpStream,
    service: S,
    phase: watch::Receiver<Phase>,
    _slot: OwnedSemaphorePermit,
) where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new());
    let _registration = shared.registry.register(activity.clone());
    let Some(tls) = shared.tls.clone() else {
        let io = Watched::new(stream, activity.clone());
        return drive(shared.clone(), io, activity, service, phase).await;
    };
    // The handshake must finish within the header timeout, like a request head: a peer that
    // connects and says nothing holds a slot no longer than a slow HTTP client would.
    let acceptor = tokio_rustls::TlsAcceptor::from(tls());
    match timeout(shared.limits.header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let io = Watched::new(stream, activity.clone());
            drive(shared.clone(), io, activity, service, phase).await;
        }
        Ok(Err(error)) => {
            shared.count_close("tls_handshake");
            tracing::warn!(listener = shared.limits.name, %error, "TLS handshake refused");
        }
        Err(_) => shared.count_close("tls_handshake"),
    }
}

/// Serves one connection's requests over `io` until [`decide`] closes it.
async fn drive<I, S, B>(
    shared: Arc<Shared>,
    io: Watched<I>,
    activity: Arc<Activity>,
    service: S,
    mut phase: watch::Receiver<Phase>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let io = TokioIo::new(io);
    let service = Tracked {
        inner: service,
        activity: activity.clone(),
    };
    let first_phase = *phase.borrow_and_update();
    let builder = match first_phase {
        Phase::Serving => &shared.builder,
        Phase::Draining | Phase::Stopped => &shared.builder_draining,
    };
    let mut connection = std::pin::pin!(builder.serve_connection(io, service));
    let mut situation = Situation {
        phase: first_phase,
        opened_while_draining: first_phase != Phase::Serving,
        closing_since: None,
    };
    let mut phase_open = true;
    // One timer for the connection's life. It is moved only when the clock must look sooner
    // than it is set for; firing early is harmless (the clock just decides again).
    let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
    let mut armed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let wake_at = match decide(&activity.snapshot(), &situation, &shared.limits, now) {
            Step::Wait(at) => at,
            Step::Close(reason) => {
                shared.count_close(reason.as_str());
                tracing::debug!(
                    listener = shared.limits.name,
                    reason = reason.as_str(),
                    "closing connection"
                );
                connection.as_mut().graceful_shutdown();
                situation.closing_since = Some(now);
                continue;
            }
            Step::Cut(reason) => {
                if let Some(reason) = reason {
                    shared.count_close(reason.as_str());
                    tracing::debug!(
                        listener = shared.limits.name,
                        reason = reason.as_str(),
                        "cutting connection"
                    );
                }
                return;
            }
        };
        arm(timer.as_mut(), &mut armed, wake_at);
        let event = {
            let mut changed = std::pin::pin!(activity.changed());
            let mut phase_changed = std::pin::pin!(phase.changed());
            std::future::poll_fn(|cx| {
                activity.polling.store(true, Ordering::SeqCst);
                let served = connection.as_mut().poll(cx);
                activity.polling.store(false, Ordering::SeqCst);
                if let Poll::Ready(result) = served {
                    return Poll::Ready(Event::Ended(result));
                }
                // What this poll's own requests changed (a head arriving, a request starting
                // or ending) is looked at here, without a wake-up for each.
                if activity.dirty.swap(false, Ordering::SeqCst) {
                    let snapshot = activity.snapshot();
                    match decide(&snapshot, &situation, &shared.limits, Instant::now()) {
                        Step::Wait(at) => arm(timer.as_mut(), &mut armed, at),
                        Step::Close(_) | Step::Cut(_) => return Poll::Ready(Event::Look),
                    }
                    // The last request ended after hyper's flush in this poll (a body's end
                    // found after its bytes went out; an HTTP/2 stream ending on its own
                    // task): one more poll of the connection reaches a flush that sees it.
                    if snapshot.in_flight == 0 && snapshot.sending {
                        cx.waker().wake_by_ref();
                    }
                }
                if changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Look);
                }
                if phase_open && let Poll::Ready(changed) = phase_changed.as_mut().poll(cx) {
                    return Poll::Ready(Event::Phase(changed.is_ok()));
                }
                if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                    armed = None;
                    return Poll::Ready(Event::Look);
                }
                Poll::Pending
            })
            .await
        };
        match event {
            Event::Ended(result) => {
                if let Err(error) = result {
                    tracing::debug!(listener = shared.limits.name, %error, "connection ended with an error");
                }
                return;
            }
            Event::Look => {}
            Event::Phase(true) => situation.phase = *phase.borrow_and_update(),
            Event::Phase(false) => phase_open = false,
        }
    }
}

/// Why the connection task looks at its clock again.
enum Event<E> {
    /// The connection is done.
    Ended(Result<(), E>),
    /// Something changed or a deadline passed.
    Look,
    /// The node's phase changed (`false`: its owner went away).
    Phase(bool),
}

/// Sets `timer` to fire at `at` unless it is already set to fire sooner.
fn arm(timer: Pin<&mut tokio::time::Sleep>, armed: &mut Option<Instant>, at: Option<Instant>) {
    if let Some(at) = at
        && armed.is_none_or(|current| at < current)
    {
        timer.reset(at);
        *armed = Some(at);
    }
}

/// What a connection's clock knows about the connection's requests.
#[derive(Clone, Copy, Debug)]
struct Snapshot {
    in_flight: usize,
    /// At least one request was started on this connection.
    served: bool,
    /// The accept loop wants this connection's slot (or descriptor).
    evict: bool,
    /// When the last request ended (or the connection was accepted), or the last response that
    /// waited for its reader went out.
    idle_since: Instant,
    /// When the first byte of an HTTP/1 request head arrived, while it is still arriving.
    head_since: Option<Instant>,
    /// The connection's last response may not be all out yet ([`Sending`]): the clock treats
    /// it as a request in flight.
    sending: bool,
    /// A write waits on a full socket: since when the reader took nothing.
    blocked_since: Option<Instant>,
    /// The connection speaks HTTP/2.
    http2: bool,
    /// HTTP/2: since when the response held longest by its reader's flow-control window has
    /// waited to be asked for its next frame.
    held_since: Option<Instant>,
}

/// What the connection task knows beyond its requests.
#[derive(Clone, Copy, Debug)]
struct Situation {
    phase: Phase,
    opened_while_draining: bool,
    /// When `graceful_shutdown` was called.
    closing_since: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Nothing to do until something changes or this instant passes.
    Wait(Option<Instant>),
    /// Call `graceful_shutdown`: HTTP/1 closes after the response in progress (at once when
    /// idle), HTTP/2 sends GOAWAY and closes when its streams are done.
    Close(Reason),
    /// Drop the connection now (counted under the reason, if any).
    Cut(Option<Reason>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    Idle,
    HeaderTimeout,
    Evicted,
    Drain,
    Stop,
    /// The reader took nothing of a response for `idle_timeout`.
    StalledReader,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::StalledReader => "stalled_reader",
            Reason::Idle => "idle",
            Reason::HeaderTimeout => "header_timeout",
            Reason::Evicted => "evicted",
            Reason::Drain => "drain",
            Reason::Stop => "stop",
        }
    }
}

/// The per-connection clock: what to do with a connection now, and when to look again.
fn decide(s: &Snapshot, c: &Situation, limits: &ListenerLimits, now: Instant) -> Step {
    // A reader that took nothing of a response for the idle timeout is gone, or holding the
    // connection on purpose: cut it, whatever is in flight (hyper could not finish anyway).
    let reader_stall = [s.blocked_since, s.held_since]
        .into_iter()
        .flatten()
        .min()
        .map(|since| since + limits.idle_timeout);
    if reader_stall.is_some_and(|stall| now >= stall) {
        return Step::Cut(Some(Reason::StalledReader));
    }
    // An HTTP/2 response held for a window tells nobody when it starts waiting: look again
    // within the idle timeout.
    let h2_look = (s.http2 && s.in_flight > 0).then(|| now + limits.idle_timeout);
    // A response not known to be out, with no request running and nothing waiting on the
    // socket, is a flush still to come; should it never come, the idle clock applies.
    let unflushed = (s.in_flight == 0 && s.sending && s.blocked_since.is_none())
        .then(|| s.idle_since + limits.idle_timeout);
    if s.in_flight > 0 || s.blocked_since.is_some() || unflushed.is_some_and(|at| now < at) {
        // Never cut a running request, nor the end of its response still waiting for its
        // reader. Draining: let it finish, then close.
        return match (c.phase, c.closing_since) {
            (Phase::Serving, _) | (_, Some(_)) => Step::Wait(
                [reader_stall, unflushed, h2_look]
                    .into_iter()
                    .flatten()
                    .min(),
            ),
            (Phase::Draining, None) => Step::Close(Reason::Drain),
            (Phase::Stopped, None) => Step::Close(Reason::Stop),
        };
    }
    let head_deadline = s.head_since.map(|since| since + limits.header_timeout);
    if head_deadline.is_some_and(|deadline| now >= deadline) {
        return Step::Cut(Some(Reason::HeaderTimeout));
    }
    if let Some(asked) = c.closing_since {
        return after_close_asked(s, c, asked, head_deadline, now);
    }
    if let Some(reason) = close_reason(s, c, limits, now) {
        // An evicted connection that never had a request has nothing to flush or say goodbye
        // to; cutting it at once keeps the accept loop quick under a slow-header flood.
        if reason == Reason::Evicted && !s.served {
            return Step::Cut(Some(reason));
        }
        return Step::Close(reason);
    }
    // A head arriving is timed by the header clock, not the idle one.
    Step::Wait(Some(
        head_deadline.unwrap_or(s.idle_since + limits.idle_timeout),
    ))
}

/// Why an idle connection (no request in flight) should close now, if it should.
fn close_reason(
    s: &Snapshot,
    c: &Situation,
    limits: &ListenerLimits,
    now: Instant,
) -> Option<Reason> {
    if s.evict {
        Some(Reason::Evicted)
    } else if c.phase == Phase::Stopped {
        Some(Reason::Stop)
    } else if c.phase == Phase::Draining && (s.served || !c.opened_while_draining) {
        // A connection opened while draining serves one request first (a probe, say).
        Some(Reason::Drain)
    } else if s.head_since.is_none() && now >= s.idle_since + limits.idle_timeout {
        Some(Reason::Idle)
    } else {
        None
    }
}

/// An idle connection asked to close: hyper ends it by itself, but not one still waiting for
/// its first HTTP/1 request, so cut it after a grace that lets the goodbye (and the last
/// response) be flushed. A request head still arriving may finish, unless we were evicted.
/// While draining, an HTTP/2 connection that served requests is left to hyper, which ends it
/// once its streams are done (after GOAWAY): h2 may still hold the end of a response for the
/// peer's flow-control window, which no write of ours shows, and a peer that stops answering
/// pings is dropped by the keep-alive. The drain waits for it (`Lifecycle::idle`).
fn after_close_asked(
    s: &Snapshot,
    c: &Situation,
    asked: Instant,
    head_deadline: Option<Instant>,
    now: Instant,
) -> Step {
    if let Some(deadline) = head_deadline.filter(|_| !s.evict) {
        return Step::Wait(Some(deadline));
    }
    if s.http2 && s.served && c.phase == Phase::Draining {
        return Step::Wait(None);
    }
    let mut cut_at = asked + CLOSE_GRACE;
    if s.served {
        cut_at = cut_at.max(s.idle_since + FLUSH_GRACE);
    }
    if now >= cut_at {
        Step::Cut(None)
    } else {
        Step::Wait(Some(cut_at))
    }
}

/// A connection's requests as they come and go; shared by the connection task, its IO and its
/// service.
struct Activity {
    in_flight: AtomicUsize,
    served: AtomicBool,
    evict: AtomicBool,
    times: Mutex<Times>,
    /// Something the clock looks at changed since it last looked.
    dirty: AtomicBool,
    /// The connection task is polling the connection itself: what changes meanwhile (nearly
    /// everything on HTTP/1) is seen when that poll returns, without a wake-up.
    polling: AtomicBool,
    /// Wakes the connection task for a change made elsewhere (HTTP/2 streams, eviction).
    changed: Notify,
    gone: AtomicBool,
    gone_notify: Notify,
    /// Where the connection's last response stands ([`Sending`] as a number). Only the
    /// connection's own task changes it (hyper calls services and writes from it, HTTP/2 too).
    sending: AtomicU8,
    http2: AtomicBool,
    /// HTTP/2 responses that handed hyper a frame and were not asked for the next one since:
    /// since when, by request ([`InFlight::id`]).
    held: Mutex<HashMap<u64, Instant>>,
    next_request: AtomicU64,
}

/// Whether a connection's responses are all out, as its writes tell ([`Watched`]).
///
/// A request's guard ([`InFlight`]) drops when its body has given hyper its last frame; the end
/// of it may still wait in hyper's buffers (or the gathered ones) for a slow reader. The state
/// is set when a request starts, before any guard of the node's (so a drain never sees the
/// request gone and its response not yet marked), and cleared by a flush that leaves nothing
/// waiting once no request is in flight.
/// Stored as its number, in this order: a request starting raises the state to `Request` and
/// never lowers `Blocked`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Sending {
    /// Everything handed over was taken by the socket.
    AllOut = 0,
    /// A request started; its response is not known to be out.
    Request = 1,
    /// A write found the socket full.
    Blocked = 2,
}

impl Sending {
    fn of(stored: u8) -> Sending {
        match stored {
            0 => Sending::AllOut,
            1 => Sending::Request,
            _ => Sending::Blocked,
        }
    }
}

struct Times {
    idle_since: Instant,
    head_since: Option<Instant>,
    /// While a write waits on a full socket: when it began waiting, or the socket last took
    /// some of what waited.
    progress_at: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            sending: AtomicU8::new(Sending::AllOut as u8),
            http2: AtomicBool::new(false),
            held: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            evict: AtomicBool::new(false),
            times: Mutex::new(Times {
                idle_since: Instant::now(),
                head_since: None,
                progress_at: Instant::now(),
            }),
            dirty: AtomicBool::new(false),
            polling: AtomicBool::new(false),
            changed: Notify::new(),
            gone: AtomicBool::new(false),
            gone_notify: Notify::new(),
        }
    }

    fn times(&self) -> MutexGuard<'_, Times> {
        // The data stays consistent even if a holder panicked: two plain fields.
        self.times
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn snapshot(&self) -> Snapshot {
        let http2 = self.http2.load(Ordering::SeqCst);
        let sending = self.sending();
        let times = self.times();
        Snapshot {
            in_flight: self.in_flight.load(Ordering::SeqCst),
            served: self.served.load(Ordering::SeqCst),
            evict: self.evict.load(Ordering::SeqCst),
            idle_since: times.idle_since,
            head_since: times.head_since,
            sending: sending != Sending::AllOut,
            blocked_since: (sending == Sending::Blocked).then_some(times.progress_at),
            http2,
            held_since: if http2 {
                self.held().values().min().copied()
            } else {
                None
            },
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<u64, Instant>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// No request in flight and every response byte taken by the socket.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.sending() == Sending::AllOut
    }

    fn sending(&self) -> Sending {
        Sending::of(self.sending.load(Ordering::SeqCst))
    }

    /// Whether a drain must wait for this connection: a response not yet all out, or an HTTP/2
    /// connection that served requests and is still open (see [`after_close_asked`]).
    fn drain_waits(&self) -> bool {
        self.sending() != Sending::AllOut
            || (self.http2.load(Ordering::SeqCst) && self.served.load(Ordering::SeqCst))
    }

    /// A write found the socket full: response bytes wait in the connection's buffers.
    fn write_blocked(&self) {
        if self.sending() == Sending::Blocked {
            return;
        }
        self.times().progress_at = Instant::now();
        self.sending.store(Sending::Blocked as u8, Ordering::SeqCst);
        self.touched();
    }

    /// The socket took bytes of a response that had waited for its reader: the reader is alive.
    fn reader_took_some(&self) {
        if self.sending() == Sending::Blocked {
            self.times().progress_at = Instant::now();
        }
    }

    /// A flush left nothing waiting. Once no request is in flight the responses are all out,
    /// and a connection that waited on its reader is idle from now.
    fn flushed(&self) {
        if self.sending() == Sending::AllOut {
            return;
        }
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            // Nothing waits on the socket now: a request still running (an upload, a slow
            // answer) is not a stalled reader.
            let _ = self.sending.compare_exchange(
                Sending::Blocked as u8,
                Sending::Request as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            return;
        }
        let was = self.sending.swap(Sending::AllOut as u8, Ordering::SeqCst);
        if Sending::of(was) == Sending::Blocked {
            self.times().idle_since = Instant::now();
        }
        self.touched();
    }

    async fn changed(&self) {
        self.changed.notified().await
    }

    /// Tells the connection task to look at its clock: marks the change, and wakes the task only
    /// when it is not the one making it. (Both flags are sequentially consistent: either the
    /// task's check after its poll sees `dirty`, or this sees `polling` false and wakes it.)
    fn touched(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }

    /// Bytes of a request head arrived on an HTTP/1 connection (or one not yet known).
    fn head_bytes(&self) {
        if !self.is_idle() {
            return;
        }
        let mut times = self.times();
        if times.head_since.is_none() {
            times.head_since = Some(Instant::now());
            drop(times);
            self.touched();
        }
    }

    /// The connection turned out to be HTTP/2: it has no HTTP/1 head to time.
    fn not_http1(&self) {
        self.http2.store(true, Ordering::SeqCst);
        self.times().head_since = None;
        self.touched();
    }

    /// A request starts; `http2` is the protocol it came in by.
    fn request_started(self: &Arc<Self>, http2: bool) -> InFlight {
        self.sending
            .fetch_max(Sending::Request as u8, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        self.times().head_since = None;
        self.touched();
        InFlight {
            activity: self.clone(),
            id: self.next_request.fetch_add(1, Ordering::Relaxed),
            http2,
        }
    }

    fn evict(&self) {
        self.evict.store(true, Ordering::SeqCst);
        self.touched();
    }

    /// Resolves once the connection task has ended.
    async fn gone(&self) {
        loop {
            let notified = self.gone_notify.notified();
            if self.gone.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// A request in flight, until its response body is done or dropped.
struct InFlight {
    activity: Arc<Activity>,
    /// Tells the connection's requests apart in [`Activity::held`].
    id: u64,
    http2: bool,
}

/// Over HTTP/2, the response's frames tell when it waits for its reader's window.
impl BodyGuard for InFlight {
    fn asked(&self) {
        if self.http2 {
            self.activity.held().remove(&self.id);
        }
    }

    fn handed(&self) {
        if self.http2 {
            self.activity.held().insert(self.id, Instant::now());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        if self.http2 {
            activity.held().remove(&self.id);
        }
        if activity.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            let mut times = activity.times();
            times.idle_since = Instant::now();
            times.head_since = None;
            drop(times);
            activity.touched();
        }
    }
}

/// The open connections of a listener, to find the one idle the longest.
#[derive(Default)]
struct Registry {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register(&self, activity: Arc<Activity>) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open().insert(id, activity.clone());
        Registration {
            registry: self,
            id,
            activity,
        }
    }

    /// Connections a drain must wait for ([`Activity::drain_waits`]).
    fn drain_waits(&self) -> usize {
        self.open().values().filter(|a| a.drain_waits()).count()
    }

    /// Asks the connection with no request in flight for the longest time to close; `None`
    /// when every connection has a request in flight (or a response still being sent).
    /// O(open connections), only at the limit.
    fn evict_longest_idle(&self) -> Option<Arc<Activity>> {
        let open = self.open();
        let victim = open
            .values()
            .filter(|a| a.is_idle() && !a.evict.load(Ordering::SeqCst))
            .min_by_key(|a| a.times().idle_since)?
            .clone();
        drop(open);
        victim.evict();
        Some(victim)
    }
}

/// Keeps a connection in the registry while its task runs.
struct Registration<'a> {
    registry: &'a Registry,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.open().remove(&self.id);
        self.activity.gone.store(true, Ordering::SeqCst);
        self.activity.gone_notify.notify_waiters();
    }
}

/// Which protocol a connection speaks, from its first bytes (as hyper-util's auto builder
/// decides it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// The first `matched` bytes agree with the HTTP/2 preface.
    Detecting {
        matched: usize,
    },
    Http1,
    Http2,
}

impl Protocol {
    fn after(self, bytes: &[u8]) -> Protocol {
        let Protocol::Detecting { matched } = self else {
            return self;
        };
        let wanted = &H2_PREFACE[matched..];
        let n = wanted.len().min(bytes.len());
        if bytes[..n] != wanted[..n] {
            Protocol::Http1
        } else if matched + n == H2_PREFACE.len() {
            Protocol::Http2
        } else {
            Protocol::Detecting {
                matched: matched + n,
            }
        }
    }
}

/// The accepted socket, telling the connection's clock when request bytes arrive, and
/// gathering its writes once it turns out to speak HTTP/2 ([`coalesce`]).
struct Watched<I> {
    stream: Coalesced<I>,
    activity: Arc<Activity>,
    protocol: Protocol,
}

impl<I> Watched<I> {
    /// A write that the socket did not take whole leaves bytes waiting (one copied into the
    /// gathering buffer is taken whole).
    fn note_write(&self, written: &Poll<io::Result<usize>>, offered: usize, took_before: u64) {
        self.note_progress(took_before);
        match written {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Ok(n)) if *n < offered => self.activity.write_blocked(),
            Poll::Ready(_) => {}
        }
    }

    /// The socket took bytes since `took_before`: the reader is alive.
    fn note_progress(&self, took_before: u64) {
        if self.stream.socket_took() > took_before {
            self.activity.reader_took_some();
        }
    }

    fn new(stream: I, activity: Arc<Activity>) -> Watched<I> {
        Watched {
            stream: Coalesced::new(stream),
            activity,
            protocol: Protocol::Detecting { matched: 0 },
        }
    }

    fn bytes_read(&mut self, bytes: &[u8]) {
        let before = self.protocol;
        self.protocol = before.after(bytes);
        match self.protocol {
            Protocol::Http2 if before != Protocol::Http2 => {
                self.activity.not_http1();
                self.stream.gather();
            }
            Protocol::Http2 => {}
            Protocol::Http1 | Protocol::Detecting { .. } => self.activity.head_bytes(),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.bytes_read(read);
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes tell the connection's clock when the socket is full, so that neither a drain nor an
/// eviction cuts a response whose end still waits in hyper's buffers (or the gathered ones),
/// when the socket took some of it (bytes copied into the gathering buffer do not count), and
/// when a flush has left nothing waiting. Under TLS the socket here is rustls's, which takes up
/// to its own buffer's worth ahead of the peer. (Data that h2 holds back for the peer's
/// flow-control window is not written, so not seen here; a drain leaves HTTP/2 connections to
/// end by themselves for that reason.)
impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let took = this.stream.socket_took();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.note_write(&written, buf.len(), took);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let took = this.stream.socket_took();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.note_write(&written, bufs.iter().map(|buf| buf.len()).sum(), took);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let took = this.stream.socket_took();
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        this.note_progress(took);
        match flushed {
            Poll::Pending => this.activity.write_blocked(),
            Poll::Ready(Ok(())) if !this.stream.holds_bytes() => this.activity.flushed(),
            Poll::Ready(_) => {}
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let took = this.stream.socket_took();
        let shut = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.note_progress(took);
        shut
    }
}

/// The service as hyper calls it: counts each request in flight until its response body is
/// done or dropped, and hands the inner service a [`RequestBody`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ConnectionBody<B>>;
    type Error = S::Error;
    /// A request's answer; its [`InFlight`] guard moves into the response body.
    type Future = GuardedFuture<SlicedFuture<tower::util::Oneshot<S, Request<Body>>>, InFlight>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let http2 = request.version() == http::Version::HTTP_2;
        let in_flight = self.activity.request_started(http2);
        let request = request.map(|body| Body::new(RequestBody::new(body, http2)));
        let answer = SlicedFuture::new(self.inner.clone().oneshot(request), http2.then_some(SLICE));
        GuardedFuture::new(answer, Some(in_flight))
    }
}

/// A response body that counts its request on the connection until it is done: a streaming
/// download counts until its last byte. Over HTTP/2 it is handed over in slices.
type ConnectionBody<B> = GuardedBody<Sliced<B>, InFlight>;

/// The request body handed to the service.
///
/// Over HTTP/2, when the service answers early (403, 413) and drops the body unread, hyper's h2
/// ends the stream with RST_STREAM once the response is sent: NO_ERROR, as RFC 9113 §8.1
/// allows, but curl (7.88 at least) is still uploading at that point and fails the whole
/// transfer (error 92, "stream was not closed cleanly") without reporting the status. So a body
/// dropped unread is read on in the background and thrown away, up to [`DISCARD_MAX_BYTES`] and
/// [`DISCARD_MAX_TIME`]: for ordinary bodies the client finishes sending, the stream ends
/// cleanly and the client sees the answer; past the bound the reset happens as before.
/// HTTP/1 is left to hyper: reading on there would send `100 Continue` to a client that asked
/// for it, which an early answer is meant to avoid.
struct RequestBody {
    incoming: Option<Incoming>,
    discard_unread: bool,
}

impl RequestBody {
    fn new(incoming: Incoming, discard_unread: bool) -> RequestBody {
        RequestBody {
            incoming: Some(incoming),
            discard_unread,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().incoming.as_mut() {
            Some(incoming) => Pin::new(incoming).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(incoming) = self.incoming.take() else {
            return;
        };
        if !self.discard_unread || http_body::Body::is_end_stream(&incoming) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(incoming));
        }
    }
}

async fn discard(mut incoming: Incoming) {
    let read_to_end = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = incoming.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > DISCARD_MAX_BYTES {
                break;
            }
        }
    };
    let _ = timeout(DISCARD_MAX_TIME, read_to_end).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal at the connection limit is written by hand, outside the layers: it must
    /// still be a whole answer a client can act on, with a request id like every response.
    #[tokio::test]
    async fn the_refusal_at_the_connection_limit_is_a_whole_answer_with_a_request_id() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(b"GET /up HTTP/1.1\r\n\r\n").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let (mut accepted, _) = listener.accept().await.unwrap();
        answer_busy(&mut accepted).await.unwrap();
        let answer = client.await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        for header in ["retry-after: 1", "connection: close", "x-request-id: "] {
            assert!(head.contains(header), "{header} missing from {head}");
        }
        let length = format!("content-length: {}", body.len());
        assert!(head.contains(&length), "{head}");
        assert!(body.contains("too_many_connections"), "{body}");
    }

    fn limits() -> ListenerLimits {
        ListenerLimits {
            name: "test",
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4,
        }
    }

    fn idle_since(at: Instant) -> Snapshot {
        Snapshot {
            in_flight: 0,
            served: true,
            evict: false,
            idle_since: at,
            head_since: None,
            sending: false,
            blocked_since: None,
            http2: false,
            held_since: None,
        }
    }

    fn serving() -> Situation {
        Situation {
            phase: Phase::Serving,
            opened_while_draining: false,
            closing_since: None,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_request_in_flight_is_never_cut() {
        let t0 = Instant::now();
        let busy = Snapshot {
            in_flight: 1,
            evict: true,
            head_since: Some(t0),
            ..idle_since(t0)
        };
        let late = t0 + 3600 * S;
        assert_eq!(decide(&busy, &serving(), &limits(), late), Step::Wait(None));
        let draining = Situation {
            phase: Phase::Draining,
            ..serving()
        };
        assert_eq!(
            decide(&busy, &draining, &limits(), late),
            Step::Close(Reason::Drain),
            "finish the request, then close"
        );
        let closing = Situation {
            closing_since: Some(t0),
            ..draining
        };
        assert_eq!(decide(&busy, &closing, &limits(), late), Step::Wait(None));
    }

    #[test]
    fn idle_connections_close_after_the_idle_timeout() {
        let t0 = Instant::now();
        let idle = idle_since(t0);
        assert_eq!(
            decide(&idle, &serving(), &limits(), t0 + 59 * S),
            Step::Wait(Some(t0 + 60 * S))
        );
        assert_eq!(
            decide(&idle, &serving(), &limits(), t0 + 60 * S),
            Step::Close(Reason::Idle)
        );
    }

    #[test]
    fn a_slow_head_is_cut_at_the_header_timeout_not_the_idle_one() {
        let t0 = Instant::now();
        let slow = Snapshot {
            head_since: Some(t0 + 55 * S),
            ..idle_since(t0)
        };
        assert_eq!(
            decide(&slow, &serving(), &limits(), t0 + 61 * S),
            Step::Wait(Some(t0 + 65 * S)),
            "bytes of a head arriving: the idle clock does not apply"
        );
        assert_eq!(
            decide(&slow, &serving(), &limits(), t0 + 65 * S),
            Step::Cut(Some(Reason::HeaderTimeout))
        );
    }

    #[test]
    fn closing_waits_for_the_last_response_to_flush_then_cuts() {
        let t0 = Instant::now();
        let just_answered = idle_since(t0);
        let asked = Situation {
            closing_since: Some(t0),
            ..serving()
        };
        assert_eq!(
            decide(&just_answered, &asked, &limits(), t0),
            Step::Wait(Some(t0 + FLUSH_GRACE))
        );
        assert_eq!(
            decide(&just_answered, &asked, &limits(), t0 + FLUSH_GRACE),
            Step::Cut(None)
        );
        let never_used = Snapshot {
            served: false,
            ..just_answered
        };
        assert_eq!(
            decide(&never_used, &asked, &limits(), t0),
            Step::Wait(Some(t0 + CLOSE_GRACE))
        );
    }

    #[test]
    fn an_http2_response_held_for_a_window_that_never_opens_is_a_stalled_reader() {
        let t0 = Instant::now();
        let streaming = Snapshot {
            in_flight: 1,
            http2: true,
            ..idle_since(t0)
        };
        assert_eq!(
            decide(&streaming, &serving(), &limits(), t0 + 5 * S),
            Step::Wait(Some(t0 + 65 * S)),
            "a stream's wait for its window starts unannounced: the clock looks again in time"
        );
        let held = Snapshot {
            held_since: Some(t0),
            ..streaming
        };
        assert_eq!(
            decide(&held, &serving(), &limits(), t0 + 59 * S),
            Step::Wait(Some(t0 + 60 * S))
        );
        assert_eq!(
            decide(&held, &serving(), &limits(), t0 + 60 * S),
            Step::Cut(Some(Reason::StalledReader))
        );
    }

    #[test]
    fn the_end_of_a_response_waits_for_a_reader_that_takes_some_of_it_within_the_idle_timeout() {
        let t0 = Instant::now();
        // Its body is done; the last of it waits on a full socket since `t0` (or the socket
        // last took some of it then).
        let still_sending = Snapshot {
            sending: true,
            blocked_since: Some(t0),
            ..idle_since(t0)
        };
        let stall = t0 + 60 * S;
        assert_eq!(
            decide(&still_sending, &serving(), &limits(), t0 + 59 * S),
            Step::Wait(Some(stall)),
            "not idle while the reader is alive"
        );
        let draining = Situation {
            phase: Phase::Draining,
            ..serving()
        };
        assert_eq!(
            decide(&still_sending, &draining, &limits(), t0),
            Step::Close(Reason::Drain)
        );
        let closing = Situation {
            closing_since: Some(t0),
            ..draining
        };
        assert_eq!(
            decide(&still_sending, &closing, &limits(), t0 + 59 * S),
            Step::Wait(Some(stall)),
            "the drain waits for it (up to shutdown.drain_timeout)"
        );
        for situation in [serving(), closing] {
            assert_eq!(
                decide(&still_sending, &situation, &limits(), stall),
                Step::Cut(Some(Reason::StalledReader)),
                "a reader that took nothing for the idle timeout is cut"
            );
        }
        // Not yet known to be out, but nothing waits on the socket: a flush is still to come,
        // and should it never come the idle clock applies.
        let unflushed = Snapshot {
            blocked_since: None,
            ..still_sending
        };
        assert_eq!(
            decide(&unflushed, &serving(), &limits(), t0 + 59 * S),
            Step::Wait(Some(t0 + 60 * S))
        );
        assert_eq!(
            decide(&unflushed, &serving(), &limits(), t0 + 60 * S),
            Step::Close(Reason::Idle)
        );
    }

    #[test]
    fn a_download_whose_reader_takes_nothing_for_the_idle_timeout_is_cut() {
        let t0 = Instant::now();
        let stuck = Snapshot {
            in_flight: 1,
            sending: true,
            blocked_since: Some(t0 + 10 * S),
            ..idle_since(t0)
        };
        assert_eq!(
            decide(&stuck, &serving(), &limits(), t0 + 69 * S),
            Step::Wait(Some(t0 + 70 * S)),
            "the reader took some 60 s ago at most"
        );
        assert_eq!(
            decide(&stuck, &serving(), &limits(), t0 + 70 * S),
            Step::Cut(Some(Reason::StalledReader))
        );
        let busy = Snapshot {
            blocked_since: None,
            ..stuck
        };
        assert_eq!(
            decide(&busy, &serving(), &limits(), t0 + 3600 * S),
            Step::Wait(None),
            "a request that is not writing (an upload, a slow answer) has no such clock"
        );
    }

    #[test]
    fn draining_leaves_an_http2_connection_to_end_after_goaway_until_the_node_stops() {
        let t0 = Instant::now();
        let http2 = Snapshot {
            http2: true,
            ..idle_since(t0)
        };
        let closing = Situation {
            phase: Phase::Draining,
            closing_since: Some(t0),
            ..serving()
        };
        assert_eq!(
            decide(&http2, &closing, &limits(), t0 + 3600 * S),
            Step::Wait(None),
            "h2 may hold the end of a response for the peer's window"
        );
        let stopped = Situation {
            phase: Phase::Stopped,
            ..closing
        };
        assert_eq!(
            decide(&http2, &stopped, &limits(), t0 + FLUSH_GRACE),
            Step::Cut(None),
            "the drain is over"
        );
    }

    #[test]
    fn draining_closes_idle_connections_but_lets_a_new_one_make_its_request() {
        let t0 = Instant::now();
        let draining = Situation {
            phase: Phase::Draining,
            ..serving()
        };
        assert_eq!(
            decide(&idle_since(t0), &draining, &limits(), t0),
            Step::Close(Reason::Drain)
        );
        let new_one = Snapshot {
            served: false,
            ..idle_since(t0)
        };
        let opened_while_draining = Situation {
            opened_while_draining: true,
            ..draining
        };
        assert_eq!(
            decide(&new_one, &opened_while_draining, &limits(), t0),
            Step::Wait(Some(t0 + 60 * S))
        );
    }

    #[test]
    fn eviction_cuts_a_head_in_progress_at_once_and_lets_a_last_response_flush() {
        let t0 = Instant::now();
        let slowloris = Snapshot {
            served: false,
            evict: true,
            head_since: Some(t0),
            ..idle_since(t0)
        };
        assert_eq!(
            decide(&slowloris, &serving(), &limits(), t0),
            Step::Cut(Some(Reason::Evicted))
        );
        let just_answered = Snapshot {
            evict: true,
            ..idle_since(t0)
        };
        assert_eq!(
            decide(&just_answered, &serving(), &limits(), t0),
            Step::Close(Reason::Evicted)
        );
        let asked = Situation {
            closing_since: Some(t0),
            ..serving()
        };
        assert_eq!(
            decide(&just_answered, &asked, &limits(), t0),
            Step::Wait(Some(t0 + FLUSH_GRACE))
        );
    }

    #[test]
    fn the_protocol_is_told_by_the_preface() {
        let start = Protocol::Detecting { matched: 0 };
        assert_eq!(start.after(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(start.after(H2_PREFACE), Protocol::Http2);
        let partial = start.after(b"PRI * HT");
        assert_eq!(partial, Protocol::Detecting { matched: 8 });
        assert_eq!(partial.after(&H2_PREFACE[8..]), Protocol::Http2);
        assert_eq!(partial.after(b"XX"), Protocol::Http1);
    }
}
