//! Capacity: reserving room for writes, least-recently-accessed eviction, and access tracking.
//!
//! Reads do not write to RocksDB. They note the access in memory ([`PendingTouches`]); a
//! background pass (and every eviction pass, first) moves those notes into the `access` column
//! family, which is the eviction queue ordered oldest first.

use std::collections::HashMap;
use std::sync::Mutex;

use rocksdb::WriteBatch;

use super::meta::{self, ArtifactRecord, UsageDelta};
use super::{Reservation, Store, StoreError, now_ms};

/// An access is recorded only when the stored one is older than this: bounds the writes a hot
/// key causes (at most four a second) while keeping the eviction order accurate.
const TOUCH_RESOLUTION_MS: u64 = 250;
/// Artifacts examined per eviction batch.
const EVICT_BATCH: usize = 256;
/// Records rewritten per access-time flush batch.
const TOUCH_BATCH: usize = 256;

/// Accesses noted since the last flush: encoded key → access time.
#[derive(Default)]
pub(super) struct PendingTouches(Mutex<HashMap<Vec<u8>, u64>>);

impl PendingTouches {
    /// Notes an access of the artifact whose record says it was last accessed at `recorded_ms`.
    pub(super) fn note(&self, encoded: &[u8], recorded_ms: u64) {
        let now = now_ms();
        if now.saturating_sub(recorded_ms) < TOUCH_RESOLUTION_MS {
            return;
        }
        let mut pending = self.0.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(encoded.to_vec(), now);
    }

    fn take(&self) -> HashMap<Vec<u8>, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Store {
    /// Makes room for `bytes` more, evicting if needed; `credit` is what the write gives back
    /// when it lands (the version it overwrites, the parts it assembles), counted already. Fails
    /// with [`StoreError::InsufficientStorage`] when eviction cannot free enough.
    pub(super) async fn reserve(&self, bytes: u64, credit: u64) -> Result<Reservation, StoreError> {
        let capacity = self.inner.options.capacity;
        let needed = bytes.saturating_sub(credit);
        if needed > capacity {
            return Err(StoreError::InsufficientStorage);
        }
        // A pass that frees nothing may have been beaten to it by a concurrent one: look once
        // more before giving up.
        let mut stalled = false;
        loop {
            let target = {
                let mut accounting = self.accounting();
                let counted = accounting.counted();
                if counted + needed <= capacity {
                    accounting.reserved += bytes;
                    return Ok(Reservation {
                        store: self.clone(),
                        bytes,
                    });
                }
                // Published artifacts are all eviction can shrink: how far they must go, and
                // the low watermark below that so that eviction runs in batches, not per write.
                let excess = counted + needed - capacity;
                let others = counted - accounting.usage.bytes;
                accounting
                    .usage
                    .bytes
                    .saturating_sub(excess)
                    .min(self.inner.options.low_watermark.saturating_sub(others))
            };
            let freed = self.evict_until(target).await?;
            if freed == 0 {
                if stalled {
                    // Nothing left to evict: the rest is staged or reserved by writes in flight.
                    return Err(StoreError::InsufficientStorage);
                }
                stalled = true;
            } else {
                stalled = false;
            }
        }
    }

    /// Evicts least-recently-accessed artifacts until committed usage is at most `target`.
    /// Returns how many bytes it freed.
    pub(super) async fn evict_until(&self, target: u64) -> Result<u64, StoreError> {
        let _one_at_a_time = self.inner.evicting.lock().await;
        self.flush_touches().await?;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.evict_blocking(target))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    fn evict_blocking(&self, target: u64) -> Result<u64, StoreError> {
        let mut freed = 0;
        loop {
            let mut usage = self.accounting().usage.bytes;
            if usage <= target {
                return Ok(freed);
            }
            // The oldest entries, read without locks; each is decided on again below, under the
            // lock of its key, against the record as it is then.
            let mut entries = Vec::new();
            let oldest = self
                .inner
                .db
                .iterator_cf(self.cf(meta::CF_ACCESS), rocksdb::IteratorMode::Start);
            for item in oldest.take(EVICT_BATCH) {
                entries.push(item?.0);
            }
            if entries.is_empty() {
                return Ok(freed);
            }
            let keys = self.inner.keys.lock_all(
                entries
                    .iter()
                    .filter_map(|entry| meta::split_access_key(entry).map(|(_, key)| key)),
            );
            let mut batch = WriteBatch::default();
            let mut delta = UsageDelta::default();
            let mut bodies = Vec::new();
            for access_key in &entries {
                let Some((accessed_ms, encoded)) = meta::split_access_key(access_key) else {
                    batch.delete_cf(self.cf(meta::CF_ACCESS), access_key);
                    continue;
                };
                match self.record(encoded)? {
                    Some(record) if record.accessed_ms == accessed_ms => {
                        self.batch_remove(&mut batch, encoded, &record, &mut delta);
                        let charge = record.charge(encoded.len());
                        freed += charge;
                        usage = usage.saturating_sub(charge);
                        bodies.push(self.doom(record.body));
                    }
                    // A stale queue entry (its artifact was rewritten or touched since).
                    _ => batch.delete_cf(self.cf(meta::CF_ACCESS), access_key),
                }
                if usage <= target {
                    break;
                }
            }
            self.write_accounted(batch, delta)?;
            drop(keys);
            metrics::counter!(crate::metrics::STORAGE_EVICTIONS_TOTAL)
                .increment(bodies.len() as u64);
            for body in bodies {
                self.remove_doomed(body);
            }
        }
    }

    /// Writes the accesses noted by reads into records and the eviction queue.
    pub(super) async fn flush_touches(&self) -> Result<(), StoreError> {
        let touches = self.inner.touches.take();
        if touches.is_empty() {
            return Ok(());
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let touches: Vec<(Vec<u8>, u64)> = touches.into_iter().collect();
            for chunk in touches.chunks(TOUCH_BATCH) {
                store.flush_touch_batch(chunk)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// Rewrites the records of one batch of touched keys under their locks, so a publish of one
    /// of them meanwhile is never overwritten by the older record.
    fn flush_touch_batch(&self, touches: &[(Vec<u8>, u64)]) -> Result<(), StoreError> {
        let _keys = self
            .inner
            .keys
            .lock_all(touches.iter().map(|(k, _)| k.as_slice()));
        let mut batch = WriteBatch::default();
        for (encoded, accessed_ms) in touches {
            let Some(mut record) = self.record(encoded)? else {
                continue;
            };
            if record.accessed_ms >= *accessed_ms {
                continue;
            }
            batch.delete_cf(
                self.cf(meta::CF_ACCESS),
                meta::access_key(record.accessed_ms, encoded),
            );
            record.accessed_ms = *accessed_ms;
            batch.put_cf(
                self.cf(meta::CF_ACCESS),
                meta::access_key(*accessed_ms, encoded),
                [],
            );
            batch.put_cf(
                self.cf(meta::CF_ARTIFACTS),
                encoded,
                meta::encode::<ArtifactRecord>(&record),
            );
        }
        // Not synced even in `fsync` durability: an access time lost to a power cut only makes
        // eviction a little less exact, and the next synced write carries this one to disk.
        self.write_synced(batch, false)
    }
}
