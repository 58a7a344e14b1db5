//! The public gRPC listener: the REAPI v2 cache services (Capabilities, ContentAddressableStorage,
//! ActionCache), ByteStream and gRPC health, for Bazel, Buck2 and every REAPI cache client.
//!
//! The services are tonic's, served as an axum router on the node's own listener (see
//! `listener.rs`: the same connection limits, `TCP_NODELAY` and drain with GOAWAY as HTTP), under
//! the shared layers: request id → call metrics (gRPC's own observation: counted, timed and logged
//! by `grpc-status` when the response ends) → admission → method. Each
//! method parses its request (`digest.rs`, `resource.rs`), asks the one authorizer
//! (`access.rs`), and works on the one store with its publish path, so a blob written here is
//! the blob the Bazel HTTP routes of the same project serve, and the reverse. ByteStream `Read`
//! has a route of its own (`read.rs`) that sends each chunk without copying it.

pub(crate) mod access;
mod action_cache;
mod blobs;
mod bytestream;
mod capabilities;
mod cas;
mod compress;
mod digest;
mod layers;
#[doc(hidden)]
pub mod proto;
mod read;
mod resource;
mod status;
mod tree;

use std::sync::Arc;

use tonic::service::Routes;

use crate::context::NodeContext;
use crate::layers::{AdmissionLayer, RequestIdLayer};
use proto::bytestream::byte_stream_server::ByteStreamServer;
use proto::health::health_server::HealthServer;
use proto::reapi::action_cache_server::ActionCacheServer;
use proto::reapi::capabilities_server::CapabilitiesServer;
use proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;

/// The gRPC services with the shared layers, ready for `listener::serve`.
pub(crate) fn router(node: Arc<NodeContext>) -> axum::Router {
    let message_limit = node.config.grpc.max_message_size.0 as usize;
    // Each generated server gets the node's message limit both ways.
    macro_rules! limited {
        ($server:expr) => {
            $server
                .max_decoding_message_size(message_limit)
                .max_encoding_message_size(message_limit)
        };
    }
    let bytestream = bytestream::ByteStreamService {
        node: node.clone(),
        begun: bytestream::BegunUploads::default(),
    };
    let routes = Routes::new(limited!(CapabilitiesServer::new(
        capabilities::CapabilitiesService { node: node.clone() }
    )))
    .add_service(limited!(ContentAddressableStorageServer::new(cas::Cas {
        node: node.clone()
    })))
    .add_service(limited!(ActionCacheServer::new(
        action_cache::ActionCacheService { node: node.clone() }
    )))
    .add_service(limited!(ByteStreamServer::new(bytestream.clone())))
    .add_service(HealthServer::new(capabilities::HealthService {
        node: node.clone(),
    }));
    routes
        .into_axum_router()
        .route(read::PATH, read::route(bytestream, message_limit))
        .layer(AdmissionLayer::new(
            node.lifecycle.clone(),
            node.config.limits.max_in_flight_requests,
            layers::GrpcRefusals,
        ))
        .layer(layers::CallMetricsLayer)
        .layer(RequestIdLayer)
}
