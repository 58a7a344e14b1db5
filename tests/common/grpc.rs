//! A REAPI client for the tests: the project's tonic client over a plain h2c channel to the
//! node's gRPC listener, with the token and account metadata a test chooses.

use std::time::Duration;

use kura::grpc::proto::bytestream::byte_stream_client::ByteStreamClient;
use kura::grpc::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, WriteRequest,
};
use kura::grpc::proto::health::health_client::HealthClient;
use kura::grpc::proto::reapi::action_cache_client::ActionCacheClient;
use kura::grpc::proto::reapi::capabilities_client::CapabilitiesClient;
use kura::grpc::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kura::grpc::proto::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    batch_update_blobs_request,
};
use sha2::Digest as _;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::Node;

/// The REAPI client of one test.
#[derive(Clone)]
pub struct Grpc {
    channel: Channel,
    token: Option<String>,
    account: Option<String>,
}

impl Grpc {
    pub async fn connect(node: &Node) -> Grpc {
        Grpc::connect_with(node, |endpoint| endpoint).await
    }

    /// [`Grpc::connect`] with the channel's settings of the test's own.
    pub async fn connect_with(node: &Node, configure: impl FnOnce(Endpoint) -> Endpoint) -> Grpc {
        let endpoint = Endpoint::from_shared(format!("http://{}", node.grpc_addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5));
        let channel = configure(endpoint)
            .connect()
            .await
            .expect("connect to the gRPC listener");
        Grpc {
            channel,
            token: None,
            account: None,
        }
    }

    pub fn token(&self, token: &str) -> Grpc {
        Grpc {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    pub fn account(&self, account: &str) -> Grpc {
        Grpc {
            account: Some(account.to_string()),
            ..self.clone()
        }
    }

    /// `message` with this client's metadata.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}").parse().expect("metadata value");
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(account) = &self.account {
            let value = account.parse().expect("metadata value");
            request.metadata_mut().insert("x-kura-account", value);
        }
        request
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
    }

    pub fn action_cache(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }

    pub fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel.clone())
    }

    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }

    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    /// Writes `data` under `resource` in chunks of `chunk` bytes, starting at `offset`.
    pub async fn write_from(
        &self,
        resource: &str,
        data: &[u8],
        offset: usize,
        chunk: usize,
        finish: bool,
    ) -> Result<i64, Status> {
        self.send(write_messages(resource, data, offset, chunk, finish))
            .await
    }

    /// Sends these Write messages as one stream; the committed size it answers.
    pub async fn send(&self, messages: Vec<WriteRequest>) -> Result<i64, Status> {
        let stream = futures_util::stream::iter(messages);
        let response = self.bytestream().write(self.request(stream)).await?;
        Ok(response.into_inner().committed_size)
    }

    pub async fn write(&self, resource: &str, data: &[u8]) -> Result<i64, Status> {
        self.write_from(resource, data, 0, 64 * 1024, true).await
    }

    pub async fn read(&self, resource: &str, offset: i64, limit: i64) -> Result<Vec<u8>, Status> {
        self.read_messages_of_at_most(resource, offset, limit, 4 << 20)
            .await
    }

    /// [`Grpc::read`] by a client that refuses messages over `max_message` bytes.
    pub async fn read_messages_of_at_most(
        &self,
        resource: &str,
        offset: i64,
        limit: i64,
        max_message: usize,
    ) -> Result<Vec<u8>, Status> {
        let request = ReadRequest {
            resource_name: resource.to_string(),
            read_offset: offset,
            read_limit: limit,
        };
        let mut stream = self
            .bytestream()
            .max_decoding_message_size(max_message)
            .read(self.request(request))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(message) = stream.message().await? {
            assert!(message.data.len() <= 1 << 20, "chunks of at most 1 MiB");
            out.extend_from_slice(&message.data);
        }
        Ok(out)
    }

    pub async fn query(&self, resource: &str) -> Result<QueryWriteStatusResponse, Status> {
        let request = QueryWriteStatusRequest {
            resource_name: resource.to_string(),
        };
        Ok(self
            .bytestream()
            .query_write_status(self.request(request))
            .await?
            .into_inner())
    }

    /// UpdateActionResult of `action` in `project` (SHA-256): what the node stored.
    pub async fn update_action_result(
        &self,
        project: &str,
        action: Digest,
        result: kura::grpc::proto::reapi::ActionResult,
    ) -> Result<kura::grpc::proto::reapi::ActionResult, Status> {
        let request = kura::grpc::proto::reapi::UpdateActionResultRequest {
            instance_name: project.to_string(),
            action_digest: Some(action),
            action_result: Some(result),
            ..Default::default()
        };
        Ok(self
            .action_cache()
            .update_action_result(self.request(request))
            .await?
            .into_inner())
    }

    /// GetActionResult of `action` in `project`, nothing inlined.
    pub async fn get_action_result(
        &self,
        project: &str,
        action: Digest,
    ) -> Result<kura::grpc::proto::reapi::ActionResult, Status> {
        let request = kura::grpc::proto::reapi::GetActionResultRequest {
            instance_name: project.to_string(),
            action_digest: Some(action),
            ..Default::default()
        };
        Ok(self
            .action_cache()
            .get_action_result(self.request(request))
            .await?
            .into_inner())
    }

    /// Digests of `digests` that FindMissingBlobs reports missing (SHA-256 unless `function`).
    pub async fn missing(
        &self,
        project: &str,
        digests: Vec<Digest>,
        function: i32,
    ) -> Result<Vec<Digest>, Status> {
        let request = FindMissingBlobsRequest {
            instance_name: project.to_string(),
            blob_digests: digests,
            digest_function: function,
        };
        Ok(self
            .cas()
            .find_missing_blobs(self.request(request))
            .await?
            .into_inner()
            .missing_blob_digests)
    }

    /// Stores each of `blobs` in `project` under its SHA-256 digest (one uncompressed batch),
    /// asserting that every item was stored.
    pub async fn put_blobs(&self, project: &str, blobs: &[&[u8]]) {
        let items = blobs
            .iter()
            .map(|data| (sha256(data), data.to_vec(), 0))
            .collect();
        let codes = self.batch_update(project, items, 1).await.unwrap();
        assert!(
            codes.iter().all(|code| *code == tonic::Code::Ok),
            "{codes:?}"
        );
    }

    /// BatchUpdateBlobs of `(digest, data, compressor)` items; the per-item codes.
    pub async fn batch_update(
        &self,
        project: &str,
        items: Vec<(Digest, Vec<u8>, i32)>,
        function: i32,
    ) -> Result<Vec<Code>, Status> {
        let requests = items
            .into_iter()
            .map(
                |(digest, data, compressor)| batch_update_blobs_request::Request {
                    digest: Some(digest),
                    data: data.into(),
                    compressor,
                },
            )
            .collect();
        let request = BatchUpdateBlobsRequest {
            instance_name: project.to_string(),
            requests,
            digest_function: function,
        };
        let response = self.cas().batch_update_blobs(self.request(request)).await?;
        Ok(response
            .into_inner()
            .responses
            .iter()
            .map(|r| Code::from_i32(r.status.as_ref().map_or(-1, |s| s.code)))
            .collect())
    }

    /// BatchReadBlobs; each item's code, data and compressor.
    pub async fn batch_read(
        &self,
        project: &str,
        digests: Vec<Digest>,
        compressors: Vec<i32>,
    ) -> Result<Vec<(Code, Vec<u8>, i32)>, Status> {
        let request = BatchReadBlobsRequest {
            instance_name: project.to_string(),
            digests,
            acceptable_compressors: compressors,
            digest_function: 0,
        };
        let response = self.cas().batch_read_blobs(self.request(request)).await?;
        Ok(response
            .into_inner()
            .responses
            .into_iter()
            .map(|r| {
                let code = Code::from_i32(r.status.as_ref().map_or(-1, |s| s.code));
                (code, r.data.to_vec(), r.compressor)
            })
            .collect())
    }
}

/// The messages of a Write: `data[offset..]` in chunks, offsets counted from the start.
pub fn write_messages(
    resource: &str,
    data: &[u8],
    offset: usize,
    chunk: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    let mut messages = Vec::new();
    let mut at = offset;
    loop {
        let end = (at + chunk).min(data.len());
        let last = end == data.len();
        messages.push(WriteRequest {
            resource_name: if messages.is_empty() {
                resource.to_string()
            } else {
                String::new()
            },
            write_offset: at as i64,
            finish_write: last && finish,
            data: data[at..end].to_vec().into(),
        });
        at = end;
        if last {
            return messages;
        }
    }
}

pub fn sha256(data: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(sha2::Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

pub fn blake3(data: &[u8]) -> Digest {
    Digest {
        hash: blake3::hash(data).to_hex().to_string(),
        size_bytes: data.len() as i64,
    }
}

/// `{project}/blobs/{hash}/{size}`.
pub fn blob_name(project: &str, digest: &Digest) -> String {
    format!("{project}/blobs/{}/{}", digest.hash, digest.size_bytes)
}

/// `{project}/uploads/{uuid}/blobs/{hash}/{size}`.
pub fn upload_name(project: &str, upload: &str, digest: &Digest) -> String {
    format!(
        "{project}/uploads/{upload}/blobs/{}/{}",
        digest.hash, digest.size_bytes
    )
}
