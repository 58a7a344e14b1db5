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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::storage::{Durability, Kind, StoreOptions};

    fn store(dir: &std::path::Path) -> Store {
        Store::open(StoreOptions {
            data_dir: dir.to_path_buf(),
            durability: Durability::Process,
            capacity: 1 << 30,
            low_watermark: 1 << 29,
            inline_max: 1024,
            node_id: Some("test".into()),
        })
        .unwrap()
    }

    async fn staged(store: &Store, bytes: &[u8]) -> StagedBody {
        let mut writer = store.writer(u64::MAX, false);
        writer.write(bytes).await.unwrap();
        writer.finish(None).await.unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Parts written in any order, some several times, assemble to the last version of each
        /// listed part in list order; a listed part never written fails without publishing.
        #[test]
        fn assembly_matches_a_model(
            writes in proptest::collection::vec((1u32..6, any::<u8>(), 0usize..3000), 1..16),
            listed in proptest::collection::vec(1u32..6, 1..6),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = store(dir.path());
                let target = ArtifactKey::new("p", Kind::Module, "builds/h/n");
                let id = store.start_upload(&target, 4).unwrap();
                let mut model: HashMap<u32, Vec<u8>> = HashMap::new();
                for (number, byte, len) in &writes {
                    let body = vec![*byte; *len];
                    store.put_part(&id, *number, staged(&store, &body).await).await.unwrap();
                    model.insert(*number, body);
                }
                let result = store.complete_upload(&id, &listed, None, u64::MAX).await;
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
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn in_flight_uploads_are_bounded_and_counted_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let target = ArtifactKey::new("p", Kind::Module, "builds/h/n");
        {
            let store = store(dir.path());
            store.start_upload(&target, 2).unwrap();
            store.start_upload(&target, 2).unwrap();
            assert!(matches!(
                store.start_upload(&target, 2),
                Err(StoreError::TooManyUploads(2))
            ));
        }
        let store = store(dir.path());
        assert!(
            matches!(
                store.start_upload(&target, 2),
                Err(StoreError::TooManyUploads(2))
            ),
            "the count survives a restart"
        );
        assert_eq!(store.expire_uploads(0).unwrap(), 2);
        store.start_upload(&target, 2).unwrap();
    }
}
