//! Per-key write locks: what lets writers of different keys reach RocksDB at the same time.
//!
//! A record is read, changed and written back (a publish replaces the previous version, an
//! eviction or clean deletes what it read). Those read-modify-writes of one key must not
//! interleave, but writes of different keys need not wait for each other: serialising all of
//! them (as one global lock did) left RocksDB a single writer at a time, so `fsync` durability
//! paid one device flush per write instead of one per group of concurrent writes.
//!
//! Keys map onto a fixed array of mutexes by hash. A publish holds exactly one stripe. Passes
//! over many keys (eviction, clean, access-time flush, index backfill) lock all the stripes of a
//! batch in ascending order, so two such passes can never deadlock with each other, and a
//! publish, holding one, cannot be part of a cycle either. No stripe is ever taken while the
//! accounting or uploads lock is held.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

/// Stripes: enough that a batch of a few hundred keys leaves most of them free for publishes.
const STRIPES: usize = 1024;

pub(super) struct KeyLocks {
    stripes: Box<[Mutex<()>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl KeyLocks {
    pub(super) fn new() -> KeyLocks {
        KeyLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn stripe(&self, encoded: &[u8]) -> usize {
        (self.hasher.hash_one(encoded) % STRIPES as u64) as usize
    }

    fn lock_stripe(&self, index: usize) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic while holding it leaves nothing inconsistent in
        // memory (RocksDB batches are atomic), so poisoning is ignored.
        self.stripes[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the one key a publish (or single removal) rewrites.
    pub(super) fn lock(&self, encoded: &[u8]) -> MutexGuard<'_, ()> {
        self.lock_stripe(self.stripe(encoded))
    }

    /// Locks every key of a batch, stripes in ascending order (see the module docs).
    pub(super) fn lock_all<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut indices: Vec<usize> = keys.into_iter().map(|k| self.stripe(k)).collect();
        indices.sort_unstable();
        indices.dedup();
        indices.into_iter().map(|i| self.lock_stripe(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn batches_and_single_keys_never_deadlock() {
        let locks = Arc::new(KeyLocks::new());
        let keys: Vec<Vec<u8>> = (0..2000).map(|i| format!("k{i}").into_bytes()).collect();
        let keys = Arc::new(keys);
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let (locks, keys) = (locks.clone(), keys.clone());
                std::thread::spawn(move || {
                    for round in 0..200 {
                        if t % 2 == 0 {
                            // A batch pass over keys in a scrambled order.
                            let batch = keys.iter().skip((round * 7 + t) % 50).step_by(13);
                            let _all = locks.lock_all(batch.rev().map(Vec::as_slice));
                        } else {
                            let _one = locks.lock(&keys[(round * 31 + t) % keys.len()]);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }
}
