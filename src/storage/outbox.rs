//! The replication log: what this node wrote, in publish order, until every peer has it.
//!
//! When the store is opened with `replication_log`, every *local* publish (an artifact written
//! by a client of this node, or a project clean) appends one [`LogRecord`] to the `outbox`
//! family **in the same batch** as the artifact's record, keyed by its sequence number
//! (`seq.rs`). So the log holds a record if and only if the write it describes committed, and a
//! crash between the two cannot happen. Writes received from peers are never logged: the mesh
//! is full, every node sends its own writes to every other node.
//!
//! Each peer has a cursor in the `state` family: the last sequence number it acknowledged.
//! Readers go no further than [`Store::stable_seq`], below which no publish can still commit.
//! [`Store::trim_log`] drops what every live peer has, and the bound (`outbox.max_entries`)
//! drops the oldest records past it. Either raises the log's *floor*: records at or below it may
//! be gone. A peer whose cursor is below the floor (one the bound overtook, or one admitted, or
//! admitted again after it expired, once the log was trimmed without it) has lost records and
//! must catch up from an index instead ([`Store::log_lost`] tells).
//!
//! A record names what changed, not the bytes: the sender reads the artifact's current record
//! and body when it sends, and skips a record whose artifact has since been replaced (a later
//! record covers the new version) or is gone (evicted or cleaned).

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use super::keys::ArtifactKey;
use super::{Store, StoreError, meta};

/// One entry of the replication log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogRecord {
    /// An artifact published on this node: its key (encoded) and the version that was stored.
    Upsert {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        version_ms: u64,
        blake3: [u8; 32],
        size: u64,
    },
    /// A project cleaned on this node at `version_ms`.
    DeleteProject { project: String, version_ms: u64 },
}

impl LogRecord {
    /// The write time the record carries (the age of the oldest pending one is a peer's lag).
    pub fn version_ms(&self) -> u64 {
        match self {
            LogRecord::Upsert { version_ms, .. } | LogRecord::DeleteProject { version_ms, .. } => {
                *version_ms
            }
        }
    }

    /// The artifact an upsert names.
    pub fn artifact(&self) -> Option<ArtifactKey> {
        match self {
            LogRecord::Upsert { key, .. } => ArtifactKey::decode(key),
            LogRecord::DeleteProject { .. } => None,
        }
    }
}

/// A stretch of the log: its records, and the sequence number through which it is complete
/// (a reader that has sent them all has everything up to `upto`, gaps included).
#[derive(Debug)]
pub struct LogSlice {
    pub records: Vec<(u64, LogRecord)>,
    pub upto: u64,
}

/// One artifact as a peer's index lists it: what a bootstrapping node compares with its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// [`ArtifactKey::encode`] of the artifact.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub size: u64,
    pub blake3: [u8; 32],
    pub version_ms: u64,
    pub origin: String,
}

/// Prefix of peer cursors in the `state` family (followed by the peer's node id).
const CURSOR_PREFIX: &[u8] = b"cursor\0";

fn cursor_key(peer: &str) -> Vec<u8> {
    prefixed(CURSOR_PREFIX, peer)
}

/// Prefix of catch-up promises in the `state` family (followed by the writer's node id).
const CATCH_UP_PREFIX: &[u8] = b"catchup\0";

fn prefixed(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

impl Store {
    /// Whether local publishes are logged for the mesh.
    pub(super) fn logs_replication(&self) -> bool {
        self.inner.options.replication_log
    }

    /// Adds `record` under `seq` to a publish's batch.
    pub(super) fn batch_log(&self, batch: &mut WriteBatch, seq: u64, record: &LogRecord) {
        batch.put_cf(
            self.cf(meta::CF_OUTBOX),
            meta::encode_seq(seq),
            meta::encode(record),
        );
    }

    /// Up to `limit` log records after `after`, oldest first, never past [`Store::stable_seq`].
    /// Unreadable records (from a later release) are skipped.
    pub fn log_after(&self, after: u64, limit: usize) -> Result<LogSlice, StoreError> {
        let stable = self.stable_seq();
        let start = meta::encode_seq(after.saturating_add(1));
        let iter = self.inner.db.iterator_cf(
            self.cf(meta::CF_OUTBOX),
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let mut records = Vec::new();
        for item in iter {
            let (key, value) = item?;
            let Some(seq) = meta::decode_seq(&key) else {
                continue;
            };
            if seq > stable || records.len() >= limit {
                break;
            }
            if let Some(record) = meta::decode::<LogRecord>(&value) {
                records.push((seq, record));
            }
        }
        let upto = if records.len() >= limit {
            records.last().map_or(after, |(seq, _)| *seq)
        } else {
            stable.max(after)
        };
        Ok(LogSlice { records, upto })
    }

    /// Up to `limit` live artifacts after the encoded key `after` (from the start when `None`),
    /// in key order: a paged walk that stays exact while writes go on (each key is seen once,
    /// at the version it has when its page is read). Artifacts a clean hides are left out.
    pub fn index_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<IndexEntry>, StoreError> {
        let mode = match after {
            Some(key) => rocksdb::IteratorMode::From(key, rocksdb::Direction::Forward),
            None => rocksdb::IteratorMode::Start,
        };
        let iter = self.inner.db.iterator_cf(self.cf(meta::CF_ARTIFACTS), mode);
        let mut entries = Vec::new();
        for item in iter {
            let (key, value) = item?;
            if after == Some(&key[..]) {
                continue;
            }
            if entries.len() >= limit {
                break;
            }
            let (Some(record), Some(artifact)) = (
                meta::decode::<meta::RecordView>(&value),
                ArtifactKey::decode(&key),
            ) else {
                continue;
            };
            if self
                .inner
                .tombstones
                .hides(&artifact.project, record.version_ms)
            {
                continue;
            }
            entries.push(IndexEntry {
                key: key.to_vec(),
                size: record.size,
                blake3: record.blake3,
                version_ms: record.version_ms,
                origin: record.origin.to_owned(),
            });
        }
        Ok(entries)
    }

    /// Every project's last clean, for a bootstrapping peer.
    pub fn tombstones(&self) -> Vec<(String, u64)> {
        self.inner.tombstones.all()
    }

    /// The version stored under `key` as `(version_ms, origin)`, if any (no body is read).
    pub fn version_of(&self, key: &ArtifactKey) -> Result<Option<(u64, String)>, StoreError> {
        let encoded = key.encode();
        let Some(value) = self.get(meta::CF_ARTIFACTS, &encoded)? else {
            return Ok(None);
        };
        Ok(meta::decode::<meta::RecordView>(&value)
            .filter(|record| !self.inner.tombstones.hides(&key.project, record.version_ms))
            .map(|record| (record.version_ms, record.origin.to_owned())))
    }

    /// The sequence number of the oldest record in the log, if any.
    pub fn log_oldest(&self) -> Result<Option<u64>, StoreError> {
        let mut iter = self
            .inner
            .db
            .iterator_cf(self.cf(meta::CF_OUTBOX), rocksdb::IteratorMode::Start);
        match iter.next() {
            Some(item) => Ok(meta::decode_seq(&item?.0)),
            None => Ok(None),
        }
    }

    /// The records a peer at `cursor` lacks, up to `limit`, or `None` when the log no longer
    /// holds all of them (it catches up from an index instead).
    pub fn log_for_peer(&self, cursor: u64, limit: usize) -> Result<Option<LogSlice>, StoreError> {
        self.log_for_peer_around(cursor, limit, || {})
    }

    /// [`Store::log_for_peer`], running `between` after the records are read (tests trim there).
    ///
    /// The floor is read *after* the records: trimming raises it in the batch that deletes, so a
    /// floor still at or below the cursor proves the read saw every record after it. Read
    /// before, a trim landing between the two reads would hand the peer a slice with a hole its
    /// cursor then moves past, and nothing would ever fill it.
    pub(super) fn log_for_peer_around(
        &self,
        cursor: u64,
        limit: usize,
        between: impl FnOnce(),
    ) -> Result<Option<LogSlice>, StoreError> {
        let slice = self.log_after(cursor, limit)?;
        between();
        if self.log_lost(cursor)? {
            return Ok(None);
        }
        Ok(Some(slice))
    }

    /// Whether a peer at `cursor` has missed records: the log was trimmed or bounded past it.
    /// A peer admitted for the first time is at 0, so it has missed records unless the log still
    /// holds everything this node ever logged.
    pub fn log_lost(&self, cursor: u64) -> Result<bool, StoreError> {
        Ok(self.log_floor()? > cursor)
    }

    /// The last peer-acknowledged sequence number of `peer` (0 when it never acknowledged).
    pub fn cursor(&self, peer: &str) -> Result<u64, StoreError> {
        Ok(self.stored_cursor(peer)?.unwrap_or(0))
    }

    fn stored_cursor(&self, peer: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .inner
            .db
            .get_cf(self.cf(meta::CF_STATE), cursor_key(peer))?
            .and_then(|bytes| meta::decode_seq(&bytes)))
    }

    /// The cursor of an admitted peer, created at 0 the first time: from then on the peer holds
    /// the log back until it has acknowledged it (a peer without a cursor does not).
    pub fn admit_peer(&self, peer: &str) -> Result<u64, StoreError> {
        match self.stored_cursor(peer)? {
            Some(seq) => Ok(seq),
            None => {
                self.set_cursor(peer, 0)?;
                Ok(0)
            }
        }
    }

    /// Every persisted cursor, by peer node id.
    pub fn cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.seqs_under(CURSOR_PREFIX)
    }

    /// Every `state` entry under `prefix` whose value is a sequence number, by the id after it.
    fn seqs_under(&self, prefix: &[u8]) -> Result<Vec<(String, u64)>, StoreError> {
        let iter = self.inner.db.iterator_cf(
            self.cf(meta::CF_STATE),
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        let mut found = Vec::new();
        for item in iter {
            let (key, value) = item?;
            let Some(id) = key.strip_prefix(prefix) else {
                break;
            };
            if let (Ok(id), Some(seq)) = (std::str::from_utf8(id), meta::decode_seq(&value)) {
                found.push((id.to_owned(), seq));
            }
        }
        Ok(found)
    }

    /// Persists this node's promise to catch up from `writer`'s index (`generation` tells a
    /// promise renewed during a pass from the one the pass began with).
    pub fn set_catch_up(&self, writer: &str, generation: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(meta::CF_STATE),
            prefixed(CATCH_UP_PREFIX, writer),
            meta::encode_seq(generation),
        );
        self.write(batch)
    }

    /// Every catch-up this node still owes, by writer node id, with its generation.
    pub fn catch_ups(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.seqs_under(CATCH_UP_PREFIX)
    }

    /// Removes a kept promise.
    pub fn clear_catch_up(&self, writer: &str) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(meta::CF_STATE), prefixed(CATCH_UP_PREFIX, writer));
        self.write(batch)
    }

    /// Persists that `peer` has everything up to `seq`. Synced like any acknowledged write, so a
    /// restart resumes after it and never earlier than what the peer confirmed.
    pub fn set_cursor(&self, peer: &str, seq: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(meta::CF_STATE),
            cursor_key(peer),
            meta::encode_seq(seq),
        );
        self.write(batch)
    }

    /// Forgets `peer`'s cursor (an expired peer: it catches up from an index when it returns).
    pub fn forget_cursor(&self, peer: &str) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(meta::CF_STATE), cursor_key(peer));
        self.write(batch)
    }

    /// Drops the records every peer in `cursors` has acknowledged, and the oldest ones past
    /// `max_entries`. Returns how many the bound dropped (records some peer had not yet
    /// acknowledged). Never blocks a writer: it deletes ranges below the stable point.
    pub fn trim_log(&self, slowest: Option<u64>, max_entries: u64) -> Result<u64, StoreError> {
        let Some(oldest) = self.log_oldest()? else {
            return Ok(0);
        };
        let newest = self.stable_seq();
        // No live peer: nobody needs the log beyond what the bound keeps for one that returns.
        let acknowledged = slowest.unwrap_or(0).min(newest);
        let bound = newest.saturating_sub(max_entries);
        let mut dropped = 0;
        let mut below = acknowledged;
        if bound > acknowledged {
            // Sequence numbers are nearly dense, so this counts the unacknowledged records the
            // bound drops closely enough for a metric.
            // Saturating: a peer admitted with cursor 0 after the peers' trims took the log
            // past the bound drops nothing more (the records went before, acknowledged).
            dropped = bound.saturating_sub(acknowledged.max(oldest - 1));
            below = bound;
        }
        if below >= oldest {
            // The floor moves in the batch that deletes, so no peer is ever told its records
            // are still there when they are not.
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(
                self.cf(meta::CF_OUTBOX),
                meta::encode_seq(oldest),
                meta::encode_seq(below + 1),
            );
            if below > self.log_floor()? {
                batch.put_cf(self.cf(meta::CF_STATE), FLOOR_KEY, meta::encode_seq(below));
            }
            self.write(batch)?;
        }
        Ok(dropped)
    }

    /// The highest sequence number the log may no longer hold (0: it holds everything logged).
    pub fn log_floor(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .db
            .get_cf(self.cf(meta::CF_STATE), FLOOR_KEY)?
            .and_then(|bytes| meta::decode_seq(&bytes))
            .unwrap_or(0))
    }
}

/// Key in `state` of the log's floor: the highest sequence number trimming or the bound removed.
const FLOOR_KEY: &[u8] = b"outbox_floor";
