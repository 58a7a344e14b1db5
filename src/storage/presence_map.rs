//! The `presence` entries of content-addressed artifacts held in memory, so that an existence
//! check of thousands of digests (`FindMissingBlobs`) costs a hash lookup per key instead of a
//! RocksDB `MultiGet`.
//!
//! Why: with the `presence` family in SST files, each key of a `MultiGet` is a bloom probe per
//! file, an index search, a block-cache lookup (or a copy from the page cache) and a data-block
//! search: about 2 µs of memory-bound work per key on the machines of `docs/benchmarks.md`, so
//! 10,000 keys took 17–24 ms on two cores however the family was tuned. A hash map answers the
//! same question in a fifth of that. The price is memory: a slot of 65 bytes per artifact (its
//! 64 hex digits packed into 32 bytes, its project and kind as a number, the 24 bytes of its
//! `presence` entry, the table's control byte), in tables that are between 7/16 and 7/8 full as
//! they grow: 75–150 bytes per artifact ([`PresenceMap::bytes`], on `/metrics`). A table that
//! removals left three quarters empty is rebuilt at twice what it holds (see [`Shard::remove`]),
//! so that memory follows the artifacts after a mass eviction or clean instead of staying sized
//! for the most the node ever held.
//! `storage.presence_in_memory` turns the map off on a node with more artifacts than memory to
//! spare.
//!
//! Only the content-addressed kinds (`cas-sha256`, `cas-blake3`) with keys of 64 lowercase hex
//! digits are held; any other key is answered [`Held::Unknown`] and looked up in RocksDB.
//!
//! Coherence, while serving ([`State::Serving`]): every batch that writes or deletes records
//! passes them to [`PresenceMap::apply`] after it is written, still under the keys' locks
//! (`Store::write_accounted`), so the map changes in the same order as RocksDB does for each key.
//! A batch whose write failed removes its keys: a blob wrongly called missing is uploaded again,
//! one wrongly called present would fail a build.
//!
//! Loading, at open ([`State::Loading`]): the map follows every write from before the first one
//! can happen (it is built before the store is returned), while the family is read into it. An
//! entry read by the loader goes in only if no write touched its key since the map was created:
//! a write's entry is newer than anything the loader can have read, and a removal is remembered
//! for the load's duration so that the loader cannot bring the key back. Until the load ends,
//! existence checks read RocksDB. A small family is loaded before `Store::open` returns; a large
//! one in the background, so that start-up time does not grow with the number of artifacts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use super::Kind;
use super::meta::Presence;
use super::presence::{key_start, pack_hash};

/// Independent locks, so that two threads checking keys (and writers) rarely meet.
const SHARDS: usize = 64;

/// What the map holds of one artifact's key: its `project \0 kind \0` prefix as a number (see
/// [`PresenceMap::prefix_id`]) and its 32-byte hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct HeldKey {
    prefix: u32,
    hash: [u8; 32],
}

#[derive(Default)]
struct Shard {
    entries: HashMap<HeldKey, Presence>,
    /// While loading: keys removed since the map was created, which the loader must not add.
    removed: HashSet<HeldKey>,
}

/// Below this many slots a table is not worth rebuilding smaller.
const SHRINK_FLOOR: usize = 256;

impl Shard {
    /// Removes `key`, and rebuilds the table at twice what it still holds once it is less than
    /// a quarter full. The rebuild costs a pass over what is left, and cannot come again before
    /// at least half of that is removed too, so its cost per removal stays constant.
    fn remove(&mut self, key: &HeldKey) {
        self.entries.remove(key);
        let capacity = self.entries.capacity();
        if capacity > SHRINK_FLOOR && self.entries.len() < capacity / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }
}

/// What the map knows of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// Stored, with its `presence` entry.
    Present(Presence),
    Absent,
    /// Not the map's to answer (not loaded yet, turned off, or not a content-addressed key):
    /// ask RocksDB.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Off = 0,
    Loading = 1,
    Serving = 2,
}

pub(super) struct PresenceMap {
    shards: Box<[Mutex<Shard>]>,
    /// Each `project \0 kind \0` prefix seen, numbered in order of appearance. A node holds a
    /// few kinds for each of its projects, so this stays small; numbers are never reused.
    prefixes: RwLock<HashMap<Box<[u8]>, u32>>,
    state: AtomicU8,
}

impl PresenceMap {
    /// A map that follows writes from now on and answers once [`PresenceMap::loaded`] is
    /// called; or, when `enabled` is false, one that holds nothing and answers nothing.
    pub(super) fn new(enabled: bool) -> PresenceMap {
        let state = if enabled { State::Loading } else { State::Off };
        PresenceMap {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            prefixes: RwLock::default(),
            state: AtomicU8::new(state as u8),
        }
    }

    fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            2 => State::Serving,
            1 => State::Loading,
            _ => State::Off,
        }
    }

    /// Whether existence checks are answered from memory.
    pub(super) fn serving(&self) -> bool {
        self.state() == State::Serving
    }

    /// Whether the map holds (or is loading) entries, so writes must reach it.
    pub(super) fn following(&self) -> bool {
        self.state() != State::Off
    }

    /// What the map knows of the artifact encoded as `encoded` (`project \0 kind \0 key`).
    #[cfg(test)]
    pub(super) fn get(&self, encoded: &[u8]) -> Held {
        self.with_entry(encoded, |entry| match entry {
            Some(presence) => Held::Present(*presence),
            None => Held::Absent,
        })
    }

    /// [`PresenceMap::get`] for an existence check that notes an access of what it finds. The
    /// entry's `accessed_ms` is when an access was last noted (its publish at first): once that
    /// is `resolution_ms` old (or in the future: the clock went back), `note` is called and
    /// `accessed_ms` becomes `now_ms`, both under the entry's lock, so that no other check can
    /// see the access as noted before the note is queued. A blob that every build asks about is
    /// thus noted once per resolution, not on every check (as `hot.rs` does for reads): each
    /// note is a pending entry, and each flush of one reads RocksDB twice.
    pub(super) fn get_noting(
        &self,
        encoded: &[u8],
        now_ms: u64,
        resolution_ms: u64,
        note: impl FnOnce(),
    ) -> Held {
        self.with_entry(encoded, |entry| match entry {
            Some(presence) => {
                let found = *presence;
                let due =
                    presence.accessed_ms > now_ms || now_ms - presence.accessed_ms >= resolution_ms;
                if due {
                    note();
                    presence.accessed_ms = now_ms;
                }
                Held::Present(found)
            }
            None => Held::Absent,
        })
    }

    /// `answer` of the key's entry, under its shard's lock; [`Held::Unknown`] for a key the map
    /// cannot answer.
    fn with_entry(
        &self,
        encoded: &[u8],
        answer: impl FnOnce(Option<&mut Presence>) -> Held,
    ) -> Held {
        if !self.serving() {
            return Held::Unknown;
        }
        let Some((prefix, hash)) = split_encoded(encoded) else {
            return Held::Unknown;
        };
        // A prefix never seen has no entry: every entry's prefix was numbered before it went in.
        let Some(prefix) = self.known_prefix(prefix) else {
            return Held::Absent;
        };
        let key = HeldKey { prefix, hash };
        answer(self.shard(&key).entries.get_mut(&key))
    }

    /// Follows a write of the record encoded as `encoded`: `Some` its new `presence` entry,
    /// `None` for a removal (or a write that failed). The caller holds the key's lock.
    pub(super) fn apply(&self, encoded: &[u8], presence: Option<Presence>) {
        if !self.following() {
            return;
        }
        let Some(key) = split_encoded(encoded).map(|split| self.held_key(split)) else {
            return;
        };
        let mut shard = self.shard(&key);
        // Read under the shard's lock: `loaded` and `turn_off` change the state holding every
        // shard's lock, so this write lands wholly before or wholly after them.
        let loading = match self.state() {
            State::Off => return,
            State::Loading => true,
            State::Serving => false,
        };
        match presence {
            Some(presence) => {
                shard.entries.insert(key, presence);
                if loading {
                    shard.removed.remove(&key);
                }
            }
            None => {
                shard.remove(&key);
                if loading {
                    shard.removed.insert(key);
                }
            }
        }
    }

    /// Adds an entry the loader read from the family (its key as the family spells it), unless
    /// a write since the map was created decided that key. Other keys (not packed) are skipped.
    pub(super) fn load(&self, presence_key: &[u8], presence: Presence) {
        let Some(key) = split_packed(presence_key).map(|split| self.held_key(split)) else {
            return;
        };
        let mut shard = self.shard(&key);
        if self.state() == State::Loading && !shard.removed.contains(&key) {
            shard.entries.entry(key).or_insert(presence);
        }
    }

    /// Ends the load: the map answers from now on.
    pub(super) fn loaded(&self) {
        // Under each shard's lock, so that no write is between its two halves meanwhile.
        let shards: Vec<_> = self.shards.iter().map(lock).collect();
        let previous = self.state.compare_exchange(
            State::Loading as u8,
            State::Serving as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        for mut shard in shards {
            shard.removed = HashSet::new();
            if previous.is_err() {
                shard.entries = HashMap::new();
            }
        }
    }

    /// Stops following writes and frees the entries (a load that failed or was cut short):
    /// existence checks read RocksDB from now on.
    pub(super) fn turn_off(&self) {
        let shards: Vec<_> = self.shards.iter().map(lock).collect();
        self.state.store(State::Off as u8, Ordering::Release);
        for mut shard in shards {
            *shard = Shard::default();
        }
    }

    /// Empties the map and starts loading again, as at open.
    #[cfg(test)]
    pub(super) fn restart_loading(&self) {
        let mut shards: Vec<_> = self.shards.iter().map(lock).collect();
        self.state.store(State::Loading as u8, Ordering::Release);
        for shard in &mut shards {
            **shard = Shard::default();
        }
    }

    /// Whether the map would hold the artifact encoded as `encoded` (its key is 64 lowercase hex
    /// digits).
    #[cfg(test)]
    pub(super) fn holds_shape(encoded: &[u8]) -> bool {
        split_encoded(encoded).is_some()
    }

    /// How many artifacts the map holds.
    pub(super) fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| lock(shard).entries.len() as u64)
            .sum()
    }

    /// Memory the map's tables take, in bytes: their slots, full or not (sized by the table, not
    /// by what it holds), and the prefix table.
    pub(super) fn bytes(&self) -> u64 {
        let slot = std::mem::size_of::<(HeldKey, Presence)>() as u64 + 1;
        let tables: u64 = self
            .shards
            .iter()
            .map(|shard| {
                let shard = lock(shard);
                // `capacity` is 7/8 of the buckets allocated.
                (shard.entries.capacity() + shard.removed.capacity()) as u64 * 8 / 7 * slot
            })
            .sum();
        let prefixes = self.prefixes.read().unwrap_or_else(|p| p.into_inner());
        let prefix_bytes: u64 = prefixes.keys().map(|prefix| prefix.len() as u64 + 32).sum();
        tables + prefix_bytes
    }

    /// [`PresenceMap::len`] once it answers; 0 before.
    pub(super) fn served_len(&self) -> u64 {
        if self.serving() { self.len() } else { 0 }
    }

    fn shard(&self, key: &HeldKey) -> MutexGuard<'_, Shard> {
        // The hash is a digest, spread evenly; the map inside hashes it again with a random key,
        // so crafted digests that share a shard still cannot make its lookups slow.
        lock(&self.shards[key.hash[0] as usize % SHARDS])
    }

    /// The key held for a prefix and hash, numbering the prefix if it is new.
    fn held_key(&self, (prefix, hash): (&[u8], [u8; 32])) -> HeldKey {
        HeldKey {
            prefix: self.prefix_id(prefix),
            hash,
        }
    }

    fn known_prefix(&self, prefix: &[u8]) -> Option<u32> {
        let prefixes = self.prefixes.read().unwrap_or_else(|p| p.into_inner());
        prefixes.get(prefix).copied()
    }

    fn prefix_id(&self, prefix: &[u8]) -> u32 {
        if let Some(id) = self.known_prefix(prefix) {
            return id;
        }
        let mut prefixes = self.prefixes.write().unwrap_or_else(|p| p.into_inner());
        let next = prefixes.len() as u32;
        *prefixes.entry(prefix.into()).or_insert(next)
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `project \0 kind \0` prefix and packed hash of an encoded key of a content-addressed
/// kind whose key part is 64 lowercase hex digits.
fn split_encoded(encoded: &[u8]) -> Option<(&[u8], [u8; 32])> {
    let (prefix, key) = encoded.split_at(key_start(encoded)?);
    held_kind(prefix).then_some(())?;
    Some((prefix, pack_hash(key)?))
}

/// The same of a `presence` key that holds a packed hash (`project \0 kind \0 \0 hash`).
fn split_packed(presence_key: &[u8]) -> Option<(&[u8], [u8; 32])> {
    let (prefix, rest) = presence_key.split_at(key_start(presence_key)?);
    held_kind(prefix).then_some(())?;
    let (&0, hash) = rest.split_first()? else {
        return None;
    };
    Some((prefix, hash.try_into().ok()?))
}

/// Whether a `project \0 kind \0` prefix names a kind the map holds: the content-addressed
/// ones, the only kinds existence checks ask about. Action-cache keys are digests too, but
/// nothing asks whether they exist, so holding them would only cost memory.
fn held_kind(prefix: &[u8]) -> bool {
    [Kind::CasSha256, Kind::CasBlake3].iter().any(|kind| {
        prefix
            .strip_suffix(b"\0")
            .and_then(|rest| rest.strip_suffix(kind.as_str().as_bytes()))
            .is_some_and(|rest| rest.ends_with(b"\0"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{ArtifactKey, Kind};

    fn encoded(n: u8) -> Vec<u8> {
        ArtifactKey::new("p", Kind::CasSha256, format!("{n:02x}").repeat(32)).encode()
    }

    fn packed(n: u8) -> Vec<u8> {
        let mut out = Vec::new();
        super::super::presence::presence_key(&encoded(n), &mut out);
        out
    }

    fn entry(size: u64) -> Presence {
        Presence {
            size,
            version_ms: 1,
            accessed_ms: 1,
        }
    }

    #[test]
    fn answers_nothing_until_loaded_and_then_what_it_holds() {
        let map = PresenceMap::new(true);
        map.load(&packed(1), entry(10));
        assert_eq!(map.get(&encoded(1)), Held::Unknown, "still loading");
        map.loaded();
        assert_eq!(map.get(&encoded(1)), Held::Present(entry(10)));
        assert_eq!(map.get(&encoded(2)), Held::Absent);
        let other_project = ArtifactKey::new("q", Kind::CasSha256, "01".repeat(32)).encode();
        assert_eq!(map.get(&other_project), Held::Absent);
        let text_key = ArtifactKey::new("p", Kind::Gradle, "not-a-digest").encode();
        assert_eq!(map.get(&text_key), Held::Unknown, "RocksDB answers it");
        let action = ArtifactKey::new("p", Kind::ActionCache, "01".repeat(32)).encode();
        assert_eq!(map.get(&action), Held::Unknown, "not a kind the map holds");
        let blake3 = ArtifactKey::new("p", Kind::CasBlake3, "01".repeat(32)).encode();
        assert_eq!(map.get(&blake3), Held::Absent, "held, and not stored");
    }

    #[test]
    fn the_loader_never_overrides_a_write_made_while_it_ran() {
        let map = PresenceMap::new(true);
        // Written, then read by the loader from an older view: the write wins.
        map.apply(&encoded(1), Some(entry(2)));
        map.load(&packed(1), entry(1));
        // Removed, then read by the loader from a view that still had it: stays removed.
        map.apply(&encoded(2), Some(entry(2)));
        map.apply(&encoded(2), None);
        map.load(&packed(2), entry(2));
        // Removed, then written again: the write counts, not the removal.
        map.apply(&encoded(3), None);
        map.apply(&encoded(3), Some(entry(3)));
        map.load(&packed(3), entry(1));
        // Untouched: the loader's entry.
        map.load(&packed(4), entry(4));
        map.loaded();
        assert_eq!(map.get(&encoded(1)), Held::Present(entry(2)));
        assert_eq!(map.get(&encoded(2)), Held::Absent);
        assert_eq!(map.get(&encoded(3)), Held::Present(entry(3)));
        assert_eq!(map.get(&encoded(4)), Held::Present(entry(4)));
        assert_eq!(map.len(), 3);
        // Once serving, a removed key can come back through the next write.
        map.apply(&encoded(2), Some(entry(5)));
        assert_eq!(map.get(&encoded(2)), Held::Present(entry(5)));
    }

    #[test]
    fn an_access_is_noted_once_per_resolution() {
        let map = PresenceMap::new(true);
        map.loaded();
        map.apply(&encoded(1), Some(entry(10)));
        let notes = std::cell::Cell::new(0);
        let check = |now| map.get_noting(&encoded(1), now, 50, || notes.set(notes.get() + 1));
        let held_at = |accessed_ms| {
            Held::Present(Presence {
                accessed_ms,
                ..entry(10)
            })
        };
        // Published at 1: old enough at 100, so this check notes it.
        assert_eq!(check(100), held_at(1));
        assert_eq!(notes.get(), 1);
        // Noted at 100: checks within the resolution note nothing.
        assert_eq!(check(120), held_at(100));
        assert_eq!(check(149), held_at(100));
        assert_eq!(notes.get(), 1);
        // A resolution later, noted again.
        assert_eq!(check(150), held_at(100));
        assert_eq!(notes.get(), 2);
        // The clock went back: noted, rather than silenced until it catches up.
        assert_eq!(check(20), held_at(150));
        assert_eq!(notes.get(), 3);
        assert_eq!(map.get(&encoded(1)), held_at(20));
        // A publish starts afresh from its own time.
        map.apply(&encoded(1), Some(entry(11)));
        assert_eq!(map.get(&encoded(1)), Held::Present(entry(11)));
    }

    #[test]
    fn turned_off_it_holds_and_answers_nothing() {
        let map = PresenceMap::new(true);
        map.apply(&encoded(1), Some(entry(1)));
        map.turn_off();
        map.apply(&encoded(2), Some(entry(1)));
        map.loaded();
        assert_eq!(map.get(&encoded(1)), Held::Unknown);
        assert_eq!(map.len(), 0);
        let off = PresenceMap::new(false);
        off.apply(&encoded(1), Some(entry(1)));
        assert_eq!(off.get(&encoded(1)), Held::Unknown);
        assert_eq!(off.len(), 0);
    }

    /// After an eviction or clean that removed most of the map's entries, its memory follows
    /// what it still holds instead of staying sized for the most it ever held.
    #[test]
    fn memory_follows_the_entries_after_most_are_removed() {
        let map = PresenceMap::new(true);
        map.loaded();
        let key = |n: u32| {
            let hash = blake3::hash(&n.to_le_bytes()).to_hex();
            ArtifactKey::new("p", Kind::CasSha256, hash.as_str()).encode()
        };
        let count = 200_000;
        for n in 0..count {
            map.apply(&key(n), Some(entry(n.into())));
        }
        let full = map.bytes();
        assert!(full > 200_000 * 65, "{full} bytes for {count} entries");
        let kept = count / 20;
        for n in kept..count {
            map.apply(&key(n), None);
        }
        assert_eq!(map.len(), kept as u64);
        let after = map.bytes();
        assert!(
            after < full / 5,
            "{after} bytes for {kept} entries, {full} when it held {count}"
        );
        for n in 0..kept {
            assert_eq!(map.get(&key(n)), Held::Present(entry(n.into())));
        }
        assert_eq!(map.get(&key(kept)), Held::Absent);
    }

    #[test]
    fn keys_of_other_shapes_are_never_held() {
        let map = PresenceMap::new(true);
        let shapes = [
            (Kind::CasSha256, "ab".repeat(31)),
            (Kind::CasSha256, "AB".repeat(32)),
            (Kind::CasSha256, "ab".repeat(33)),
            (Kind::ActionCache, "ab".repeat(32)),
            (Kind::Gradle, "ab".repeat(32)),
        ];
        for (kind, key) in shapes {
            let encoded = ArtifactKey::new("p", kind, key).encode();
            map.apply(&encoded, Some(entry(1)));
            let mut family_key = Vec::new();
            super::super::presence::presence_key(&encoded, &mut family_key);
            map.load(&family_key, entry(1));
        }
        assert_eq!(map.len(), 0);
    }
}
