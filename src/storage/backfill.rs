//! Rebuilding a family derived from the records (the body index, `presence`) for a data dir
//! written before that family existed: one walk over `artifacts`, a batch of keys at a time.

use rocksdb::WriteBatch;

use super::{Store, StoreError, meta};

impl Store {
    /// Calls `derive` on every record (encoded key, stored value) with a batch to put the
    /// derived entries in, `batch_len` records per batch. Each batch is read and written under
    /// its keys' locks, so no record is replaced or removed between being read and its derived
    /// entries landing (a publish or removal after the lock is released writes or deletes
    /// them itself). Blocking.
    ///
    /// The batches are written unsynced: the caller's synced write of its "done" flag syncs the
    /// log up to them, and a crash before it only means the next start walks again. The walk
    /// reads every record, inline bodies included, so it stays out of the block cache, which
    /// holds what the node is serving.
    pub(super) fn derive_from_records(
        &self,
        batch_len: usize,
        mut derive: impl FnMut(&[u8], &[u8], &mut WriteBatch),
    ) -> Result<(), StoreError> {
        let off_cache = || {
            let mut options = rocksdb::ReadOptions::default();
            options.fill_cache(false);
            options
        };
        let point_reads = off_cache();
        let mut from: Vec<u8> = Vec::new();
        loop {
            let iter = self.inner.db.iterator_cf_opt(
                self.cf(meta::CF_ARTIFACTS),
                off_cache(),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            let keys = iter
                .take(batch_len)
                .map(|item| item.map(|(key, _)| key))
                .collect::<Result<Vec<_>, _>>()?;
            let Some(last) = keys.last().cloned() else {
                return Ok(());
            };
            let guards = self.inner.keys.lock_all(keys.iter().map(|k| &k[..]));
            let mut batch = WriteBatch::default();
            for key in &keys {
                // Read again under the lock: the scan's value may be gone or replaced by now.
                let value = self.inner.db.get_pinned_cf_opt(
                    self.cf(meta::CF_ARTIFACTS),
                    key,
                    &point_reads,
                )?;
                if let Some(value) = value {
                    derive(key, &value, &mut batch);
                }
            }
            self.write_synced(batch, false)?;
            drop(guards);
            from = last.into_vec();
            from.push(0);
        }
    }
}
