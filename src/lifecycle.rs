//! Node lifecycle: `starting` → `serving` → `draining`, and the count of requests in flight that
//! a drain waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

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

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

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
}
