//! Waits between retries of a failed exchange with a peer (replication.md: exponential backoff
//! with jitter, 100 ms → 30 s), shared by the sender of each peer and the catch-up worker.

use std::time::Duration;

use rand::Rng;

/// First and longest wait after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff with full jitter between [`BACKOFF_MIN`] and [`BACKOFF_MAX`].
#[derive(Default)]
pub(super) struct Backoff {
    failures: u32,
}

impl Backoff {
    pub(super) fn reset(&mut self) {
        self.failures = 0;
    }

    pub(super) fn next(&mut self) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        // Between half and all of the ceiling: peers that failed together do not retry together.
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next();
        assert!(
            first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
            "{first:?}"
        );
        let mut last = first;
        for _ in 0..20 {
            last = backoff.next();
            assert!(last <= BACKOFF_MAX);
        }
        assert!(last >= BACKOFF_MAX / 2, "{last:?}");
        backoff.reset();
        assert!(backoff.next() <= BACKOFF_MIN);
    }
}
