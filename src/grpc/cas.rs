//! `ContentAddressableStorage`: which blobs are missing, blobs in batches, and directory trees
//! (walked in `tree.rs`).

use std::sync::Arc;

use futures_util::{StreamExt, stream};
use tonic::{Request, Response, Status};

use super::access::admit;
use super::blobs::{lease_memory, read_blob, store_blob};
use super::compress;
use super::digest::{BlobDigest, HashFunction};
use super::proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use super::proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Digest, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetTreeRequest, GetTreeResponse, batch_read_blobs_response, batch_update_blobs_response,
    compressor,
};
use super::proto::rpc;
use super::status::of_store_error;
use super::tree::{self, TreeStream, TreeWalk};
use crate::auth::Action;
use crate::context::NodeContext;
use crate::storage::KeyBatch;

/// Blobs of one batch call stored or read at once.
const BATCH_CONCURRENCY: usize = 16;
/// Directories per GetTree page when the client leaves `page_size` at 0.
const DEFAULT_TREE_PAGE: usize = 1000;
/// The most directories one GetTree page holds, whatever the client asks. A page also stops
/// before it outgrows one message (see `tree.rs`).
const MAX_TREE_PAGE: usize = 10_000;
/// Room kept for a message's own framing when its contents approach the message limit.
const FRAMING_ROOM: usize = 16 * 1024;

pub(crate) struct Cas {
    pub node: Arc<NodeContext>,
}

#[tonic::async_trait]
impl ContentAddressableStorage for Cas {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let (project, request) = admit(&self.node, request, Action::Read).await?;
        let function = HashFunction::from_field(request.digest_function)?;
        // Checked in place and looked up as one batch of encoded keys: a request of 10,000
        // digests makes a few allocations, not tens of thousands.
        let mut keys = KeyBatch::with_capacity(request.blob_digests.len());
        let mut asked = Vec::with_capacity(request.blob_digests.len());
        for (index, digest) in request.blob_digests.iter().enumerate() {
            let size = BlobDigest::check(function, &digest.hash, digest.size_bytes)
                .map_err(|fault| Status::invalid_argument(format!("digest: {fault}")))?;
            // The empty blob is always present and never looked up.
            if size != 0 {
                keys.push(&project, function.cas_kind(), &digest.hash);
                asked.push((index, size));
            }
        }
        let sizes = self
            .node
            .store
            .stored_sizes(keys)
            .await
            .map_err(of_store_error)?;
        let mut missing = vec![false; request.blob_digests.len()];
        for ((index, size), stored) in asked.into_iter().zip(sizes) {
            missing[index] = stored != Some(size);
        }
        let missing = request
            .blob_digests
            .into_iter()
            .zip(missing)
            .filter_map(|(digest, missing)| missing.then_some(digest))
            .collect();
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let (project, request) = admit(&self.node, request, Action::Write).await?;
        let function = HashFunction::from_field(request.digest_function)?;
        // Both what arrived and what it expands to must fit: a small zstd item may claim a
        // large size.
        let total = saturating_total(request.requests.iter().map(|item| {
            let claimed = item
                .digest
                .as_ref()
                .map_or(0, |d| d.size_bytes.max(0) as u64);
            claimed.max(item.data.len() as u64)
        }));
        self.check_batch_total(total)?;
        let _lease = lease_memory(&self.node, total).await?;
        let node = &self.node;
        let project = &project;
        let responses = stream::iter(request.requests)
            .map(|item| async move {
                let digest = item.digest.clone();
                let status = match update_one(node, project, function, item).await {
                    Ok(()) => ok_status(),
                    Err(status) => to_rpc_status(&status),
                };
                batch_update_blobs_response::Response {
                    digest,
                    status: Some(status),
                }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let (project, request) = admit(&self.node, request, Action::Read).await?;
        let function = HashFunction::from_field(request.digest_function)?;
        let digests = parse_all(function, &request.digests)?;
        let total = saturating_total(digests.iter().map(|d| d.size));
        self.check_batch_total(total)?;
        let _lease = lease_memory(&self.node, total).await?;
        let zstd = request
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        let max = self.node.config.grpc.max_batch_total_size.0;
        let node = &self.node;
        let project = &project;
        let responses = stream::iter(digests)
            .map(|digest| async move {
                let (data, compressor, status) = match read_blob(node, project, &digest, max).await
                {
                    Ok(Some(data)) => {
                        let (data, compressor) = maybe_compress(data, zstd);
                        (data, compressor, ok_status())
                    }
                    Ok(None) => (
                        bytes::Bytes::new(),
                        compressor::Value::Identity,
                        to_rpc_status(&Status::not_found("blob not found")),
                    ),
                    Err(status) => (
                        bytes::Bytes::new(),
                        compressor::Value::Identity,
                        to_rpc_status(&status),
                    ),
                };
                batch_read_blobs_response::Response {
                    digest: Some(digest.to_proto()),
                    data,
                    compressor: compressor as i32,
                    status: Some(status),
                }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<TreeStream>, Status> {
        let (project, request) = admit(&self.node, request, Action::Read).await?;
        let function = HashFunction::from_field(request.digest_function)?;
        let root = BlobDigest::from_proto(function, request.root_digest.as_ref(), "root_digest")?;
        let start = match request.page_token.as_str() {
            "" => 0,
            token => token
                .parse::<usize>()
                .map_err(|_| Status::invalid_argument("page_token was not issued by this node"))?,
        };
        let page_size = match usize::try_from(request.page_size) {
            Ok(0) => DEFAULT_TREE_PAGE,
            Ok(size) => size.min(MAX_TREE_PAGE),
            Err(_) => return Err(Status::invalid_argument("page_size is negative")),
        };
        let limit = self.node.config.grpc.max_message_size.0 as usize - FRAMING_ROOM;
        // A page is built in memory before it is sent: at most one message of directories,
        // plus the one read that did not fit.
        let lease = lease_memory(&self.node, 2 * limit as u64).await?;
        let mut walk = TreeWalk::new(self.node.clone(), project, root, page_size, limit);
        walk.skip(start).await?;
        let first = match walk.next_page().await? {
            Some(page) => page,
            None if start == 0 => {
                return Err(Status::not_found("the root directory is not stored"));
            }
            // A token past the end: nothing left.
            None => GetTreeResponse::default(),
        };
        Ok(Response::new(tree::pages(first, walk, lease)))
    }
}

impl Cas {
    fn check_batch_total(&self, total: u64) -> Result<(), Status> {
        let max = self.node.config.grpc.max_batch_total_size.0;
        if total > max {
            return Err(Status::invalid_argument(format!(
                "the batch holds {total} bytes of blobs, over max_batch_total_size_bytes ({max}); use ByteStream for large blobs"
            )));
        }
        Ok(())
    }
}

/// The sum of a batch's claimed sizes, stopping at `u64::MAX`: the sizes are the client's,
/// and a sum that wrapped would let huge items through the limit (one of them then sized a
/// decompression buffer, and the allocation aborted the process).
fn saturating_total(sizes: impl Iterator<Item = u64>) -> u64 {
    sizes.fold(0, u64::saturating_add)
}

/// Stores one item of a BatchUpdateBlobs call.
async fn update_one(
    node: &NodeContext,
    project: &str,
    function: HashFunction,
    item: super::proto::reapi::batch_update_blobs_request::Request,
) -> Result<(), Status> {
    let digest = BlobDigest::from_proto(function, item.digest.as_ref(), "digest")?;
    let data = match compressor::Value::try_from(item.compressor) {
        Ok(compressor::Value::Identity) => item.data.to_vec(),
        Ok(compressor::Value::Zstd) => compress::decompress_exact(&item.data, digest.size)
            .map_err(|e| Status::invalid_argument(format!("bad zstd data: {e}")))?,
        _ => {
            return Err(Status::invalid_argument(format!(
                "compressor {} is not supported; use IDENTITY or ZSTD",
                item.compressor
            )));
        }
    };
    store_blob(node, project, &digest, &data).await
}

/// The parsed digests of a request; one malformed digest refuses the whole call.
fn parse_all(function: HashFunction, digests: &[Digest]) -> Result<Vec<BlobDigest>, Status> {
    digests
        .iter()
        .map(|digest| BlobDigest::from_proto(function, Some(digest), "digest"))
        .collect()
}

/// zstd when the client accepts it and it makes the blob smaller.
fn maybe_compress(data: bytes::Bytes, zstd: bool) -> (bytes::Bytes, compressor::Value) {
    if zstd
        && !data.is_empty()
        && let Ok(compressed) = compress::compress(&data)
        && compressed.len() < data.len()
    {
        return (compressed.into(), compressor::Value::Zstd);
    }
    (data, compressor::Value::Identity)
}

fn ok_status() -> rpc::Status {
    rpc::Status {
        code: tonic::Code::Ok as i32,
        message: String::new(),
        details: Vec::new(),
    }
}

/// A call status as a batch item's status.
pub(crate) fn to_rpc_status(status: &Status) -> rpc::Status {
    rpc::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: Vec::new(),
    }
}
