//! `Capabilities` (what the node offers) and `grpc.health.v1.Health` (whether it serves).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::access::admit;
use super::digest::HashFunction;
use super::proto::health::health_check_response::ServingStatus;
use super::proto::health::health_server::Health;
use super::proto::health::{HealthCheckRequest, HealthCheckResponse};
use super::proto::reapi::capabilities_server::Capabilities;
use super::proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, GetCapabilitiesRequest, ServerCapabilities,
    compressor, symlink_absolute_path_strategy,
};
use super::proto::semver::SemVer;
use crate::auth::Action;
use crate::context::NodeContext;

/// The services whose health `Check` answers for (and the empty name: the whole node).
const SERVICES: [&str; 5] = [
    "",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.Capabilities",
    "google.bytestream.ByteStream",
];

pub(crate) struct CapabilitiesService {
    pub node: Arc<NodeContext>,
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        admit(&self.node, request, Action::Read).await?;
        let config = &self.node.config;
        let zstd = vec![compressor::Value::Zstd as i32];
        let version = |minor| SemVer {
            major: 2,
            minor,
            patch: 0,
            prerelease: String::new(),
        };
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: HashFunction::ALL.iter().map(|f| f.field() as i32).collect(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: config.grpc.max_batch_total_size.0 as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: zstd.clone(),
                supported_batch_update_compressors: zstd,
                max_cas_blob_size_bytes: config.limits.blob.0 as i64,
            }),
            deprecated_api_version: None,
            low_api_version: Some(version(0)),
            high_api_version: Some(version(3)),
        }))
    }
}

pub(crate) struct HealthService {
    pub node: Arc<NodeContext>,
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if !SERVICES.contains(&request.get_ref().service.as_str()) {
            return Err(Status::not_found("unknown service"));
        }
        // The same answer as `/ready`: serving, or not (starting, bootstrapping, draining).
        let status = match self.node.readiness() {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }
}
