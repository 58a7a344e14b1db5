//! `ByteStream`: blobs of any size, streamed in chunks, with resumable uploads.
//!
//! Reads stream the store's verified body (a mismatch aborts the stream with `DATA_LOSS`, so a
//! client never gets wrong bytes with an OK status), as zstd on `compressed-blobs/zstd` names.
//!
//! Writes of plain blobs go through the store's resumable uploads, keyed by the resource name
//! (without its ignored metadata segments): every chunk is appended to the upload's file as it
//! arrives, so an interrupted stream, or a node restarted under it, resumes at the offset
//! `QueryWriteStatus` reports. The blob is published only once `finish_write` came, the size
//! matches and the digest of the whole body checked out. Two kinds of upload are received in
//! one go into a plain staged body instead, and are not resumable (their status is unknown
//! once interrupted, and the client starts again at 0): zstd uploads, decoded as they arrive,
//! and blobs small enough to live inside their record (`storage.inline_max`), for which a
//! staging file would cost more than sending them again.
//!
//! The node also remembers the names of uploads it has begun and not published (a bounded set,
//! [`BegunUploads`]), so that `QueryWriteStatus` answers one that kept nothing (received in one
//! go, or refused before its staging file existed, say for overload) with 0 bytes committed
//! rather than NOT_FOUND: Bazel's uploader queries before a retry, and in its newer form fails
//! the attempt on any query error but UNIMPLEMENTED (NOT_FOUND is not one it retries).

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use tonic::{Request, Response, Status, Streaming};

use super::access::{CallInfo, authorize};
use super::blobs::lease_memory;
use super::compress::{StreamDecoder, StreamEncoder};
use super::digest::HashFunction;
use super::proto::bytestream::byte_stream_server::ByteStream;
use super::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use super::resource::{BlobName, UploadName, parse_read, parse_write};
use super::status::of_store_error;
use crate::auth::Action;
use crate::context::NodeContext;
use crate::storage::{BodyStream, ResumableUpload, StoreError};

/// Largest data chunk of a `ReadResponse`.
const READ_CHUNK: usize = 1024 * 1024;
/// What one stream holds in memory at most: a chunk in hand and one on the way.
const STREAM_FOOTPRINT: u64 = 2 * READ_CHUNK as u64;

#[derive(Clone)]
pub(crate) struct ByteStreamService {
    pub node: Arc<NodeContext>,
    pub begun: BegunUploads,
}

/// How many names of begun, unpublished uploads the node remembers (about 200 bytes each); past
/// that, the least recently begun are forgotten, and a forgotten one is unknown again.
const BEGUN_REMEMBERED: usize = 4096;

/// The staging names of uploads whose first message was authorized and that have not been
/// published: one of them with no staging file is an upload that kept nothing, which
/// `QueryWriteStatus` answers with 0 bytes committed. In memory only: after a restart such an
/// upload is unknown (NOT_FOUND, as `grpc-api.md` says of unknown uploads). First in, first
/// forgotten: a cache policy that favours what is looked up often would keep abandoned names
/// and forget the one being written.
#[derive(Clone, Default)]
pub(crate) struct BegunUploads(Arc<std::sync::Mutex<BegunNames>>);

#[derive(Default)]
struct BegunNames {
    /// Each name with the turn it was last begun at.
    names: std::collections::HashMap<String, u64>,
    /// Names in the order they were begun; a name begun again is in it twice, and only its
    /// latest turn forgets it.
    order: std::collections::VecDeque<(u64, String)>,
    turn: u64,
}

impl BegunUploads {
    fn names(&self) -> std::sync::MutexGuard<'_, BegunNames> {
        // Every change is complete before the lock is released: a poisoned one is consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begun(&self, staging_name: String) {
        let mut begun = self.names();
        begun.turn += 1;
        let turn = begun.turn;
        begun.names.insert(staging_name.clone(), turn);
        begun.order.push_back((turn, staging_name));
        while begun.order.len() > BEGUN_REMEMBERED {
            let Some((turn, name)) = begun.order.pop_front() else {
                break;
            };
            if begun.names.get(&name) == Some(&turn) {
                begun.names.remove(&name);
            }
        }
    }

    fn published(&self, staging_name: &str) {
        self.names().names.remove(staging_name);
    }

    fn knows(&self, staging_name: &str) -> bool {
        self.names().names.contains_key(staging_name)
    }
}

pub(super) type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let name = parse_read(&request.get_ref().resource_name)?;
        authorize(
            &self.node,
            &CallInfo::of(&request),
            &name.project,
            Action::Read,
        )
        .await?;
        let ReadRequest {
            read_offset,
            read_limit,
            ..
        } = request.into_inner();
        let offset = u64::try_from(read_offset)
            .map_err(|_| Status::out_of_range(format!("read_offset {read_offset} is negative")))?;
        let limit = u64::try_from(read_limit)
            .map_err(|_| Status::out_of_range(format!("read_limit {read_limit} is negative")))?;
        let body = self.open(&name).await?;
        if offset > name.digest.size {
            return Err(past_the_end(offset, name.digest.size));
        }
        let lease = lease_memory(&self.node, name.digest.size.min(STREAM_FOOTPRINT)).await?;
        let chunks = match name.compressed {
            false => {
                let end = match limit {
                    0 => name.digest.size,
                    limit => name.digest.size.min(offset.saturating_add(limit)),
                };
                body.range(offset, end)
            }
            // REAPI: a compressed read's offset counts uncompressed bytes (a client resuming a
            // download gets a fresh frame of the rest), and a limit cannot be honoured on
            // compressed bytes, so a non-zero one is refused.
            true if limit != 0 => {
                return Err(Status::invalid_argument(format!(
                    "read_limit {limit} on a compressed read: REAPI requires 0"
                )));
            }
            true => compressed(body.range(offset, name.digest.size)),
        };
        let responses = chunks.map(move |chunk| {
            let _held = &lease;
            chunk.map(|data| ReadResponse { data })
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let call = CallInfo::of(&request);
        let (metadata, extensions) = (call.metadata.clone(), call.extensions.clone());
        let mut messages = request.into_inner();
        let first = messages
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the write stream carried no message"))?;
        let name = parse_write(&first.resource_name)?;
        let call = CallInfo {
            metadata: &metadata,
            extensions: &extensions,
        };
        authorize(&self.node, &call, &name.blob.project, Action::Write).await?;
        let limit = self.node.config.limits.blob.0;
        if name.blob.digest.size > limit {
            return Err(Status::invalid_argument(format!(
                "the blob is {} bytes, over the node's limit of {limit} (limits.blob)",
                name.blob.digest.size
            )));
        }
        let staging_name = name.staging_name();
        if self.stored(&name.blob)? {
            // Already stored: end the upload early, as REAPI allows.
            self.begun.published(&staging_name);
            let committed_size = match name.blob.compressed {
                false => name.blob.digest.size as i64,
                true => -1,
            };
            return Ok(Response::new(WriteResponse { committed_size }));
        }
        self.begun.begun(staging_name.clone());
        let mut footprint = name.blob.digest.size.min(STREAM_FOOTPRINT);
        if name.blob.compressed {
            footprint += super::compress::DECODER_FOOTPRINT;
        }
        let _lease = lease_memory(&self.node, footprint).await?;
        let resource_name = first.resource_name.clone();
        let upload = Upload {
            node: &self.node,
            resource_name: &resource_name,
            name: &name,
        };
        // A blob small enough to live inside its record is received in memory: a staging file
        // would cost more than sending it again after an interruption.
        let small = name.blob.digest.size <= self.node.config.storage.inline_max.0;
        let committed_size = if name.blob.compressed {
            let decoder = StreamDecoder::new(name.blob.digest.size)
                .map_err(|e| Status::internal(format!("zstd: {e}")))?;
            upload.in_one_go(first, messages, Some(decoder)).await?
        } else if small && first.write_offset == 0 {
            upload.in_one_go(first, messages, None).await?
        } else {
            upload.plain(first, messages).await?
        };
        self.begun.published(&staging_name);
        Ok(Response::new(WriteResponse { committed_size }))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let name = parse_write(&request.get_ref().resource_name)?;
        authorize(
            &self.node,
            &CallInfo::of(&request),
            &name.blob.project,
            Action::Write,
        )
        .await?;
        if self.stored(&name.blob)? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: name.blob.digest.size as i64,
                complete: true,
            }));
        }
        let store = self.node.store.clone();
        let staging_name = name.staging_name();
        let lookup = staging_name.clone();
        let offset = tokio::task::spawn_blocking(move || store.resumable_offset(&lookup))
            .await
            .map_err(|e| Status::internal(format!("status lookup failed: {e}")))?
            .map_err(of_store_error)?;
        if offset == Some(name.blob.digest.size) && !name.blob.compressed {
            return self.publish_complete(&name, &staging_name).await;
        }
        let committed_size = match offset {
            Some(offset) if !name.blob.compressed => Some(offset as i64),
            // Begun, not published, and nothing of it kept: it starts over at 0.
            _ if self.begun.knows(&staging_name) => Some(0),
            _ => None,
        };
        match committed_size {
            Some(committed_size) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size,
                complete: false,
            })),
            None => Err(Status::not_found(
                "no upload in progress under this resource name; start at offset 0",
            )),
        }
    }
}

impl ByteStreamService {
    /// Whether the blob is stored (the empty blob always is); a hit refreshes its access time.
    /// One point read of the record, inline like HTTP's HEAD: no body is touched.
    fn stored(&self, blob: &BlobName) -> Result<bool, Status> {
        if blob.digest.is_empty_blob() {
            return Ok(true);
        }
        let info = self
            .node
            .store
            .head(&blob.digest.cas_key(&blob.project))
            .map_err(of_store_error)?;
        Ok(info.is_some_and(|info| info.size == blob.digest.size))
    }

    /// An upload that holds every byte of its blob but was never published: its stream ended
    /// before `finish_write`, or the node stopped first. A client resuming at the blob's size
    /// has nothing left to send (Bazel's uploader either takes the size for success or fails
    /// to seek past the end), so the query publishes it, verified: complete; or, when the bytes
    /// are wrong, discarded and to be sent again from 0.
    async fn publish_complete(
        &self,
        name: &UploadName,
        staging_name: &str,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let digest = &name.blob.digest;
        let upload = self
            .node
            .store
            .resume_upload(
                staging_name,
                digest.size,
                digest.function == HashFunction::Sha256,
            )
            .await
            .map_err(of_store_error)?;
        let (committed_size, complete) = if upload.committed() != digest.size {
            // A Write published it, or started it over, between the look at its file and this
            // claim: answer from what is there now, and leave the file as it is.
            let committed = upload.committed() as i64;
            drop(upload);
            match self.stored(&name.blob)? {
                true => (digest.size as i64, true),
                false => (committed, false),
            }
        } else {
            match publish_resumable(&self.node, name, upload).await {
                Ok(()) => {
                    self.begun.published(staging_name);
                    (digest.size as i64, true)
                }
                Err(status) if status.code() == tonic::Code::InvalidArgument => (0, false),
                Err(status) => return Err(status),
            }
        };
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size,
            complete,
        }))
    }

    /// Opens the blob for reading, or NOT_FOUND.
    async fn open(&self, name: &BlobName) -> Result<Body, Status> {
        if name.digest.is_empty_blob() {
            return Ok(Body::Empty);
        }
        let key = name.digest.cas_key(&name.project);
        match self.node.store.read(&key).await.map_err(of_store_error)? {
            Some(artifact) if artifact.info.size == name.digest.size => Ok(Body::Stored(artifact)),
            _ => Err(Status::not_found("blob not found")),
        }
    }
}

type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// A blob opened for reading.
enum Body {
    Empty,
    Stored(crate::storage::Artifact),
}

impl Body {
    /// The bytes in `[start, end)` as chunks of at most [`READ_CHUNK`].
    fn range(self, start: u64, end: u64) -> Chunks {
        match self {
            Body::Empty => Box::pin(stream::empty()),
            Body::Stored(artifact) => match artifact.into_body(start, end) {
                BodyStream::Bytes(bytes) => {
                    let chunks: Vec<Result<Bytes, Status>> = (0..bytes.len())
                        .step_by(READ_CHUNK)
                        .map(|at| Ok(bytes.slice(at..(at + READ_CHUNK).min(bytes.len()))))
                        .collect();
                    Box::pin(stream::iter(chunks))
                }
                BodyStream::Stream(chunks) => Box::pin(chunks.map(|chunk| {
                    chunk.map_err(|_| {
                        Status::data_loss(
                            "the stored blob failed verification and was dropped; upload it again",
                        )
                    })
                })),
            },
        }
    }
}

/// The chunks zstd-compressed, as one frame.
fn compressed(chunks: Chunks) -> Chunks {
    let encoder = match StreamEncoder::new() {
        Ok(encoder) => encoder,
        Err(e) => {
            return Box::pin(stream::once(
                async move { Err(Status::internal(e.to_string())) },
            ));
        }
    };
    let state = (chunks, Some(encoder));
    Box::pin(
        stream::unfold(state, |(mut chunks, encoder)| async move {
            let mut encoder = encoder?;
            let step = match chunks.next().await {
                Some(Ok(chunk)) => encoder.push(&chunk).map(|out| (out, false)),
                Some(Err(status)) => return Some((Err(status), (chunks, None))),
                None => encoder.finish().map(|out| (out, true)),
            };
            match step {
                Ok((out, true)) => Some((Ok(out), (chunks, None))),
                Ok((out, false)) => Some((Ok(out), (chunks, Some(encoder)))),
                Err(e) => Some((Err(Status::internal(format!("zstd: {e}"))), (chunks, None))),
            }
        })
        .filter(|chunk| std::future::ready(!matches!(chunk, Ok(bytes) if bytes.is_empty()))),
    )
}

fn past_the_end(offset: u64, size: u64) -> Status {
    Status::out_of_range(format!(
        "read_offset {offset} is past the end of the blob ({size} bytes)"
    ))
}

/// One Write call being received.
struct Upload<'a> {
    node: &'a NodeContext,
    /// The name as the first message carried it: later messages may repeat it, not change it.
    resource_name: &'a str,
    name: &'a UploadName,
}

impl Upload<'_> {
    /// Appends to the resumable upload, publishing once complete and verified.
    async fn plain(
        &self,
        first: WriteRequest,
        mut messages: Streaming<WriteRequest>,
    ) -> Result<i64, Status> {
        let digest = &self.name.blob.digest;
        let want_sha256 = digest.function == HashFunction::Sha256;
        let staging = self.name.staging_name();
        let store = &self.node.store;
        let mut upload = store
            .resume_upload(&staging, digest.size, want_sha256)
            .await
            .map_err(of_store_error)?;
        if first.write_offset == 0 && upload.committed() > 0 {
            // The client starts over: what an earlier attempt left is not what it sends.
            upload.discard();
            upload = store
                .resume_upload(&staging, digest.size, want_sha256)
                .await
                .map_err(of_store_error)?;
        }
        let mut message = first;
        loop {
            self.check_name(&message)?;
            if message.write_offset != upload.committed() as i64 {
                return Err(Status::invalid_argument(format!(
                    "write_offset {} but {} bytes are committed; query the write status and resume there",
                    message.write_offset,
                    upload.committed()
                )));
            }
            if !message.data.is_empty() {
                write_chunk(&mut upload, message.data).await?;
            }
            if message.finish_write {
                break;
            }
            message = match messages.message().await {
                Ok(Some(next)) => next,
                Ok(None) => {
                    return Err(
                        keep_for_resume(upload, "the stream ended before finish_write").await,
                    );
                }
                Err(status) => return Err(keep_for_resume(upload, status.message()).await),
            };
        }
        publish_resumable(self.node, self.name, upload).await?;
        Ok(digest.size as i64)
    }

    /// Receives an upload that is not resumable into a staged body, decoding zstd as it arrives
    /// when `decoder` is given; publishes once complete and verified. Returns the bytes received
    /// (compressed ones for zstd).
    async fn in_one_go(
        &self,
        first: WriteRequest,
        mut messages: Streaming<WriteRequest>,
        mut decoder: Option<StreamDecoder>,
    ) -> Result<i64, Status> {
        let digest = &self.name.blob.digest;
        self.node
            .store
            .check_room(digest.size)
            .map_err(of_store_error)?;
        let mut writer = self
            .node
            .store
            .writer(digest.size, digest.function == HashFunction::Sha256);
        let mut received = 0u64;
        let mut message = first;
        loop {
            self.check_name(&message)?;
            if message.write_offset != received as i64 {
                return Err(Status::invalid_argument(format!(
                    "write_offset {} but {received} bytes were received; this upload is not resumable: restart at 0",
                    message.write_offset
                )));
            }
            received += message.data.len() as u64;
            match decoder.as_mut() {
                Some(decoder) => {
                    decoder.feed(message.data);
                    while let Some(piece) = decoder
                        .next()
                        .map_err(|e| Status::invalid_argument(format!("bad zstd data: {e}")))?
                    {
                        writer.write(&piece).await.map_err(too_many_bytes)?;
                    }
                }
                None => writer.write(&message.data).await.map_err(too_many_bytes)?,
            }
            if message.finish_write {
                break;
            }
            message = messages
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("the stream ended before finish_write"))?;
        }
        let complete = decoder.as_ref().is_none_or(StreamDecoder::complete);
        if !complete || writer.size() != digest.size {
            return Err(Status::invalid_argument(format!(
                "received {} bytes{}, the digest says {}; nothing was stored",
                writer.size(),
                if complete {
                    ""
                } else {
                    " and an unfinished zstd frame"
                },
                digest.size
            )));
        }
        let staged = writer.finish(None).await.map_err(of_store_error)?;
        if !digest.matches(&staged) {
            return Err(Status::invalid_argument(
                "digest mismatch: the bytes do not hash to the digest in the resource name; nothing was stored",
            ));
        }
        self.node
            .store
            .commit_local(&digest.cas_key(&self.name.blob.project), staged)
            .await
            .map_err(of_store_error)?;
        Ok(received as i64)
    }

    fn check_name(&self, message: &WriteRequest) -> Result<(), Status> {
        if !message.resource_name.is_empty() && message.resource_name != self.resource_name {
            return Err(Status::invalid_argument(
                "the resource name changed in the middle of the stream",
            ));
        }
        Ok(())
    }
}

/// Publishes a resumable upload that holds the whole blob, once its size and digest check out;
/// a wrong one is discarded (INVALID_ARGUMENT), nothing stored.
async fn publish_resumable(
    node: &NodeContext,
    name: &UploadName,
    upload: ResumableUpload,
) -> Result<(), Status> {
    let digest = &name.blob.digest;
    if upload.committed() != digest.size {
        let status = Status::invalid_argument(format!(
            "finish_write after {} bytes, but the digest says {}; nothing was stored",
            upload.committed(),
            digest.size
        ));
        upload.discard();
        return Err(status);
    }
    // Digests are checked here rather than in `finish`, which would keep a wrong upload.
    let staged = upload.finish(None).await.map_err(of_store_error)?;
    if !digest.matches(&staged) {
        return Err(Status::invalid_argument(
            "digest mismatch: the bytes do not hash to the digest in the resource name; nothing was stored",
        ));
    }
    node.store
        .commit_local(&digest.cas_key(&name.blob.project), staged)
        .await
        .map_err(of_store_error)?;
    Ok(())
}

async fn write_chunk(upload: &mut ResumableUpload, data: Bytes) -> Result<(), Status> {
    upload.write(data).await.map_err(too_many_bytes)
}

/// A write past the digest's size says so; other store errors map as usual.
fn too_many_bytes(error: StoreError) -> Status {
    match error {
        StoreError::TooLarge { .. } => {
            Status::invalid_argument("more bytes than the digest's size; nothing was stored")
        }
        error => of_store_error(error),
    }
}

/// An interrupted upload: its bytes are made durable for a resume, and the call fails.
async fn keep_for_resume(mut upload: ResumableUpload, why: &str) -> Status {
    match upload.sync().await {
        Ok(committed) => Status::cancelled(format!(
            "{why}; {committed} bytes are committed: resume at that offset"
        )),
        Err(error) => of_store_error(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begun_uploads_forget_the_least_recently_begun_first() {
        let begun = BegunUploads::default();
        for i in 0..BEGUN_REMEMBERED {
            begun.begun(format!("u{i}"));
        }
        // Asked about often, as an abandoned upload's name may be: still first to go.
        assert!(begun.knows("u0"));
        // Begun again: its earlier turn no longer forgets it.
        begun.begun("u1".into());
        begun.begun("new".into());
        assert!(!begun.knows("u0"), "the oldest went");
        assert!(begun.knows("u1"), "begun again");
        assert!(begun.knows("new"));
        begun.published("new");
        assert!(!begun.knows("new"));
    }
}
