//! The orphan sweep: files no record references, left by a crash, are found and deleted.
//!
//! A body file is renamed into `bodies/` just before the batch that publishes its record; a
//! crash in between leaves a file nobody references. The `bodies` column family indexes every
//! file body (id → key), written and deleted in the same batches as the records, so "referenced"
//! is one point lookup rather than a scan of every record. A file in `bodies/` is deleted when:
//! - it is older (by mtime) than the grace period,
//! - its id is not live (see [`super::bodies::LiveBodies`]: being written, published or removed
//!   by this process), checked before the index *and* after it, and
//! - the index has no entry for it, or its entry names a key that has no record any more or
//!   whose record names another body (see [`Store::remove_if_forgotten`]).
//!
//! Why a publish is never raced: the file exists in `bodies/` only after the rename, and its id
//! was made live before its temp file was created. So when the sweep finds the file and then
//! finds the id not live, the publish has finished: either its batch (and index entry) was
//! written before the id was released, which the index lookup that follows sees, or it failed.
//! A publish refused before its batch deletes the file itself; one whose batch failed to write
//! keeps its id live until the process exits, since RocksDB may replay that batch at the next
//! start (a sweep after it finds the file indexed and keeps it, or deletes it if not). The
//! grace period is a second guard, not the first.
//!
//! Why a removal is not counted as an orphan: a batch that drops a record holds its body's id
//! live from before the batch (which deletes the index entry) until the file is deleted. So if
//! the index lookup found no entry because of that batch, the second live check either sees the
//! id held (and skips) or sees it released, when the file is gone already and deleting it finds
//! nothing to count.
//!
//! The sweep also deletes stale files in `tmp/` (not live, older than the grace period) and, under
//! the uploads lock, `.partial` leftovers and directories of uploads that have no record.
//!
//! Data dirs written before the index existed are backfilled from `artifacts` first (once; a
//! flag in `state` records it). Until the flag is set, nothing in `bodies/` is deleted.

use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rocksdb::WriteBatch;

use super::meta::{self, ArtifactRecord, BodyRef, UsageDelta};
use super::{Store, StoreError, bodies, is_damage};

/// Records re-read per backfill batch.
const BACKFILL_BATCH: usize = 512;

/// What one sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Body files no record referenced.
    pub bodies: u64,
    /// Stale temp files.
    pub temps: u64,
    /// `.partial` part files and upload directories without a record.
    pub uploads: u64,
}

impl SweepReport {
    pub fn total(&self) -> u64 {
        self.bodies + self.temps + self.uploads
    }
}

impl Store {
    /// Deletes the files no record references that are older than `grace`, and counts them in
    /// `kura_storage_orphans_removed_total`. Blocking: run it on a blocking thread.
    pub fn sweep_orphans(&self, grace: Duration) -> Result<SweepReport, StoreError> {
        self.backfill_body_index()?;
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let report = SweepReport {
            bodies: self.sweep_bodies(cutoff)?,
            temps: self.sweep_temps(cutoff)?,
            uploads: self.sweep_upload_leftovers(cutoff)?,
        };
        metrics::counter!(crate::metrics::STORAGE_ORPHANS_REMOVED_TOTAL).increment(report.total());
        Ok(report)
    }

    /// Indexes every file body of records written before the index existed, once.
    fn backfill_body_index(&self) -> Result<(), StoreError> {
        let state = self.cf(meta::CF_STATE);
        if self
            .get(meta::CF_STATE, meta::BODIES_INDEXED_KEY)?
            .is_some()
        {
            return Ok(());
        }
        let mut indexed = 0u64;
        self.derive_from_records(BACKFILL_BATCH, |key, value, batch| {
            if let Some(ArtifactRecord {
                body: BodyRef::File(id),
                ..
            }) = meta::decode(value)
            {
                batch.put_cf(self.cf(meta::CF_BODIES), meta::body_index_key(id), key);
                indexed += 1;
            }
        })?;
        let mut batch = WriteBatch::default();
        batch.put_cf(state, meta::BODIES_INDEXED_KEY, []);
        self.write_synced(batch, true)?;
        tracing::info!(indexed, "indexed the body files of existing artifacts");
        Ok(())
    }

    fn sweep_bodies(&self, cutoff: SystemTime) -> Result<u64, StoreError> {
        let mut removed = 0;
        for shard in std::fs::read_dir(&self.inner.bodies_dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(shard.path())? {
                let entry = entry?;
                let Some(id) = entry.file_name().to_str().and_then(bodies::body_id) else {
                    continue;
                };
                // The order matters (module docs): live, the index, live again.
                if !older_than(&entry.path(), cutoff)? || self.inner.live_bodies.contains(id) {
                    continue;
                }
                let indexed = match self.get(meta::CF_BODIES, meta::body_index_key(id)) {
                    Ok(indexed) => indexed,
                    Err(error) if is_damage(&error) => {
                        // Whether a record references it cannot be told: the file stays.
                        tracing::error!(id = %format!("{id:032x}"), %error, "the body index entry of a file is in a damaged block; keeping the file");
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                };
                if self.inner.live_bodies.contains(id) {
                    continue;
                }
                let gone = match indexed {
                    None => remove_file(&entry.path())?,
                    Some(key) => self.remove_if_forgotten(id, &key, &entry.path())?,
                };
                if gone {
                    tracing::warn!(id = %format!("{id:032x}"), "removed a body file no record references");
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Deletes the body file `id`, which the index says belongs to `key`, if there is no record
    /// of `key` any more or it names another body. Publishes and removals move a record and its
    /// index entry in one batch, so the two disagree only when a record was deleted without
    /// its body being known: forgotten because RocksDB found its block damaged
    /// (`Store::forget_damaged_record`), or undecodable and removed by a clean. The file's id
    /// was in the lost bytes, so the index entry and the file stayed behind. This drops both;
    /// a crash between the batch and the file's removal leaves a file without an index entry,
    /// which the next sweep deletes.
    fn remove_if_forgotten(&self, id: u128, key: &[u8], path: &Path) -> Result<bool, StoreError> {
        match self.claim(key, id) {
            Ok(FileClaim::Unclaimed) => {}
            Ok(FileClaim::Claimed | FileClaim::Undecodable) => return Ok(false),
            Err(error) if is_damage(&error) => {
                // Nobody read the damaged record since it was damaged: forget it now.
                self.forget_damaged_record(key, &error);
            }
            Err(error) => return Err(error.into()),
        }
        // Again under the key's lock, where no publish of the key can move its record; any
        // doubt keeps the file.
        let _key = self.inner.keys.lock(key);
        let still_indexed = match self.get(meta::CF_BODIES, meta::body_index_key(id)) {
            Ok(indexed) => indexed.is_some_and(|indexed| *indexed == *key),
            Err(error) if is_damage(&error) => false,
            Err(error) => return Err(error.into()),
        };
        let unclaimed = match self.claim(key, id) {
            Ok(claim) => matches!(claim, FileClaim::Unclaimed),
            Err(error) if is_damage(&error) => false,
            Err(error) => return Err(error.into()),
        };
        if !still_indexed || !unclaimed {
            return Ok(false);
        }
        let size = match std::fs::symlink_metadata(path) {
            Ok(metadata) => metadata.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(meta::CF_BODIES), meta::body_index_key(id));
        // Forgetting a record took its charge off but left the size of a file body counted. It
        // told a file from an inline body by `storage.inline_max`, as this does, so the size is
        // never taken off twice (a body filed under a smaller limit stays counted: high, not
        // low).
        let counted = if size > self.inner.options.inline_max as u64 {
            size
        } else {
            0
        };
        let delta = UsageDelta {
            bytes: -(counted.min(i64::MAX as u64) as i64),
            artifacts: 0,
        };
        // No record changes: the file's record was gone or named another body.
        self.write_accounted(batch, delta, [])?;
        remove_file(path)
    }

    /// What the record of `key` says of the body file `id`.
    fn claim(&self, key: &[u8], id: u128) -> Result<FileClaim, rocksdb::Error> {
        Ok(match self.get(meta::CF_ARTIFACTS, key)? {
            None => FileClaim::Unclaimed,
            Some(value) => match meta::decode::<ArtifactRecord>(&value) {
                Some(record) if record.body == BodyRef::File(id) => FileClaim::Claimed,
                Some(_) => FileClaim::Unclaimed,
                None => FileClaim::Undecodable,
            },
        })
    }

    fn sweep_temps(&self, cutoff: SystemTime) -> Result<u64, StoreError> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.inner.tmp_dir)? {
            let entry = entry?;
            let live = entry
                .file_name()
                .to_str()
                .and_then(bodies::temp_id)
                .is_some_and(|id| self.inner.live_bodies.contains(id));
            if !live && older_than(&entry.path(), cutoff)? && remove_file(&entry.path())? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// What a key's record says of a body file the index assigns to it.
enum FileClaim {
    /// The record names the file.
    Claimed,
    /// There is no record, or it names another body.
    Unclaimed,
    /// A record this binary cannot decode (written by a newer one, say): it may name the file.
    Undecodable,
}

/// Whether the file was last modified before `cutoff` (a file gone meanwhile is not).
pub(super) fn older_than(path: &Path, cutoff: SystemTime) -> Result<bool, StoreError> {
    match std::fs::symlink_metadata(path).and_then(|m| m.modified()) {
        Ok(modified) => Ok(modified <= cutoff),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a file; `false` when it was already gone.
pub(super) fn remove_file(path: &Path) -> Result<bool, StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}
