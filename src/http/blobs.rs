//! The simple key → blob caches: Nx (`/v1/cache/{key}`, write-once, project `nx`), Metro
//! (`/api/metro/cache/{key}`, project `metro`) and the Bazel HTTP cache
//! (`/bazel/{account}/{project}/ac|cas/{key}`, also ccache's `layout=bazel`).

use axum::Router;
use axum::routing::{MethodRouter, get};

use super::AppState;
use super::access::{PathScope, Scope, ScopeRule};
use super::artifacts::{self, BlobRoute, KeyRule, Stored, Surface};
use super::transfer::ContentType;
use crate::storage::{Kind, WriteMode};

const OCTET_STREAM: &str = "application/octet-stream";

const NX: Surface = Surface {
    kind: Kind::Nx,
    content_type: ContentType::UploadsOr(OCTET_STREAM),
    limit: |limits| limits.blob.0,
    write_mode: WriteMode::WriteOnce,
    stored: Stored::Ok,
    keys: KeyRule::Any,
};

const METRO: Surface = Surface {
    kind: Kind::Metro,
    write_mode: WriteMode::Overwrite,
    ..NX
};
const BAZEL_AC: Surface = Surface {
    kind: Kind::ActionCache,
    keys: KeyRule::Sha256,
    ..METRO
};
/// Shares storage with REAPI SHA-256 blobs of the same project.
const BAZEL_CAS: Surface = Surface {
    kind: Kind::CasSha256,
    keys: KeyRule::Sha256OfBody,
    ..METRO
};

/// Nx and Metro have no account or project in their requests: the node's account, and a project
/// of their own.
struct NxScope;

impl Scope for NxScope {
    const RULE: ScopeRule = ScopeRule::Fixed("nx");
}

struct MetroScope;

impl Scope for MetroScope {
    const RULE: ScopeRule = ScopeRule::Fixed("metro");
}

struct Nx;

impl BlobRoute for Nx {
    const SURFACE: Surface = NX;
    type Scope = NxScope;
}

struct Metro;

impl BlobRoute for Metro {
    const SURFACE: Surface = METRO;
    type Scope = MetroScope;
}

struct BazelAc;

impl BlobRoute for BazelAc {
    const SURFACE: Surface = BAZEL_AC;
    type Scope = PathScope;
}

struct BazelCas;

impl BlobRoute for BazelCas {
    const SURFACE: Surface = BAZEL_CAS;
    type Scope = PathScope;
}

fn blob<R: BlobRoute>() -> MethodRouter<AppState> {
    get(artifacts::load::<R>).put(artifacts::save::<R>)
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/cache/{key}", blob::<Nx>())
        .route("/api/metro/cache/{key}", blob::<Metro>())
        .route("/bazel/{account}/{project}/ac/{key}", blob::<BazelAc>())
        .route("/bazel/{account}/{project}/cas/{key}", blob::<BazelCas>())
}
