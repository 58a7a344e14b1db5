//! The simple key → blob caches: Nx (`/v1/cache/{key}`, write-once, project `nx`), Metro
//! (`/api/metro/cache/{key}`, project `metro`) and the Bazel HTTP cache
//! (`/bazel/{account}/{project}/ac|cas/{key}`, also ccache's `layout=bazel`).

use axum::routing::get;
use axum::{Extension, Router};

use super::AppState;
use super::access::ScopeRule;
use super::artifacts::{self, KeyRule, Stored, Surface};
use crate::storage::{Kind, WriteMode};

const OCTET_STREAM: &str = "application/octet-stream";

const NX: Surface = Surface {
    kind: Kind::Nx,
    content_type: OCTET_STREAM,
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

pub fn routes() -> Router<AppState> {
    let blob = || get(artifacts::load).put(artifacts::save);
    let nx = Router::new()
        .route("/v1/cache/{key}", blob())
        .route_layer(Extension(NX))
        .route_layer(Extension(ScopeRule::Fixed("nx")));
    let metro = Router::new()
        .route("/api/metro/cache/{key}", blob())
        .route_layer(Extension(METRO))
        .route_layer(Extension(ScopeRule::Fixed("metro")));
    let bazel_ac = Router::new()
        .route("/bazel/{account}/{project}/ac/{key}", blob())
        .route_layer(Extension(BAZEL_AC));
    let bazel_cas = Router::new()
        .route("/bazel/{account}/{project}/cas/{key}", blob())
        .route_layer(Extension(BAZEL_CAS));
    nx.merge(metro).merge(
        bazel_ac
            .merge(bazel_cas)
            .route_layer(Extension(ScopeRule::Path)),
    )
}
