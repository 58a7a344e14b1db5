//! The replication bandwidth limit: a token bucket over body bytes sent to peers.
//!
//! One bucket per node (`replication.bandwidth_limit`) and, optionally, one per peer
//! (`replication.per_peer_limit`); a chunk of body waits for both before it is handed to the
//! connection. The bucket holds at most one second of the rate (the burst) and may go into
//! debt: a chunk larger than what is left takes it all and its sender sleeps until the debt is
//! paid back, so chunks of any size pass and concurrent senders share the rate without a
//! queue. Only replication's own workers ever wait here; client requests never touch it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket of `rate` bytes per second; a rate of 0 is unlimited.
pub struct Bandwidth {
    rate: u64,
    state: Mutex<Bucket>,
}

struct Bucket {
    /// Bytes that may pass now; negative when in debt.
    tokens: f64,
    last: Instant,
}

impl Bandwidth {
    pub fn new(rate: u64) -> Bandwidth {
        Bandwidth {
            rate,
            state: Mutex::new(Bucket {
                tokens: rate as f64,
                last: Instant::now(),
            }),
        }
    }

    /// Takes `bytes` from the bucket and waits until they are paid for; returns the time
    /// waited.
    pub async fn take(&self, bytes: u64) -> Duration {
        let wait = self.charge(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }

    /// Charges `bytes` now and says how long the caller must wait before sending them.
    fn charge(&self, bytes: u64) -> Duration {
        if self.rate == 0 || bytes == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.last).as_secs_f64();
        bucket.last = now;
        // Refill, capped at one second of the rate (the burst).
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.tokens -= bytes as f64;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_backlog_passes_at_the_rate_after_one_burst() {
        let bucket = Bandwidth::new(1000);
        let start = Instant::now();
        for _ in 0..20 {
            bucket.take(500).await;
        }
        // 10,000 bytes: the first 1,000 are the burst, the other 9,000 take 9 s.
        let elapsed = start.elapsed().as_secs_f64();
        assert!((8.9..=9.1).contains(&elapsed), "{elapsed}");
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_larger_than_the_burst_pass_and_pay_their_debt() {
        let bucket = Bandwidth::new(1000);
        let waited = bucket.take(3500).await;
        assert_eq!(waited, Duration::from_millis(2500));
        // The debt is paid by then: the next 1,000 bytes cost only their own second.
        let next = bucket.take(1000).await;
        assert_eq!(next, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_senders_share_the_rate() {
        let bucket = std::sync::Arc::new(Bandwidth::new(10_000));
        let start = Instant::now();
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let bucket = bucket.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        bucket.take(1000).await;
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.await.unwrap();
        }
        // 100,000 bytes at 10,000/s after a 10,000 burst: 9 s, whoever sent them.
        let elapsed = start.elapsed().as_secs_f64();
        assert!((8.9..=9.2).contains(&elapsed), "{elapsed}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_refills_only_up_to_one_second() {
        let bucket = Bandwidth::new(1000);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(bucket.take(1000).await, Duration::ZERO);
        assert_eq!(bucket.take(1000).await, Duration::from_secs(1));
    }

    #[tokio::test]
    async fn zero_is_unlimited() {
        let bucket = Bandwidth::new(0);
        assert_eq!(bucket.take(u64::MAX).await, Duration::ZERO);
    }
}
