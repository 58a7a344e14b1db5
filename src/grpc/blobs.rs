//! Whole-blob reads and writes for the calls whose blobs travel inside one message (the batch
//! calls, action results, trees). Streams go through `bytestream.rs` instead. Both sides use
//! the one store and its rules: bytes verified on the way in against the digest, and on the way
//! out by the store (a corrupt blob is dropped and reads as missing).

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tonic::Status;

use super::digest::{BlobDigest, HashFunction};
use super::status::of_store_error;
use crate::context::NodeContext;
use crate::memory::MemoryLease;
use crate::storage::{ArtifactKey, BodyStream};

/// Leases room for `bytes` from the node's body memory budget, or RESOURCE_EXHAUSTED once it
/// stayed spent for `limits.body_memory_wait` (HTTP answers 429 in the same place).
pub(crate) async fn lease_memory(node: &NodeContext, bytes: u64) -> Result<MemoryLease, Status> {
    node.body_memory.lease(bytes).await.ok_or_else(|| {
        Status::resource_exhausted(
            "the node holds as many transfers in memory as it may; retry shortly",
        )
    })
}

/// Reads the artifact under `key` whole, verified. `None` when it is missing, not `size` bytes
/// long (when a size is expected), or failed verification.
pub(crate) async fn read_whole(
    node: &NodeContext,
    key: &ArtifactKey,
    size: Option<u64>,
    max: u64,
) -> Result<Option<Bytes>, Status> {
    let Some(artifact) = node.store.read(key).await.map_err(of_store_error)? else {
        return Ok(None);
    };
    let stored = artifact.info.size;
    if size.is_some_and(|size| size != stored) || stored > max {
        return Ok(None);
    }
    match artifact.into_body(0, stored) {
        BodyStream::Bytes(bytes) => Ok(Some(bytes)),
        BodyStream::Stream(mut stream) => {
            let mut whole = BytesMut::with_capacity(stored as usize);
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => whole.extend_from_slice(&chunk),
                    // The store dropped the corrupt blob and counted it: it is missing now.
                    Err(_) => return Ok(None),
                }
            }
            Ok(Some(whole.freeze()))
        }
    }
}

/// Reads the blob `digest` names in `project` (the empty blob is always there).
pub(crate) async fn read_blob(
    node: &NodeContext,
    project: &str,
    digest: &BlobDigest,
    max: u64,
) -> Result<Option<Bytes>, Status> {
    if digest.is_empty_blob() {
        return Ok(Some(Bytes::new()));
    }
    read_whole(node, &digest.cas_key(project), Some(digest.size), max).await
}

/// Stores `data` as the blob `digest` names in `project`, after checking that it is exactly
/// those bytes; on a mismatch nothing is stored and the error says what the bytes hash to.
pub(crate) async fn store_blob(
    node: &NodeContext,
    project: &str,
    digest: &BlobDigest,
    data: &[u8],
) -> Result<(), Status> {
    if data.len() as u64 != digest.size {
        return Err(Status::invalid_argument(format!(
            "the blob has {} bytes, its digest says {}; nothing was stored",
            data.len(),
            digest.size
        )));
    }
    if digest.is_empty_blob() {
        return Ok(());
    }
    let want_sha256 = digest.function == HashFunction::Sha256;
    let mut writer = node.store.writer(digest.size, want_sha256);
    writer.write(data).await.map_err(of_store_error)?;
    let staged = writer.finish(None).await.map_err(of_store_error)?;
    if !digest.matches(&staged) {
        return Err(mismatch(digest, data));
    }
    node.store
        .commit_local(&digest.cas_key(project), staged)
        .await
        .map_err(of_store_error)?;
    Ok(())
}

/// Stores an action-cache value (an encoded `ActionResult`) under `key`.
pub(crate) async fn store_value(
    node: &NodeContext,
    key: &ArtifactKey,
    value: &[u8],
) -> Result<(), Status> {
    let mut writer = node.store.writer(value.len() as u64, false);
    writer.write(value).await.map_err(of_store_error)?;
    let staged = writer.finish(None).await.map_err(of_store_error)?;
    node.store
        .commit_local(key, staged)
        .await
        .map_err(of_store_error)?;
    Ok(())
}

fn mismatch(digest: &BlobDigest, data: &[u8]) -> Status {
    Status::invalid_argument(format!(
        "digest mismatch: the bytes hash to {} but the digest says {}; nothing was stored",
        digest.function.hash_hex(data),
        digest.hash
    ))
}
