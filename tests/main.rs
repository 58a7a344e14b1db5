//! The integration tests: one binary that starts the real `kura` on 127.0.0.1 (see `common`).
//!
//! One module per area; `regression` holds one test per fixed bug, named after what it guards.

mod common;

mod auth_introspection;
mod auth_static;
mod bazel_e2e;
mod capacity;
mod durability;
mod gradle_e2e;
mod grpc;
mod grpc_auth;
mod http_common;
mod http_surfaces;
mod lifecycle;
mod memory;
mod mesh;
mod mesh_discovery;
mod mesh_tls;
mod regression;
