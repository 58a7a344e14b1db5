//! Artifact bodies: staged while hashing, published by rename, read back verified.
//!
//! A body is written to `tmp/` while BLAKE3 (and SHA-256 when asked) is computed over it, fsync'd
//! when durability says so, and renamed into `bodies/` just before its metadata commits. Small
//! bodies never touch a file: they are kept in memory (bounded) and stored inside the record.
//! Reads hash what they send and withhold the final chunk until the whole body has verified, so a
//! corrupted body never arrives as a complete, successful response.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest as _, Sha256};

use super::StoreError;
use super::checksums::{BodyCheck, Checked, Expected};

/// How many bytes are buffered before they are hashed and written out in one blocking call.
/// Below the mmap threshold `main.rs` sets (512 KiB), so that each upload's buffer is a heap
/// block the next upload reuses, not a mapping of its own whose every page faults in anew. (A
/// `storage.inline_max` of 256 KiB or more makes the buffer `inline_max + 1` bytes instead.)
const WRITE_BUFFER: usize = 256 * 1024;
/// Size of each chunk read from disk and handed to the network.
pub const READ_CHUNK: usize = 256 * 1024;

/// Hashes computed while a body streams in.
#[derive(Clone)]
pub(super) struct Digests {
    blake3: blake3::Hasher,
    sha256: Option<Sha256>,
}

impl Digests {
    pub(super) fn new(want_sha256: bool) -> Self {
        Digests {
            blake3: blake3::Hasher::new(),
            sha256: want_sha256.then(Sha256::new),
        }
    }

    /// The BLAKE3 and (when computed) SHA-256 of everything hashed, or
    /// [`StoreError::ChecksumMismatch`] when the SHA-256 is not `expected_sha256`.
    pub(super) fn finish(
        self,
        expected_sha256: Option<[u8; 32]>,
    ) -> Result<([u8; 32], Option<[u8; 32]>), StoreError> {
        let sha256: Option<[u8; 32]> = self.sha256.map(|s| s.finalize().into());
        if let Some(expected) = expected_sha256
            && sha256 != Some(expected)
        {
            return Err(StoreError::ChecksumMismatch);
        }
        Ok((*self.blake3.finalize().as_bytes(), sha256))
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        self.blake3.update(bytes);
        if let Some(sha) = &mut self.sha256 {
            sha.update(bytes);
        }
    }
}

/// Ids of the bodies this process is writing, publishing or removing: from the creation of the
/// temp file until the publish batch is written (or the body is given up), and from before the
/// batch that drops a record until its body file is deleted. A temp file and the body file it
/// becomes share the id, so the orphan sweep can tell a file in flight from a leftover without
/// relying on its age. Counted, since a body can be held twice (published by one write and
/// replaced by the next before the first let go).
#[derive(Default)]
pub(super) struct LiveBodies(Mutex<HashMap<u128, u32>>);

impl LiveBodies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u128, u32>> {
        // Counts changed by single increments and decrements: poison is harmless.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id, live until the guard is dropped.
    fn register(self: &Arc<Self>) -> LiveGuard {
        let mut ids = self.lock();
        let id = loop {
            let id = rand::random::<u128>();
            if let std::collections::hash_map::Entry::Vacant(entry) = ids.entry(id) {
                entry.insert(1);
                break id;
            }
        };
        LiveGuard {
            live: self.clone(),
            id,
        }
    }

    /// Keeps an existing body's id live until the guard is dropped.
    pub(super) fn hold(self: &Arc<Self>, id: u128) -> LiveGuard {
        *self.lock().entry(id).or_insert(0) += 1;
        LiveGuard {
            live: self.clone(),
            id,
        }
    }

    /// Keeps an existing body's id live until the process exits: a body only the next start
    /// can judge (see `Store::commit`).
    pub(super) fn keep_until_exit(&self, id: u128) {
        *self.lock().entry(id).or_insert(0) += 1;
    }

    pub(super) fn contains(&self, id: u128) -> bool {
        self.lock().contains_key(&id)
    }
}

/// Keeps an id in [`LiveBodies`] while it lives.
pub(super) struct LiveGuard {
    live: Arc<LiveBodies>,
    id: u128,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut ids = self.live.lock();
        if let Some(count) = ids.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                ids.remove(&self.id);
            }
        }
    }
}

/// A temp file that is deleted unless it was published. Its id stays live until this is
/// dropped (after the file is removed, fields drop after `drop`).
struct TempFile {
    path: PathBuf,
    file: Option<File>,
    live: LiveGuard,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Nothing to report if it is already gone: it was published or never created.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Streams one body into staging. Dropping it without [`BodyWriter::finish`] deletes its temp
/// file, so an aborted upload leaves nothing behind.
pub struct BodyWriter {
    tmp_dir: PathBuf,
    live: Arc<LiveBodies>,
    inline_max: usize,
    limit: u64,
    size: u64,
    pending: Vec<u8>,
    digests: Option<Digests>,
    spill: Option<TempFile>,
    fsync: bool,
}

/// A body fully received and hashed, ready to publish.
pub struct StagedBody {
    pub size: u64,
    pub blake3: [u8; 32],
    pub sha256: Option<[u8; 32]>,
    pub(super) content: StagedContent,
}

pub(super) enum StagedContent {
    Inline(Vec<u8>),
    File { id: u128, temp: TempFileHandle },
}

/// Keeps a staged temp file alive (and deletes it on drop) until it is published.
pub(super) struct TempFileHandle(TempFile);

impl TempFileHandle {
    pub(super) fn path(&self) -> &Path {
        &self.0.path
    }
}

impl BodyWriter {
    pub(super) fn new(
        tmp_dir: PathBuf,
        live: Arc<LiveBodies>,
        inline_max: usize,
        limit: u64,
        want_sha256: bool,
        fsync: bool,
    ) -> Self {
        BodyWriter {
            tmp_dir,
            live,
            inline_max,
            limit,
            size: 0,
            pending: Vec::new(),
            digests: Some(Digests::new(want_sha256)),
            spill: None,
            fsync,
        }
    }

    /// Bytes accepted so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a chunk. Fails with [`StoreError::TooLarge`] as soon as the limit is passed.
    pub async fn write(&mut self, mut chunk: &[u8]) -> Result<(), StoreError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(StoreError::TooLarge { limit: self.limit });
        }
        let flush_at = WRITE_BUFFER.max(self.inline_max + 1);
        if self.pending.len() + chunk.len() > self.inline_max && self.pending.capacity() < flush_at
        {
            // Past the inline size this body goes to a file: take the whole write buffer at
            // once (and keep it across flushes) instead of growing it by doubling, which would
            // leave a trail of differently sized blocks in the allocator for every upload. One
            // size for every upload lets the allocator hand the same block around.
            self.pending.reserve_exact(flush_at - self.pending.len());
        }
        // `pending` is below `flush_at` here and after every pass: it is flushed on reaching it.
        while !chunk.is_empty() {
            let room = flush_at.saturating_sub(self.pending.len());
            let (now, rest) = chunk.split_at(room.min(chunk.len()));
            self.pending.extend_from_slice(now);
            chunk = rest;
            if self.pending.len() >= flush_at {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Hashes and writes the buffered bytes on a blocking thread.
    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut temp = match self.spill.take() {
            Some(temp) => temp,
            None => self.create_temp().await?,
        };
        let mut digests = self.digests.take().ok_or_else(poisoned)?;
        let buffer = std::mem::take(&mut self.pending);
        let (temp, digests, mut buffer, result) = tokio::task::spawn_blocking(move || {
            digests.update(&buffer);
            let result = match temp.file.as_mut() {
                Some(file) => file.write_all(&buffer),
                None => Err(io::Error::other("temp file closed")),
            };
            (temp, digests, buffer, result)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?;
        self.spill = Some(temp);
        self.digests = Some(digests);
        result.map_err(StoreError::from_write)?;
        buffer.clear();
        self.pending = buffer;
        Ok(())
    }

    async fn create_temp(&self) -> Result<TempFile, StoreError> {
        let live = self.live.register();
        let path = self.tmp_dir.join(temp_name(live.id));
        let open_path = path.clone();
        let file = tokio::task::spawn_blocking(move || File::create_new(&open_path))
            .await
            .map_err(|e| StoreError::Io(io::Error::other(e)))?
            .map_err(StoreError::from_write)?;
        Ok(TempFile {
            path,
            file: Some(file),
            live,
        })
    }

    /// Completes the body. `expected_sha256`, when given, must match the bytes received.
    pub async fn finish(
        mut self,
        expected_sha256: Option<[u8; 32]>,
    ) -> Result<StagedBody, StoreError> {
        let content = if self.spill.is_none() && self.pending.len() <= self.inline_max {
            let bytes = std::mem::take(&mut self.pending);
            if let Some(d) = self.digests.as_mut() {
                d.update(&bytes)
            }
            StagedContent::Inline(bytes)
        } else {
            self.flush().await?;
            let mut temp = self.spill.take().ok_or_else(poisoned)?;
            let fsync = self.fsync;
            let temp = tokio::task::spawn_blocking(move || -> io::Result<TempFile> {
                if let Some(file) = temp.file.take()
                    && fsync
                {
                    file.sync_all()?;
                }
                Ok(temp)
            })
            .await
            .map_err(|e| StoreError::Io(io::Error::other(e)))?
            .map_err(StoreError::from_write)?;
            StagedContent::File {
                id: temp.live.id,
                temp: TempFileHandle(temp),
            }
        };
        let digests = self.digests.take().ok_or_else(poisoned)?;
        let (blake3, sha256) = digests.finish(expected_sha256)?;
        Ok(StagedBody {
            size: self.size,
            blake3,
            sha256,
            content,
        })
    }
}

/// Moves a complete file written elsewhere (a resumable upload's) into `tmp/` as a staged body
/// under a fresh id: live until published, deleted if it is not.
pub(super) fn adopt_file(
    live: &Arc<LiveBodies>,
    tmp_dir: &Path,
    from: &Path,
) -> io::Result<StagedContent> {
    let live = live.register();
    let path = tmp_dir.join(temp_name(live.id));
    std::fs::rename(from, &path)?;
    Ok(StagedContent::File {
        id: live.id,
        temp: TempFileHandle(TempFile {
            path,
            file: None,
            live,
        }),
    })
}

fn poisoned() -> StoreError {
    StoreError::Io(io::Error::other("body writer used after a failed write"))
}

/// Where the body file with this id lives: `bodies/<2 hex>/<32 hex>`.
pub fn body_path(bodies_dir: &Path, id: u128) -> PathBuf {
    let name = format!("{id:032x}");
    bodies_dir.join(&name[..2]).join(name)
}

/// The id of a body file named by [`body_path`]; `None` for any other name.
pub(super) fn body_id(name: &str) -> Option<u128> {
    parse_id(name)
}

/// Name of the temp file a body with this id is staged in.
fn temp_name(id: u128) -> String {
    format!("{id:032x}.body")
}

/// The id of a temp file named by [`temp_name`].
pub(super) fn temp_id(name: &str) -> Option<u128> {
    parse_id(name.strip_suffix(".body")?)
}

fn parse_id(hex: &str) -> Option<u128> {
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(hex, 16).ok()
}

/// Moves a staged temp file to its final place (and makes the rename durable when asked).
pub(super) fn publish_file(temp: &TempFileHandle, dest: &Path, fsync: bool) -> io::Result<()> {
    std::fs::rename(temp.path(), dest)?;
    if fsync && let Some(dir) = dest.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What reading a small body file whole found.
pub(super) enum Verified {
    /// The bytes matched; `learned` as in [`Checked::Intact`].
    Intact { bytes: Bytes, learned: Option<u128> },
    /// The bytes do not match the record: the caller answers a miss instead of serving them.
    Corrupt,
    /// No such file (replaced since the record was read, or lost).
    Missing,
}

impl Verified {
    /// Checks a whole body read into `bytes`.
    fn check(bytes: Vec<u8>, expected: Expected) -> Verified {
        let mut check = BodyCheck::new(expected);
        check.update(&bytes);
        match check.finish() {
            Checked::Intact { learned } => Verified::Intact {
                bytes: Bytes::from(bytes),
                learned,
            },
            Checked::Corrupt => Verified::Corrupt,
        }
    }
}

/// Reads a whole small body file and checks it (see `checksums.rs`).
pub(super) fn read_verified(path: &Path, size: u64, expected: Expected) -> io::Result<Verified> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Verified::Missing),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::with_capacity(size as usize);
    // Read one byte more than expected so a grown file is noticed too.
    Read::by_ref(&mut file)
        .take(size + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 != size {
        return Ok(Verified::Corrupt);
    }
    Ok(Verified::check(bytes, expected))
}

/// [`read_verified`] without blocking, when the kernel can answer from its caches: the path
/// resolved from the dentry cache (`RESOLVE_CACHED`) and every byte from the page cache
/// (`RWF_NOWAIT`). `None` when it cannot (a cold file, a short read, an older kernel, any
/// error): the caller then reads on the blocking pool, which also decides what a missing or
/// odd-sized file means. A hot small body is so served without a thread hop.
#[cfg(target_os = "linux")]
pub(super) fn read_cached(path: &Path, size: u64, expected: Expected) -> Option<Verified> {
    use rustix::fs::{CWD, Mode, OFlags, ResolveFlags, openat2};
    let file = openat2(
        CWD,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::CACHED,
    )
    .ok()?;
    let size = usize::try_from(size).ok()?;
    // One byte more than expected, so that a grown file reads long and is left to the slow path.
    let mut bytes = Vec::with_capacity(size.checked_add(1)?);
    let read = read_at_cached(&file, 0, &mut bytes)?;
    if read != size {
        return None;
    }
    Some(Verified::check(bytes, expected))
}

#[cfg(not(target_os = "linux"))]
pub(super) fn read_cached(_path: &Path, _size: u64, _expected: Expected) -> Option<Verified> {
    None
}

/// Appends to `buf`, up to its capacity, what the page cache holds of the file from `offset`
/// (`RWF_NOWAIT`); returns how many bytes it appended. `None` when the kernel would have to wait
/// for the disk (or on any error): the caller then reads on the blocking pool, which decides what
/// an error means. The kernel writes into the vector's spare capacity, which is not zeroed
/// first: zeroing every 256 KiB read buffer cost more than the read's own bookkeeping. (Raw
/// `libc`: rustix's `preadv2` takes initialised buffers only.)
#[cfg(target_os = "linux")]
fn read_at_cached(file: impl std::os::fd::AsFd, offset: u64, buf: &mut Vec<u8>) -> Option<usize> {
    use std::os::fd::AsRawFd as _;
    let offset = libc::off_t::try_from(offset).ok()?;
    let spare = buf.spare_capacity_mut();
    let target = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // SAFETY: the one iovec covers the vector's spare capacity, which stays allocated and
    // unaliased for the call; the kernel writes at most `iov_len` bytes into it.
    let read = unsafe {
        libc::preadv2(
            file.as_fd().as_raw_fd(),
            &target,
            1,
            offset,
            libc::RWF_NOWAIT,
        )
    };
    // A negative count is an error (EAGAIN when the page cache lacks the bytes).
    let read = usize::try_from(read).ok()?;
    // SAFETY: the kernel initialised the first `read` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + read) };
    Some(read)
}

#[cfg(not(target_os = "linux"))]
fn read_at_cached(
    _file: impl std::os::fd::AsFd,
    _offset: u64,
    _buf: &mut Vec<u8>,
) -> Option<usize> {
    None
}

/// What a verified stream does with the outcome of its check (a corrupt body, or a checksum it
/// learned); called once, when the whole body was read.
pub(super) type OnChecked = Arc<dyn Fn(Checked) + Send + Sync>;

/// A stream over `[start, end)` of a body file that checks the whole file as it goes (see
/// `checksums.rs`) and holds back its last chunk until the check passed. On a mismatch it ends
/// with an error instead, so the HTTP response is aborted rather than completed.
pub(super) fn verified_stream(
    file: File,
    size: u64,
    expected: Expected,
    range: Range<u64>,
    on_checked: OnChecked,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = ReadState {
        reader: Some((file, BodyCheck::new(expected))),
        offset: 0,
        size,
        range,
        held: None,
        done: false,
        on_checked,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let item = state.next_item().await?;
        Some((item, state))
    })
}

struct ReadState {
    /// The file and the check of what was read of it so far; away while a read is on the
    /// blocking pool.
    reader: Option<(File, BodyCheck)>,
    offset: u64,
    size: u64,
    range: Range<u64>,
    held: Option<Bytes>,
    done: bool,
    on_checked: OnChecked,
}

impl ReadState {
    async fn next_item(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            let chunk = match self.read_chunk().await {
                Ok(chunk) => chunk,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let chunk_start = self.offset;
            self.offset += chunk.len() as u64;
            if chunk.is_empty() || self.offset > self.size {
                return self.finish();
            }
            // The part of this chunk inside the requested range.
            let from = self.range.start.max(chunk_start);
            let to = self.range.end.min(self.offset);
            if from < to {
                let part = chunk.slice((from - chunk_start) as usize..(to - chunk_start) as usize);
                if let Some(previous) = self.held.replace(part) {
                    return Some(Ok(previous));
                }
            }
        }
    }

    /// End of file: release the held chunk only if everything verified.
    fn finish(&mut self) -> Option<io::Result<Bytes>> {
        self.done = true;
        let checked = match &self.reader {
            Some((_, check)) if self.offset == self.size => check.finish(),
            _ => Checked::Corrupt,
        };
        (self.on_checked)(checked);
        if let Checked::Intact { .. } = checked {
            return self.held.take().map(Ok);
        }
        Some(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "stored body failed verification",
        )))
    }

    /// The next chunk of the file, checked. A chunk the page cache holds is read on this
    /// thread; otherwise the read (and its check) goes to the blocking pool.
    async fn read_chunk(&mut self) -> io::Result<Bytes> {
        let (file, mut check) = self
            .reader
            .take()
            .ok_or_else(|| io::Error::other("body file closed"))?;
        let offset = self.offset;
        let mut buf = Vec::with_capacity(READ_CHUNK);
        // What the page cache holds of the chunk (a short chunk when only its start is there).
        if read_at_cached(&file, offset, &mut buf).is_some() {
            check.update(&buf);
            self.reader = Some((file, check));
            return Ok(Bytes::from(buf));
        }
        let (reader, result) = tokio::task::spawn_blocking(move || {
            let result = read_full_at(&file, offset, &mut buf).map(|()| {
                check.update(&buf);
                Bytes::from(buf)
            });
            ((file, check), result)
        })
        .await
        .map_err(io::Error::other)?;
        self.reader = Some(reader);
        result
    }
}

/// Fills the spare capacity of `buf` from `offset` unless the file ends first.
fn read_full_at(file: &File, offset: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    let start = buf.len();
    while buf.len() < buf.capacity() {
        let at = offset + (buf.len() - start) as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(buf), at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_cached_read_serves_only_bytes_that_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("body");
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let size = body.len() as u64;
        let by_blake3 = Expected::Blake3(*blake3::hash(&body).as_bytes());
        std::fs::write(&path, &body).unwrap();
        // Just written, so in the page cache.
        let learned = match read_cached(&path, size, by_blake3) {
            Some(Verified::Intact {
                bytes,
                learned: Some(learned),
            }) => {
                assert!(bytes == body, "the stored bytes");
                learned
            }
            _ => panic!("a hot file is read without the blocking pool, and teaches its checksum"),
        };
        let by_xxh3 = Expected::Xxh3(learned);
        assert!(matches!(
            read_cached(&path, size, by_xxh3),
            Some(Verified::Intact { learned: None, .. })
        ));
        let mut flipped = body.clone();
        flipped[150_000] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        for expected in [by_blake3, by_xxh3] {
            assert!(matches!(
                read_cached(&path, size, expected),
                Some(Verified::Corrupt)
            ));
            assert!(matches!(
                read_verified(&path, size, expected),
                Ok(Verified::Corrupt)
            ));
        }
        // Longer or shorter than the record says, or gone: left to the slow path.
        std::fs::write(&path, [&body[..], b"x"].concat()).unwrap();
        assert!(read_cached(&path, size, by_blake3).is_none());
        std::fs::write(&path, &body[1..]).unwrap();
        assert!(read_cached(&path, size, by_blake3).is_none());
        std::fs::remove_file(&path).unwrap();
        assert!(read_cached(&path, size, by_blake3).is_none());
    }

    /// What a verified stream over `range` of the file served, whether it ended in an error,
    /// and the outcome of its check.
    async fn collect(
        path: &Path,
        size: u64,
        expected: Expected,
        range: Range<u64>,
    ) -> (Vec<u8>, bool, Option<Checked>) {
        let outcome = Arc::new(Mutex::new(None));
        let seen = outcome.clone();
        let file = File::open(path).unwrap();
        let stream = verified_stream(
            file,
            size,
            expected,
            range,
            Arc::new(move |checked| {
                assert!(
                    seen.lock().unwrap().replace(checked).is_none(),
                    "called once"
                );
            }),
        );
        futures_util::pin_mut!(stream);
        let mut out = Vec::new();
        let mut failed = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(_) => failed = true,
            }
        }
        let checked = *outcome.lock().unwrap();
        (out, failed, checked)
    }

    #[tokio::test]
    async fn verified_stream_serves_ranges_and_withholds_the_end_of_corrupt_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let body: Vec<u8> = (0..(READ_CHUNK * 3 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &body).unwrap();
        let by_blake3 = Expected::Blake3(*blake3::hash(&body).as_bytes());
        let size = body.len() as u64;

        let (all, failed, checked) = collect(&path, size, by_blake3, 0..size).await;
        assert_eq!((all == body, failed), (true, false));
        let Some(Checked::Intact {
            learned: Some(learned),
        }) = checked
        else {
            panic!("a first read teaches the body's checksum: {checked:?}");
        };
        let by_xxh3 = Expected::Xxh3(learned);

        let range = 10..READ_CHUNK as u64 + 20;
        let (part, failed, checked) = collect(&path, size, by_xxh3, range).await;
        assert!(!failed);
        assert_eq!(checked, Some(Checked::Intact { learned: None }));
        assert_eq!(part, body[10..READ_CHUNK + 20]);

        let mut damaged = body.clone();
        damaged[READ_CHUNK * 3 + 1] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        for expected in [by_blake3, by_xxh3] {
            let (served, failed, checked) = collect(&path, size, expected, 0..size).await;
            assert!(failed, "a corrupt body must end in an error");
            assert_eq!(checked, Some(Checked::Corrupt));
            assert!(served.len() < body.len(), "the last chunk must be withheld");
        }
    }

    /// The same stream when the page cache does not hold the file (or holds only part of it):
    /// the chunks the kernel would wait for are read on the blocking pool, and the bytes and the
    /// verdict are the same.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_body_out_of_the_page_cache_streams_the_same() {
        use rustix::fs::{Advice, fadvise};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let body: Vec<u8> = (0..(READ_CHUNK * 2 + 5)).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &body).unwrap();
        let by_blake3 = Expected::Blake3(*blake3::hash(&body).as_bytes());
        let size = body.len() as u64;
        let drop_cached = |from: u64| {
            let file = File::open(&path).unwrap();
            file.sync_all().unwrap();
            fadvise(&file, from, None, Advice::DontNeed).unwrap();
        };
        for from in [0, READ_CHUNK as u64 / 2] {
            drop_cached(from);
            let (all, failed, checked) = collect(&path, size, by_blake3, 0..size).await;
            assert_eq!((all == body, failed), (true, false));
            assert!(matches!(
                checked,
                Some(Checked::Intact { learned: Some(_) })
            ));
        }
        let mut damaged = body.clone();
        damaged[5] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        drop_cached(0);
        let (served, failed, checked) = collect(&path, size, by_blake3, 0..size).await;
        assert!(failed && served.len() < body.len());
        assert_eq!(checked, Some(Checked::Corrupt));
    }

    #[tokio::test]
    async fn writer_inlines_small_bodies_and_spills_large_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut small = BodyWriter::new(
            dir.path().into(),
            Arc::default(),
            1024,
            1 << 30,
            true,
            false,
        );
        small.write(b"hello").await.unwrap();
        let staged = small.finish(None).await.unwrap();
        assert!(matches!(staged.content, StagedContent::Inline(ref b) if b == b"hello"));
        assert_eq!(&staged.blake3, blake3::hash(b"hello").as_bytes());
        assert_eq!(staged.sha256, Some(Sha256::digest(b"hello").into()));

        let big: Vec<u8> = (0..WRITE_BUFFER * 2 + 3).map(|i| (i % 251) as u8).collect();
        // Chunks smaller than the write buffer, and larger ones, which are split across its
        // flushes in order.
        for chunk_size in [10_000, WRITE_BUFFER + 5_000] {
            let mut writer = BodyWriter::new(
                dir.path().into(),
                Arc::default(),
                1024,
                1 << 30,
                false,
                false,
            );
            for chunk in big.chunks(chunk_size) {
                writer.write(chunk).await.unwrap();
                assert!(writer.pending.len() < WRITE_BUFFER, "flushed when full");
            }
            let staged = writer.finish(None).await.unwrap();
            let StagedContent::File { ref temp, .. } = staged.content else {
                panic!("a large body must spill to a file");
            };
            assert_eq!(std::fs::read(temp.path()).unwrap(), big, "{chunk_size}");
            assert_eq!(&staged.blake3, blake3::hash(&big).as_bytes());
            let temp_path = temp.path().to_path_buf();
            drop(staged);
            assert!(!temp_path.exists(), "an unpublished temp file is removed");
        }
    }

    #[tokio::test]
    async fn writer_enforces_limit_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = BodyWriter::new(dir.path().into(), Arc::default(), 1024, 4, false, false);
        assert!(matches!(
            writer.write(b"12345").await,
            Err(StoreError::TooLarge { limit: 4 })
        ));
        let mut writer = BodyWriter::new(dir.path().into(), Arc::default(), 1024, 100, true, false);
        writer.write(b"abc").await.unwrap();
        assert!(matches!(
            writer.finish(Some([0; 32])).await,
            Err(StoreError::ChecksumMismatch)
        ));
    }
}
