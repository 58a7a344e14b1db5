//! Kura: a content-addressed build-cache node.
//!
//! Reading order: [`node`] wires everything; [`context`] is what every listener shares; the
//! listener module accepts connections; [`http`] and [`grpc`] are the public surfaces;
//! [`replication`] is the account mesh and its peer plane; [`auth`] decides who may do what; [`storage`] is the only code that touches disk. `docs/architecture.md` is the
//! one-page map.

pub mod auth;
pub mod certs;
pub mod config;
pub(crate) mod context;
pub mod grpc;
pub mod http;
pub(crate) mod layers;
pub(crate) mod lifecycle;
mod listener;
pub(crate) mod memory;
pub(crate) mod metrics;
pub(crate) mod names;
pub mod node;
pub mod replication;
pub mod storage;

/// The git commit this binary was built from (`unknown` outside a checkout).
pub const GIT_SHA: &str = env!("KURA_GIT_SHA");
