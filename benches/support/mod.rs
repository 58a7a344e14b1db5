//! What the benchmarks share: filling a store with many artifacts quickly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kura::storage::{ArtifactKey, Store};

/// Writes artifacts `0..count` (`key(n)`, `body(n)`) with 32 concurrent writers.
pub async fn fill(
    store: &Store,
    count: u64,
    key: fn(u64) -> ArtifactKey,
    body: fn(u64) -> Vec<u8>,
) {
    let next = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    store.put_bytes(&key(n), &body(n)).await.expect("put");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
}
