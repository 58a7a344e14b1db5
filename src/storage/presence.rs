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

use std::sync::atomic::Ordering;

use rocksdb::{DB, WriteBatch};

use super::meta::{self, Presence};
use super::{ArtifactKey, Store, StoreError, cf};

/// Records re-read per backfill batch.
const BACKFILL_BATCH: usize = 512;

/// Appends the `presence` key of the artifact encoded as `encoded`: the encoded key itself,
/// except that a key of 64 lowercase hex digits (what every content-addressed kind uses) is
/// packed into its 32 bytes behind a NUL. No text key contains NUL, so a packed key never equals
/// an unpacked one; and the family stays ordered by project, like `artifacts`.
pub(super) fn presence_key(encoded: &[u8], out: &mut Vec<u8>) {
    if let Some(split) = key_start(encoded) {
        let (prefix, key) = encoded.split_at(split);
        let mut packed = [0u8; 32];
        if key.len() == 64
            && key.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && hex::decode_to_slice(key, &mut packed).is_ok()
        {
            out.extend_from_slice(prefix);
            out.push(0);
            out.extend_from_slice(&packed);
            return;
        }
    }
    out.extend_from_slice(encoded);
}

/// Where the key part of an encoded `project \0 kind \0 key` starts.
fn key_start(encoded: &[u8]) -> Option<usize> {
    let first = encoded.iter().position(|b| *b == 0)?;
    let second = encoded[first + 1..].iter().position(|b| *b == 0)?;
    Some(first + 1 + second + 1)
}

/// Whether `presence` is complete in the database just opened: flagged, or nothing stored yet
/// (then the flag is written, since every record from now on gets its entry).
pub(super) fn indexed_at_open(db: &DB) -> Result<bool, StoreError> {
    let state = cf(db, meta::CF_STATE);
    if db
        .get_pinned_cf(state, meta::PRESENCE_INDEXED_KEY)?
        .is_some()
    {
        return Ok(true);
    }
    let mut records = db.iterator_cf(cf(db, meta::CF_ARTIFACTS), rocksdb::IteratorMode::Start);
    if records.next().transpose()?.is_some() {
        return Ok(false);
    }
    db.put_cf(state, meta::PRESENCE_INDEXED_KEY, [])?;
    Ok(true)
}

/// Many keys in one allocation.
#[derive(Clone)]
struct KeyBuffer {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl KeyBuffer {
    fn new<W: FnOnce(&mut Vec<u8>)>(writers: impl ExactSizeIterator<Item = W>) -> KeyBuffer {
        let mut buffer = KeyBuffer {
            bytes: Vec::with_capacity(writers.len() * 64),
            ends: Vec::with_capacity(writers.len()),
        };
        for write in writers {
            write(&mut buffer.bytes);
            buffer.ends.push(buffer.bytes.len());
        }
        buffer
    }

    fn keys(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.ends.iter().enumerate().map(|(i, end)| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            &self.bytes[start..*end]
        })
    }
}

impl Store {
    /// [`presence_key`] of one artifact, for a batch.
    pub(super) fn presence_key(&self, encoded: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(encoded.len());
        presence_key(encoded, &mut out);
        out
    }

    /// The size of each artifact that is stored and visible (`None` otherwise), noting an
    /// access of each one found. Blocking: RocksDB `MultiGet` over one chunk of a lookup.
    pub(super) fn sizes_blocking(
        &self,
        keys: &[ArtifactKey],
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let indexed = self.inner.presence_indexed.load(Ordering::Acquire);
        // Every key encoded into one buffer (one allocation instead of one per key): the
        // access-time note names an artifact by its encoded key, the lookup by its family's key.
        let encoded = KeyBuffer::new(
            keys.iter()
                .map(|key| move |out: &mut Vec<u8>| key.encode_into(out)),
        );
        let (family, looked_up) = if indexed {
            let packed = KeyBuffer::new(
                encoded
                    .keys()
                    .map(|key| move |out: &mut Vec<u8>| presence_key(key, out)),
            );
            (meta::CF_PRESENCE, packed)
        } else {
            (meta::CF_ARTIFACTS, encoded.clone())
        };
        let values = self
            .inner
            .db
            .batched_multi_get_cf(self.cf(family), looked_up.keys(), false);
        let resolution = self.access_resolution_ms();
        let mut sizes = Vec::with_capacity(keys.len());
        for ((key, encoded), value) in keys.iter().zip(encoded.keys()).zip(values) {
            let size = value?.and_then(|value| {
                let presence = if indexed {
                    Presence::decode(&value)?
                } else {
                    Presence::of_view(&meta::decode(&value)?)
                };
                if self
                    .inner
                    .tombstones
                    .hides(&key.project, presence.version_ms)
                {
                    return None;
                }
                self.inner
                    .touches
                    .note(encoded, presence.accessed_ms, resolution);
                Some(presence.size)
            });
            sizes.push(size);
        }
        Ok(sizes)
    }

    /// Writes the `presence` entry of every record stored before the family existed, once, and
    /// then lets existence checks use it. Returns how many entries it wrote. Blocking.
    pub fn backfill_presence(&self) -> Result<u64, StoreError> {
        if self.inner.presence_indexed.load(Ordering::Acquire) {
            return Ok(0);
        }
        let mut written = 0u64;
        let mut from: Vec<u8> = Vec::new();
        loop {
            let mut keys = Vec::new();
            let iter = self.inner.db.iterator_cf(
                self.cf(meta::CF_ARTIFACTS),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            for item in iter.take(BACKFILL_BATCH) {
                keys.push(item?.0);
            }
            let Some(last) = keys.last().cloned() else {
                break;
            };
            // Under the keys' locks no record is replaced or removed meanwhile, so each entry
            // written here matches its record as it stands (a publish or removal after the lock
            // is released writes or deletes the entry itself).
            let guards = self.inner.keys.lock_all(keys.iter().map(|k| &k[..]));
            let mut batch = WriteBatch::default();
            for key in &keys {
                let Some(value) = self.get(meta::CF_ARTIFACTS, key)? else {
                    continue;
                };
                // An undecodable record gets no entry: reads treat it as absent too.
                if let Some(record) = meta::decode(&value) {
                    let presence = Presence::of_view(&record);
                    batch.put_cf(
                        self.cf(meta::CF_PRESENCE),
                        self.presence_key(key),
                        presence.encode(),
                    );
                    written += 1;
                }
            }
            self.write(batch)?;
            drop(guards);
            from = last.into_vec();
            from.push(0);
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(meta::CF_STATE), meta::PRESENCE_INDEXED_KEY, []);
        self.write_synced(batch, true)?;
        self.inner.presence_indexed.store(true, Ordering::Release);
        Ok(written)
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
