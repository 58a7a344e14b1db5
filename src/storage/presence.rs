//! Existence checks of many keys at once (what `FindMissingBlobs` asks), from the `presence`
//! family.
//!
//! A record in `artifacts` can carry an inline body of up to 32 KiB, so a lookup there reads and
//! caches data blocks full of bodies to learn a size. `presence` holds, per artifact, only what
//! the check needs (size, version for the clean tombstones, access time at publish for the
//! access-time note): about a quarter of a bodiless record, so more of it stays in the block
//! cache and each data block searched holds more keys.
//!
//! Invariant: every batch that writes or deletes a record in `artifacts` writes or deletes its
//! `presence` entry too, under the key's lock. Data dirs from before the family are backfilled
//! once in the background (`state` flag [`meta::PRESENCE_INDEXED_KEY`]); until the flag is set,
//! existence checks read `artifacts` as before, so no answer is ever wrong meanwhile.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rocksdb::{DB, WriteBatch};

use super::meta::{self, Presence};
use super::presence_map::Held;
use super::{ArtifactKey, Inner, Kind, Store, StoreError, cf};

/// Records re-read per backfill batch: small, so that the key locks it holds delay few writes.
const BACKFILL_BATCH: usize = 128;

/// How many deleted entries the emptiness check at open steps over before it stops looking.
const SKIPPABLE_TOMBSTONES: u64 = 10_000;

/// Entries of the family loaded into the presence map before `Store::open` returns (about
/// 15 ms); the rest load in the background (about 0.8 s per million entries on the machines of
/// `docs/benchmarks.md`).
const LOAD_AT_OPEN_MAX: usize = 20_000;

/// Entries a background load reads per step. Between steps it holds no reference to the store,
/// so a store that is closed meanwhile closes (and stops the load) within one step. Tests take
/// small steps, so that writes racing a load meet it at many points.
const LOAD_STEP: usize = if cfg!(test) { 64 } else { 8192 };

#[cfg(test)]
thread_local! {
    /// Set by tests to load even a small family in the background, as a large one is.
    pub(super) static LOAD_IN_BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How many entries to load before `Store::open` returns: [`LOAD_AT_OPEN_MAX`], or none in tests
/// that set [`LOAD_IN_BACKGROUND`].
fn load_at_open() -> usize {
    #[cfg(test)]
    if LOAD_IN_BACKGROUND.get() {
        return 0;
    }
    LOAD_AT_OPEN_MAX
}

/// A multi-key lookup is split over the cores only in chunks of at least this many keys: below
/// it, a thread hop costs more than it saves.
const CHUNK_MIN: usize = 1024;

/// Appends the `presence` key of the artifact encoded as `encoded`: the encoded key itself,
/// except that a key of 64 lowercase hex digits (what every content-addressed kind uses) is
/// packed into its 32 bytes behind a NUL. No text key contains NUL, so a packed key never equals
/// an unpacked one; and the family stays ordered by project, like `artifacts`.
pub(super) fn presence_key(encoded: &[u8], out: &mut Vec<u8>) {
    if let Some(split) = key_start(encoded) {
        let (prefix, key) = encoded.split_at(split);
        if let Some(packed) = pack_hash(key) {
            out.extend_from_slice(prefix);
            out.push(0);
            out.extend_from_slice(&packed);
            return;
        }
    }
    out.extend_from_slice(encoded);
}

/// The 32 bytes spelled by 64 lowercase hex digits; `None` for anything else (uppercase too, so
/// that two spellings of one hash never share an entry). Branch-free per digit: it runs for
/// every key of every existence check.
pub(super) fn pack_hash(key: &[u8]) -> Option<[u8; 32]> {
    let digits: &[u8; 64] = key.try_into().ok()?;
    let mut packed = [0u8; 32];
    let mut invalid = 0u8;
    for (byte, pair) in packed.iter_mut().zip(digits.chunks_exact(2)) {
        let (high, low) = (NIBBLES[pair[0] as usize], NIBBLES[pair[1] as usize]);
        invalid |= high | low;
        *byte = high << 4 | low;
    }
    (invalid & NOT_HEX == 0).then_some(packed)
}

/// Marks a byte that is not a lowercase hex digit in [`NIBBLES`].
const NOT_HEX: u8 = 0x10;

/// Each byte's value as a lowercase hex digit, or [`NOT_HEX`].
const NIBBLES: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut digit = 0;
    while digit < 16 {
        let symbol = b"0123456789abcdef"[digit];
        table[symbol as usize] = digit as u8;
        digit += 1;
    }
    table
};

/// Where the key part of an encoded `project \0 kind \0 key` starts.
pub(super) fn key_start(encoded: &[u8]) -> Option<usize> {
    let first = encoded.iter().position(|b| *b == 0)?;
    let second = encoded[first + 1..].iter().position(|b| *b == 0)?;
    Some(first + 1 + second + 1)
}

/// Whether `presence` is complete in the database just opened: flagged, or nothing stored yet
/// (then the flag is written, since every record from now on gets its entry).
pub(super) fn indexed_at_open(db: &DB) -> Result<bool, StoreError> {
    let state = cf(db, meta::CF_STATE);
    let flagged = db
        .get_pinned_cf(state, meta::PRESENCE_INDEXED_KEY)?
        .is_some();
    // A flagged family with entries is the common start: one seek, and `artifacts` is not read.
    if flagged && !is_empty(db, meta::CF_PRESENCE)? {
        return Ok(true);
    }
    let records = !is_empty(db, meta::CF_ARTIFACTS)?;
    if flagged && records {
        // Records but not one entry: the family was lost (dropped by hand, or the data dir
        // went through a release without it). Answering from it would call every blob missing.
        tracing::warn!("the presence family is empty while artifacts are stored; rebuilding it");
        db.delete_cf(state, meta::PRESENCE_INDEXED_KEY)?;
        return Ok(false);
    }
    if flagged || records {
        return Ok(flagged);
    }
    db.put_cf(state, meta::PRESENCE_INDEXED_KEY, [])?;
    Ok(true)
}

/// Whether a family holds no live entry. In a family whose first entries were deleted the seek
/// steps over their tombstones, so it gives up after `SKIPPABLE_TOMBSTONES` and answers "not
/// empty", the safe side for both questions above: tombstones in `presence` mean its entries
/// were removed with their records (not that the family was lost), and a store wrongly taken
/// for non-empty only runs a backfill that finds nothing.
fn is_empty(db: &DB, family: &str) -> Result<bool, StoreError> {
    let mut bounded = rocksdb::ReadOptions::default();
    bounded.set_max_skippable_internal_keys(SKIPPABLE_TOMBSTONES);
    bounded.fill_cache(false);
    let mut entries = db.iterator_cf_opt(cf(db, family), bounded, rocksdb::IteratorMode::Start);
    match entries.next() {
        None => Ok(true),
        Some(Ok(_)) => Ok(false),
        Some(Err(error)) if error.kind() == rocksdb::ErrorKind::Incomplete => Ok(false),
        Some(Err(error)) => Err(error.into()),
    }
}

/// Many keys in one allocation.
#[derive(Clone, Default)]
struct KeyBuffer {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl KeyBuffer {
    fn with_capacity(keys: usize) -> KeyBuffer {
        KeyBuffer {
            bytes: Vec::with_capacity(keys * 64),
            ends: Vec::with_capacity(keys),
        }
    }

    /// Adds the key that `write` appends.
    fn push(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.bytes);
        self.ends.push(self.bytes.len());
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, index: usize) -> &[u8] {
        let start = index.checked_sub(1).map_or(0, |before| self.ends[before]);
        &self.bytes[start..self.ends[index]]
    }

    fn range(&self, range: Range<usize>) -> impl ExactSizeIterator<Item = &[u8]> {
        range.map(|index| self.get(index))
    }
}

/// The keys of a multi-key lookup ([`Store::stored_sizes`]), encoded into one buffer as they are
/// added: a lookup of 10,000 keys makes a few allocations, not tens of thousands.
#[derive(Clone, Default)]
pub struct KeyBatch {
    encoded: KeyBuffer,
}

impl KeyBatch {
    pub fn with_capacity(keys: usize) -> KeyBatch {
        KeyBatch {
            encoded: KeyBuffer::with_capacity(keys),
        }
    }

    /// Adds the key of `project`, `kind` and `key` (see [`ArtifactKey`]).
    pub fn push(&mut self, project: &str, kind: Kind, key: &str) {
        self.encoded
            .push(|out| ArtifactKey::encode_parts_into(project, kind, key, out));
    }

    pub fn len(&self) -> usize {
        self.encoded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> FromIterator<&'a ArtifactKey> for KeyBatch {
    fn from_iter<I: IntoIterator<Item = &'a ArtifactKey>>(keys: I) -> KeyBatch {
        let mut batch = KeyBatch::default();
        for key in keys {
            batch.push(&key.project, key.kind, &key.key);
        }
        batch
    }
}

impl Store {
    /// [`presence_key`] of one artifact, for a batch.
    pub(super) fn presence_key(&self, encoded: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(encoded.len());
        presence_key(encoded, &mut out);
        out
    }

    /// Which of `keys` are stored (and not hidden by a clean), in order, noting an access of
    /// each one present: what `FindMissingBlobs` vouches for must not be the next evicted. The
    /// presence map answers what it holds, one batched RocksDB lookup per chunk the rest; no
    /// record is decoded. Runs off the async workers, a large request split over the cores (the
    /// lookups are memory-bound CPU work).
    pub async fn present(&self, keys: &[ArtifactKey]) -> Result<Vec<bool>, StoreError> {
        let sizes = self.stored_sizes(keys.iter().collect()).await?;
        Ok(sizes.into_iter().map(|size| size.is_some()).collect())
    }

    /// [`Store::present`] that also tells each present artifact's size (REAPI digests carry
    /// one, and a digest whose size differs from the stored blob's names no stored blob).
    pub async fn stored_sizes(&self, keys: KeyBatch) -> Result<Vec<Option<u64>>, StoreError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = keys.len().div_ceil(cores).max(CHUNK_MIN);
        let keys = Arc::new(keys);
        let lookups: Vec<_> = (0..keys.len())
            .step_by(chunk)
            .map(|start| {
                let (store, keys) = (self.clone(), keys.clone());
                let end = (start + chunk).min(keys.len());
                tokio::task::spawn_blocking(move || store.sizes_blocking(&keys, start..end))
            })
            .collect();
        let mut sizes = Vec::with_capacity(keys.len());
        for lookup in lookups {
            let part = lookup
                .await
                .map_err(|e| StoreError::Io(io::Error::other(e)))??;
            sizes.extend(part);
        }
        Ok(sizes)
    }

    /// [`Store::stored_sizes`] of the keys in `range`. Blocking: the presence map answers what
    /// it holds, one RocksDB `MultiGet` the rest.
    fn sizes_blocking(
        &self,
        keys: &KeyBatch,
        range: Range<usize>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let map = &self.inner.presence_map;
        let (now, resolution) = (super::now_ms(), self.access_resolution_ms());
        let touches = &self.inner.touches;
        let visible = |encoded: &[u8], presence: Presence| {
            Some(presence).filter(|p| !self.hidden_by_clean(encoded, p.version_ms))
        };
        let mut entries: Vec<Option<Presence>> = Vec::with_capacity(range.len());
        // Positions within `range` that the map cannot answer.
        let mut unknown = Vec::new();
        for (at, encoded) in keys.encoded.range(range.clone()).enumerate() {
            // The map notes the accesses it vouches for itself (once per resolution).
            let held = map.get_noting(encoded, now, resolution, || touches.note_at(encoded, now));
            entries.push(match held {
                Held::Present(presence) => visible(encoded, presence),
                Held::Absent => None,
                Held::Unknown => {
                    unknown.push(range.start + at);
                    None
                }
            });
        }
        if !unknown.is_empty() {
            // What RocksDB answers is noted here, by its publish time.
            let looked_up = self.presence_from_rocksdb(keys, &unknown)?;
            let mut found = Vec::new();
            for (at, presence) in unknown.into_iter().zip(looked_up) {
                let encoded = keys.encoded.get(at);
                let presence = presence.and_then(|presence| visible(encoded, presence));
                if let Some(presence) = &presence {
                    found.push((encoded, presence.accessed_ms));
                }
                entries[at - range.start] = presence;
            }
            touches.note_all(found, resolution);
        }
        Ok(entries
            .into_iter()
            .map(|presence| presence.map(|p| p.size))
            .collect())
    }

    /// The `presence` entries of the keys at `positions` of `keys`, from RocksDB: one
    /// `MultiGet` of the family, or of the records while the family is being backfilled.
    fn presence_from_rocksdb(
        &self,
        keys: &KeyBatch,
        positions: &[usize],
    ) -> Result<Vec<Option<Presence>>, StoreError> {
        let indexed = self.inner.presence_indexed.load(Ordering::Acquire);
        let asked = || positions.iter().map(|at| keys.encoded.get(*at));
        let values = if indexed {
            let mut packed = KeyBuffer::with_capacity(positions.len());
            for encoded in asked() {
                packed.push(|out| presence_key(encoded, out));
            }
            self.inner.db.batched_multi_get_cf(
                self.cf(meta::CF_PRESENCE),
                packed.range(0..packed.len()),
                false,
            )
        } else {
            self.inner
                .db
                .batched_multi_get_cf(self.cf(meta::CF_ARTIFACTS), asked(), false)
        };
        values
            .into_iter()
            .map(|value| {
                Ok(value?.and_then(|value| {
                    if indexed {
                        Presence::decode(&value)
                    } else {
                        Some(Presence::of_view(&meta::decode(&value)?))
                    }
                }))
            })
            .collect()
    }

    /// Whether existence checks are answered from memory (the presence map is on and loaded).
    pub fn presence_in_memory(&self) -> bool {
        self.inner.presence_map.serving()
    }

    /// Fills the presence map from the family (see `presence_map.rs`): its first
    /// [`LOAD_AT_OPEN_MAX`] entries before returning, the rest, if any, on a thread of its own. A
    /// load that fails turns the map off, and existence checks keep reading RocksDB.
    pub(super) fn load_presence_map(&self) {
        if !self.inner.presence_map.following() {
            return;
        }
        let started = std::time::Instant::now();
        let from = match self.load_presence_step(&[], load_at_open()) {
            Ok(Some(from)) => from,
            ended => return self.presence_load_ended(ended.map(|_| ()), started),
        };
        let store = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("kura-presence-load".into())
            .spawn(move || load_in_steps(store, from, started));
        if let Err(error) = spawned {
            tracing::warn!(%error, "could not start loading the presence map; existence checks read RocksDB");
            self.inner.presence_map.turn_off();
        }
    }

    /// Reads up to `limit` entries of the family, from `from` on, into the presence map.
    /// Returns the key to go on from, or `None` at the end of the family.
    fn load_presence_step(&self, from: &[u8], limit: usize) -> Result<Option<Vec<u8>>, StoreError> {
        self.load_presence_entries(self.presence_entries(from), limit)
    }

    /// The family's entries from `from` on, as of now (the iterator reads a snapshot).
    pub(super) fn presence_entries(
        &self,
        from: &[u8],
    ) -> rocksdb::DBIteratorWithThreadMode<'_, rocksdb::DB> {
        let mut options = rocksdb::ReadOptions::default();
        // A one-off scan: it must not push the working set out of the block cache.
        options.fill_cache(false);
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        self.inner
            .db
            .iterator_cf_opt(self.cf(meta::CF_PRESENCE), options, mode)
    }

    /// [`Store::load_presence_step`] of entries already read (or being read) from the family.
    pub(super) fn load_presence_entries(
        &self,
        entries: rocksdb::DBIteratorWithThreadMode<'_, rocksdb::DB>,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        for (read, entry) in entries.enumerate() {
            let (key, value) = entry?;
            if read == limit {
                return Ok(Some(key.into_vec()));
            }
            // An entry that does not decode has no record behind it for existence checks either.
            if let Some(presence) = Presence::decode(&value) {
                self.inner.presence_map.load(&key, presence);
            }
        }
        Ok(None)
    }

    fn presence_load_ended(&self, result: Result<(), StoreError>, started: std::time::Instant) {
        let map = &self.inner.presence_map;
        match result {
            Ok(()) => {
                map.loaded();
                tracing::info!(
                    entries = map.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "presence map loaded"
                );
            }
            Err(error) => {
                map.turn_off();
                tracing::error!(%error, "could not load the presence map; existence checks read RocksDB");
            }
        }
    }

    /// Whether a clean of the project of the artifact encoded as `encoded` hides a version.
    fn hidden_by_clean(&self, encoded: &[u8], version_ms: u64) -> bool {
        let project = encoded.split(|b| *b == 0).next().unwrap_or_default();
        std::str::from_utf8(project)
            .is_ok_and(|project| self.inner.tombstones.hides(project, version_ms))
    }

    /// Writes the `presence` entry of every record stored before the family existed, once, and
    /// then lets existence checks use it. Returns how many entries it wrote. Blocking.
    pub fn backfill_presence(&self) -> Result<u64, StoreError> {
        if self.inner.presence_indexed.load(Ordering::Acquire) {
            return Ok(0);
        }
        let mut written = 0u64;
        self.derive_from_records(BACKFILL_BATCH, |key, value, batch| {
            // An undecodable record gets no entry: reads treat it as absent too.
            if let Some(record) = meta::decode(value) {
                let presence = Presence::of_view(&record);
                batch.put_cf(
                    self.cf(meta::CF_PRESENCE),
                    self.presence_key(key),
                    presence.encode(),
                );
                written += 1;
            }
        })?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(meta::CF_STATE), meta::PRESENCE_INDEXED_KEY, []);
        self.write_synced(batch, true)?;
        self.inner.presence_indexed.store(true, Ordering::Release);
        Ok(written)
    }
}

/// The background load: a step at a time, each with the store borrowed for its duration only.
fn load_in_steps(store: std::sync::Weak<Inner>, mut from: Vec<u8>, started: std::time::Instant) {
    // A load that stops without ending (a panic) must not leave the map following writes
    // forever and never answering.
    let mut unfinished = TurnOffUnlessEnded {
        store: store.clone(),
        ended: false,
    };
    while let Some(inner) = store.upgrade() {
        let store = Store { inner };
        match store.load_presence_step(&from, LOAD_STEP) {
            Ok(Some(next)) => {
                from = next;
                // Tests race writes against the load: a pause per step makes sure they meet.
                #[cfg(test)]
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            ended => {
                store.presence_load_ended(ended.map(|_| ()), started);
                unfinished.ended = true;
                return;
            }
        }
    }
}

/// Turns the presence map off when dropped before the load ended (see [`load_in_steps`]).
struct TurnOffUnlessEnded {
    store: std::sync::Weak<Inner>,
    ended: bool,
}

impl Drop for TurnOffUnlessEnded {
    fn drop(&mut self) {
        if !self.ended
            && let Some(inner) = self.store.upgrade()
        {
            inner.presence_map.turn_off();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Kind;

    fn packed(key: &ArtifactKey) -> Vec<u8> {
        let mut out = Vec::new();
        presence_key(&key.encode(), &mut out);
        out
    }

    #[test]
    fn content_addressed_keys_are_packed_and_other_keys_kept() {
        let hash = "0123456789abcdef".repeat(4);
        let cas = ArtifactKey::new("p", Kind::CasSha256, hash.clone());
        let mut expected = b"p\0cas-sha256\0\0".to_vec();
        expected.extend_from_slice(&hex::decode(&hash).unwrap());
        assert_eq!(packed(&cas), expected);
        // Not 64 lowercase hex digits: kept as they are.
        for text in [
            hash.to_uppercase(),
            hash[..63].to_string(),
            format!("{hash}0"),
        ] {
            let key = ArtifactKey::new("p", Kind::CasSha256, text);
            assert_eq!(packed(&key), key.encode());
        }
    }

    proptest::proptest! {
        /// Two different keys never share an entry, whichever of them is packed.
        #[test]
        fn different_keys_get_different_entries(
            a in "[0-9a-fA-F]{63,65}|[ -~]{0,70}",
            b in "[0-9a-fA-F]{63,65}|[ -~]{0,70}",
        ) {
            let (a, b) = (
                ArtifactKey::new("p", Kind::CasSha256, a),
                ArtifactKey::new("p", Kind::CasSha256, b),
            );
            proptest::prop_assert_eq!(a == b, packed(&a) == packed(&b));
        }
    }
}
