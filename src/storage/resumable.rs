//! Resumable uploads: a body streamed in under a caller-chosen name that survives a restart of
//! the node, so the client resumes at the offset the node reports (ByteStream `Write` and
//! `QueryWriteStatus`).
//!
//! Each upload is one file in `staging/`, named by the BLAKE3 of the upload's name, written by
//! plain appends. Its length is the committed offset: every byte before it was handed to the
//! kernel, and in `fsync` durability synced before the offset is reported (by
//! [`ResumableUpload::sync`], [`Store::resumable_offset`] and a resume), so after a crash the
//! file holds at least the bytes acknowledged. `staging/` is not emptied at start, unlike
//! `tmp/`; uploads nobody wrote to for `uploads.expiry` are deleted by
//! [`Store::expire_resumable`].
//!
//! One writer per upload: a [`Claim`] on its name, held by the writer and by every blocking
//! operation it started, so a cancelled request cannot free the name while its write still
//! runs. Expiry deletes only unclaimed uploads, under the same lock.
//!
//! Nothing here is published until [`ResumableUpload::finish`] has hashed the whole body (the
//! part written before a restart is read back and hashed again) and moved it out of `staging/`
//! while still claimed; the caller then commits it through the one publish path, with its
//! digest checks. A failed publish discards the body: the client starts that upload again
//! (the offset it is told is 0).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::bodies::{self, Digests, StagedBody, StagedContent};
use super::{Store, StoreError};

/// Bytes read per call when a resumed upload's existing part is hashed again.
const REHASH_CHUNK: usize = 1024 * 1024;

/// File names of the resumable uploads held by a writer.
#[derive(Default)]
pub(super) struct OpenResumable(Arc<Mutex<HashSet<String>>>);

impl OpenResumable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `file_name`, or `None` while someone holds it.
    fn claim(&self, file_name: &str) -> Option<Arc<Claim>> {
        self.lock().insert(file_name.to_string()).then(|| {
            Arc::new(Claim {
                names: self.0.clone(),
                file_name: file_name.to_string(),
            })
        })
    }

    /// Runs `remove` on an upload nobody holds, under the lock a claim takes.
    fn remove_unclaimed(&self, file_name: &str, remove: impl FnOnce() -> bool) -> bool {
        let names = self.lock();
        !names.contains(file_name) && remove()
    }
}

/// One writer's hold on an upload's name, released when the last holder (the writer, or a
/// blocking write it started) drops it.
pub(super) struct Claim {
    names: Arc<Mutex<HashSet<String>>>,
    file_name: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.file_name);
    }
}

/// A resumable upload held open for writing. Dropping it keeps what was written, for a later
/// [`Store::resume_upload`] of the same name; [`ResumableUpload::discard`] deletes it.
pub struct ResumableUpload {
    store: Store,
    claim: Arc<Claim>,
    path: PathBuf,
    /// `None` while a blocking operation has it, and for good after a failed one: the file's
    /// length may then differ from what was hashed, and only a resume (which hashes the file
    /// again) can go on.
    file: Option<File>,
    digests: Option<Digests>,
    written: u64,
    limit: u64,
}

impl Store {
    /// Opens the resumable upload `name` for writing, creating it or resuming it where it
    /// stopped (also after a restart). Fails with [`StoreError::UploadBusy`] while another
    /// writer holds it, and with [`StoreError::TooLarge`] when what it holds passes `limit`.
    pub async fn resume_upload(
        &self,
        name: &str,
        limit: u64,
        want_sha256: bool,
    ) -> Result<ResumableUpload, StoreError> {
        let file_name = staging_name(name);
        let claim = self
            .inner
            .resumable
            .claim(&file_name)
            .ok_or(StoreError::UploadBusy)?;
        let path = self.inner.staging_dir.join(&file_name);
        let (opening, fsync) = (path.clone(), self.fsyncs());
        let staging_dir = self.inner.staging_dir.clone();
        let held = claim.clone();
        let (file, digests, written) = tokio::task::spawn_blocking(move || {
            let _held = held;
            open_and_rehash(&opening, &staging_dir, want_sha256, fsync)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?
        .map_err(StoreError::from_write)?;
        if written > limit {
            return Err(StoreError::TooLarge { limit });
        }
        self.check_room(limit - written)?;
        Ok(ResumableUpload {
            store: self.clone(),
            claim,
            path,
            file: Some(file),
            digests: Some(digests),
            written,
            limit,
        })
    }

    /// The committed offset of the resumable upload `name` (`None` when there is none): what
    /// `QueryWriteStatus` reports. In `fsync` durability the bytes are synced first, so the
    /// offset survives a power cut. Blocking.
    pub fn resumable_offset(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let path = self.inner.staging_dir.join(staging_name(name));
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // The length is read before the sync: a writer the client abandoned may still be
        // appending, and what it appends after the sync is not yet safe to report.
        let length = file.metadata()?.len();
        if self.fsyncs() {
            file.sync_data().map_err(StoreError::from_write)?;
        }
        Ok(Some(length))
    }

    /// Deletes resumable uploads nobody wrote to for `max_age` and no writer holds. Blocking: a
    /// directory scan.
    pub fn expire_resumable(&self, max_age: Duration) -> Result<usize, StoreError> {
        let cutoff = SystemTime::now()
            .checked_sub(max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.inner.staging_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if !super::sweep::older_than(&path, cutoff)? {
                continue;
            }
            // Under the claims' lock, and its age looked at again there: a resume that claimed,
            // wrote and released it since the look above has made it young again.
            let deleted = self.inner.resumable.remove_unclaimed(name, || {
                let still_old = super::sweep::older_than(&path, cutoff).unwrap_or(false);
                still_old && super::sweep::remove_file(&path).unwrap_or_else(|error| {
                    tracing::warn!(path = %path.display(), %error, "could not expire an upload");
                    false
                })
            });
            if deleted {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl ResumableUpload {
    /// Bytes the upload holds: where the next [`ResumableUpload::write`] appends.
    pub fn committed(&self) -> u64 {
        self.written
    }

    /// Appends a chunk. Fails with [`StoreError::TooLarge`] before writing past the limit.
    pub async fn write(&mut self, chunk: bytes::Bytes) -> Result<(), StoreError> {
        let after = self.written + chunk.len() as u64;
        if after > self.limit {
            return Err(StoreError::TooLarge { limit: self.limit });
        }
        let mut file = self.file.take().ok_or_else(broken)?;
        let mut digests = self.digests.take().ok_or_else(broken)?;
        let held = self.claim.clone();
        let (file, digests, result) = tokio::task::spawn_blocking(move || {
            let _held = held;
            let result = file.write_all(&chunk);
            if result.is_ok() {
                digests.update(&chunk);
            }
            (file, digests, result)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?;
        result.map_err(StoreError::from_write)?;
        self.file = Some(file);
        self.digests = Some(digests);
        self.written = after;
        Ok(())
    }

    /// Makes the bytes written so far survive a crash (in `fsync` durability, also a power
    /// cut) and returns the committed offset, which may then be reported to the client.
    pub async fn sync(&mut self) -> Result<u64, StoreError> {
        if self.store.fsyncs() {
            let file = self.file.take().ok_or_else(broken)?;
            let held = self.claim.clone();
            let (file, result) = tokio::task::spawn_blocking(move || {
                let _held = held;
                let result = file.sync_data();
                (file, result)
            })
            .await
            .map_err(|e| StoreError::Io(io::Error::other(e)))?;
            // After a failed fsync the kernel may have dropped the dirty pages: a later one
            // could succeed without them. The writer stays broken; a resume re-reads the file.
            result.map_err(StoreError::from_write)?;
            self.file = Some(file);
        }
        Ok(self.written)
    }

    /// The whole body, hashed, ready to commit; `expected_sha256`, when given, must match. The
    /// body leaves `staging/` (an inline one is read into memory, a file one moves to `tmp/`)
    /// while the upload is still claimed, so no resume of the same name can touch it. On a
    /// digest mismatch the upload is kept as it is; the caller decides (see `discard`).
    pub async fn finish(
        mut self,
        expected_sha256: Option<[u8; 32]>,
    ) -> Result<StagedBody, StoreError> {
        let file = self.file.take().ok_or_else(broken)?;
        let digests = self.digests.take().ok_or_else(broken)?;
        let (blake3, sha256) = digests.finish(expected_sha256)?;
        let size = self.written;
        let store = self.store.clone();
        let (path, held) = (self.path.clone(), self.claim.clone());
        let content = tokio::task::spawn_blocking(move || -> io::Result<StagedContent> {
            let _held = held;
            if file.metadata()?.len() != size {
                return Err(io::Error::other(
                    "the upload's file does not hold what was written to it",
                ));
            }
            if size <= store.inner.options.inline_max as u64 {
                let mut bytes = Vec::with_capacity(size as usize);
                File::open(&path)?.read_to_end(&mut bytes)?;
                std::fs::remove_file(&path)?;
                return Ok(StagedContent::Inline(bytes));
            }
            if store.fsyncs() {
                file.sync_all()?;
            }
            bodies::adopt_file(&store.inner.live_bodies, &store.inner.tmp_dir, &path)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?
        .map_err(StoreError::from_write)?;
        Ok(StagedBody {
            size,
            blake3,
            sha256,
            content,
        })
    }

    /// Deletes the upload and what it holds.
    pub fn discard(self) {
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), %error, "could not delete an upload");
        }
    }
}

fn broken() -> StoreError {
    StoreError::Io(io::Error::other(
        "resumable upload used after a failed write; resume it to go on",
    ))
}

/// The file name of the upload called `name`: a hash, so any name is a safe file name.
fn staging_name(name: &str) -> String {
    format!("{}.upload", blake3::hash(name.as_bytes()).to_hex())
}

/// Opens (creating) an upload's file for appending and hashes what it already holds, synced
/// first in `fsync` durability, so the length it reports survives a power cut.
fn open_and_rehash(
    path: &Path,
    staging_dir: &Path,
    want_sha256: bool,
    fsync: bool,
) -> io::Result<(File, Digests, u64)> {
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    if !created {
        // A resume is activity: expiry measures idleness from it, not from the last byte, so
        // an upload resumed between a query and its first write is not expired in between.
        // Best effort: if the time cannot be set, the upload only looks idle for longer.
        let _ = file.set_modified(SystemTime::now());
    }
    if fsync {
        file.sync_data()?;
        if created {
            File::open(staging_dir)?.sync_all()?;
        }
    }
    let mut digests = Digests::new(want_sha256);
    let mut written = 0u64;
    // Most uploads start empty: no buffer then (a zeroed 1 MiB one was a few percent of every
    // ByteStream write's CPU, `docs/benchmarks.md`).
    let held = file.metadata()?.len();
    if held == 0 {
        return Ok((file, digests, 0));
    }
    let mut buffer = vec![0u8; REHASH_CHUNK.min(usize::try_from(held).unwrap_or(REHASH_CHUNK))];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        digests.update(&buffer[..n]);
        written += n as u64;
    }
    Ok((file, digests, written))
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    use bytes::Bytes;

    use super::*;
    use crate::storage::{ArtifactKey, BodyStream, Durability, Kind, StoreOptions};

    /// Set in the child process of the kill -9 test: the data dir it writes to.
    const CHILD_DIR: &str = "KURA_TEST_RESUMABLE_CHILD_DIR";
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 64;

    fn chunk(i: usize) -> Bytes {
        Bytes::from(vec![(i * 7 + 1) as u8; CHUNK])
    }

    fn whole_body() -> Vec<u8> {
        (0..CHUNKS).flat_map(|i| chunk(i).to_vec()).collect()
    }

    fn open(dir: &Path) -> Store {
        Store::open(StoreOptions {
            durability: Durability::Fsync,
            ..StoreOptions::for_tests(dir)
        })
        .unwrap()
    }

    /// Sends the rest of the body from where the upload stands, then publishes it under `key`.
    async fn complete(store: &Store, name: &str, key: &ArtifactKey) {
        let body = whole_body();
        let mut upload = store.resume_upload(name, u64::MAX, true).await.unwrap();
        let from = upload.committed() as usize;
        for piece in body[from..].chunks(CHUNK) {
            upload.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        let sha256: [u8; 32] = sha2::Sha256::digest(&body).into();
        let staged = upload.finish(Some(sha256)).await.unwrap();
        store.commit_local(key, staged).await.unwrap();
    }

    use sha2::Digest as _;

    /// The stored body under `key`, read (and verified) the way a GET reads it.
    async fn body_of(store: &Store, key: &ArtifactKey) -> Option<Vec<u8>> {
        use futures_util::StreamExt;
        let artifact = store.read(key).await.unwrap()?;
        let size = artifact.info.size;
        match artifact.into_body(0, size) {
            BodyStream::Bytes(bytes) => Some(bytes.to_vec()),
            BodyStream::Stream(mut stream) => {
                let mut body = Vec::new();
                while let Some(chunk) = stream.next().await {
                    body.extend_from_slice(&chunk.unwrap());
                }
                Some(body)
            }
        }
    }

    /// Not a test on its own: the writer process that
    /// `an_upload_resumes_at_the_acknowledged_offset_after_kill_9` starts and kills. It
    /// acknowledges half the body, then goes on writing slowly until it is killed.
    #[tokio::test]
    async fn resumable_writer_child_process() {
        let Ok(dir) = std::env::var(CHILD_DIR) else {
            return;
        };
        let store = open(Path::new(&dir));
        let mut upload = store.resume_upload("blob-1", u64::MAX, true).await.unwrap();
        for i in 0..CHUNKS / 2 {
            upload.write(chunk(i)).await.unwrap();
        }
        let acknowledged = upload.sync().await.unwrap();
        println!("ACK {acknowledged}");
        for i in CHUNKS / 2..CHUNKS - 1 {
            upload.write(chunk(i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }

    /// The path ByteStream uses: a writer process killed with SIGKILL mid-upload; after a
    /// restart the upload holds at least what was acknowledged, the client sends the rest from
    /// the offset the node reports, and the published bytes are the right ones.
    #[tokio::test]
    async fn an_upload_resumes_at_the_acknowledged_offset_after_kill_9() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "storage::resumable::tests::resumable_writer_child_process",
                "--nocapture",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let acknowledged: u64 = stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("ACK ").map(|n| n.parse().unwrap()))
            .expect("the writer never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(acknowledged, (CHUNKS / 2 * CHUNK) as u64);

        let store = open(dir.path());
        let offset = store
            .resumable_offset("blob-1")
            .unwrap()
            .expect("the upload survived");
        assert!(
            offset >= acknowledged && offset < (CHUNKS * CHUNK) as u64,
            "offset {offset} after kill -9, {acknowledged} acknowledged"
        );
        let key = ArtifactKey::new("p", Kind::CasSha256, "blob-1");
        complete(&store, "blob-1", &key).await;
        assert_eq!(body_of(&store, &key).await, Some(whole_body()));
        assert_eq!(
            store.resumable_offset("blob-1").unwrap(),
            None,
            "published: gone"
        );
    }

    #[tokio::test]
    async fn an_upload_without_room_for_its_rest_over_the_disk_floor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreOptions {
            min_free: 1,
            ..StoreOptions::for_tests(dir.path())
        })
        .unwrap();
        // No filesystem has an exabyte free; every one has a few KiB.
        assert!(matches!(
            store.resume_upload("huge", 1 << 60, false).await,
            Err(StoreError::DiskFull { incoming, .. }) if incoming == 1 << 60
        ));
        let mut small = store
            .resume_upload("small", 2 * CHUNK as u64, false)
            .await
            .unwrap();
        small.write(chunk(0)).await.unwrap();
    }

    #[tokio::test]
    async fn one_writer_at_a_time_and_a_reopened_store_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut upload = store.resume_upload("u", u64::MAX, false).await.unwrap();
        upload.write(chunk(0)).await.unwrap();
        assert!(matches!(
            store.resume_upload("u", u64::MAX, false).await,
            Err(StoreError::UploadBusy)
        ));
        drop(upload);
        drop(store);

        let store = open(dir.path());
        assert_eq!(store.resumable_offset("u").unwrap(), Some(CHUNK as u64));
        let key = ArtifactKey::new("p", Kind::CasSha256, "u");
        complete(&store, "u", &key).await;
        assert_eq!(body_of(&store, &key).await, Some(whole_body()));
    }

    #[tokio::test]
    async fn a_wrong_digest_publishes_nothing_and_limits_hold_across_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut upload = store
            .resume_upload("u", 2 * CHUNK as u64, true)
            .await
            .unwrap();
        upload.write(chunk(0)).await.unwrap();
        upload.write(chunk(1)).await.unwrap();
        assert!(matches!(
            upload.write(chunk(2)).await,
            Err(StoreError::TooLarge { .. })
        ));
        drop(upload);
        assert!(matches!(
            store.resume_upload("u", CHUNK as u64, true).await,
            Err(StoreError::TooLarge { .. })
        ));
        let upload = store.resume_upload("u", u64::MAX, true).await.unwrap();
        assert!(matches!(
            upload.finish(Some([0; 32])).await,
            Err(StoreError::ChecksumMismatch)
        ));
        let upload = store.resume_upload("u", u64::MAX, true).await.unwrap();
        upload.discard();
        assert_eq!(store.resumable_offset("u").unwrap(), None);
    }

    #[tokio::test]
    async fn idle_uploads_expire_and_open_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut idle = store.resume_upload("idle", u64::MAX, false).await.unwrap();
        idle.write(chunk(0)).await.unwrap();
        drop(idle);
        let mut open = store.resume_upload("open", u64::MAX, false).await.unwrap();
        open.write(chunk(0)).await.unwrap();
        assert_eq!(
            store.expire_resumable(Duration::from_secs(3600)).unwrap(),
            0
        );
        assert_eq!(store.expire_resumable(Duration::ZERO).unwrap(), 1);
        assert_eq!(store.resumable_offset("idle").unwrap(), None);
        assert_eq!(open.committed(), CHUNK as u64);
        assert_eq!(store.resumable_offset("open").unwrap(), Some(CHUNK as u64));
    }

    /// Expiry measures idleness from the last resume, not the last byte: a client that resumed
    /// an old upload (and has not written yet) keeps it.
    #[tokio::test]
    async fn a_resumed_upload_is_not_idle() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut upload = store.resume_upload("old", u64::MAX, false).await.unwrap();
        upload.write(chunk(0)).await.unwrap();
        drop(upload);
        let path = store.inner.staging_dir.join(staging_name("old"));
        let day_ago = SystemTime::now() - Duration::from_secs(24 * 3600);
        File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();
        drop(store.resume_upload("old", u64::MAX, false).await.unwrap());
        assert_eq!(
            store.expire_resumable(Duration::from_secs(3600)).unwrap(),
            0
        );
        assert_eq!(store.resumable_offset("old").unwrap(), Some(CHUNK as u64));
    }

    /// A retry of the same name after `finish` starts a new upload: it can neither append to
    /// nor delete the body on its way to being published.
    #[tokio::test]
    async fn a_finished_upload_leaves_staging_before_it_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut upload = store.resume_upload("u", u64::MAX, false).await.unwrap();
        for i in 0..CHUNKS {
            upload.write(chunk(i)).await.unwrap();
        }
        let staged = upload.finish(None).await.unwrap();
        assert_eq!(store.resumable_offset("u").unwrap(), None);
        let mut retry = store.resume_upload("u", u64::MAX, false).await.unwrap();
        assert_eq!(retry.committed(), 0);
        retry.write(chunk(9)).await.unwrap();
        drop(retry);
        assert_eq!(store.expire_resumable(Duration::ZERO).unwrap(), 1);

        let key = ArtifactKey::new("p", Kind::CasSha256, "u");
        store.commit_local(&key, staged).await.unwrap();
        assert_eq!(body_of(&store, &key).await, Some(whole_body()));
    }
}
