//! Project clean: one decision at one instant.
//!
//! A clean first writes a tombstone `project → t` into the `state` column family, where `t` is
//! the clean's time. From that batch on, every record of the project with `version_ms <= t` is
//! dead: reads miss it, and a write that replaces it counts as new. Every write published after
//! the tombstone is stamped with a `version_ms` after `t` (see `publish_record`), so what was
//! written before the clean is gone and what came after stays, whatever the deletion batches
//! below meet on their way. The tombstone is kept: the mesh will carry it, so that a peer's older
//! copy cannot bring an artifact back.
//!
//! Why this holds without a global write lock: a publish holds `publish_order` shared from the
//! moment it reads its project's tombstone until its batch is written, and the tombstone is
//! written (and mirrored in memory) under `publish_order` held exclusively. So each publish
//! either wrote its batch before the tombstone was taken — and a local clean's `t` is at least
//! the highest `version_ms` ever published in the project (the store keeps that mark, up to an
//! hour ahead of the clock: [`CLEAN_AHEAD_MAX_MS`]), so it is `<= t` and the clean removes it,
//! even when a peer's fast clock or a local write raised past such a version stamped it ahead
//! of this node's clock — or read the new tombstone and was stamped after `t`. The deletion batches lock the stripes of the keys they delete and
//! read each record again under them, so a publish racing a batch is either deleted whole
//! (older) or kept whole (newer), never half of each.

use std::collections::HashMap;
use std::sync::RwLock;

use rocksdb::{DB, WriteBatch};

use super::meta::{self, ArtifactRecord, UsageDelta};
use super::outbox::LogRecord;
use super::{Store, StoreError, keys, now_ms};

/// Prefix of tombstone keys in the `state` column family (followed by the project).
const TOMBSTONE_PREFIX: &[u8] = b"tombstone\0";
/// Prefix of the marks of cleans whose deletions have not finished (followed by the project):
/// written with the tombstone, removed once every older record is gone, so a clean cut short
/// by a crash or an I/O error is finished at the next start.
const UNFINISHED_PREFIX: &[u8] = b"clean-unfinished\0";
/// How far ahead of the clock a local clean may be dated to pass the versions it removes.
const CLEAN_AHEAD_MAX_MS: u64 = 60 * 60 * 1000;
/// Records examined per deletion batch.
const CLEAN_BATCH: usize = 512;

/// The time of each project's last clean, mirrored from the `state` column family.
pub(super) struct Tombstones(RwLock<HashMap<String, u64>>);

impl Tombstones {
    pub(super) fn load(db: &DB) -> Result<Tombstones, StoreError> {
        let mut map = HashMap::new();
        let state = super::cf(db, meta::CF_STATE);
        let iter = db.iterator_cf(
            state,
            rocksdb::IteratorMode::From(TOMBSTONE_PREFIX, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            let Some(project) = key.strip_prefix(TOMBSTONE_PREFIX) else {
                break;
            };
            if let (Ok(project), Some(at)) = (std::str::from_utf8(project), meta::decode(&value)) {
                map.insert(project.to_owned(), at);
            }
        }
        Ok(Tombstones(RwLock::new(map)))
    }

    /// When `project` was last cleaned.
    pub(super) fn of(&self, project: &str) -> Option<u64> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(project).copied()
    }

    /// Whether a record of `project` written at `version_ms` is gone by a clean.
    pub(super) fn hides(&self, project: &str, version_ms: u64) -> bool {
        self.of(project).is_some_and(|at| version_ms <= at)
    }

    /// Every project's last clean.
    pub(super) fn all(&self) -> Vec<(String, u64)> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(project, at)| (project.clone(), *at))
            .collect()
    }

    fn set(&self, project: &str, at: u64) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.insert(project.to_owned(), at);
    }
}

impl Store {
    /// Deletes every artifact of `project` written before now; returns how many went. The clean
    /// is logged for the mesh (see `outbox.rs`).
    pub async fn delete_project(&self, project: &str) -> Result<u64, StoreError> {
        self.clean(project, None).await
    }

    /// Applies a clean of `project` made on another node at `at`: what this node holds of the
    /// project from before `at` goes, and older versions arriving later are ignored. Not logged
    /// (the origin sends its own clean to every node).
    pub async fn apply_remote_clean(&self, project: &str, at: u64) -> Result<u64, StoreError> {
        // One this node holds already, or an older one: what it removes goes with the clean
        // held, and the tombstone hides it meanwhile. Every bootstrap and catch-up pass hands
        // each peer's cleans over again, and applying one anew would hold every publish for its
        // batch and rescan the project. Only the held clean's deletions are finished if they
        // failed (its mark is still there): the retry of the clean that failed comes here.
        if self.inner.tombstones.hides(project, at) {
            let store = self.clone();
            let project = project.to_owned();
            return tokio::task::spawn_blocking(move || {
                match store.unfinished_clean(&project)? {
                    Some(held) => store.finish_clean(&project, held),
                    None => Ok(0),
                }
            })
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        }
        self.clean(project, Some(at)).await
    }

    async fn clean(&self, project: &str, remote_at: Option<u64>) -> Result<u64, StoreError> {
        let store = self.clone();
        let project = project.to_owned();
        tokio::task::spawn_blocking(move || {
            let at = store.write_tombstone(&project, remote_at)?;
            store.finish_clean(&project, at)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// The time of `project`'s clean whose deletions have not all been made, if any.
    pub(super) fn unfinished_clean(&self, project: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .get(meta::CF_STATE, unfinished_key(project))?
            .as_deref()
            .and_then(meta::decode::<u64>))
    }

    /// Deletes what a clean of `project` at `at` left, then drops its unfinished mark.
    fn finish_clean(&self, project: &str, at: u64) -> Result<u64, StoreError> {
        let removed = self.delete_older(&keys::project_prefix(project), at)?;
        // A later clean of the project may have marked itself meanwhile: its mark stays until
        // its own deletions are done (tombstones are written under `publish_order` held
        // exclusively, so none lands between this read and this delete).
        let _order = self
            .inner
            .publish_order
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mark = self.get(meta::CF_STATE, unfinished_key(project))?;
        if mark.as_deref().and_then(meta::decode::<u64>) == Some(at) {
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(meta::CF_STATE), unfinished_key(project));
            self.write(batch)?;
        }
        Ok(removed)
    }

    /// Finishes the cleans that a crash or an error cut short (their tombstones were written,
    /// not all their deletions); returns how many records went. Run once at start, in the
    /// background: the tombstones already hide those records meanwhile.
    pub async fn finish_unfinished_cleans(&self) -> Result<u64, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut unfinished = Vec::new();
            let iter = store.inner.db.iterator_cf(
                store.cf(meta::CF_STATE),
                rocksdb::IteratorMode::From(UNFINISHED_PREFIX, rocksdb::Direction::Forward),
            );
            for item in iter {
                let (key, value) = item?;
                let Some(project) = key.strip_prefix(UNFINISHED_PREFIX) else {
                    break;
                };
                if let (Ok(project), Some(at)) =
                    (std::str::from_utf8(project), meta::decode::<u64>(&value))
                {
                    unfinished.push((project.to_owned(), at));
                }
            }
            let mut removed = 0;
            for (project, at) in unfinished {
                removed += store.finish_clean(&project, at)?;
            }
            Ok(removed)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// The instant of the clean (now, or a remote clean's time): durable, and ordered with
    /// publishes by `publish_order`. A local clean's batch carries its replication log record.
    pub(super) fn write_tombstone(
        &self,
        project: &str,
        remote_at: Option<u64>,
    ) -> Result<u64, StoreError> {
        let _order = self
            .inner
            .publish_order
            .write()
            .unwrap_or_else(|p| p.into_inner());
        // Never earlier than a previous clean of the project, even if the clock stepped back.
        let previous = self.inner.tombstones.of(project).unwrap_or(0);
        let at = match remote_at {
            Some(at) => at,
            None => self.local_clean_time(project)?,
        }
        .max(previous);
        let mut key = TOMBSTONE_PREFIX.to_vec();
        key.extend_from_slice(project.as_bytes());
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(meta::CF_STATE), key, meta::encode(&at));
        batch.put_cf(
            self.cf(meta::CF_STATE),
            unfinished_key(project),
            meta::encode(&at),
        );
        let logged = remote_at.is_none() && self.logs_replication();
        let ticket = self.inner.sequencer.take(logged);
        batch.merge_cf(
            self.cf(meta::CF_STATE),
            meta::SEQ_KEY,
            meta::encode_seq(ticket.seq),
        );
        if logged {
            let logged = LogRecord::DeleteProject {
                project: project.to_owned(),
                version_ms: at,
            };
            self.batch_log(&mut batch, ticket.seq, &logged);
        }
        self.write(batch)?;
        self.inner.tombstones.set(project, at);
        Ok(at)
    }

    /// A local clean removes everything published in the project before it: its time is past
    /// every version the project ever had here, including one a peer's fast clock stamped ahead
    /// of ours or a local write raised past such a version (no publish is in flight: the caller
    /// holds `publish_order` exclusively). Up to [`CLEAN_AHEAD_MAX_MS`] ahead of the clock:
    /// a version further ahead (a peer's clock hours off) would otherwise date the clean, and so
    /// every later write of the project, that far into the future.
    fn local_clean_time(&self, project: &str) -> Result<u64, StoreError> {
        let now = now_ms();
        let high = self
            .get(meta::CF_STATE, meta::version_high_key(project))?
            .and_then(|bytes| meta::decode_seq(&bytes))
            .unwrap_or(0);
        let limit = now.saturating_add(CLEAN_AHEAD_MAX_MS);
        if high > limit {
            tracing::warn!(
                project,
                ahead_ms = high - now,
                "a version of this project is stamped far ahead of this node's clock (a peer's clock is off?); the clean is dated at most an hour ahead, and what is newer survives it"
            );
        }
        Ok(now.max(high.min(limit)))
    }

    /// Deletes the records under `prefix` written at or before `at`, in batches.
    fn delete_older(&self, prefix: &[u8], at: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut from = prefix.to_vec();
        loop {
            // Look ahead without locks, then lock the batch's keys and decide on what the
            // records say under them.
            let mut candidates = Vec::new();
            let iter = self.inner.db.iterator_cf(
                self.cf(meta::CF_ARTIFACTS),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            for item in iter.take(CLEAN_BATCH) {
                let (key, _) = item?;
                if !key.starts_with(prefix) {
                    break;
                }
                candidates.push(key);
            }
            let Some(last) = candidates.last().cloned() else {
                return Ok(removed);
            };
            let keys = self.inner.keys.lock_all(candidates.iter().map(|k| &k[..]));
            let mut batch = WriteBatch::default();
            let mut delta = UsageDelta::default();
            let mut bodies = Vec::new();
            let mut forgotten = Vec::new();
            for key in &candidates {
                let Some(value) = self.get(meta::CF_ARTIFACTS, key)? else {
                    continue;
                };
                match meta::decode::<ArtifactRecord>(&value) {
                    Some(record) if record.version_ms <= at => {
                        self.batch_remove(&mut batch, key, &record, &mut delta)?;
                        bodies.push(self.doom(record.body));
                        forgotten.push(&key[..]);
                    }
                    Some(_) => {}
                    // Unreadable: drop it and its access time (its queue entry, if any, is
                    // found stale and deleted by eviction).
                    None => {
                        self.batch_delete_keyed(&mut batch, key);
                        forgotten.push(&key[..]);
                    }
                }
            }
            if !batch.is_empty() {
                self.write_accounted(batch, delta, forgotten.into_iter().map(|key| (key, None)))?;
            }
            drop(keys);
            removed += bodies.len() as u64;
            for body in bodies {
                self.remove_doomed(body);
            }
            // Continue after the last key looked at.
            from = last.into_vec();
            from.push(0);
        }
    }
}

fn unfinished_key(project: &str) -> Vec<u8> {
    let mut key = UNFINISHED_PREFIX.to_vec();
    key.extend_from_slice(project.as_bytes());
    key
}
