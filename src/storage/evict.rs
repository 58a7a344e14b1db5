//! Capacity: reserving room for writes, least-recently-accessed eviction, and access tracking.
//!
//! Reads do not write to RocksDB. They note the access in memory ([`PendingTouches`]); a
//! background pass (and every eviction pass, first) moves those notes into the `atime` column
//! family and the `access` family, which is the eviction queue ordered oldest first. A record
//! is never rewritten for an access, and an artifact's access time moves at most once per
//! `storage.access_time_resolution`, so a hot key costs one small write per interval.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rocksdb::WriteBatch;

use super::meta::{self, UsageDelta};
use super::{Reservation, Store, StoreError, now_ms};

/// Default of `storage.access_time_resolution`.
pub const DEFAULT_ACCESS_TIME_RESOLUTION: Duration = Duration::from_secs(60);
/// Artifacts examined per eviction batch.
const EVICT_BATCH: usize = 256;
/// Access times written per flush batch: a few hundred keys, so that most key-lock stripes stay
/// free for publishes meanwhile.
pub(super) const TOUCH_BATCH: usize = 256;
/// Independent maps of pending accesses, so concurrent readers rarely share a lock.
const TOUCH_SHARDS: usize = 16;

#[cfg(test)]
thread_local! {
    /// Test hook: how many flush batches succeed on this thread before one fails.
    pub(super) static FAIL_TOUCH_BATCH_AFTER: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

/// Accesses noted since the last flush: encoded key → access time, in shards chosen by a hash
/// of the key.
#[derive(Default)]
pub(super) struct PendingTouches {
    shards: [Mutex<HashMap<Vec<u8>, u64>>; TOUCH_SHARDS],
    hasher: RandomState,
}

/// Sets a pending access time, allocating the key only when it is not pending yet.
fn upsert(pending: &mut HashMap<Vec<u8>, u64>, encoded: &[u8], now: u64) {
    match pending.get_mut(encoded) {
        Some(time) => *time = now,
        None => {
            pending.insert(encoded.to_vec(), now);
        }
    }
}

impl PendingTouches {
    /// Notes an access now of the artifact under `encoded` whose record was published at
    /// `published_ms`. Accesses within `resolution` of the publish are not worth noting.
    pub(super) fn note(&self, encoded: &[u8], published_ms: u64, resolution: u64) {
        let now = now_ms();
        if now.saturating_sub(published_ms) >= resolution {
            self.note_at(encoded, now);
        }
    }

    /// Notes an access at `now` of the artifact under `encoded`, which the caller found worth
    /// noting (`hot::ReadRecord::note_due` on the read path). A key already pending costs a
    /// lookup, not an allocation.
    pub(super) fn note_at(&self, encoded: &[u8], now: u64) {
        upsert(&mut self.lock(self.shard_of(encoded)), encoded, now);
    }

    /// The shard that holds `encoded`'s pending access.
    fn shard_of(&self, encoded: &[u8]) -> usize {
        self.hasher.hash_one(encoded) as usize % TOUCH_SHARDS
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, HashMap<Vec<u8>, u64>> {
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`PendingTouches::note`] of many artifacts (encoded key, when an access of it was last
    /// noted, or its publish) at once, skipping those noted within `resolution`: one clock read,
    /// and each shard locked once rather than once per key.
    pub(super) fn note_all(&self, accessed: Vec<(&[u8], u64)>, resolution: u64) {
        let now = now_ms();
        let mut by_shard: Vec<(usize, &[u8])> = accessed
            .into_iter()
            .filter(|(_, published_ms)| now.saturating_sub(*published_ms) >= resolution)
            .map(|(encoded, _)| (self.shard_of(encoded), encoded))
            .collect();
        by_shard.sort_unstable_by_key(|(shard, _)| *shard);
        for group in by_shard.chunk_by(|a, b| a.0 == b.0) {
            let mut pending = self.lock(group[0].0);
            for (_, encoded) in group {
                upsert(&mut pending, encoded, now);
            }
        }
    }

    /// Puts back notes a flush took but could not write, unless a newer note of the same key
    /// came meanwhile: a lost note would leave the artifact's access time old, and the presence
    /// map would not note it again for a resolution, so eviction could take a blob just
    /// vouched for.
    fn restore(&self, touches: impl IntoIterator<Item = (Vec<u8>, u64)>) {
        for (encoded, accessed_ms) in touches {
            let mut pending = self.lock(self.shard_of(&encoded));
            let time = pending.entry(encoded).or_insert(accessed_ms);
            *time = (*time).max(accessed_ms);
        }
    }

    /// The access time pending for `encoded`, if any.
    #[cfg(test)]
    pub(super) fn pending(&self, encoded: &[u8]) -> Option<u64> {
        self.lock(self.shard_of(encoded)).get(encoded).copied()
    }

    /// Whether no access waits for a flush.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.shards
            .iter()
            .all(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()).is_empty())
    }

    pub(super) fn take(&self) -> Vec<(Vec<u8>, u64)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(|p| p.into_inner()));
            all.extend(taken);
        }
        all
    }
}

/// How an eviction pass, or one batch of it, ended.
pub(super) struct Evicted {
    /// Bytes of published artifacts it removed.
    pub(super) freed: u64,
    /// The eviction queue was empty: nothing published is left to evict.
    pub(super) ran_dry: bool,
    /// Committed usage is at the target.
    reached: bool,
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
        // Nothing left to evict may only mean that every artifact is a write in flight, about
        // to publish: look once more before giving up.
        let mut stalled = false;
        loop {
            let (target, published) = {
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
                // down to where the background pass starts, so that eviction runs in batches,
                // not per write. The background pass takes it on to the low watermark: this
                // write waits for no more than it must.
                let published = accounting.usage.bytes;
                let excess = counted + needed - capacity;
                let others = counted - published;
                let target = published
                    .saturating_sub(excess)
                    .min(self.eviction_start().saturating_sub(others));
                (target, published)
            };
            // Nothing published to shrink (all of it is staged or reserved), or a queue that
            // ran out. A pass that freed nothing because another one (the background pass,
            // say) got there first is no reason to give up: the room is looked at again.
            let ran_dry = published <= target || self.evict_until(target).await?.ran_dry;
            if ran_dry {
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
    ///
    /// Each batch takes the `evicting` lock on its own: a write that must make room while the
    /// background pass runs waits for one batch of it, not for all of it. A pass frees at most
    /// what was over `target` when it began, so writes that keep pace with it do not keep it
    /// (and the maintenance task that runs it) going: the next pass sees them.
    pub(super) async fn evict_until(&self, target: u64) -> Result<Evicted, StoreError> {
        let most = self.accounting().usage.bytes.saturating_sub(target);
        let mut freed = 0;
        loop {
            let batch = self
                .one_pass_at_a_time(move |store| {
                    store.flush_touches()?;
                    store.evict_batch(target)
                })
                .await?;
            freed += batch.freed;
            if batch.reached || batch.ran_dry || freed >= most {
                return Ok(Evicted { freed, ..batch });
            }
        }
    }

    /// Runs `pass` (one batch of an eviction pass, or a flush of recorded reads) off the async
    /// workers under the `evicting` lock. The lock travels with it: a caller that stops waiting
    /// (its client gone, a peer's push timed out) leaves it running and still holding the lock,
    /// so that no other can start beside it; the batches that caller would have run after it
    /// are not run.
    pub(super) async fn one_pass_at_a_time<T: Send + 'static>(
        &self,
        pass: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let one_at_a_time = self.inner.evicting.clone().lock_owned().await;
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let _one_at_a_time = one_at_a_time;
            pass(&store)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// Evicts from the head of the queue, one batch of it at most, until committed usage is at
    /// most `target`.
    fn evict_batch(&self, target: u64) -> Result<Evicted, StoreError> {
        let mut freed = 0;
        let mut usage = self.accounting().usage.bytes;
        if usage <= target {
            return Ok(Evicted {
                freed,
                ran_dry: false,
                reached: true,
            });
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
            return Ok(Evicted {
                freed,
                ran_dry: true,
                reached: false,
            });
        }
        let keys = self.inner.keys.lock_all(
            entries
                .iter()
                .filter_map(|entry| meta::split_access_key(entry).map(|(_, key)| key)),
        );
        let mut batch = WriteBatch::default();
        let mut delta = UsageDelta::default();
        let mut bodies = Vec::new();
        // Only these leave the set of hot records: a stale queue entry names an artifact
        // read since, which is just what the set should keep.
        let mut removed = Vec::new();
        for access_key in &entries {
            let Some((accessed_ms, encoded)) = meta::split_access_key(access_key) else {
                batch.delete_cf(self.cf(meta::CF_ACCESS), access_key);
                continue;
            };
            let current = match self.record(encoded) {
                Ok(Some(record)) => {
                    let last = self.last_access(encoded, record.accessed_ms)?;
                    Some(record).filter(|_| last == accessed_ms)
                }
                Ok(None) => None,
                // The least recently used key is the one nobody reads, so no read would
                // ever forget it: eviction does, or every pass would stop at it for good.
                Err(StoreError::Db(error)) if super::is_damage(&error) => {
                    self.forget_damaged_record_locked(encoded, &error);
                    None
                }
                Err(error) => return Err(error),
            };
            match current {
                Some(record) => {
                    self.batch_remove(&mut batch, encoded, &record, &mut delta)?;
                    let charge = record.charge(encoded.len());
                    freed += charge;
                    usage = usage.saturating_sub(charge);
                    bodies.push(self.doom(record.body));
                    removed.push(encoded);
                }
                // A stale queue entry (its artifact was rewritten or touched since).
                None => batch.delete_cf(self.cf(meta::CF_ACCESS), access_key),
            }
            if usage <= target {
                break;
            }
        }
        self.write_accounted(batch, delta, removed.into_iter().map(|key| (key, None)))?;
        drop(keys);
        metrics::counter!(crate::metrics::STORAGE_EVICTIONS_TOTAL).increment(bodies.len() as u64);
        for body in bodies {
            self.remove_doomed(body);
        }
        Ok(Evicted {
            freed,
            ran_dry: false,
            reached: usage <= target,
        })
    }

    /// Writes the accesses noted by reads into `atime` and the eviction queue. The caller holds
    /// the `evicting` lock: an eviction pass between this flush taking the notes and writing
    /// them would read a queue without them, and could evict an artifact just read or vouched
    /// for by an existence check.
    fn flush_touches(&self) -> Result<(), StoreError> {
        let touches = self.inner.touches.take();
        if touches.is_empty() {
            return Ok(());
        }
        self.flush_touches_blocking(touches)
    }

    /// Writes `touches` batch by batch; what a failed batch and those after it did not write is
    /// put back for the next flush.
    pub(super) fn flush_touches_blocking(
        &self,
        touches: Vec<(Vec<u8>, u64)>,
    ) -> Result<(), StoreError> {
        let mut written = 0;
        let outcome = touches.chunks(TOUCH_BATCH).try_for_each(|chunk| {
            self.flush_touch_batch(chunk)?;
            written += chunk.len();
            Ok(())
        });
        if outcome.is_err() {
            self.inner
                .touches
                .restore(touches.into_iter().skip(written));
        }
        outcome
    }

    /// [`Store::flush_touches`] under the `evicting` lock, as a periodic pass runs it.
    pub(super) async fn flush_touches_between_evictions(&self) -> Result<(), StoreError> {
        self.one_pass_at_a_time(Store::flush_touches).await
    }

    /// Moves the queue entries of one batch of touched keys, under their locks, so that a
    /// publish or removal meanwhile always finds the entry it must delete.
    fn flush_touch_batch(&self, touches: &[(Vec<u8>, u64)]) -> Result<(), StoreError> {
        #[cfg(test)]
        if let Some(left) = FAIL_TOUCH_BATCH_AFTER.get() {
            FAIL_TOUCH_BATCH_AFTER.set(left.checked_sub(1));
            if left == 0 {
                return Err(StoreError::Io(std::io::Error::other(
                    "injected flush failure",
                )));
            }
        }
        let _keys = self
            .inner
            .keys
            .lock_all(touches.iter().map(|(k, _)| k.as_slice()));
        let resolution = self.access_resolution_ms();
        let mut batch = WriteBatch::default();
        for (encoded, accessed_ms) in touches {
            let published_ms = match self.published_ms(encoded) {
                Ok(Some(published_ms)) => published_ms,
                Ok(None) => continue,
                // An access noted without reading the record (an existence check answered from
                // memory) can name a key in a damaged block. Forgotten, as a read or eviction
                // forgets it; kept, it would fail every flush, and so every eviction pass.
                Err(StoreError::Db(error)) if super::is_damage(&error) => {
                    self.forget_damaged_record_locked(encoded, &error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let last = self.last_access(encoded, published_ms)?;
            // Not newer (noted before a rewrite of the key) or not enough newer to be worth it.
            if *accessed_ms <= last || accessed_ms - last < resolution {
                continue;
            }
            batch.delete_cf(self.cf(meta::CF_ACCESS), meta::access_key(last, encoded));
            batch.put_cf(
                self.cf(meta::CF_ACCESS),
                meta::access_key(*accessed_ms, encoded),
                [],
            );
            batch.put_cf(
                self.cf(meta::CF_ATIME),
                encoded,
                meta::encode_time(*accessed_ms),
            );
        }
        // Not synced even in `fsync` durability: an access time lost to a power cut only makes
        // eviction a little less exact, and the next synced write carries this one to disk.
        self.write_synced(batch, false)
    }

    pub(super) fn access_resolution_ms(&self) -> u64 {
        self.inner.options.access_time_resolution.as_millis() as u64
    }
}
