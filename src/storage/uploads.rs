//! Module multipart uploads: parts received in any order, assembled into one artifact.
//!
//! An upload is a record in the `uploads` column family (what it will become, when it started)
//! and a directory `uploads/<id>/` holding one file per part. Parts are staged in `tmp/` and
//! renamed into place, so re-sending a part replaces it atomically. Completing streams the listed
//! parts, in order, through a normal [`BodyWriter`], so the assembled artifact is hashed and
//! published exactly like any other upload.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use tokio::io::AsyncReadExt;

use super::meta::{self, EncodedKey, UploadRecord};
use super::{
    ArtifactKey, Committed, NewArtifact, StagedBody, Store, StoreError, WriteMode, bodies, now_ms,
};

impl Store {
    /// Registers a new upload that will become `target`; returns its id.
    pub fn start_upload(
        &self,
        target: &ArtifactKey,
        max_in_flight: usize,
    ) -> Result<String, StoreError> {
        let counter = &self.inner.uploads_in_flight;
        if counter.fetch_add(1, Ordering::SeqCst) >= max_in_flight {
            counter.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::TooManyUploads(max_in_flight));
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let created = std::fs::create_dir(self.upload_dir(&id))
            .map_err(StoreError::from_write)
            .and_then(|()| {
                let record = UploadRecord {
                    target: EncodedKey(target.encode()),
                    created_ms: now_ms(),
                };
                self.inner
                    .db
                    .put_cf(self.cf(meta::CF_UPLOADS), &id, meta::encode(&record))?;
                Ok(())
            });
        if let Err(error) = created {
            counter.fetch_sub(1, Ordering::SeqCst);
            return Err(error);
        }
        Ok(id)
    }

    /// The artifact an upload will become, or `None` for an unknown (or expired) upload.
    pub fn upload_target(&self, id: &str) -> Result<Option<ArtifactKey>, StoreError> {
        Ok(self
            .upload_record(id)?
            .and_then(|record| record.target.decode()))
    }

    fn upload_record(&self, id: &str) -> Result<Option<UploadRecord>, StoreError> {
        let value = self.inner.db.get_pinned_cf(self.cf(meta::CF_UPLOADS), id)?;
        Ok(value.and_then(|bytes| meta::decode(&bytes)))
    }

    /// Stores (or replaces) part `number` of an upload.
    pub async fn put_part(
        &self,
        id: &str,
        number: u32,
        part: StagedBody,
    ) -> Result<(), StoreError> {
        if self.upload_record(id)?.is_none() {
            return Err(StoreError::UploadNotFound);
        }
        let dest = self.upload_dir(id).join(number.to_string());
        tokio::task::spawn_blocking(move || match part.content {
            bodies::StagedContent::Inline(bytes) => write_atomically(&dest, &bytes),
            bodies::StagedContent::File { temp, .. } => std::fs::rename(temp.path(), &dest),
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?
        .map_err(|e| match e.kind() {
            // The upload completed or expired while this part was arriving.
            io::ErrorKind::NotFound => StoreError::UploadNotFound,
            _ => StoreError::from_write(e),
        })
    }

    /// Assembles `parts` in the order given and publishes the result. Nothing is published
    /// unless every part is present and the checksum (when given) matches.
    pub async fn complete_upload(
        &self,
        id: &str,
        parts: &[u32],
        expected_sha256: Option<[u8; 32]>,
        limit: u64,
    ) -> Result<Committed, StoreError> {
        let record = self.upload_record(id)?.ok_or(StoreError::UploadNotFound)?;
        let target = record.target.decode().ok_or(StoreError::UploadNotFound)?;
        let dir = self.upload_dir(id);
        for &number in parts {
            if !tokio::fs::try_exists(dir.join(number.to_string())).await? {
                return Err(StoreError::MissingPart(number));
            }
        }
        let mut writer = self.writer(limit, expected_sha256.is_some());
        let mut buffer = vec![0u8; bodies::READ_CHUNK];
        for &number in parts {
            let mut file = tokio::fs::File::open(dir.join(number.to_string()))
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => StoreError::MissingPart(number),
                    _ => StoreError::Io(e),
                })?;
            loop {
                let n = file.read(&mut buffer).await?;
                if n == 0 {
                    break;
                }
                writer.write(&buffer[..n]).await?;
            }
        }
        let staged = writer.finish(expected_sha256).await?;
        let committed = self
            .commit(
                &target,
                staged,
                NewArtifact::default(),
                WriteMode::Overwrite,
            )
            .await?;
        self.remove_upload(id)?;
        Ok(committed)
    }

    /// Deletes uploads started more than `max_age_ms` ago, with their parts.
    pub fn expire_uploads(&self, max_age_ms: u64) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(max_age_ms);
        let mut expired = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(meta::CF_UPLOADS), rocksdb::IteratorMode::Start)
        {
            let (id, value) = item?;
            let stale = meta::decode::<UploadRecord>(&value).is_none_or(|r| r.created_ms < cutoff);
            if stale {
                expired.push(String::from_utf8_lossy(&id).into_owned());
            }
        }
        for id in &expired {
            self.remove_upload(id)?;
        }
        Ok(expired.len())
    }

    fn remove_upload(&self, id: &str) -> Result<(), StoreError> {
        if self.upload_record(id)?.is_some() {
            self.inner.db.delete_cf(self.cf(meta::CF_UPLOADS), id)?;
            self.inner.uploads_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        match std::fs::remove_dir_all(self.upload_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Counts uploads in flight after a restart and removes part directories without a record.
    pub(super) fn recover_uploads(&self) -> Result<(), StoreError> {
        let mut known = std::collections::HashSet::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(meta::CF_UPLOADS), rocksdb::IteratorMode::Start)
        {
            let (id, _) = item?;
            known.insert(String::from_utf8_lossy(&id).into_owned());
        }
        for entry in std::fs::read_dir(&self.inner.uploads_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        self.inner
            .uploads_in_flight
            .store(known.len(), Ordering::SeqCst);
        Ok(())
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.inner.uploads_dir.join(id)
    }
}

/// Writes a small part through a temp file so a reader never sees half of it.
fn write_atomically(dest: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    let temp = dest.with_extension("partial");
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, dest)
}
