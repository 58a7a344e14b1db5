//! Module multipart uploads: parts received in any order, assembled into one artifact.
//!
//! An upload is a record in the `uploads` column family (what it will become, when it started)
//! and a directory `uploads/<id>/` holding one file per part. Parts are staged in `tmp/` and
//! renamed into place, so re-sending a part replaces it atomically. Completing streams the listed
//! parts, in order, through a normal [`super::BodyWriter`], so the assembled artifact is hashed
//! and published exactly like any other upload.
//!
//! Each placed part also gets an entry in `uploads` with its size and BLAKE3, and assembly holds
//! the part's file to it. In `process` durability a part file is not synced, so a power cut can
//! leave one that was renamed into place empty, or with the bytes of the part it replaced; the
//! file's own length and hash would describe those bytes. Such a part is refused as lost
//! ([`StoreError::LostPart`], or missing when it is found at start), never assembled.
//!
//! [`OpenUploads`] mirrors the records in memory with the bytes each part stages. It is rebuilt
//! from the records and the part files at start, and every change to a record happens under its
//! lock together with the change to the mirror, so the count of uploads in flight is the number
//! of records, always. Staged bytes count against `storage.capacity` like published ones.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use rocksdb::WriteBatch;
use tokio::io::AsyncReadExt;

use super::meta::{self, EncodedKey, PartRecord, UploadRecord};
use super::{
    ArtifactKey, Committed, Intent, NewArtifact, Provenance, StagedBody, Store, StoreError,
    WriteMode, bodies, now_ms,
};

/// The bounds an upload works within (`uploads.*` and `limits.module_*` in the config).
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Uploads open at once.
    pub max_in_flight: usize,
    /// Highest part number.
    pub max_parts: u32,
    /// Bytes staged by one upload, and the size of the assembled artifact.
    pub max_bytes: u64,
}

/// The uploads in flight, as the records say, with what their parts stage.
#[derive(Default)]
pub(super) struct OpenUploads(Mutex<HashMap<String, OpenUpload>>);

#[derive(Default)]
struct OpenUpload {
    created_ms: u64,
    /// Part number → its size and hash, as acknowledged.
    parts: HashMap<u32, PartRecord>,
    /// A `complete` is assembling this upload: other completions and new parts are refused.
    completing: bool,
}

impl OpenUpload {
    fn staged(&self) -> u64 {
        self.parts.values().map(|part| part.size).sum()
    }
}

impl OpenUploads {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, OpenUpload>> {
        // Every change under this lock is complete before it is released or fails before it
        // starts, so a poisoned lock holds consistent data.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks an upload as being completed; clears the mark when dropped unless the upload went.
struct CompletionClaim<'a> {
    store: &'a Store,
    id: &'a str,
}

impl Drop for CompletionClaim<'_> {
    fn drop(&mut self) {
        if let Some(upload) = self.store.inner.uploads.lock().get_mut(self.id) {
            upload.completing = false;
        }
    }
}

/// Why an upload's record and parts go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// Published, or missed its checksum: the completion that claimed it removes it.
    Completed,
    /// Too old: unless a completion has claimed it meanwhile.
    Expired,
}

impl Store {
    /// Registers a new upload that will become `target`; returns its id. Blocking (a directory,
    /// a metadata write, and syncs in `fsync` durability): call it off the async workers.
    pub fn start_upload(
        &self,
        target: &ArtifactKey,
        limits: &UploadLimits,
    ) -> Result<String, StoreError> {
        let mut open = self.inner.uploads.lock();
        if open.len() >= limits.max_in_flight {
            return Err(StoreError::TooManyUploads(limits.max_in_flight));
        }
        self.check_room(0)?;
        let id = format!("{:032x}", rand::random::<u128>());
        let dir = self.upload_dir(&id);
        std::fs::create_dir(&dir).map_err(StoreError::from_write)?;
        let created_ms = now_ms();
        let record = UploadRecord {
            target: EncodedKey(target.encode()),
            created_ms,
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(meta::CF_UPLOADS), &id, meta::encode(&record));
        let written = self
            .sync_dir(&self.inner.uploads_dir)
            .and_then(|()| self.write(batch));
        if let Err(error) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        open.insert(
            id.clone(),
            OpenUpload {
                created_ms,
                ..OpenUpload::default()
            },
        );
        Ok(id)
    }

    /// The artifact an upload will become, or `None` for an unknown (or expired) upload.
    pub fn upload_target(&self, id: &str) -> Result<Option<ArtifactKey>, StoreError> {
        let value = self.get(meta::CF_UPLOADS, id)?;
        Ok(value
            .and_then(|bytes| meta::decode::<UploadRecord>(&bytes))
            .and_then(|record| record.target.decode()))
    }

    /// Stores (or replaces) part `number` of an upload. The part's bytes count against capacity
    /// (evicting to make room) and against `limits.max_bytes` for the upload.
    pub async fn put_part(
        &self,
        id: &str,
        number: u32,
        part: StagedBody,
        limits: &UploadLimits,
    ) -> Result<(), StoreError> {
        if number == 0 || number > limits.max_parts {
            return Err(StoreError::BadPartNumber(limits.max_parts));
        }
        let replaced = {
            let open = self.inner.uploads.lock();
            let upload = open
                .get(id)
                .filter(|u| !u.completing)
                .ok_or(StoreError::UploadNotFound)?;
            let replaced = upload.parts.get(&number).map_or(0, |part| part.size);
            if upload.staged() - replaced + part.size > limits.max_bytes {
                return Err(StoreError::TooLarge {
                    limit: limits.max_bytes,
                });
            }
            replaced
        };
        let reservation = self.reserve(part.size, replaced).await?;
        let store = self.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let _reservation = reservation;
            store.place_part(&id, number, part)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?
    }

    /// Moves a received part into its upload's directory, records it and accounts for it, all
    /// under the uploads lock, so a part never lands in an upload that completed or expired
    /// meanwhile.
    fn place_part(&self, id: &str, number: u32, part: StagedBody) -> Result<(), StoreError> {
        let dest = self.upload_dir(id).join(number.to_string());
        let fsync = self.fsyncs();
        let acknowledged = PartRecord {
            size: part.size,
            blake3: Some(part.blake3),
        };
        let mut open = self.inner.uploads.lock();
        let upload = open
            .get_mut(id)
            .filter(|u| !u.completing)
            .ok_or(StoreError::UploadNotFound)?;
        match part.content {
            bodies::StagedContent::Inline(bytes) => write_atomically(&dest, &bytes, fsync),
            bodies::StagedContent::File { temp, .. } => std::fs::rename(temp.path(), &dest),
        }
        .map_err(StoreError::from_write)?;
        // After the file is in place: a part with an entry had its file (a file without one is
        // deleted at start).
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(meta::CF_UPLOADS),
            meta::part_key(id, number),
            meta::encode(&acknowledged),
        );
        let written = self.write(batch);
        let replaced = match &written {
            Ok(()) => upload.parts.insert(number, acknowledged),
            // The file now holds bytes no entry vouches for: the part is gone, and is sent again.
            Err(_) => {
                let _ = std::fs::remove_file(&dest);
                upload.parts.remove(&number)
            }
        };
        {
            let kept = written.as_ref().map_or(0, |_| acknowledged.size);
            let mut accounting = self.accounting();
            accounting.staged = accounting.staged - replaced.map_or(0, |part| part.size) + kept;
        }
        written?;
        drop(open);
        // The part's bytes were synced before the rename (durability `fsync`); this makes the
        // rename itself durable before the 204.
        self.sync_dir(&self.upload_dir(id))
    }

    /// Assembles `parts` in the order given and publishes the result. Nothing is published
    /// unless every part is present and the checksum (when given) matches. Of concurrent
    /// completions of one upload exactly one proceeds; the others find no upload.
    pub async fn complete_upload(
        &self,
        id: &str,
        parts: &[u32],
        expected_sha256: Option<[u8; 32]>,
        limits: &UploadLimits,
    ) -> Result<Committed, StoreError> {
        if let Some(number) = first_duplicate(parts) {
            return Err(StoreError::DuplicatePart(number));
        }
        let (claim, staged_bytes, acknowledged) = self.claim_completion(id, parts)?;
        let target = self.upload_target(id)?.ok_or(StoreError::UploadNotFound)?;
        // The assembled copy needs room of its own until the parts are removed.
        self.check_room(staged_bytes)?;
        let assembled = match self
            .assemble(&self.upload_dir(id), &acknowledged, expected_sha256, limits)
            .await
        {
            Err(StoreError::ChecksumMismatch) => {
                // Its parts are not the bytes the client means: it starts a new upload (the
                // Tuist CLI does), so this one's slot and parts go now, not at its expiry.
                if let Err(error) = self.remove_upload(id, Removal::Completed) {
                    tracing::warn!(upload = id, %error, "could not remove the parts of an upload that missed its checksum; they are swept later");
                }
                return Err(StoreError::ChecksumMismatch);
            }
            assembled => assembled?,
        };
        // The parts' bytes are already accounted; the artifact replaces them.
        let committed = self
            .commit_crediting(
                &target,
                assembled,
                NewArtifact::default(),
                Intent {
                    mode: WriteMode::Overwrite,
                    provenance: Provenance::local(self),
                    hook: None,
                },
                staged_bytes,
            )
            .await?;
        // Published: the answer is the artifact's, whatever becomes of the parts. A record left
        // behind expires, a directory left behind is swept (`sweep_upload_leftovers`).
        if let Err(error) = self.remove_upload(id, Removal::Completed) {
            tracing::warn!(upload = id, %error, "could not remove a completed upload's parts; they are swept later");
        }
        drop(claim);
        Ok(committed)
    }

    /// Takes the right to complete an upload; returns it with the bytes the upload stages and
    /// the listed parts as they were acknowledged, in list order.
    #[allow(clippy::type_complexity)]
    fn claim_completion<'a>(
        &'a self,
        id: &'a str,
        parts: &[u32],
    ) -> Result<(CompletionClaim<'a>, u64, Vec<(u32, PartRecord)>), StoreError> {
        let mut open = self.inner.uploads.lock();
        let upload = open
            .get_mut(id)
            .filter(|u| !u.completing)
            .ok_or(StoreError::UploadNotFound)?;
        let acknowledged = parts
            .iter()
            .map(|&number| match upload.parts.get(&number) {
                Some(part) => Ok((number, *part)),
                None => Err(StoreError::MissingPart(number)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        upload.completing = true;
        let staged = upload.staged();
        Ok((CompletionClaim { store: self, id }, staged, acknowledged))
    }

    /// Streams the listed part files, in order, into one staged body, each checked against
    /// what was acknowledged for it.
    async fn assemble(
        &self,
        dir: &Path,
        parts: &[(u32, PartRecord)],
        expected_sha256: Option<[u8; 32]>,
        limits: &UploadLimits,
    ) -> Result<StagedBody, StoreError> {
        let mut writer = self.writer(limits.max_bytes, expected_sha256.is_some());
        let mut buffer = vec![0u8; bodies::READ_CHUNK];
        for &(number, acknowledged) in parts {
            let mut file = tokio::fs::File::open(dir.join(number.to_string()))
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => StoreError::LostPart(number),
                    _ => StoreError::Io(e),
                })?;
            let mut part = blake3::Hasher::new();
            let mut size = 0u64;
            loop {
                let n = file.read(&mut buffer).await?;
                if n == 0 {
                    break;
                }
                part.update(&buffer[..n]);
                size += n as u64;
                writer.write(&buffer[..n]).await?;
            }
            let hash = *part.finalize().as_bytes();
            if size != acknowledged.size || acknowledged.blake3.is_some_and(|b| b != hash) {
                return Err(StoreError::LostPart(number));
            }
        }
        writer.finish(expected_sha256).await
    }

    /// Deletes uploads started more than `max_age_ms` ago, with their parts. An upload being
    /// completed is left to its completion. Blocking: call it off the async workers.
    pub fn expire_uploads(&self, max_age_ms: u64) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(max_age_ms);
        let expired: Vec<String> = self
            .inner
            .uploads
            .lock()
            .iter()
            .filter(|(_, upload)| upload.created_ms < cutoff && !upload.completing)
            .map(|(id, _)| id.clone())
            .collect();
        let mut removed = 0;
        for id in &expired {
            if self.remove_upload(id, Removal::Expired)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes an upload's record, its parts and their accounting, once: `false` when it was
    /// already gone, or when it expired but a completion claimed it since the expiry listed it
    /// (its parts are being assembled).
    fn remove_upload(&self, id: &str, removal: Removal) -> Result<bool, StoreError> {
        let mut open = self.inner.uploads.lock();
        let Some(upload) = open.get(id) else {
            return Ok(false);
        };
        if removal == Removal::Expired && upload.completing {
            return Ok(false);
        }
        let staged = upload.staged();
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(meta::CF_UPLOADS), id);
        let (first_part, past_parts) = meta::part_key_range(id);
        batch.delete_range_cf(self.cf(meta::CF_UPLOADS), first_part, past_parts);
        self.write(batch)?;
        open.remove(id);
        {
            let mut accounting = self.accounting();
            accounting.staged = accounting.staged.saturating_sub(staged);
        }
        drop(open);
        match std::fs::remove_dir_all(self.upload_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(true),
        }
    }

    /// Rebuilds the uploads in flight from their records, part entries and part files after a
    /// restart, and removes part directories without a record. Returns the bytes the parts
    /// stage.
    pub(super) fn recover_uploads(&self) -> Result<u64, StoreError> {
        let mut records = Vec::new();
        let mut acknowledged: HashMap<String, HashMap<u32, PartRecord>> = HashMap::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(meta::CF_UPLOADS), rocksdb::IteratorMode::Start)
        {
            let (key, value) = item?;
            if let Some((id, number)) = meta::split_part_key(&key) {
                if let Some(part) = meta::decode::<PartRecord>(&value) {
                    let parts = acknowledged.entry(id.to_owned()).or_default();
                    parts.insert(number, part);
                }
                continue;
            }
            let id = String::from_utf8_lossy(&key).into_owned();
            // An unreadable record expires at the next pass (created at the epoch).
            let created_ms = meta::decode::<UploadRecord>(&value).map_or(0, |r| r.created_ms);
            records.push((id, created_ms));
        }
        let mut open = HashMap::new();
        for (id, created_ms) in records {
            let entries = acknowledged.remove(&id).unwrap_or_default();
            let parts = staged_parts(&self.upload_dir(&id), entries)?;
            open.insert(
                id,
                OpenUpload {
                    created_ms,
                    parts,
                    completing: false,
                },
            );
        }
        for entry in std::fs::read_dir(&self.inner.uploads_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !open.contains_key(&name) {
                remove_entry(&entry.path())?;
            }
        }
        let staged = open.values().map(OpenUpload::staged).sum();
        *self.inner.uploads.lock() = open;
        Ok(staged)
    }

    /// Under the uploads lock nothing is placing a part, so a `.partial` file is a leftover of a
    /// failed write, and a directory without an upload is one whose removal failed.
    pub(super) fn sweep_upload_leftovers(&self, cutoff: SystemTime) -> Result<u64, StoreError> {
        let open = self.inner.uploads.lock();
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.inner.uploads_dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !open.contains_key(&name) {
                if super::sweep::older_than(&path, cutoff)? {
                    match remove_entry(&path) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let parts = match std::fs::read_dir(&path) {
                Ok(parts) => parts,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for part in parts {
                let part = part?.path();
                if part.extension().is_some_and(|e| e == "partial")
                    && super::sweep::older_than(&part, cutoff)?
                    && super::sweep::remove_file(&part)?
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Uploads in flight (the number of upload records).
    pub fn uploads_in_flight(&self) -> usize {
        self.inner.uploads.lock().len()
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.inner.uploads_dir.join(id)
    }
}

/// The parts of an upload directory (none when the directory is missing): each part file with
/// an entry of its length, and each without an entry taken at its length (placed by a release
/// that wrote no entries, before an upgrade or after a downgrade; or whose entry a crash kept
/// from being written, and whose client, not answered, sends it again). Other files are
/// removed: leftover `.partial` files of a crash mid-write, and a part a power cut left at
/// another length than its entry says (its client sends it again when completing fails).
fn staged_parts(
    dir: &Path,
    mut acknowledged: HashMap<u32, PartRecord>,
) -> Result<HashMap<u32, PartRecord>, StoreError> {
    let mut keep = |number, length| match acknowledged.remove(&number) {
        Some(part) => Some(part).filter(|part| part.size == length),
        None => Some(PartRecord {
            size: length,
            blake3: None,
        }),
    };
    let mut parts = HashMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(parts),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let number = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok());
        let part = match number {
            Some(number) => keep(number, entry.metadata()?.len()).map(|part| (number, part)),
            None => None,
        };
        match part {
            Some((number, part)) => {
                parts.insert(number, part);
            }
            None => std::fs::remove_file(entry.path())?,
        }
    }
    Ok(parts)
}

/// The first part number listed twice.
fn first_duplicate(parts: &[u32]) -> Option<u32> {
    let mut seen = std::collections::HashSet::with_capacity(parts.len());
    parts.iter().copied().find(|n| !seen.insert(*n))
}

/// Writes a small part through a temp file so a reader never sees half of it.
fn write_atomically(dest: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
    use std::io::Write as _;
    let temp = dest.with_extension("partial");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    if fsync {
        file.sync_all()?;
    }
    std::fs::rename(&temp, dest)
}

/// Removes what `uploads/` holds under a name no upload owns: a part directory, or a stray file
/// put there by hand (which must not stop the node from starting).
fn remove_entry(path: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::storage::{Kind, StoreOptions};

    const LIMITS: UploadLimits = UploadLimits {
        max_in_flight: 4,
        max_parts: 10_000,
        max_bytes: u64::MAX,
    };

    fn store_with_capacity(dir: &std::path::Path, capacity: u64) -> Store {
        Store::open(StoreOptions {
            capacity,
            low_watermark: capacity / 2,
            ..StoreOptions::for_tests(dir)
        })
        .unwrap()
    }

    fn store(dir: &std::path::Path) -> Store {
        store_with_capacity(dir, 1 << 30)
    }

    async fn staged(store: &Store, bytes: &[u8]) -> StagedBody {
        let mut writer = store.writer(u64::MAX, false);
        writer.write(bytes).await.unwrap();
        writer.finish(None).await.unwrap()
    }

    /// A file put in `uploads/` by hand (no upload's directory) is removed at start, as a
    /// directory without an upload is. (It stopped the node from starting: ENOTDIR.)
    #[tokio::test]
    async fn a_stray_file_among_the_uploads_does_not_stop_the_store_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        drop(store(dir.path()));
        let stray = dir.path().join("uploads").join("notes.txt");
        std::fs::write(&stray, b"left here by hand").unwrap();
        let reopened = store(dir.path());
        assert!(!stray.exists());
        drop(reopened);
    }

    #[tokio::test]
    async fn an_expiry_leaves_an_upload_that_a_completion_claimed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let key = ArtifactKey::new("p", Kind::Module, "m");
        let id = store.start_upload(&key, &LIMITS).unwrap();
        let part = staged(&store, b"part one").await;
        store.put_part(&id, 1, part, &LIMITS).await.unwrap();
        // The expiry listed the upload just before the completion claimed it.
        let (claim, _, _) = store.claim_completion(&id, &[1]).unwrap();
        assert!(!store.remove_upload(&id, Removal::Expired).unwrap());
        assert!(store.upload_dir(&id).join("1").exists(), "parts kept");
        drop(claim);
        let committed = store.complete_upload(&id, &[1], None, &LIMITS).await;
        assert!(committed.is_ok(), "{committed:?}");
    }

    /// In `process` durability part files are not synced: a power cut can leave one renamed
    /// into place with other bytes than those acknowledged (the part it replaced, or none).
    /// Completing refuses such a part instead of publishing what its file holds.
    #[tokio::test]
    async fn a_part_file_that_lost_its_bytes_is_never_assembled() {
        let dir = tempfile::tempdir().unwrap();
        let key = ArtifactKey::new("p", Kind::Module, "m");
        let part_file =
            |id: &str, number: u32| dir.path().join("uploads").join(id).join(number.to_string());
        let id = {
            let store = store(dir.path());
            let id = store.start_upload(&key, &LIMITS).unwrap();
            for (number, bytes) in [(1, b"first part"), (2, b"2nd part!!")] {
                let part = staged(&store, bytes).await;
                store.put_part(&id, number, part, &LIMITS).await.unwrap();
            }
            id
        };
        // The bytes of an earlier version of part 2, at the same length.
        std::fs::write(part_file(&id, 2), b"old part!!").unwrap();
        let reopened = store(dir.path());
        let refused = reopened.complete_upload(&id, &[1, 2], None, &LIMITS).await;
        assert!(
            matches!(refused, Err(StoreError::LostPart(2))),
            "{refused:?}"
        );
        assert!(reopened.head(&key).unwrap().is_none(), "nothing published");
        // Sent again, the part completes the upload with the bytes acknowledged.
        let part = staged(&reopened, b"2nd part!!").await;
        reopened.put_part(&id, 2, part, &LIMITS).await.unwrap();
        let committed = reopened.complete_upload(&id, &[1, 2], None, &LIMITS).await;
        assert_eq!(
            committed.unwrap().info.blake3,
            *blake3::hash(b"first part2nd part!!").as_bytes()
        );

        // A part left empty is dropped at start, uncounted: completing names it missing.
        let id = reopened.start_upload(&key, &LIMITS).unwrap();
        let part = staged(&reopened, b"another").await;
        reopened.put_part(&id, 1, part, &LIMITS).await.unwrap();
        drop(reopened);
        std::fs::write(part_file(&id, 1), b"").unwrap();
        let reopened = store(dir.path());
        assert_eq!(reopened.stats().staged_bytes, 0);
        let refused = reopened.complete_upload(&id, &[1], None, &LIMITS).await;
        assert!(
            matches!(refused, Err(StoreError::MissingPart(1))),
            "{refused:?}"
        );
        assert!(!part_file(&id, 1).exists());
    }

    /// A data dir written before parts had entries (or by such a release after a downgrade)
    /// keeps its uploads in flight: their parts are adopted at each start, by length.
    #[tokio::test]
    async fn parts_staged_before_part_entries_existed_are_adopted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let key = ArtifactKey::new("p", Kind::Module, "m");
        let id = {
            let store = store(dir.path());
            let id = store.start_upload(&key, &LIMITS).unwrap();
            let part = staged(&store, b"from before").await;
            store.put_part(&id, 1, part, &LIMITS).await.unwrap();
            // What an older release left: the record and the part file, no entry.
            let mut batch = WriteBatch::default();
            let (first, past) = meta::part_key_range(&id);
            batch.delete_range_cf(store.cf(meta::CF_UPLOADS), first, past);
            store.write(batch).unwrap();
            id
        };
        for _ in 0..2 {
            // Adopted at every start.
            let reopened = store(dir.path());
            assert_eq!(reopened.stats().staged_bytes, 11);
        }
        let reopened = store(dir.path());
        let committed = reopened.complete_upload(&id, &[1], None, &LIMITS).await;
        assert_eq!(
            committed.unwrap().info.blake3,
            *blake3::hash(b"from before").as_bytes()
        );
    }

    /// Staged parts are counted but cannot be evicted: a part that does not fit beside them is
    /// refused at once, not retried for ever (a write waited in a loop when nothing published
    /// was left above its eviction target).
    #[tokio::test]
    async fn a_part_that_cannot_fit_beside_staged_parts_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_capacity(dir.path(), 10_000);
        let key = ArtifactKey::new("p", Kind::Module, "m");
        let id = store.start_upload(&key, &LIMITS).unwrap();
        let first = staged(&store, &[1u8; 6000]).await;
        store.put_part(&id, 1, first, &LIMITS).await.unwrap();
        let second = staged(&store, &[2u8; 6000]).await;
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store.put_part(&id, 2, second, &LIMITS),
        )
        .await
        .expect("the part was answered");
        assert!(
            matches!(refused, Err(StoreError::InsufficientStorage)),
            "{refused:?}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Parts written in any order, some several times, assemble to the last version of each
        /// listed part in list order; a listed part never written fails without publishing.
        #[test]
        fn assembly_matches_a_model(
            writes in proptest::collection::vec((1u32..6, any::<u8>(), 0usize..3000), 1..16),
            listed in proptest::collection::hash_set(1u32..6, 1..6),
        ) {
            let listed: Vec<u32> = listed.into_iter().collect();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = store(dir.path());
                let target = ArtifactKey::new("p", Kind::Module, "builds/h/n");
                let id = store.start_upload(&target, &LIMITS).unwrap();
                let mut model: HashMap<u32, Vec<u8>> = HashMap::new();
                for (number, byte, len) in &writes {
                    let body = vec![*byte; *len];
                    store.put_part(&id, *number, staged(&store, &body).await, &LIMITS).await.unwrap();
                    model.insert(*number, body);
                }
                let result = store.complete_upload(&id, &listed, None, &LIMITS).await;
                match listed.iter().find(|n| !model.contains_key(n)) {
                    Some(missing) => {
                        assert!(matches!(result, Err(StoreError::MissingPart(n)) if n == *missing));
                        assert!(store.head(&target).unwrap().is_none(), "nothing published");
                        assert!(store.upload_target(&id).unwrap().is_some(), "the upload can still complete");
                    }
                    None => {
                        let expected: Vec<u8> = listed.iter().flat_map(|n| model[n].clone()).collect();
                        let committed = result.unwrap();
                        assert_eq!(committed.info.size, expected.len() as u64);
                        let artifact = store.read(&target).await.unwrap().unwrap();
                        assert_eq!(artifact.info.blake3, *blake3::hash(&expected).as_bytes());
                        assert!(store.upload_target(&id).unwrap().is_none(), "a completed upload is gone");
                        assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
                        assert_eq!(store.stats().staged_bytes, 0);
                    }
                }
            });
        }
    }

    /// One step of the interleaving model.
    #[derive(Clone, Debug)]
    enum Step {
        Start,
        Part {
            upload: usize,
            number: u32,
            len: usize,
        },
        Complete {
            upload: usize,
            parts: Vec<u32>,
        },
        /// Two completions of one upload at once.
        RacingCompletes {
            upload: usize,
            parts: Vec<u32>,
        },
        Expire,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => Just(Step::Start),
            5 => (0usize..6, 1u32..5, 0usize..40_000)
                .prop_map(|(upload, number, len)| Step::Part { upload, number, len }),
            2 => (0usize..6, proptest::collection::vec(1u32..5, 1..4))
                .prop_map(|(upload, parts)| Step::Complete { upload, parts }),
            1 => (0usize..6, proptest::collection::vec(1u32..5, 1..3))
                .prop_map(|(upload, parts)| Step::RacingCompletes { upload, parts }),
            1 => Just(Step::Expire),
        ]
    }

    /// Upload records, counted in RocksDB itself (part entries left out).
    fn records(store: &Store) -> usize {
        store
            .inner
            .db
            .iterator_cf(store.cf(meta::CF_UPLOADS), rocksdb::IteratorMode::Start)
            .filter(|item| meta::split_part_key(&item.as_ref().unwrap().0).is_none())
            .count()
    }

    /// Bytes of every part file on disk.
    fn bytes_on_disk(dir: &std::path::Path) -> u64 {
        let mut total = 0;
        for upload in std::fs::read_dir(dir.join("uploads")).unwrap() {
            for part in std::fs::read_dir(upload.unwrap().path()).unwrap() {
                total += part.unwrap().metadata().unwrap().len();
            }
        }
        total
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random interleavings of start, part, complete (alone and racing) and expiry on many
        /// uploads, against a small capacity: after every step the count of uploads in flight is
        /// the number of records, what the accounting stages is what the part files hold, and
        /// everything counted stays within capacity.
        #[test]
        fn upload_bookkeeping_never_drifts(steps in proptest::collection::vec(step(), 1..40)) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let capacity = 256 * 1024;
                let store = store_with_capacity(dir.path(), capacity);
                let limits = UploadLimits { max_in_flight: 5, max_parts: 4, max_bytes: 100_000 };
                let mut ids: Vec<String> = Vec::new();
                for (i, step) in steps.iter().enumerate() {
                    match step {
                        Step::Start => {
                            let target = ArtifactKey::new("p", Kind::Module, format!("builds/h{i}/n"));
                            match store.start_upload(&target, &limits) {
                                Ok(id) => ids.push(id),
                                Err(StoreError::TooManyUploads(5)) => assert_eq!(store.uploads_in_flight(), 5),
                                Err(other) => panic!("start: {other}"),
                            }
                        }
                        Step::Part { upload, number, len } => {
                            let Some(id) = ids.get(*upload) else { continue };
                            let body = staged(&store, &vec![*number as u8; *len]).await;
                            match store.put_part(id, *number, body, &limits).await {
                                Ok(()) | Err(StoreError::UploadNotFound)
                                | Err(StoreError::TooLarge { .. }) | Err(StoreError::InsufficientStorage) => {}
                                Err(other) => panic!("part: {other}"),
                            }
                        }
                        Step::Complete { upload, parts } => {
                            let Some(id) = ids.get(*upload) else { continue };
                            match store.complete_upload(id, parts, None, &limits).await {
                                Ok(_) | Err(StoreError::UploadNotFound) | Err(StoreError::MissingPart(_))
                                | Err(StoreError::DuplicatePart(_)) | Err(StoreError::InsufficientStorage) => {}
                                Err(other) => panic!("complete: {other}"),
                            }
                        }
                        Step::RacingCompletes { upload, parts } => {
                            let Some(id) = ids.get(*upload) else { continue };
                            let (a, b) = tokio::join!(
                                store.complete_upload(id, parts, None, &limits),
                                store.complete_upload(id, parts, None, &limits),
                            );
                            assert!(!(a.is_ok() && b.is_ok()), "two completions of one upload succeeded");
                        }
                        Step::Expire => {
                            store.expire_uploads(0).unwrap();
                        }
                    }
                    assert_eq!(store.uploads_in_flight(), records(&store), "after {step:?}");
                    let stats = store.stats();
                    assert_eq!(stats.staged_bytes, bytes_on_disk(dir.path()), "after {step:?}");
                    assert!(stats.used_bytes <= capacity, "after {step:?}: {stats:?}");
                }
            });
        }
    }

    #[tokio::test]
    async fn in_flight_uploads_are_bounded_and_counted_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let target = ArtifactKey::new("p", Kind::Module, "builds/h/n");
        let limits = UploadLimits {
            max_in_flight: 2,
            ..LIMITS
        };
        {
            let store = store(dir.path());
            let id = store.start_upload(&target, &limits).unwrap();
            store
                .put_part(&id, 1, staged(&store, b"abc").await, &limits)
                .await
                .unwrap();
            store.start_upload(&target, &limits).unwrap();
            assert!(matches!(
                store.start_upload(&target, &limits),
                Err(StoreError::TooManyUploads(2))
            ));
        }
        let store = store(dir.path());
        assert!(
            matches!(
                store.start_upload(&target, &limits),
                Err(StoreError::TooManyUploads(2))
            ),
            "the count survives a restart"
        );
        assert_eq!(store.stats().staged_bytes, 3, "staged bytes survive too");
        assert_eq!(store.expire_uploads(0).unwrap(), 2);
        assert_eq!(store.stats().staged_bytes, 0);
        store.start_upload(&target, &limits).unwrap();
    }

    #[tokio::test]
    async fn part_numbers_are_bounded_and_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let target = ArtifactKey::new("p", Kind::Module, "builds/h/n");
        let limits = UploadLimits {
            max_parts: 3,
            max_bytes: 10,
            ..LIMITS
        };
        let id = store.start_upload(&target, &limits).unwrap();
        let part = staged(&store, b"x").await;
        assert!(matches!(
            store.put_part(&id, 4, part, &limits).await,
            Err(StoreError::BadPartNumber(3))
        ));
        store
            .put_part(&id, 1, staged(&store, b"123456").await, &limits)
            .await
            .unwrap();
        assert!(matches!(
            store
                .put_part(&id, 2, staged(&store, b"12345").await, &limits)
                .await,
            Err(StoreError::TooLarge { limit: 10 })
        ));
        assert!(matches!(
            store.complete_upload(&id, &[1, 1], None, &limits).await,
            Err(StoreError::DuplicatePart(1))
        ));
        store
            .complete_upload(&id, &[1], None, &limits)
            .await
            .unwrap();
    }
}
