//! Node lifecycle: `starting` → `serving` → `draining`, and what a drain waits for: the requests
//! in flight, and the connections still sending what those requests answered.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// The states of operations.md. `Bootstrapping` arrives with replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Starting,
    Serving,
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Draining => "draining",
        }
    }
}

/// Shared lifecycle state; cheap to clone.
#[derive(Clone, Default)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: AtomicU8,
    in_flight: AtomicUsize,
    /// Each listener's count of its connections still sending (`listener.rs`).
    sending_counts: Mutex<Vec<SendingCount>>,
    idle: Notify,
    draining: Notify,
}

impl Lifecycle {
    pub fn state(&self) -> State {
        match self.inner.state.load(Ordering::SeqCst) {
            0 => State::Starting,
            1 => State::Serving,
            _ => State::Draining,
        }
    }

    pub fn set_serving(&self) {
        // Never leave draining once it started.
        let _ = self
            .inner
            .state
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Starts draining; returns `false` when a drain had already started.
    pub fn start_draining(&self) -> bool {
        let previous = self.inner.state.swap(2, Ordering::SeqCst);
        self.inner.draining.notify_waiters();
        previous != 2
    }

    /// Resolves once a drain has started.
    pub async fn draining(&self) {
        let notified = self.inner.draining.notified();
        if self.state() == State::Draining {
            return;
        }
        notified.await;
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn track(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            inner: self.inner.clone(),
        }
    }

    /// Adds a listener's count of its connections still sending. A drain waits for them as for
    /// requests (a response body can be done while its end still waits for a slow reader), but
    /// the in-flight limit does not count them.
    pub(crate) fn count_sending_with(&self, count: SendingCount) {
        self.inner
            .sending_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(count);
    }

    /// Connections still sending (those with requests in flight included).
    pub fn sending(&self) -> usize {
        let counts = self
            .inner
            .sending_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|count| count()).sum()
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no request is in flight and every response is sent. Requests wake it as
    /// they end; connections still sending are looked at every [`SENDING_LOOK`], so that no
    /// connection's writes pay for waking a drain.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.in_flight() == 0 {
                if self.sending() == 0 {
                    return;
                }
                tokio::time::sleep(SENDING_LOOK).await;
                continue;
            }
            notified.await;
        }
    }
}

/// A listener's count of its connections still sending.
pub(crate) type SendingCount = Box<dyn Fn() -> usize + Send + Sync>;

/// How often a drain looks again at connections still sending.
const SENDING_LOOK: Duration = Duration::from_millis(20);

/// A request in flight (its response body included).
pub struct InFlight {
    inner: Arc<Inner>,
}

impl crate::layers::BodyGuard for InFlight {}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.inner.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_every_guard() {
        let lifecycle = Lifecycle::default();
        lifecycle.set_serving();
        let guard = lifecycle.track();
        assert!(lifecycle.start_draining());
        assert!(!lifecycle.start_draining());
        assert_eq!(lifecycle.state(), State::Draining);
        let waiter = tokio::spawn({
            let lifecycle = lifecycle.clone();
            async move { lifecycle.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn idle_waits_for_connections_still_sending_too() {
        let lifecycle = Lifecycle::default();
        let sending = Arc::new(AtomicUsize::new(1));
        lifecycle.count_sending_with(Box::new({
            let sending = sending.clone();
            move || sending.load(Ordering::SeqCst)
        }));
        assert_eq!(lifecycle.in_flight(), 0, "not a request: no in-flight slot");
        let waiter = tokio::spawn({
            let lifecycle = lifecycle.clone();
            async move { lifecycle.idle().await }
        });
        tokio::time::sleep(SENDING_LOOK * 3).await;
        assert!(!waiter.is_finished());
        sending.store(0, Ordering::SeqCst);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
