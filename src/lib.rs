//! Kura: a content-addressed build-cache node.
//!
//! Reading order: [`node`] wires everything; [`http`] is the public listener and its surfaces;
//! [`auth`] decides who may do what; [`storage`] is the only code that touches disk.

pub mod auth;
pub mod config;
pub mod http;
pub mod lifecycle;
mod listener;
pub mod metrics;
pub mod names;
pub mod node;
pub mod storage;

/// The git commit this binary was built from (`unknown` outside a checkout).
pub const GIT_SHA: &str = env!("KURA_GIT_SHA");
