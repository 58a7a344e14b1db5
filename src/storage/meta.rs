//! The metadata records kept in RocksDB and their encodings.
//!
//! Column families:
//! - `artifacts`: [`ArtifactKey::encode`] → [`ArtifactRecord`]
//! - `access`: `last_access_ms (8 bytes BE) ++ encoded key` → empty; ordered oldest first, it
//!   is the eviction queue
//! - `presence`: encoded key → [`Presence`] (size, version, access time at publish), written
//!   and deleted in the same batches as the record: what an existence check (FindMissingBlobs)
//!   reads, a few dozen bytes per artifact where the record can hold a 32 KiB inline body
//! - `atime`: encoded key → last access (8 bytes BE), for artifacts read since their publish
//!   (until then the record's `accessed_ms` is the last access). Kept apart from the record so
//!   that noting a read never rewrites a record, whose inline body can be 32 KiB
//! - `uploads`: upload id → [`UploadRecord`] (module multipart uploads in flight), and
//!   [`part_key`] → [`PartRecord`] for each of their parts
//! - `state`: node-wide counters such as [`Usage`] and the last publish sequence number (both
//!   kept by merge operands, see [`merge_state`]), project tombstones, peer cursors and the
//!   highest log record the bound dropped (`outbox.rs`)
//! - `bodies`: body file id (16 bytes BE) → encoded key of the record naming it; the reverse
//!   index that lets the orphan sweep tell a leftover body file from a referenced one
//! - `outbox`: the replication log, publish sequence number (8 bytes BE) → `outbox::LogRecord`,
//!   written in the publish batch of every local write when the node has peers (`outbox.rs`)
//! - `extra`: records callers add to a publish's batch (`BatchHook`); the store never reads them
//!
//! Records are `postcard`-encoded behind a one-byte format version so a later release can read
//! what this one wrote.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::keys::ArtifactKey;

pub const CF_ARTIFACTS: &str = "artifacts";
pub const CF_ACCESS: &str = "access";
pub const CF_UPLOADS: &str = "uploads";
pub const CF_STATE: &str = "state";
pub const CF_BODIES: &str = "bodies";
pub const CF_OUTBOX: &str = "outbox";
pub const CF_ATIME: &str = "atime";
pub const CF_EXTRA: &str = "extra";
pub const CF_PRESENCE: &str = "presence";
pub const ALL_CFS: [&str; 9] = [
    CF_ARTIFACTS,
    CF_PRESENCE,
    CF_ACCESS,
    CF_ATIME,
    CF_UPLOADS,
    CF_STATE,
    CF_BODIES,
    CF_OUTBOX,
    CF_EXTRA,
];

/// Key of the [`Usage`] record in `state`.
pub const USAGE_KEY: &[u8] = b"usage";
/// Present in `state` once `bodies` indexes every file body (data dirs from before the index
/// get it by a backfill; until then the orphan sweep deletes nothing in `bodies/`).
pub const BODIES_INDEXED_KEY: &[u8] = b"bodies_indexed";

/// Present in `state` once `presence` has an entry for every record (data dirs from before the
/// family get them by a backfill; until then existence checks read `artifacts`).
pub const PRESENCE_INDEXED_KEY: &[u8] = b"presence_indexed";

/// Key of a body file in the `bodies` family.
pub fn body_index_key(id: u128) -> [u8; 16] {
    id.to_be_bytes()
}

/// Key of the highest publish sequence number committed, in `state` (8 bytes, big-endian).
pub const SEQ_KEY: &[u8] = b"seq";

/// Prefix of the keys, in `state`, of the highest `version_ms` ever published in each project
/// (followed by the project; stored like [`SEQ_KEY`]): a local clean of the project is never
/// older than what it removes (see `clean.rs`).
pub const VERSION_HIGH_PREFIX: &[u8] = b"version_high\0";

/// The key of `project`'s highest published `version_ms`.
pub fn version_high_key(project: &str) -> Vec<u8> {
    let mut key = VERSION_HIGH_PREFIX.to_vec();
    key.extend_from_slice(project.as_bytes());
    key
}

/// A sequence number as stored under [`SEQ_KEY`] (value and merge operands alike).
pub(crate) fn encode_seq(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn decode_seq(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The highest sequence number among a stored value and merge operands.
fn max_seq<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    values
        .filter_map(decode_seq)
        .max()
        .map(|seq| encode_seq(seq).to_vec())
}

const FORMAT_V1: u8 = 1;

/// Where an artifact's bytes live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyRef {
    /// Small bodies live inside the record: one lookup serves them, and they publish atomically
    /// with their metadata for free. (`Bytes`: encoded as a byte string and decoded as one
    /// copy, not byte by byte; a clone shares the bytes, so a record held in memory, see
    /// `hot.rs`, is served without copying its body.)
    Inline(Bytes),
    /// A file under `bodies/`, named by this id (see `bodies::body_path`).
    File(u128),
}

/// Everything the node knows about one stored artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub size: u64,
    pub blake3: [u8; 32],
    /// SHA-256 of the bytes when a client sent one or the protocol names it.
    pub sha256: Option<[u8; 32]>,
    pub content_type: Option<String>,
    /// Wall-clock write time at the origin node (last writer wins across the mesh).
    pub version_ms: u64,
    pub origin: String,
    /// Access time at publish, for least-recently-accessed eviction; reads since then are in
    /// the `atime` family (see [`Store::last_access`](super::Store)).
    pub accessed_ms: u64,
    pub body: BodyRef,
}

/// An [`ArtifactRecord`] decoded without copying anything: what an existence check needs,
/// without the cost of an inline body. Field for field the same encoding.
#[derive(Debug, Deserialize)]
pub struct RecordView<'a> {
    pub size: u64,
    pub blake3: [u8; 32],
    pub sha256: Option<[u8; 32]>,
    #[serde(borrow)]
    pub content_type: Option<&'a str>,
    pub version_ms: u64,
    #[serde(borrow)]
    pub origin: &'a str,
    pub accessed_ms: u64,
    #[serde(borrow)]
    pub body: BodyView<'a>,
}

/// [`BodyRef`], borrowed.
#[derive(Debug, Deserialize)]
pub enum BodyView<'a> {
    Inline(#[serde(borrow)] &'a [u8]),
    File(u128),
}

/// What an existence check needs of a record, kept in the `presence` family: a fixed 24 bytes
/// (three big-endian `u64`s), so a later format can be told apart by its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presence {
    pub size: u64,
    pub version_ms: u64,
    pub accessed_ms: u64,
}

impl Presence {
    pub fn of(record: &ArtifactRecord) -> Presence {
        Presence {
            size: record.size,
            version_ms: record.version_ms,
            accessed_ms: record.accessed_ms,
        }
    }

    pub fn of_view(record: &RecordView<'_>) -> Presence {
        Presence {
            size: record.size,
            version_ms: record.version_ms,
            accessed_ms: record.accessed_ms,
        }
    }

    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..8].copy_from_slice(&self.size.to_be_bytes());
        out[8..16].copy_from_slice(&self.version_ms.to_be_bytes());
        out[16..].copy_from_slice(&self.accessed_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Presence> {
        let bytes: &[u8; 24] = bytes.try_into().ok()?;
        let field = |at: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(word)
        };
        Some(Presence {
            size: field(0),
            version_ms: field(8),
            accessed_ms: field(16),
        })
    }
}

/// What every artifact costs beside its body: its record's fixed fields and RocksDB's own
/// per-entry overhead in the record and in the eviction queue (an estimate, on the high side).
pub const RECORD_OVERHEAD: u64 = 160;

/// What an artifact costs against capacity: its body, its key (stored twice: the record and
/// the eviction-queue entry), its content type and [`RECORD_OVERHEAD`]. Counting metadata keeps
/// many small artifacts bounded like large ones.
pub fn charge(size: u64, encoded_key_len: usize, content_type_len: usize) -> u64 {
    size + 2 * encoded_key_len as u64 + content_type_len as u64 + RECORD_OVERHEAD
}

impl ArtifactRecord {
    /// See [`charge`].
    pub fn charge(&self, encoded_key_len: usize) -> u64 {
        let content_type_len = self.content_type.as_ref().map_or(0, String::len);
        charge(self.size, encoded_key_len, content_type_len)
    }
}

/// A module multipart upload in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub target: EncodedKey,
    pub created_ms: u64,
}

/// A part of a module upload as it was acknowledged: what assembly checks the part's file
/// against, since in `process` durability a power cut may leave a renamed part file empty or
/// with the bytes of the part it replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub size: u64,
    /// `None` for a part file found without an entry at start (placed by a release that
    /// recorded no parts), taken at its length only.
    pub blake3: Option<[u8; 32]>,
}

/// The `uploads` key of part `number` of upload `id`: the id, `#`, the number in ten digits.
/// Upload ids are hex, so this never meets an [`UploadRecord`]'s key; it sorts after it. (A
/// release that recorded no parts reads it as an unreadable upload record with no directory,
/// which it expires.)
pub fn part_key(id: &str, number: u32) -> Vec<u8> {
    format!("{id}#{number:010}").into_bytes()
}

/// The `uploads` keys of every part of upload `id`: from `id#` up to, not including, `id$`.
pub fn part_key_range(id: &str) -> (Vec<u8>, Vec<u8>) {
    (format!("{id}#").into_bytes(), format!("{id}$").into_bytes())
}

/// The upload id and part number of a [`part_key`]; `None` for an upload record's key.
pub fn split_part_key(key: &[u8]) -> Option<(&str, u32)> {
    let key = std::str::from_utf8(key).ok()?;
    let (id, number) = key.split_once('#')?;
    Some((id, number.parse().ok()?))
}

/// An [`ArtifactKey`] in its encoded form (kept as bytes inside other records).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedKey(pub Vec<u8>);

impl EncodedKey {
    pub fn decode(&self) -> Option<ArtifactKey> {
        ArtifactKey::decode(&self.0)
    }
}

/// Bytes and artifacts accounted against capacity. Updated in the same batch as every change
/// of `artifacts`, so start-up reads one record instead of scanning the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: u64,
    pub artifacts: u64,
}

impl Usage {
    /// Adds a change (saturating: a counter never wraps, whatever an old bug left behind).
    pub(crate) fn apply(&mut self, delta: UsageDelta) {
        self.bytes = self.bytes.saturating_add_signed(delta.bytes);
        self.artifacts = self.artifacts.saturating_add_signed(delta.artifacts);
    }
}

/// A change of [`Usage`] made by one batch. Batches carry it as a merge operand instead of the
/// new total, so writers need not read the counter (and serialise on it) to update it: RocksDB
/// adds the operands up, in any order, since addition commutes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UsageDelta {
    pub bytes: i64,
    pub artifacts: i64,
}

/// Format byte of an encoded [`UsageDelta`] (distinct from [`FORMAT_V1`], which a full
/// [`Usage`] carries).
const FORMAT_USAGE_DELTA: u8 = 0x81;

impl UsageDelta {
    /// An artifact costing `charge` comes in.
    pub(crate) fn add(&mut self, charge: u64) {
        self.bytes = self
            .bytes
            .saturating_add(charge.min(i64::MAX as u64) as i64);
        self.artifacts += 1;
    }

    /// An artifact costing `charge` goes.
    pub(crate) fn remove(&mut self, charge: u64) {
        self.bytes = self
            .bytes
            .saturating_sub(charge.min(i64::MAX as u64) as i64);
        self.artifacts -= 1;
    }

    pub(crate) fn is_zero(&self) -> bool {
        self.bytes == 0 && self.artifacts == 0
    }

    fn combine(self, other: UsageDelta) -> UsageDelta {
        UsageDelta {
            bytes: self.bytes.saturating_add(other.bytes),
            artifacts: self.artifacts.saturating_add(other.artifacts),
        }
    }

    /// Fixed-width encoding: format byte, then both fields little-endian.
    pub(crate) fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[0] = FORMAT_USAGE_DELTA;
        out[1..9].copy_from_slice(&self.bytes.to_le_bytes());
        out[9..17].copy_from_slice(&self.artifacts.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<UsageDelta> {
        match bytes.split_first() {
            Some((&FORMAT_USAGE_DELTA, rest)) if rest.len() == 16 => Some(UsageDelta {
                bytes: i64::from_le_bytes(rest[..8].try_into().ok()?),
                artifacts: i64::from_le_bytes(rest[8..].try_into().ok()?),
            }),
            _ => None,
        }
    }
}

/// Name of the `state` family's merge operator (RocksDB records it; never rename it).
pub(crate) const STATE_MERGE_OPERATOR: &str = "kura.state.v1";

/// Full merge of the `state` family: the usage counter adds its deltas to the stored total, and
/// the sequence number and the version high-water mark keep the highest (batches may land in any order). An operand this version cannot read is skipped rather than failing the read (which would make
/// RocksDB report corruption and refuse the key): the counter is an estimate that eviction and
/// the next writes correct, not a ledger.
pub(crate) fn merge_state(
    key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    if key == USAGE_KEY {
        let mut usage = existing.and_then(decode::<Usage>).unwrap_or_default();
        for operand in operands {
            if let Some(delta) = UsageDelta::decode(operand) {
                usage.apply(delta);
            }
        }
        return Some(encode(&usage));
    }
    if key == SEQ_KEY || key.starts_with(VERSION_HIGH_PREFIX) {
        return Some(max_seq(existing.into_iter().chain(operands)).unwrap_or_default());
    }
    // No other key takes merges; keep the newest value rather than fail.
    operands.iter().last().or(existing).map(<[u8]>::to_vec)
}

/// Partial merge of the `state` family: operands combined without the stored value.
pub(crate) fn merge_state_operands(
    key: &[u8],
    _existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    if key == USAGE_KEY {
        let mut sum = UsageDelta::default();
        for operand in operands {
            sum = sum.combine(UsageDelta::decode(operand)?);
        }
        return Some(sum.encode().to_vec());
    }
    if key == SEQ_KEY || key.starts_with(VERSION_HIGH_PREFIX) {
        return max_seq(operands.iter());
    }
    // `None`: RocksDB keeps the operands as they are.
    None
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_V1];
    // Serializing these plain structs into a Vec cannot fail.
    out.extend(postcard::to_stdvec(value).unwrap_or_default());
    out
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// Key of an artifact's entry in the `access` column family.
pub fn access_key(accessed_ms: u64, encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + encoded.len());
    out.extend_from_slice(&accessed_ms.to_be_bytes());
    out.extend_from_slice(encoded);
    out
}

/// An access time as stored in the `atime` family.
pub fn encode_time(ms: u64) -> [u8; 8] {
    ms.to_be_bytes()
}

pub fn decode_time(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Splits an `access` key back into its time and encoded artifact key.
pub fn split_access_key(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (time, key) = bytes.split_at_checked(8)?;
    Some((u64::from_be_bytes(time.try_into().ok()?), key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_unknown_versions() {
        let record = ArtifactRecord {
            size: 3,
            blake3: [7; 32],
            sha256: Some([9; 32]),
            content_type: Some("text/plain".into()),
            version_ms: 11,
            origin: "n1".into(),
            accessed_ms: 12,
            body: BodyRef::Inline(Bytes::from_static(b"abc")),
        };
        let bytes = encode(&record);
        let view = decode::<RecordView>(&bytes).expect("a view decodes what a record encodes");
        assert_eq!(
            (view.size, view.version_ms, view.accessed_ms, view.origin),
            (3, 11, 12, "n1")
        );
        assert_eq!(
            (view.content_type, view.sha256),
            (Some("text/plain"), Some([9; 32]))
        );
        assert!(matches!(view.body, BodyView::Inline(b"abc")));
        assert_eq!(decode::<ArtifactRecord>(&bytes), Some(record));
        let mut future = bytes.clone();
        future[0] = 99;
        assert_eq!(decode::<ArtifactRecord>(&future), None);
        assert_eq!(decode::<ArtifactRecord>(&[]), None);
    }

    /// Records written before inline bodies were `Bytes` (a `Vec<u8>` encoded as a byte
    /// string) must decode, and new ones must read back in older releases: the encoding of an
    /// inline body is pinned byte for byte (variant 0, length, bytes).
    #[test]
    fn an_inline_body_encodes_as_a_byte_string() {
        let body = BodyRef::Inline(Bytes::from_static(b"abc"));
        let pinned = [0u8, 3, b'a', b'b', b'c'];
        assert_eq!(postcard::to_stdvec(&body).ok(), Some(pinned.to_vec()));
        assert_eq!(postcard::from_bytes::<BodyRef>(&pinned).ok(), Some(body));
    }

    #[test]
    fn presence_entries_round_trip_and_reject_other_lengths() {
        let presence = Presence {
            size: 1 << 40,
            version_ms: 11,
            accessed_ms: u64::MAX,
        };
        assert_eq!(Presence::decode(&presence.encode()), Some(presence));
        assert_eq!(Presence::decode(&presence.encode()[..23]), None);
        assert_eq!(Presence::decode(&[0; 25]), None);
    }

    #[test]
    fn access_keys_sort_by_time() {
        let a = access_key(5, b"zzz");
        let b = access_key(6, b"aaa");
        assert!(a < b);
        assert_eq!(split_access_key(&a), Some((5, &b"zzz"[..])));
    }
}
