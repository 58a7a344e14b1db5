//! The node-wide budget for body bytes held in memory.
//!
//! Bodies stream in bounded chunks, but each transfer still holds some of its bytes: an upload
//! buffers up to half a MiB before a write, a small download is read and verified whole before
//! it is sent, a large one keeps a chunk in hand. Thousands of transfers at once would add up,
//! so every transfer leases its footprint from one budget (`limits.body_memory`) for as long as
//! it runs. When the budget is spent, new transfers wait up to `limits.body_memory_wait` and
//! are then answered 429 with `Retry-After`: the node slows down instead of running out of
//! memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per permit: leases are counted in KiB so that the budget fits a semaphore.
const UNIT: u64 = 1024;

/// The budget; cheap to clone.
#[derive(Clone, Debug)]
pub struct BodyMemory {
    permits: Arc<Semaphore>,
    total: u32,
    wait: Duration,
}

/// Room for one transfer's bytes, given back when dropped.
#[derive(Debug)]
pub struct MemoryLease(#[allow(dead_code)] OwnedSemaphorePermit);

/// A lease rides in a download's body until its last frame ([`crate::layers::GuardedBody`]).
impl crate::layers::BodyGuard for MemoryLease {}

impl BodyMemory {
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let total = (bytes / UNIT).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        BodyMemory {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
            wait,
        }
    }

    /// Leases room for `bytes` (never more than the whole budget), waiting up to the configured
    /// time; `None` when the budget stayed spent.
    pub async fn lease(&self, bytes: u64) -> Option<MemoryLease> {
        let units = bytes.div_ceil(UNIT).clamp(1, u64::from(self.total)) as u32;
        // Almost always there is room: take it without arming a timer (this runs on every GET).
        if let Ok(permit) = self.permits.clone().try_acquire_many_owned(units) {
            return Some(MemoryLease(permit));
        }
        let acquire = self.permits.clone().acquire_many_owned(units);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Some(MemoryLease(permit)),
            // The semaphore is never closed; a timeout means the budget stayed spent.
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Bytes leased right now.
    pub fn in_use(&self) -> u64 {
        u64::from(self.total).saturating_sub(self.permits.available_permits() as u64) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_wait_for_room_then_give_up() {
        let budget = BodyMemory::new(64 * 1024, Duration::from_millis(50));
        let first = budget.lease(40 * 1024).await.expect("room");
        assert_eq!(budget.in_use(), 40 * 1024);
        assert!(budget.lease(40 * 1024).await.is_none(), "spent budget");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.lease(40 * 1024).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        assert!(
            waiting.await.unwrap(),
            "a waiting lease gets the room given back"
        );
        // A lease larger than the whole budget takes all of it rather than never fitting.
        assert!(budget.lease(1 << 30).await.is_some());
    }
}
