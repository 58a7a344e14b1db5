//! Recently read small artifacts held in memory: the records of inline bodies, so that a GET or
//! HEAD of a hot small artifact is answered without a RocksDB read.
//!
//! Why: on a small GET the RocksDB point read is most of the node's work (9–11 µs of CPU on the
//! machine of `docs/benchmarks.md`, *The ladder*), and build tools ask for the same small
//! artifacts again and again. The set is bounded by `storage.read_cache` (bytes of body, key and
//! record, plus a fixed cost per entry) and keeps what is read most often (`quick_cache`'s
//! policy resists scans, so a one-off sweep over many keys does not flush it).
//!
//! Integrity: an entry is a record that RocksDB read back intact (its block checksum was verified
//! when the block came from disk; see `Store::visible_record`) and whose inline body has the
//! length the record states. It is memory like RocksDB's own block cache, which serves the same
//! bytes unverified once a block is cached; invariant 1 is about the disk.
//!
//! Coherence: every batch that writes or deletes a record forgets the key once it is written
//! ([`HotRecords::forget`], called by `Store::write_accounted`). A read that fetched the old
//! record just before such a write could still insert it afterwards; to rule that out it takes a
//! [`Ticket`] (its key stripe's write generation) before reading RocksDB, and inserts only if no
//! write of the stripe finished since. The check and the insert hold the stripe's lock, as do a
//! forget's bump and removal, so the old record is never visible, not even for an instant. Clean
//! tombstones are not the set's business: readers check them against the record's version on
//! every hit, as on a miss.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::ReadCacheStats;
use super::meta::{ArtifactRecord, BodyRef};

/// Generation stripes: a write invalidates the tickets of the keys of its stripe only.
const STRIPES: usize = 1024;

/// What an entry costs beyond its bytes, estimated: the record's fields and its `Arc` (about
/// 210 bytes), the set's slot and index (about 60), the shared header of the body's `Bytes` and
/// the allocator's headers of five blocks. The budget is therefore approximate.
const ENTRY_OVERHEAD: u64 = 384;

/// An inline body smaller than this is assumed for the capacity estimate (entries, not bytes).
const TYPICAL_ENTRY: u64 = 4096;

pub(super) struct HotRecords {
    /// `None` when `storage.read_cache` is 0.
    cache: Option<Cache<Vec<u8>, Arc<ReadRecord>, EntryWeight>>,
    /// Each stripe's write generation: bumped by every forget of one of its keys.
    generations: Box<[Mutex<u64>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// A record as a read holds it, shared (not copied) with the set when the set keeps it, and when
/// a read of it last noted an access.
///
/// Why the second field: a hot artifact is read many times a second, but its access time moves
/// at most once per `storage.access_time_resolution` (`evict.rs`). Noting every read would
/// queue the key again after each flush, and each flush would read its access time back from
/// RocksDB only to find it recent. The entry remembers the last note instead, so a hot key is
/// noted once per resolution, at no cost in between. A record read from RocksDB starts afresh.
pub(super) struct ReadRecord {
    record: ArtifactRecord,
    /// When a read of this entry last noted an access (ms since the epoch; 0: never).
    noted_ms: AtomicU64,
}

impl ReadRecord {
    pub(super) fn new(record: ArtifactRecord) -> Arc<ReadRecord> {
        Arc::new(ReadRecord {
            record,
            noted_ms: AtomicU64::new(0),
        })
    }

    /// Whether a read at `now` should note an access: not within `resolution` of the artifact's
    /// publish (its access time need not move yet) nor of the last access a read of this entry
    /// noted. Returning true claims the note.
    pub(super) fn note_due(&self, now: u64, resolution: u64) -> bool {
        if now.saturating_sub(self.record.accessed_ms) < resolution {
            return false;
        }
        let last = self.noted_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < resolution {
            return false;
        }
        // Of readers racing here, one claims the note.
        self.noted_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// The write generation of a key's stripe, taken before a read of RocksDB.
pub(super) struct Ticket {
    stripe: usize,
    generation: u64,
}

#[derive(Clone)]
struct EntryWeight;

impl std::ops::Deref for ReadRecord {
    type Target = ArtifactRecord;

    fn deref(&self) -> &ArtifactRecord {
        &self.record
    }
}

impl Weighter<Vec<u8>, Arc<ReadRecord>> for EntryWeight {
    fn weight(&self, key: &Vec<u8>, entry: &Arc<ReadRecord>) -> u64 {
        entry_weight(key, &entry.record)
    }
}

fn entry_weight(key: &[u8], record: &ArtifactRecord) -> u64 {
    let body = match &record.body {
        BodyRef::Inline(bytes) => bytes.len(),
        BodyRef::File(_) => 0,
    };
    let fields = record.origin.len() + record.content_type.as_ref().map_or(0, String::len);
    (key.len() + body + fields) as u64 + ENTRY_OVERHEAD
}

impl HotRecords {
    /// A set of at most `budget` bytes (by [`entry_weight`]); 0 holds nothing.
    pub(super) fn new(budget: u64) -> HotRecords {
        let cache = (budget > 0).then(|| {
            let entries = (budget / (TYPICAL_ENTRY + ENTRY_OVERHEAD)).max(16) as usize;
            Cache::with_weighter(entries, budget, EntryWeight)
        });
        HotRecords {
            cache,
            generations: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The record held for the key encoded as `encoded`, if any.
    pub(super) fn get(&self, encoded: &[u8]) -> Option<Arc<ReadRecord>> {
        self.cache.as_ref()?.get(encoded)
    }

    /// Take before reading the record from RocksDB, to [`HotRecords::offer`] it after.
    pub(super) fn ticket(&self, encoded: &[u8]) -> Ticket {
        let stripe = self.stripe(encoded);
        Ticket {
            stripe,
            generation: *self.generation(stripe),
        }
    }

    /// Keeps `record`, just read from RocksDB under `ticket`, if it has an intact inline body
    /// and no write of its stripe finished since the ticket was taken.
    pub(super) fn offer(&self, ticket: Ticket, encoded: &[u8], record: &Arc<ReadRecord>) {
        let Some(cache) = &self.cache else {
            return;
        };
        let BodyRef::Inline(body) = &record.body else {
            return;
        };
        if body.len() as u64 != record.size {
            // Not to be served at all (the reader drops it): never kept.
            return;
        }
        let (key, entry) = (encoded.to_vec(), Arc::clone(record));
        // Under the stripe's lock: a forget cannot run between the check and the insert, so
        // either it came before (the generation moved: what was read may be old, and is not
        // kept) or it comes after and removes the entry.
        let generation = self.generation(ticket.stripe);
        if *generation == ticket.generation {
            cache.insert(key, entry);
        }
    }

    /// Forgets the key encoded as `encoded`, whose record a batch just written changed or
    /// deleted. Call after the write, never before: a read between a forget and the write
    /// would find the old record again.
    pub(super) fn forget(&self, encoded: &[u8]) {
        let Some(cache) = &self.cache else {
            return;
        };
        let mut generation = self.generation(self.stripe(encoded));
        *generation += 1;
        cache.remove(encoded);
    }

    fn generation(&self, stripe: usize) -> MutexGuard<'_, u64> {
        // A panic while holding it leaves a number: poisoning is ignored.
        self.generations[stripe]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes held (by [`entry_weight`]), hits and misses.
    pub(super) fn stats(&self) -> ReadCacheStats {
        self.cache
            .as_ref()
            .map_or_else(ReadCacheStats::default, |cache| ReadCacheStats {
                bytes: cache.weight(),
                hits: cache.hits(),
                misses: cache.misses(),
            })
    }

    fn stripe(&self, encoded: &[u8]) -> usize {
        (self.hasher.hash_one(encoded) % STRIPES as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &[u8]) -> Arc<ReadRecord> {
        ReadRecord::new(artifact(body))
    }

    fn artifact(body: &[u8]) -> ArtifactRecord {
        ArtifactRecord {
            size: body.len() as u64,
            blake3: *blake3::hash(body).as_bytes(),
            sha256: None,
            content_type: None,
            version_ms: 1,
            origin: "node-a".into(),
            accessed_ms: 1,
            body: BodyRef::Inline(bytes::Bytes::copy_from_slice(body)),
        }
    }

    #[test]
    fn a_read_that_raced_with_a_write_leaves_nothing_behind() {
        let hot = HotRecords::new(1 << 20);
        let ticket = hot.ticket(b"k");
        // The write lands (and forgets the key) between the read of the old record and its
        // offer: the old record must not stay.
        hot.forget(b"k");
        hot.offer(ticket, b"k", &record(b"old"));
        assert!(hot.get(b"k").is_none());
        // A read after the write keeps what it read.
        let ticket = hot.ticket(b"k");
        hot.offer(ticket, b"k", &record(b"new"));
        assert_eq!(hot.get(b"k").map(|entry| entry.size), Some(3));
    }

    #[test]
    fn a_hot_record_notes_an_access_once_per_resolution() {
        let hot = HotRecords::new(1 << 20);
        let mut published = artifact(b"abc");
        published.accessed_ms = 1_000_000;
        hot.offer(hot.ticket(b"k"), b"k", &ReadRecord::new(published.clone()));
        let entry = hot.get(b"k").expect("held");
        let resolution = 60_000;
        assert!(
            !entry.note_due(1_000_000 + 59_999, resolution),
            "within a resolution of its publish"
        );
        let first = 1_000_000 + resolution;
        assert!(entry.note_due(first, resolution), "first read past it");
        assert!(!entry.note_due(first + 1, resolution));
        assert!(!entry.note_due(first + resolution - 1, resolution));
        assert!(entry.note_due(first + resolution, resolution));
        // A rewrite makes a new entry, which notes afresh.
        hot.forget(b"k");
        hot.offer(hot.ticket(b"k"), b"k", &ReadRecord::new(published.clone()));
        let fresh = hot.get(b"k").expect("held again");
        assert!(fresh.note_due(first + resolution + 1, resolution));
    }

    #[test]
    fn file_bodies_and_bodies_of_the_wrong_length_are_not_kept() {
        let hot = HotRecords::new(1 << 20);
        let mut file = artifact(b"abc");
        file.body = BodyRef::File(7);
        hot.offer(hot.ticket(b"f"), b"f", &ReadRecord::new(file));
        let mut short = artifact(b"abc");
        short.size = 4;
        hot.offer(hot.ticket(b"s"), b"s", &ReadRecord::new(short));
        assert!(hot.get(b"f").is_none());
        assert!(hot.get(b"s").is_none());
    }

    #[test]
    fn the_set_stays_within_its_budget() {
        let budget = 64 * 1024;
        let hot = HotRecords::new(budget);
        for i in 0..1000u32 {
            let key = i.to_be_bytes();
            hot.offer(hot.ticket(&key), &key, &record(&[7; 1024]));
        }
        assert!(
            hot.stats().bytes <= budget,
            "{} > {budget}",
            hot.stats().bytes
        );
        assert!(
            hot.stats().bytes > budget / 2,
            "holds {}",
            hot.stats().bytes
        );
        let off = HotRecords::new(0);
        off.offer(off.ticket(b"k"), b"k", &record(b"abc"));
        assert!(off.get(b"k").is_none());
    }
}
