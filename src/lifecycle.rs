//! Node lifecycle: `starting` → `serving` → `draining`, and what a drain waits for: the requests
//! in flight, and the responses whose last bytes still wait to be sent to a slow reader.

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
    /// Each listener's count of its connections with response bytes not yet sent (`listener.rs`).
    unsent_counts: Mutex<Vec<UnsentCount>>,
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

    /// Adds a listener's count of connections with response bytes not yet sent. A drain waits
    /// for them as for requests (a response body can be done while its end still waits for a
    /// slow reader), but the in-flight limit does not count them.
    pub(crate) fn count_unsent_with(&self, count: UnsentCount) {
        self.inner
            .unsent_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(count);
    }

    /// Connections with response bytes still to send (requests in flight included).
    pub fn unsent(&self) -> usize {
        let counts = self
            .inner
            .unsent_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|count| count()).sum()
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no request is in flight and every response is sent. Requests wake it as
    /// they end; responses still being sent are looked at every [`UNSENT_LOOK`], so that no
    /// connection's writes pay for waking a drain.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.in_flight() == 0 {
                if self.unsent() == 0 {
                    return;
                }
                tokio::time::sleep(UNSENT_LOOK).await;
                continue;
            }
            notified.await;
        }
    }
}

/// A listener's count of its connections with response bytes not yet sent.
pub(crate) type UnsentCount = Box<dyn Fn() -> usize + Send + Sync>;

/// How often a drain looks again at responses still being sent.
const UNSENT_LOOK: Duration = Duration::from_millis(20);

/// A request in flight (its response body included).
pub struct InFlight {
    inner: Arc<Inner>,
}

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
    async fn idle_waits_for_unsent_responses_too() {
        let lifecycle = Lifecycle::default();
        let unsent = Arc::new(AtomicUsize::new(1));
        lifecycle.count_unsent_with(Box::new({
            let unsent = unsent.clone();
            move || unsent.load(Ordering::SeqCst)
        }));
        assert_eq!(lifecycle.in_flight(), 0, "not a request: no in-flight slot");
        let waiter = tokio::spawn({
            let lifecycle = lifecycle.clone();
            async move { lifecycle.idle().await }
        });
        tokio::time::sleep(UNSENT_LOOK * 3).await;
        assert!(!waiter.is_finished());
        unsent.store(0, Ordering::SeqCst);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
