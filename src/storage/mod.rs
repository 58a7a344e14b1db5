//! The storage engine: the only code that touches the data dir.
//!
//! Layout of `storage.data_dir`:
//! - `LOCK`: held (flock) for the life of the process, so two nodes never share a data dir
//! - `node_id`: this node's stable identity, generated on first start
//! - `meta/`: RocksDB (see [`meta`] for its column families)
//! - `bodies/xx/<id>`: bodies too large to keep inline in their record
//! - `tmp/`: bodies being received (named by the id their body file will have); emptied on start
//! - `uploads/<upload id>/<part>`: parts of module multipart uploads
//!
//! Publishing a body is: stage + hash ([`bodies::BodyWriter`]) → rename into `bodies/` → one
//! RocksDB batch with the record, its presence entry (`presence.rs`), its eviction-queue entry
//! and the usage counter. The batch is the moment the artifact becomes visible, so readers never
//! see half of it. A crash between the rename and the batch leaves an unreferenced body file,
//! which the orphan sweep (`sweep.rs`) finds through the `bodies` reverse index and deletes; see
//! `docs/storage.md`.
//!
//! There is no global write lock: writers of different keys reach RocksDB concurrently, so
//! synced batches share device flushes (group commit). What keeps them consistent:
//! - one key's read-modify-writes are serialised by its stripe of [`locks::KeyLocks`];
//! - the usage counter is changed by merge operands (deltas), never read back by writers;
//! - the in-memory accounting is updated after each write under a lock never held across I/O;
//! - project cleans are ordered against publishes by `publish_order` (see `clean.rs`).
//!
//! Lock order: key stripe(s) → `publish_order` → `accounting`; `uploads` → `accounting`.
//!
//! Capacity counts what an artifact costs ([`meta::charge`]: body, key and record), the bytes
//! staged by module uploads, and space promised to writes about to commit. Writes also stop
//! (507) while the filesystem's free space is under `storage.min_free`, so RocksDB itself never
//! runs out of space.

mod backfill;
pub mod bodies;
mod checksums;
mod clean;
mod evict;
mod hot;
pub mod keys;
mod locks;
pub mod meta;
mod outbox;
mod presence;
mod presence_map;
mod resumable;
mod seq;
mod sweep;
#[cfg(test)]
mod tests;
mod uploads;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBPinnableSlice, DataBlockIndexType,
    Options, ReadOptions, WriteBatch, WriteOptions,
};

pub use bodies::{BodyWriter, StagedBody};
pub use evict::DEFAULT_ACCESS_TIME_RESOLUTION;
pub use keys::{ArtifactKey, Kind};
use meta::{ArtifactRecord, BodyRef, Usage, UsageDelta};
pub use outbox::{IndexEntry, LogRecord, LogSlice};
pub use presence::KeyBatch;
pub use resumable::ResumableUpload;
pub use sweep::SweepReport;
pub use uploads::UploadLimits;

/// Bodies up to this size are stored inside their metadata record.
pub const DEFAULT_INLINE_MAX: usize = 32 * 1024;
/// Default of `storage.block_cache`: holds the hot records of a busy node while keeping RSS low.
pub const DEFAULT_BLOCK_CACHE: usize = 32 << 20;
/// Default of `storage.read_cache`: the hot small artifacts of a busy node (about 15,000 of
/// 4 KiB), so that serving them costs no RocksDB read.
pub const DEFAULT_READ_CACHE: usize = 64 << 20;
/// Default of [`StoreOptions::wal_limit`]: a few memtables' worth, so a restart replays little.
pub const DEFAULT_WAL_LIMIT: u64 = 64 << 20;
/// How often a read looks again when the body file it was about to open was replaced.
const READ_ATTEMPTS: usize = 4;
/// File bodies up to this size are read whole and verified before a response starts, so a
/// corrupted one is answered as a miss rather than an aborted response.
const VERIFY_BEFORE_SERVING_MAX: u64 = 1024 * 1024;
/// File bodies up to this size are first tried from the kernel's caches on the async worker
/// (`bodies::read_cached`): reading and hashing a hot one takes tens of microseconds, less
/// than a hop to the blocking pool and back.
const CACHED_READ_MAX: u64 = 256 * 1024;

/// When a write is acknowledged relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledged once the bytes are in the kernel: survives a crash of the process, may lose
    /// the last seconds on power loss, never corrupts.
    Process,
    /// Body, directory entry and metadata are fsync'd before the acknowledgement.
    Fsync,
}

/// What [`Store::open`] needs to know.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Capacity in bytes of artifact bodies.
    pub capacity: u64,
    /// Eviction frees space down to this many bytes.
    pub low_watermark: u64,
    pub inline_max: usize,
    /// Writes are refused while the filesystem has fewer free bytes than this.
    pub min_free: u64,
    /// An artifact's access time moves at most once per this interval (see `evict.rs`).
    pub access_time_resolution: Duration,
    /// Bytes of RocksDB data blocks cached in memory (shared by all column families).
    pub block_cache: usize,
    /// Bytes of recently read inline artifacts kept decoded in memory (see `hot.rs`); 0: none.
    pub read_cache: usize,
    /// RocksDB's write-ahead log is kept around this size: past it, the column families that
    /// still hold the oldest log file are flushed so that it can go.
    pub wal_limit: u64,
    /// Overrides the generated node id when set.
    pub node_id: Option<String>,
    /// Log local publishes for the mesh (see `outbox.rs`); on when the node has peers.
    pub replication_log: bool,
    /// Hold the `presence` entries of content-addressed artifacts in memory, so that existence
    /// checks need no RocksDB lookup (see `presence_map.rs`).
    pub presence_in_memory: bool,
}

impl StoreOptions {
    /// Defaults for a store in `data_dir`: ample capacity, `process` durability.
    pub fn new(data_dir: &Path) -> Self {
        StoreOptions {
            data_dir: data_dir.to_path_buf(),
            durability: Durability::Process,
            capacity: 1 << 40,
            low_watermark: 9 << 37,
            inline_max: DEFAULT_INLINE_MAX,
            min_free: 0,
            access_time_resolution: DEFAULT_ACCESS_TIME_RESOLUTION,
            block_cache: DEFAULT_BLOCK_CACHE,
            read_cache: DEFAULT_READ_CACHE,
            wal_limit: DEFAULT_WAL_LIMIT,
            node_id: None,
            replication_log: false,
            presence_in_memory: true,
        }
    }

    #[cfg(test)]
    pub(crate) fn for_tests(data_dir: &Path) -> Self {
        StoreOptions {
            inline_max: 1024,
            access_time_resolution: Duration::ZERO,
            node_id: Some("test".into()),
            ..StoreOptions::new(data_dir)
        }
    }
}

/// Everything that can go wrong in the store. Each variant maps to one client-visible status in
/// the protocol layers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("body does not match the checksum sent with it")]
    ChecksumMismatch,
    #[error("an artifact already exists under this key")]
    AlreadyExists,
    #[error("not enough storage: eviction cannot free room for this artifact")]
    InsufficientStorage,
    #[error(
        "the data dir's filesystem has {free} bytes free: too few to take {incoming} more and keep storage.min_free ({min_free})"
    )]
    DiskFull {
        free: u64,
        min_free: u64,
        incoming: u64,
    },
    #[error("unknown upload")]
    UploadNotFound,
    #[error("part {0} was not uploaded")]
    MissingPart(u32),
    #[error(
        "part {0} is not as it was acknowledged (a power cut before its bytes reached the disk?)"
    )]
    LostPart(u32),
    #[error("part {0} is listed more than once")]
    DuplicatePart(u32),
    #[error("part numbers run from 1 to {0}")]
    BadPartNumber(u32),
    #[error("another request is writing this upload")]
    UploadBusy,
    #[error("too many uploads in flight (limit {0})")]
    TooManyUploads(usize),
    #[error("data dir {path} is in use by another kura process (lock file {path}/LOCK is held)")]
    Locked { path: PathBuf },
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("metadata store error: {0}")]
    Db(rocksdb::Error),
    /// RocksDB refuses every write after a background error it cannot recover from (a flush or
    /// compaction that met a damaged file or an I/O error): until a restart, reads go on and
    /// writes fail with this, so that clients and operators are told why instead of "internal".
    #[error("the store stopped taking writes after a background error: {0}")]
    WritesStopped(rocksdb::Error),
}

impl From<rocksdb::Error> for StoreError {
    fn from(error: rocksdb::Error) -> Self {
        // RocksDB reports a full disk as an I/O error whose text is the OS's.
        if error.as_ref().contains("No space left on device") {
            StoreError::InsufficientStorage
        } else {
            StoreError::Db(error)
        }
    }
}

impl StoreError {
    /// A write error where "disk full" means "insufficient storage", not an internal failure.
    fn from_write(error: io::Error) -> StoreError {
        if error.raw_os_error() == Some(libc::ENOSPC) || error.raw_os_error() == Some(libc::EDQUOT)
        {
            StoreError::InsufficientStorage
        } else {
            StoreError::Io(error)
        }
    }
}

/// How a write treats an existing artifact under the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Last writer wins.
    Overwrite,
    /// Refuse with [`StoreError::AlreadyExists`] (Nx's write-once cache).
    WriteOnce,
}

/// Optional attributes a client sent along with a body.
#[derive(Clone, Debug, Default)]
pub struct NewArtifact {
    pub content_type: Option<String>,
}

/// Who wrote a version of an artifact, and when: what last-writer-wins compares across the mesh,
/// as `(version_ms, origin)` in that order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// Wall-clock write time at the origin node.
    pub version_ms: u64,
    /// The node id of the node the write was made on.
    pub origin: String,
    /// Made on this node now, rather than received: not the same as `origin` naming this
    /// node, since a node that lost its data fetches its own past writes back from its peers,
    /// and those must lose to newer versions and cleans like any received version.
    local: bool,
}

impl Provenance {
    /// A write made on this node, now. Its version is raised at publish, if needed, past the
    /// version it replaces and past its project's last clean, so that a local write wins here
    /// and on every node that has seen either.
    pub fn local(store: &Store) -> Provenance {
        Provenance {
            version_ms: now_ms(),
            origin: store.node_id().to_owned(),
            local: true,
        }
    }

    /// A version received from another node (or this node's own, fetched back): published
    /// only if it is newer than the stored one and than its project's last clean (see
    /// [`Outcome`]), and never logged for the peers.
    pub fn remote(version_ms: u64, origin: impl Into<String>) -> Provenance {
        Provenance {
            version_ms,
            origin: origin.into(),
            local: false,
        }
    }
}

/// What became of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Published with this sequence number (see `seq.rs` for what it promises).
    Published { seq: u64 },
    /// A remote version not newer, by `(version_ms, origin)`, than the stored one: ignored.
    Stale,
    /// A remote version at or before its project's last clean: ignored.
    Tombstoned,
}

/// Receipt of a write: durable when published, a no-op when a remote version lost.
/// Replication and metrics hang off this.
#[derive(Clone, Debug)]
pub struct Committed {
    /// `false` when the key already held an artifact (which this write replaced), and for a
    /// write that was not published.
    pub created: bool,
    /// The version written (or, when not published, the version offered).
    pub info: ArtifactInfo,
    pub outcome: Outcome,
}

impl Committed {
    /// The publish's sequence number; `None` when the write was not published.
    pub fn seq(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Published { seq } => Some(seq),
            Outcome::Stale | Outcome::Tombstoned => None,
        }
    }
}

/// A caller's addition to a publish's batch. Called under the key's lock once the publish is decided, with what is being published; the
/// records it adds commit atomically with the artifact: visible if and only if it is.
pub type BatchHook = Box<dyn FnOnce(&Publication<'_>, &mut ExtraRecords) + Send>;

/// What a [`BatchHook`] is told about the publish it joins.
pub struct Publication<'a> {
    pub seq: u64,
    pub key: &'a ArtifactKey,
    /// The version as stored (a local write's version may have been raised).
    pub info: &'a ArtifactInfo,
    pub origin: &'a str,
}

/// The column families a caller may write in a publish's batch. The store's own families
/// (the replication log among them) are not among them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Records of the caller's own, which the store keeps and never reads.
    Extra,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Extra => meta::CF_EXTRA,
        }
    }
}

/// Records a [`BatchHook`] adds to a publish's batch.
#[derive(Default)]
pub struct ExtraRecords(Vec<(Family, Vec<u8>, Vec<u8>)>);

impl ExtraRecords {
    pub fn put(&mut self, family: Family, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.0.push((family, key.into(), value.into()));
    }
}

/// How a write is to be published: its mode, provenance and batch hook.
struct Intent {
    mode: WriteMode,
    provenance: Provenance,
    hook: Option<BatchHook>,
}

/// The metadata of an artifact, as the protocol layers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactInfo {
    pub size: u64,
    pub blake3: [u8; 32],
    pub sha256: Option<[u8; 32]>,
    pub content_type: Option<String>,
    pub version_ms: u64,
}

impl ArtifactInfo {
    fn from_record(record: &ArtifactRecord) -> Self {
        ArtifactInfo {
            size: record.size,
            blake3: record.blake3,
            sha256: record.sha256,
            content_type: record.content_type.clone(),
            version_ms: record.version_ms,
        }
    }
}

/// An artifact's record as [`Store::lookup`] found it.
pub struct Found {
    pub info: ArtifactInfo,
    encoded: Vec<u8>,
    /// Shared with the set of hot records when it came from there or was kept there.
    record: Arc<hot::ReadRecord>,
    /// Whether reading it counts as a client's access (false for [`Store::peek`]).
    accessed: bool,
}

impl Found {
    /// The node the stored version was written on.
    pub fn origin(&self) -> &str {
        &self.record.origin
    }
}

/// An artifact opened for reading.
pub struct Artifact {
    pub info: ArtifactInfo,
    body: ReadBody,
}

/// What opening a body found.
enum Opened {
    Body(ReadBody),
    /// The bytes do not match the record.
    Corrupt,
    /// The body file is not there (replaced since the record was read, or lost).
    Vanished,
}

enum ReadBody {
    /// Already verified, in memory.
    Verified(Bytes),
    /// Large body file, verified while it streams.
    File {
        file: File,
        expected: checksums::Expected,
        on_checked: bodies::OnChecked,
    },
}

/// A body ready to send: either verified bytes or a stream that verifies as it goes.
pub enum BodyStream {
    Bytes(Bytes),
    Stream(std::pin::Pin<Box<dyn futures_util::Stream<Item = io::Result<Bytes>> + Send>>),
}

impl Artifact {
    /// The bytes in `[start, end)`; the caller has checked the range against `info.size`.
    pub fn into_body(self, start: u64, end: u64) -> BodyStream {
        match self.body {
            ReadBody::Verified(bytes) => {
                BodyStream::Bytes(bytes.slice(start as usize..end as usize))
            }
            ReadBody::File {
                file,
                expected,
                on_checked,
            } => BodyStream::Stream(Box::pin(bodies::verified_stream(
                file,
                self.info.size,
                expected,
                start..end,
                on_checked,
            ))),
        }
    }
}

/// Counters the store keeps for `/status` and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStats {
    /// Everything counted against capacity: artifacts (bodies and metadata) and staged parts.
    pub used_bytes: u64,
    /// Of which bytes staged by module uploads in flight.
    pub staged_bytes: u64,
    pub artifacts: u64,
    pub capacity: u64,
    /// See [`Store::background_errors`].
    pub background_errors: u64,
    /// The set of hot small artifacts (`hot.rs`).
    pub read_cache: ReadCacheStats,
    /// What file body reads were checked against (`checksums.rs`).
    pub body_checks: BodyCheckStats,
    /// Artifacts the presence map holds (`presence_map.rs`); 0 while it loads or when off.
    pub presence_map_entries: u64,
    /// Memory its tables take (also while it loads).
    pub presence_map_bytes: u64,
}

/// How many reads of file bodies were checked against what, since the store opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyCheckStats {
    /// Against the record's BLAKE3: a body's first read, or one no longer remembered.
    pub blake3: u64,
    /// Against the XXH3-128 an earlier read learned.
    pub checksum: u64,
}

/// What the set of hot small artifacts holds and how often it answered.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadCacheStats {
    /// Bytes held (bodies, keys, records and a fixed cost per entry).
    pub bytes: u64,
    /// Reads answered from memory.
    pub hits: u64,
    /// Reads that went to RocksDB: artifacts not held, file bodies, absent keys.
    pub misses: u64,
}

/// Memory RocksDB holds, by consumer (see [`Store::rocksdb_memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RocksDbMemory {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    /// Default options shared by every point read: `DB::get_pinned_cf` would create and destroy
    /// a C++ `ReadOptions` on each call, two allocations on every small GET.
    point_reads: ReadOptions,
    block_cache: Cache,
    /// Records of recently read inline artifacts (see `hot.rs`).
    hot: hot::HotRecords,
    /// What reads learned of file bodies that verified (see `checksums.rs`).
    checksums: checksums::KnownChecksums,
    options: StoreOptions,
    node_id: String,
    tmp_dir: PathBuf,
    bodies_dir: PathBuf,
    uploads_dir: PathBuf,
    /// Resumable uploads (see `resumable.rs`); unlike `tmp/`, kept across restarts.
    staging_dir: PathBuf,
    resumable: resumable::OpenResumable,
    /// The usage mirror, reservations and staged bytes. Held for a few instructions, never
    /// across I/O: writers update it after their batch is written.
    accounting: Mutex<Accounting>,
    /// Serialises read-modify-writes of one key (see `locks.rs`).
    keys: locks::KeyLocks,
    /// Publishes hold it shared from reading their project's tombstone to writing their batch;
    /// a clean's tombstone write holds it exclusively. So every publish is wholly before or
    /// wholly after a clean (see `clean.rs`).
    publish_order: RwLock<()>,
    /// One eviction pass at a time.
    evicting: Arc<tokio::sync::Mutex<()>>,
    touches: evict::PendingTouches,
    /// Whether `presence` has an entry for every record (see `presence.rs`).
    presence_indexed: AtomicBool,
    /// The entries of `presence` for content-addressed keys, in memory (see `presence_map.rs`).
    presence_map: presence_map::PresenceMap,
    uploads: uploads::OpenUploads,
    tombstones: clean::Tombstones,
    sequencer: seq::Sequencer,
    /// Bodies being written or published (see `sweep.rs`).
    live_bodies: Arc<bodies::LiveBodies>,
    /// A publish write failed and none has succeeded since. RocksDB stops taking writes after
    /// a failed log write or sync (and after a background error), so a failure now is RocksDB
    /// refusing before its log.
    writes_stopped: AtomicBool,
    /// Held open for the life of the store: the OS releases the lock if the process dies.
    _lock: File,
}

/// Usage as committed (the mirror of the `state` counter: every batch that changes it applies
/// the same delta here after it is written), plus space promised to writes that are about to
/// commit and bytes staged by module uploads.
struct Accounting {
    usage: Usage,
    reserved: u64,
    staged: u64,
}

impl Accounting {
    /// Bytes counted against capacity.
    fn counted(&self) -> u64 {
        self.usage.bytes + self.reserved + self.staged
    }
}

impl Store {
    /// Opens (creating if needed) the data dir. Fails with [`StoreError::Locked`] when another
    /// process holds it. Start-up cost does not grow with the number of artifacts.
    pub fn open(options: StoreOptions) -> Result<Store, StoreError> {
        let dir = &options.data_dir;
        std::fs::create_dir_all(dir)?;
        let lock = lock_data_dir(dir)?;
        let node_id = match &options.node_id {
            Some(id) => id.clone(),
            None => load_or_create_node_id(dir)?,
        };
        let tmp_dir = dir.join("tmp");
        // Everything in tmp/ belonged to uploads that never completed.
        match std::fs::remove_dir_all(&tmp_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        std::fs::create_dir_all(&tmp_dir)?;
        let bodies_dir = dir.join("bodies");
        for shard in 0..=255u8 {
            std::fs::create_dir_all(bodies_dir.join(format!("{shard:02x}")))?;
        }
        let uploads_dir = dir.join("uploads");
        std::fs::create_dir_all(&uploads_dir)?;
        let staging_dir = dir.join("staging");
        std::fs::create_dir_all(&staging_dir)?;

        // One block cache for every family, so its size bounds the memory all of them use for data
        // blocks. Filters and indexes stay with their table readers (about 1.5 MB per million
        // keys).
        let block_cache = Cache::new_lru_cache(options.block_cache);
        let db = open_db(&dir.join("meta"), &block_cache, options.wal_limit)?;
        let usage = match db.get_cf(cf(&db, meta::CF_STATE), meta::USAGE_KEY)? {
            Some(bytes) => meta::decode(&bytes).unwrap_or_default(),
            None => Usage::default(),
        };
        let tombstones = clean::Tombstones::load(&db)?;
        let sequencer = seq::Sequencer::recover(&db)?;
        let presence_indexed = presence::indexed_at_open(&db)?;
        let store = Store {
            inner: Arc::new(Inner {
                db,
                point_reads: point_reads(),
                block_cache,
                hot: hot::HotRecords::new(options.read_cache as u64),
                checksums: checksums::KnownChecksums::new(),
                node_id,
                tmp_dir,
                bodies_dir,
                uploads_dir,
                staging_dir,
                resumable: resumable::OpenResumable::default(),
                accounting: Mutex::new(Accounting {
                    usage,
                    reserved: 0,
                    staged: 0,
                }),
                keys: locks::KeyLocks::new(),
                publish_order: RwLock::new(()),
                evicting: Arc::new(tokio::sync::Mutex::new(())),
                touches: evict::PendingTouches::default(),
                presence_indexed: AtomicBool::new(presence_indexed),
                // Only a complete family can be loaded; a data dir still being backfilled gets
                // the map at its next start.
                presence_map: presence_map::PresenceMap::new(
                    options.presence_in_memory && presence_indexed,
                ),
                uploads: uploads::OpenUploads::default(),
                tombstones,
                sequencer,
                live_bodies: Arc::default(),
                writes_stopped: AtomicBool::new(false),
                options,
                _lock: lock,
            }),
        };
        let staged = store.recover_uploads()?;
        store.accounting().staged = staged;
        store.load_presence_map();
        Ok(store)
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The highest sequence number at or below which every publish has finished: a reader of
    /// the replication log reads up to here, never past it (a lower number may still commit).
    pub fn stable_seq(&self) -> u64 {
        self.inner.sequencer.stable()
    }

    /// [`Store::stable_seq`], told each time it passes a publish that wrote a log record: a
    /// reader of the log that has read it all waits on this for the next one.
    pub fn watch_log(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.sequencer.watch_logged()
    }

    pub fn stats(&self) -> StoreStats {
        let presence_map_entries = self.inner.presence_map.served_len();
        let presence_map_bytes = self.inner.presence_map.bytes();
        let accounting = self.accounting();
        StoreStats {
            used_bytes: accounting.usage.bytes + accounting.staged,
            staged_bytes: accounting.staged,
            artifacts: accounting.usage.artifacts,
            capacity: self.inner.options.capacity,
            background_errors: self.background_errors(),
            read_cache: self.inner.hot.stats(),
            body_checks: self.inner.checksums.stats(),
            presence_map_entries,
            presence_map_bytes,
        }
    }

    /// Errors RocksDB met in its own background work (flushes and compactions) since the store
    /// opened. After one that it cannot recover from, such as a damaged block read by a
    /// compaction, RocksDB refuses every write (`docs/storage.md`): this is how an operator
    /// learns why.
    fn background_errors(&self) -> u64 {
        self.inner
            .db
            .property_int_value("rocksdb.background-errors")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Starts receiving a body of at most `limit` bytes. SHA-256 is computed only when asked,
    /// because it costs more than BLAKE3.
    pub fn writer(&self, limit: u64, want_sha256: bool) -> BodyWriter {
        BodyWriter::new(
            self.inner.tmp_dir.clone(),
            self.inner.live_bodies.clone(),
            self.inner.options.inline_max,
            limit,
            want_sha256,
            self.inner.options.durability == Durability::Fsync,
        )
    }

    /// Publishes a staged body under `key` as written by `provenance` (a local write passes
    /// [`Provenance::local`]). Returns once the artifact is durable per the durability setting,
    /// or, for a remote version that lost to the stored one or to a clean, at once with an
    /// [`Outcome`] that says so (not an error: the mesh's copy is simply older).
    pub async fn commit(
        &self,
        key: &ArtifactKey,
        staged: StagedBody,
        attributes: NewArtifact,
        mode: WriteMode,
        provenance: Provenance,
    ) -> Result<Committed, StoreError> {
        let intent = Intent {
            mode,
            provenance,
            hook: None,
        };
        self.commit_crediting(key, staged, attributes, intent, 0)
            .await
    }

    /// Commits `staged` under `key` as a local write replacing whatever is stored (the common
    /// case of [`Store::commit`]).
    pub async fn commit_local(
        &self,
        key: &ArtifactKey,
        staged: StagedBody,
    ) -> Result<Committed, StoreError> {
        let local = Provenance::local(self);
        self.commit(
            key,
            staged,
            NewArtifact::default(),
            WriteMode::Overwrite,
            local,
        )
        .await
    }

    /// Writes a body held whole in memory under `key`, as a local overwrite: for small records,
    /// tests and benchmarks. Client bodies stream through [`Store::writer`] instead.
    pub async fn put_bytes(&self, key: &ArtifactKey, body: &[u8]) -> Result<Committed, StoreError> {
        let mut writer = self.writer(u64::MAX, false);
        writer.write(body).await?;
        let staged = writer.finish(None).await?;
        self.commit_local(key, staged).await
    }

    /// [`Store::commit`] with records of the caller's own (`hook`) in the same atomic batch.
    pub async fn commit_with(
        &self,
        key: &ArtifactKey,
        staged: StagedBody,
        attributes: NewArtifact,
        mode: WriteMode,
        provenance: Provenance,
        hook: BatchHook,
    ) -> Result<Committed, StoreError> {
        let intent = Intent {
            mode,
            provenance,
            hook: Some(hook),
        };
        self.commit_crediting(key, staged, attributes, intent, 0)
            .await
    }

    /// [`Store::commit`] for a write whose room is partly counted already (`credit` bytes, e.g.
    /// the staged parts an assembled upload replaces).
    async fn commit_crediting(
        &self,
        key: &ArtifactKey,
        staged: StagedBody,
        attributes: NewArtifact,
        intent: Intent,
        credit: u64,
    ) -> Result<Committed, StoreError> {
        // `WriteOnce` and last-writer-wins are decided in `publish_record`, under the key's lock.
        let encoded = key.encode();
        self.check_room(0)?;
        let content_type_len = attributes.content_type.as_ref().map_or(0, String::len);
        let charge = meta::charge(staged.size, encoded.len(), content_type_len);
        // An overwrite gives back what the version it replaces costs.
        let replaced = self
            .record(&encoded)?
            .map_or(0, |old| old.charge(encoded.len()));
        let reservation = self.reserve(charge, credit + replaced).await?;
        let store = self.clone();
        let key = key.clone();
        let result = tokio::task::spawn_blocking(move || {
            // Give the reservation back whatever happens below.
            let _reservation = reservation;
            store.commit_blocking(&key, encoded, staged, attributes, intent)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)));
        result?
    }

    fn commit_blocking(
        &self,
        key: &ArtifactKey,
        encoded: Vec<u8>,
        staged: StagedBody,
        attributes: NewArtifact,
        intent: Intent,
    ) -> Result<Committed, StoreError> {
        let inner = &self.inner;
        let size = staged.size;
        let fsync = self.fsyncs();
        // The staged file's handle keeps its id live (safe from the orphan sweep) until the
        // batch that indexes it is written, or the body is given up: it drops at the end.
        let (body, _live) = match staged.content {
            bodies::StagedContent::Inline(bytes) => (BodyRef::Inline(Bytes::from(bytes)), None),
            bodies::StagedContent::File { id, temp } => {
                let dest = bodies::body_path(&inner.bodies_dir, id);
                bodies::publish_file(&temp, &dest, fsync).map_err(StoreError::from_write)?;
                (BodyRef::File(id), Some(temp))
            }
        };
        let Intent {
            mode,
            provenance,
            hook,
        } = intent;
        let mut record = ArtifactRecord {
            size,
            blake3: staged.blake3,
            sha256: staged.sha256,
            content_type: attributes.content_type,
            version_ms: provenance.version_ms,
            origin: provenance.origin,
            accessed_ms: now_ms(),
            body,
        };
        let publish = self.publish_record(key, &encoded, &mut record, provenance.local, mode, hook);
        let published = match publish {
            Ok(published) => published,
            Err(Unpublished {
                error,
                maybe_written,
            }) => {
                match (&record.body, maybe_written) {
                    // The write failed, but its batch may have reached the write-ahead log (a
                    // failed sync, say) and be replayed at the next start, naming this body and
                    // having dropped the previous version. Kept until then; the sweep after
                    // the restart deletes it unless a replayed record names it.
                    (BodyRef::File(id), true) => {
                        self.inner.live_bodies.keep_until_exit(*id);
                        tracing::warn!(id = %format!("{id:032x}"), %error, "a publish failed while writing its batch: its body file is kept until the next start");
                    }
                    // Refused before its batch: the body just moved into place is nobody's.
                    _ => self.remove_body(&record.body),
                }
                return Err(error);
            }
        };
        let outcome = published.outcome;
        if !matches!(outcome, Outcome::Published { .. }) {
            // A remote version that lost: nothing refers to its body.
            self.remove_body(&record.body);
        } else if let Some(old) = &published.previous {
            self.remove_body(&old.body);
        }
        drop(published.held);
        Ok(Committed {
            created: matches!(outcome, Outcome::Published { .. }) && !published.live,
            info: ArtifactInfo::from_record(&record),
            outcome,
        })
    }

    /// The publish point: one batch writes the record, its eviction-queue entry, the usage
    /// counter, the sequence number and the hook's records, replacing any previous record (which
    /// it returns; `created` in the receipt is whether a live one existed). Under the key's lock
    /// the previous record cannot change, and under `publish_order` the project's last clean
    /// cannot either (see `clean.rs`). A local write's version is raised past both, so it wins
    /// here and everywhere its replaced version or the clean reached; a remote version is
    /// published only if it is newer than both.
    fn publish_record(
        &self,
        key: &ArtifactKey,
        encoded: &[u8],
        record: &mut ArtifactRecord,
        local: bool,
        mode: WriteMode,
        hook: Option<BatchHook>,
    ) -> Result<Published, Unpublished> {
        let _key = self.inner.keys.lock(encoded);
        let _order = self
            .inner
            .publish_order
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let cleaned_at = self.inner.tombstones.of(&key.project);
        let previous = self.record(encoded)?;
        let live = previous
            .as_ref()
            .is_some_and(|old| cleaned_at.is_none_or(|t| old.version_ms > t));
        if local {
            if let Some(cleaned_at) = cleaned_at {
                record.version_ms = record.version_ms.max(cleaned_at.saturating_add(1));
            }
            if let Some(old) = previous.as_ref().filter(|_| live) {
                record.version_ms = record.version_ms.max(old.version_ms.saturating_add(1));
            }
        } else {
            let not_published = |outcome| {
                Ok(Published {
                    previous: None,
                    held: None,
                    live,
                    outcome,
                })
            };
            if cleaned_at.is_some_and(|t| record.version_ms <= t) {
                return not_published(Outcome::Tombstoned);
            }
            if let Some(old) = previous.as_ref().filter(|_| live)
                && (record.version_ms, record.origin.as_str())
                    <= (old.version_ms, old.origin.as_str())
            {
                return not_published(Outcome::Stale);
            }
        }
        if mode == WriteMode::WriteOnce && live {
            return Err(StoreError::AlreadyExists.into());
        }
        let logged = self.logs_replication() && local;
        let ticket = self.inner.sequencer.take(logged);
        // The replaced body stays live from before the batch until its file is deleted.
        let held = previous.as_ref().and_then(|old| self.hold(&old.body));
        let mut batch = WriteBatch::default();
        let mut delta = UsageDelta::default();
        // A new record starts with its own access time (and no `atime` entry, even a stray one).
        batch.delete_cf(self.cf(meta::CF_ATIME), encoded);
        if let Some(old) = &previous {
            let old_access = self.last_access(encoded, old.accessed_ms)?;
            batch.delete_cf(
                self.cf(meta::CF_ACCESS),
                meta::access_key(old_access, encoded),
            );
            self.batch_unindex_body(&mut batch, &old.body);
            delta.remove(old.charge(encoded.len()));
        }
        delta.add(record.charge(encoded.len()));
        let new_entry = meta::access_key(record.accessed_ms, encoded);
        batch.put_cf(self.cf(meta::CF_ARTIFACTS), encoded, meta::encode(record));
        batch.put_cf(
            self.cf(meta::CF_PRESENCE),
            self.presence_key(encoded),
            meta::Presence::of(record).encode(),
        );
        batch.put_cf(self.cf(meta::CF_ACCESS), new_entry, []);
        if let BodyRef::File(id) = record.body {
            batch.put_cf(self.cf(meta::CF_BODIES), meta::body_index_key(id), encoded);
        }
        batch.merge_cf(
            self.cf(meta::CF_STATE),
            meta::SEQ_KEY,
            meta::encode_seq(ticket.seq),
        );
        batch.merge_cf(
            self.cf(meta::CF_STATE),
            meta::version_high_key(&key.project),
            meta::encode_seq(record.version_ms),
        );
        if let Some(hook) = hook {
            let info = ArtifactInfo::from_record(record);
            let publication = Publication {
                seq: ticket.seq,
                key,
                info: &info,
                origin: &record.origin,
            };
            let mut extra = ExtraRecords::default();
            hook(&publication, &mut extra);
            for (family, key, value) in extra.0 {
                batch.put_cf(self.cf(family.name()), key, value);
            }
        }
        if logged {
            let entry = outbox::LogRecord::Upsert {
                key: encoded.to_vec(),
                version_ms: record.version_ms,
                blake3: record.blake3,
                size: record.size,
            };
            self.batch_log(&mut batch, ticket.seq, &entry);
        }
        let presence = meta::Presence::of(record);
        let stopped_before = self.inner.writes_stopped.load(Ordering::Relaxed);
        if let Err(error) = self.write_accounted(batch, delta, [(encoded, Some(presence))]) {
            self.inner.writes_stopped.store(true, Ordering::Relaxed);
            return Err(Unpublished {
                error,
                maybe_written: !stopped_before,
            });
        }
        if stopped_before {
            self.inner.writes_stopped.store(false, Ordering::Relaxed);
        }
        Ok(Published {
            previous,
            held,
            live,
            outcome: Outcome::Published { seq: ticket.seq },
        })
    }

    /// Metadata of an artifact, without touching its body.
    pub fn head(&self, key: &ArtifactKey) -> Result<Option<ArtifactInfo>, StoreError> {
        Ok(self.lookup(key)?.map(|found| found.info))
    }

    /// Looks an artifact's record up once: enough to answer HEAD and conditional requests, and
    /// what [`Store::open_found`] turns into a body without a second lookup (the GET hot path).
    pub fn lookup(&self, key: &ArtifactKey) -> Result<Option<Found>, StoreError> {
        let resolution = self.access_resolution_ms();
        let found = self.peek(key)?.map(|mut found| {
            found.accessed = true;
            // A record held in memory remembers its last note: most reads of a hot key note
            // nothing.
            let now = now_ms();
            if found.record.note_due(now, resolution) {
                self.inner.touches.note_at(&found.encoded, now);
            }
            found
        });
        Ok(found)
    }

    /// [`Store::lookup`] that is no access: what replication sends to peers, and what they
    /// fetch from here, must not keep an artifact from eviction that no client reads.
    pub fn peek(&self, key: &ArtifactKey) -> Result<Option<Found>, StoreError> {
        let encoded = key.encode();
        Ok(self.visible_record(key, &encoded)?.map(|record| Found {
            info: ArtifactInfo::from_record(&record),
            encoded,
            record,
            accessed: false,
        }))
    }

    /// The record under `key` unless a clean of its project hides it. A record RocksDB cannot
    /// read back intact is a miss: its bytes are never served, and it is forgotten.
    fn visible_record(
        &self,
        key: &ArtifactKey,
        encoded: &[u8],
    ) -> Result<Option<Arc<hot::ReadRecord>>, StoreError> {
        let record = match self.record_for_reading(encoded) {
            Ok(record) => record,
            Err(StoreError::Db(error)) if is_damage(&error) => {
                self.forget_damaged_record(encoded, &error);
                None
            }
            Err(error) => return Err(error),
        };
        Ok(record.filter(|record| !self.inner.tombstones.hides(&key.project, record.version_ms)))
    }

    /// The key `encoded` falls in a block that failed RocksDB's checksum. Its keys are deleted
    /// blind (a delete reads nothing, and its tombstone hides the damaged copy from every later
    /// read), so that existence checks stop vouching for it, a new upload of the key succeeds,
    /// and this happens once per key. The record's charge, inside the damaged bytes, is taken
    /// from its `presence` entry, which also tells whether there was a record at all (the
    /// damaged block is read for absent keys near it too). What is left: the content type's
    /// few bytes of charge, an eviction-queue entry (eviction drops it when it finds no record)
    /// and, for a file body, the file, which the body index still names and the usage count
    /// still counts until the next orphan sweep removes all three (`sweep.rs`,
    /// `docs/storage.md`).
    fn forget_damaged_record(&self, encoded: &[u8], error: &rocksdb::Error) {
        let _key = self.inner.keys.lock(encoded);
        self.forget_damaged_record_locked(encoded, error);
    }

    /// [`Store::forget_damaged_record`] by a caller that holds the key's lock (eviction).
    pub(super) fn forget_damaged_record_locked(&self, encoded: &[u8], error: &rocksdb::Error) {
        // A publish may have replaced the record since the failed read.
        match self.record(encoded) {
            Err(StoreError::Db(again)) if is_damage(&again) => {}
            _ => return,
        }
        tracing::error!(
            key = %String::from_utf8_lossy(encoded).replace('\0', "/"),
            %error,
            "the key is in a damaged metadata block; forgetting its record and answering a miss"
        );
        // Whether the key was stored, and its size, come from `presence`; while that family is
        // still being backfilled (or cannot be read) they are unknown, and nothing is counted
        // back: the usage count errs high, never low.
        let indexed = self.inner.presence_indexed.load(Ordering::Acquire);
        let presence = if indexed {
            match self.get(meta::CF_PRESENCE, self.presence_key(encoded)) {
                Ok(Some(value)) => meta::Presence::decode(&value),
                _ => None,
            }
        } else {
            None
        };
        let mut delta = UsageDelta::default();
        if let Some(presence) = &presence {
            // A body larger than the inline limit was a file, which stays on disk (its id is in
            // the damaged bytes): its size stays counted.
            let inline = presence.size <= self.inner.options.inline_max as u64;
            let body = if inline { presence.size } else { 0 };
            delta.remove(meta::charge(body, encoded.len(), 0));
        }
        if presence.is_some() || !indexed {
            metrics::counter!(crate::metrics::STORAGE_CORRUPT_TOTAL).increment(1);
        }
        let mut batch = WriteBatch::default();
        self.batch_delete_keyed(&mut batch, encoded);
        if let Err(error) = self.write_accounted(batch, delta, [(encoded, None)]) {
            tracing::error!(%error, "could not forget a damaged record");
        }
    }

    /// Opens an artifact for reading. A body that fails verification is dropped, counted and
    /// reported as missing. A body file that vanished because a newer write, an eviction or a
    /// clean replaced it is no corruption: the record is read again and its current version
    /// served (or the miss answered).
    pub async fn read(&self, key: &ArtifactKey) -> Result<Option<Artifact>, StoreError> {
        match self.lookup(key)? {
            Some(found) => self.open_found(key, found).await,
            None => Ok(None),
        }
    }

    /// [`Store::read`] of a record already looked up with [`Store::lookup`].
    pub async fn open_found(
        &self,
        key: &ArtifactKey,
        found: Found,
    ) -> Result<Option<Artifact>, StoreError> {
        let Found {
            encoded,
            mut record,
            accessed,
            ..
        } = found;
        let mut vanished: Option<BodyRef> = None;
        for attempt in 0..READ_ATTEMPTS {
            if attempt > 0 {
                let Some(again) = self.visible_record(key, &encoded)? else {
                    return Ok(None);
                };
                if vanished.as_ref() == Some(&again.body) {
                    // The record still names the file that is not there: the body is lost.
                    self.drop_corrupt(&encoded, &again.body, "body file missing");
                    return Ok(None);
                }
                if accessed {
                    self.inner.touches.note(
                        &encoded,
                        again.accessed_ms,
                        self.access_resolution_ms(),
                    );
                }
                record = again;
            }
            let info = ArtifactInfo::from_record(&record);
            // A shared record: its inline body is a reference-counted `Bytes`, not a copy.
            let body = match record.body.clone() {
                // An inline body is not hashed again: it came out of a RocksDB block whose
                // checksum RocksDB verified when it read the block from disk (a damaged block
                // is a miss, see `visible_record`), or out of the memtable (after a restart,
                // rebuilt from checksummed log records). docs/storage.md says what this gives
                // up. The length check is what is left to do.
                BodyRef::Inline(bytes) => {
                    if bytes.len() as u64 != record.size {
                        let body = BodyRef::Inline(bytes);
                        self.drop_corrupt(&encoded, &body, "stored body has the wrong length");
                        return Ok(None);
                    }
                    ReadBody::Verified(bytes)
                }
                BodyRef::File(id) => match self.open_file_body(&encoded, id, &record).await? {
                    Opened::Body(body) => body,
                    Opened::Corrupt => {
                        let body = BodyRef::File(id);
                        self.drop_corrupt(&encoded, &body, "stored body failed verification");
                        return Ok(None);
                    }
                    Opened::Vanished => {
                        vanished = Some(BodyRef::File(id));
                        continue;
                    }
                },
            };
            return Ok(Some(Artifact { info, body }));
        }
        // Overwritten again and again while we looked: answer as a miss, nothing is wrong.
        Ok(None)
    }

    async fn open_file_body(
        &self,
        encoded: &[u8],
        id: u128,
        record: &ArtifactRecord,
    ) -> Result<Opened, StoreError> {
        let path = bodies::body_path(&self.inner.bodies_dir, id);
        let size = record.size;
        let expected = self.inner.checksums.expected(id, &record.blake3);
        if size <= VERIFY_BEFORE_SERVING_MAX {
            let cached = if size <= CACHED_READ_MAX {
                bodies::read_cached(&path, size, expected)
            } else {
                None
            };
            let read = match cached {
                Some(read) => read,
                None => tokio::task::spawn_blocking(move || {
                    bodies::read_verified(&path, size, expected)
                })
                .await
                .map_err(|e| StoreError::Io(io::Error::other(e)))??,
            };
            return Ok(match read {
                bodies::Verified::Intact { bytes, learned } => {
                    self.inner.checksums.learn(id, learned);
                    Opened::Body(ReadBody::Verified(bytes))
                }
                bodies::Verified::Corrupt => Opened::Corrupt,
                bodies::Verified::Missing => Opened::Vanished,
            });
        }
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Opened::Vanished),
            Err(e) => return Err(e.into()),
        };
        // The open file keeps its bytes even if a newer write unlinks it, so from here on a
        // mismatch is real corruption.
        let store = self.clone();
        let encoded = encoded.to_vec();
        let on_checked: bodies::OnChecked = Arc::new(move |checked| match checked {
            checksums::Checked::Corrupt => store.drop_corrupt(
                &encoded,
                &BodyRef::File(id),
                "stored body failed verification",
            ),
            checksums::Checked::Intact { learned } => store.inner.checksums.learn(id, learned),
        });
        Ok(Opened::Body(ReadBody::File {
            file,
            expected,
            on_checked,
        }))
    }

    /// Removes an artifact whose stored bytes no longer match (or are gone), if it still points
    /// at that body, and counts it.
    fn drop_corrupt(&self, encoded: &[u8], body: &BodyRef, what: &'static str) {
        metrics::counter!(crate::metrics::STORAGE_CORRUPT_TOTAL).increment(1);
        tracing::error!(
            key = %String::from_utf8_lossy(encoded).replace('\0', "/"),
            "{what}; dropping the artifact"
        );
        let result = self.remove_if(encoded, |record| &record.body == body);
        if let Err(error) = result {
            tracing::error!(%error, "could not drop a corrupt artifact");
        }
    }

    /// Deletes what this node holds under `key` when a peer's version (`version_ms`, `origin`,
    /// with bytes hashing to `blake3`) supersedes it but cannot be stored here (larger than the
    /// whole capacity): last writer wins, so the older bytes must not go on being served as the
    /// key's. A copy of the same bytes, or a newer version, stays. Returns whether it deleted.
    pub fn forget_superseded(
        &self,
        key: &ArtifactKey,
        version_ms: u64,
        origin: &str,
        blake3: &[u8; 32],
    ) -> Result<bool, StoreError> {
        self.remove_if(&key.encode(), |record| {
            &record.blake3 != blake3
                && (record.version_ms, record.origin.as_str()) < (version_ms, origin)
        })
    }

    /// Deletes the record under `encoded` when `predicate` holds for it, and then its body.
    fn remove_if(
        &self,
        encoded: &[u8],
        predicate: impl FnOnce(&ArtifactRecord) -> bool,
    ) -> Result<bool, StoreError> {
        let key = self.inner.keys.lock(encoded);
        let Some(record) = self.record(encoded)? else {
            return Ok(false);
        };
        if !predicate(&record) {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        let mut delta = UsageDelta::default();
        self.batch_remove(&mut batch, encoded, &record, &mut delta)?;
        let doomed = self.doom(record.body);
        self.write_accounted(batch, delta, [(encoded, None)])?;
        drop(key);
        self.remove_doomed(doomed);
        Ok(true)
    }

    /// Adds the deletion of one artifact to `batch` and its cost to `delta`. The caller holds
    /// the key's lock and read `record` under it.
    fn batch_remove(
        &self,
        batch: &mut WriteBatch,
        encoded: &[u8],
        record: &ArtifactRecord,
        delta: &mut UsageDelta,
    ) -> Result<(), StoreError> {
        let accessed_ms = self.last_access(encoded, record.accessed_ms)?;
        self.batch_delete_keyed(batch, encoded);
        batch.delete_cf(
            self.cf(meta::CF_ACCESS),
            meta::access_key(accessed_ms, encoded),
        );
        self.batch_unindex_body(batch, &record.body);
        delta.remove(record.charge(encoded.len()));
        Ok(())
    }

    /// Deletes what is keyed by the artifact key itself: its record, `presence` entry and access
    /// time. The eviction-queue entry and the body index are keyed by what the record says.
    pub(super) fn batch_delete_keyed(&self, batch: &mut WriteBatch, encoded: &[u8]) {
        batch.delete_cf(self.cf(meta::CF_ARTIFACTS), encoded);
        batch.delete_cf(self.cf(meta::CF_PRESENCE), self.presence_key(encoded));
        batch.delete_cf(self.cf(meta::CF_ATIME), encoded);
    }

    /// When the artifact under `encoded`, whose record says `published_ms`, was last accessed:
    /// its `atime` entry once a read was noted since the publish, else the record's time. The
    /// caller holds the key's lock, so the answer names its current eviction-queue entry.
    fn last_access(&self, encoded: &[u8], published_ms: u64) -> Result<u64, StoreError> {
        let noted = self.get(meta::CF_ATIME, encoded)?;
        Ok(noted
            .and_then(|bytes| meta::decode_time(&bytes))
            .map_or(published_ms, |ms| ms.max(published_ms)))
    }

    /// Removes a body file from the reverse index, in the batch that drops its record (the file
    /// itself is deleted after the batch; if the process dies first, the sweep finds it).
    fn batch_unindex_body(&self, batch: &mut WriteBatch, body: &BodyRef) {
        if let BodyRef::File(id) = body {
            batch.delete_cf(self.cf(meta::CF_BODIES), meta::body_index_key(*id));
        }
    }

    /// Writes a batch that changes usage by `delta` and the records of `records` (each key with
    /// its new `presence` entry, or `None` when deleted): the change travels in the batch as a
    /// merge operand, and the in-memory mirror takes it once the batch is written; the set of
    /// hot records forgets those keys then, and the presence map follows them. The caller holds
    /// the keys' locks, so both change in the order RocksDB did.
    fn write_accounted<'k>(
        &self,
        mut batch: WriteBatch,
        delta: UsageDelta,
        records: impl IntoIterator<Item = (&'k [u8], Option<meta::Presence>)>,
    ) -> Result<(), StoreError> {
        if !delta.is_zero() {
            batch.merge_cf(self.cf(meta::CF_STATE), meta::USAGE_KEY, delta.encode());
        }
        let written = self.write(batch);
        // Forgotten even when the write failed: whether RocksDB applied part of it is unknown.
        // For the same reason a failed write leaves its keys absent from the presence map: a
        // blob wrongly called missing is uploaded again, one wrongly called present is not.
        for (encoded, presence) in records {
            self.inner.hot.forget(encoded);
            let presence = presence.filter(|_| written.is_ok());
            self.inner.presence_map.apply(encoded, presence);
        }
        written?;
        self.accounting().usage.apply(delta);
        Ok(())
    }

    /// What RocksDB holds in memory: memtables, table readers (indexes and filters) and the
    /// block cache, in bytes (sampled for `/metrics`).
    pub fn rocksdb_memory(&self) -> Option<RocksDbMemory> {
        let stats = rocksdb::perf::get_memory_usage_stats(
            Some(&[&self.inner.db]),
            Some(&[&self.inner.block_cache]),
        )
        .ok()?;
        Some(RocksDbMemory {
            memtables: stats.mem_table_total,
            table_readers: stats.mem_table_readers_total,
            block_cache: stats.cache_total,
        })
    }

    /// Writes RocksDB's memtables to SST files: what a read finds afterwards comes from the
    /// files and the block cache, as on a node that has run for a while (benchmarks use it).
    pub fn flush_memtables(&self) -> Result<(), StoreError> {
        for name in meta::ALL_CFS {
            self.inner.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }

    /// The most this store holds (`storage.capacity`): an artifact larger than this can never
    /// be stored, however much is evicted.
    pub fn capacity(&self) -> u64 {
        self.inner.options.capacity
    }

    /// What eviction leaves stored (`storage.low_watermark` of capacity): the most a walk of a
    /// peer's index fetches in one pass, since more would evict what the same pass fetched.
    pub fn low_watermark(&self) -> u64 {
        self.inner.options.low_watermark
    }

    /// Where the background eviction pass starts: midway between the low watermark and
    /// capacity. From there it evicts down to the low watermark, so that writes seldom find the
    /// store full and have to evict before they are answered.
    pub(super) fn eviction_start(&self) -> u64 {
        let options = &self.inner.options;
        let gap = options.capacity.saturating_sub(options.low_watermark);
        options.low_watermark + gap / 2
    }

    /// Flushes recorded accesses and, once usage is past [`Store::eviction_start`], evicts down
    /// to the low watermark. Run periodically: this is the background eviction pass.
    pub async fn maintain(&self) -> Result<(), StoreError> {
        self.flush_touches_between_evictions().await?;
        let (counted, staged) = {
            let accounting = self.accounting();
            (accounting.counted(), accounting.staged)
        };
        if counted > self.eviction_start() {
            let target = self.inner.options.low_watermark.saturating_sub(staged);
            self.evict_until(target).await?;
        }
        Ok(())
    }

    /// The access time a record was published with, read without decoding its body.
    fn published_ms(&self, encoded: &[u8]) -> Result<Option<u64>, StoreError> {
        let value = self.get(meta::CF_ARTIFACTS, encoded)?;
        Ok(value.and_then(|bytes| meta::decode::<meta::RecordView>(&bytes).map(|r| r.accessed_ms)))
    }

    /// The record a reader serves: from the set of hot small artifacts, or read from RocksDB
    /// (and offered to the set). Writers read [`Store::record`] under the key's lock instead.
    fn record_for_reading(
        &self,
        encoded: &[u8],
    ) -> Result<Option<Arc<hot::ReadRecord>>, StoreError> {
        if let Some(held) = self.inner.hot.get(encoded) {
            return Ok(Some(held));
        }
        let ticket = self.inner.hot.ticket(encoded);
        let Some(record) = self.record(encoded)? else {
            return Ok(None);
        };
        let record = hot::ReadRecord::new(record);
        self.inner.hot.offer(ticket, encoded, &record);
        Ok(Some(record))
    }

    fn record(&self, encoded: &[u8]) -> Result<Option<ArtifactRecord>, StoreError> {
        let value = self.get(meta::CF_ARTIFACTS, encoded)?;
        Ok(value.and_then(|bytes| meta::decode(&bytes)))
    }

    /// Holds a body file's id live (see `sweep.rs`); `None` for an inline body.
    fn hold(&self, body: &BodyRef) -> Option<bodies::LiveGuard> {
        match body {
            BodyRef::File(id) => Some(self.inner.live_bodies.hold(*id)),
            BodyRef::Inline(_) => None,
        }
    }

    /// Marks a body whose record the next batch drops; call before writing the batch.
    fn doom(&self, body: BodyRef) -> Doomed {
        Doomed {
            _live: self.hold(&body),
            body,
        }
    }

    /// Deletes a doomed body's file, then lets its id go.
    fn remove_doomed(&self, doomed: Doomed) {
        self.remove_body(&doomed.body);
    }

    fn remove_body(&self, body: &BodyRef) {
        if let BodyRef::File(id) = body {
            self.inner.checksums.forget(*id);
            let path = bodies::body_path(&self.inner.bodies_dir, *id);
            if let Err(error) = std::fs::remove_file(&path)
                && error.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %error, "could not remove a body file");
            }
        }
    }

    /// Writes a batch, synced in `fsync` durability. Concurrent callers are grouped by RocksDB
    /// into one log write (and one sync), which is why no lock is held around this.
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_synced(batch, self.fsyncs())
    }

    fn write_synced(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.inner
            .db
            .write_opt(batch, &options)
            .map_err(|error| match StoreError::from(error) {
                // The refusal repeats the background error; the count tells it from a write
                // that failed on its own.
                StoreError::Db(error) if self.background_errors() > 0 => {
                    StoreError::WritesStopped(error)
                }
                other => other,
            })
    }

    /// Whether writes are synced before they are acknowledged (durability `fsync`).
    fn fsyncs(&self) -> bool {
        self.inner.options.durability == Durability::Fsync
    }

    /// Makes a directory's entries durable (new or renamed files in it), in `fsync` durability.
    fn sync_dir(&self, dir: &Path) -> Result<(), StoreError> {
        if self.fsyncs() {
            File::open(dir)?
                .sync_all()
                .map_err(StoreError::from_write)?;
        }
        Ok(())
    }

    /// Refuses a write of `incoming` more bytes that would take the filesystem under
    /// `storage.min_free`, before RocksDB or a body file finds out the hard way: RocksDB cannot
    /// take writes again after its log failed on a full disk, so one large upload streaming
    /// into staging must not use up the room every other write's log needs. Callers pass what
    /// they are about to stream (a declared length, a blob's size), or 0 at publish, when the
    /// body is already on disk.
    pub fn check_room(&self, incoming: u64) -> Result<(), StoreError> {
        let min_free = self.inner.options.min_free;
        if min_free == 0 {
            return Ok(());
        }
        let free = filesystem_space(&self.inner.options.data_dir)?.available;
        if free < min_free.saturating_add(incoming) {
            return Err(StoreError::DiskFull {
                free,
                min_free,
                incoming,
            });
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        cf(&self.inner.db, name)
    }

    /// One point read of `key` in the family `name`, pinned in RocksDB's cache (no copy).
    fn get(
        &self,
        name: &str,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<DBPinnableSlice<'_>>, rocksdb::Error> {
        self.inner
            .db
            .get_pinned_cf_opt(self.cf(name), key, &self.inner.point_reads)
    }

    fn accounting(&self) -> MutexGuard<'_, Accounting> {
        // Every change under this lock is a few plain additions, complete or not started, so a
        // poisoned lock holds consistent data.
        self.inner
            .accounting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// What a publish replaced: the previous record under the key, if any (`None` when nothing
/// was published), whether it was live (not hidden by a project clean), and the outcome.
struct Published {
    previous: Option<ArtifactRecord>,
    /// Keeps the previous body's id live until its file is deleted (see `sweep.rs`).
    held: Option<bodies::LiveGuard>,
    live: bool,
    outcome: Outcome,
}

/// Why a publish failed, and whether its batch may have been written all the same: a write
/// RocksDB failed may have reached its log and be replayed at the next start, unless an
/// earlier write had already failed (RocksDB then refuses before its log).
struct Unpublished {
    error: StoreError,
    maybe_written: bool,
}

impl From<StoreError> for Unpublished {
    fn from(error: StoreError) -> Unpublished {
        Unpublished {
            error,
            maybe_written: false,
        }
    }
}

/// A body whose record a batch drops: its id is held live from before the batch until this is
/// removed, so the orphan sweep never counts a body on its way out as an orphan.
struct Doomed {
    body: BodyRef,
    _live: Option<bodies::LiveGuard>,
}

/// Space promised to a write; returned when the write ends either way (by then a published
/// artifact or a placed part counts in its place).
struct Reservation {
    store: Store,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut accounting = self.store.accounting();
        accounting.reserved = accounting.reserved.saturating_sub(self.bytes);
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Every family in meta::ALL_CFS is created when the database opens.
    db.cf_handle(name)
        .unwrap_or_else(|| unreachable!("column family {name} is created at open"))
}

/// Whether RocksDB found stored bytes that fail their checksum.
pub(super) fn is_damage(error: &rocksdb::Error) -> bool {
    error.kind() == rocksdb::ErrorKind::Corruption
}

/// What every point read of a record asks of RocksDB. Checking each block read from disk
/// against its checksum is what lets inline bodies go unhashed on read (`open_found`); it is
/// RocksDB's default, set here so that nothing turns it off unnoticed.
fn point_reads() -> ReadOptions {
    let mut options = ReadOptions::default();
    options.set_verify_checksums(true);
    options
}

fn open_db(path: &Path, cache: &Cache, wal_limit: u64) -> Result<DB, StoreError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_keep_log_file_num(4);
    options.increase_parallelism(2);
    // A log file can be deleted only once every family with writes in it has flushed, and the
    // small families (usage counter, access times, sequence number) take hours to fill a
    // memtable: without a bound, every log written meanwhile stays on disk (hundreds of MB,
    // uncounted by `storage.capacity`, all replayed at the next start). Past `wal_limit`
    // RocksDB flushes the families that hold the oldest log instead.
    options.set_max_total_wal_size(wal_limit);
    // Obsolete logs are overwritten in place rather than deleted: an fdatasync of a block
    // already allocated does not have to commit the file's size and extents to the
    // filesystem journal, which is most of a synced write's latency (`fsync` durability).
    options.set_recycle_log_file_num(4);
    // Bound memtable memory across all families: the node's memory must stay flat.
    options.set_db_write_buffer_size(32 << 20);
    let families = meta::ALL_CFS.iter().map(|name| {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(cache);
        // A bloom filter answers most lookups of absent keys (half of a FindMissingBlobs, every
        // cache miss) without reading a data block, and a hash index in each data block finds a
        // present key without a binary search.
        table.set_bloom_filter(10.0, false);
        table.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
        table.set_data_block_hash_ratio(0.75);
        if *name == meta::CF_PRESENCE {
            table.set_block_size(1024);
        }
        let mut family = Options::default();
        family.set_block_based_table_factory(&table);
        family.set_write_buffer_size(8 << 20);
        if *name == meta::CF_STATE {
            family.set_merge_operator(
                meta::STATE_MERGE_OPERATOR,
                meta::merge_state,
                meta::merge_state_operands,
            );
        }
        ColumnFamilyDescriptor::new(*name, family)
    });
    Ok(DB::open_cf_descriptors(&options, path, families)?)
}

fn lock_data_dir(dir: &Path) -> Result<File, StoreError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

fn load_or_create_node_id(dir: &Path) -> Result<String, StoreError> {
    let path = dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let id = format!("kura-{:016x}", rand::random::<u64>());
    let temp = dir.join("node_id.tmp");
    std::fs::write(&temp, format!("{id}\n"))?;
    File::open(&temp)?.sync_all()?;
    std::fs::rename(&temp, &path)?;
    Ok(id)
}

/// The size of a filesystem and the bytes an unprivileged writer can still use on it.
#[derive(Clone, Copy, Debug)]
pub struct FilesystemSpace {
    pub total: u64,
    pub available: u64,
}

/// The space of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> io::Result<FilesystemSpace> {
    let stats = rustix::fs::statvfs(path)?;
    Ok(FilesystemSpace {
        total: stats.f_blocks.saturating_mul(stats.f_frsize),
        available: stats.f_bavail.saturating_mul(stats.f_frsize),
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
