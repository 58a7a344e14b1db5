//! The key → blob surfaces, described as data: Gradle, Xcode CAS, Nx, Metro and the Bazel HTTP
//! cache differ only in the [`Surface`] and scope rule of their routes ([`BlobRoute`]). One
//! pair of handlers serves them all.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{Method, StatusCode};

use super::AppState;
use super::access::{Authorized, KeyParam, Scope};
use super::error::ApiError;
use super::transfer::{self, ContentType, ServeOptions};
use crate::config::LimitsConfig;
use crate::names;
use crate::storage::{ArtifactKey, Kind, StoreError, WriteMode};

/// How one key → blob surface behaves. Attached to its routes as an extension.
#[derive(Clone, Copy)]
pub struct Surface {
    pub kind: Kind,
    /// Content type of reads: the upload's or a fixed one.
    pub content_type: ContentType,
    /// The upload size limit of this surface.
    pub limit: fn(&LimitsConfig) -> u64,
    pub write_mode: WriteMode,
    pub stored: Stored,
    pub keys: KeyRule,
}

/// The success status of a store.
#[derive(Clone, Copy)]
pub enum Stored {
    /// 201 for a new key, 200 for an overwrite (Gradle).
    CreatedOrOk,
    Ok,
    NoContent,
}

/// What a key must look like beyond the common key alphabet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KeyRule {
    Any,
    /// 64 lowercase hex characters (SHA-256; Bazel action cache).
    Sha256,
    /// 64 lowercase hex characters that must equal the SHA-256 of the body (Bazel CAS).
    Sha256OfBody,
}

/// One key → blob route: its surface and where it finds its account and project. A type per
/// route, so its handlers are compiled for it and no per-request layer has to carry either.
pub trait BlobRoute: Send + Sync + 'static {
    const SURFACE: Surface;
    type Scope: Scope;
}

impl Surface {
    fn key(&self, project: String, key: String) -> Result<ArtifactKey, ApiError> {
        if self.keys != KeyRule::Any && !names::is_lower_hex(&key, 64) {
            return Err(ApiError::bad_request(
                "invalid_key",
                "Keys of this cache are 64 lowercase hex characters (SHA-256)",
            ));
        }
        Ok(ArtifactKey::new(project, self.kind, key))
    }
}

/// GET and HEAD of one artifact. Takes the request itself, not a copy of its headers: the
/// handler only borrows them.
pub async fn load<R: BlobRoute>(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized<R::Scope>,
    request: Request,
) -> Result<Response, ApiError> {
    let surface = R::SURFACE;
    let key = surface.key(auth.project, key)?;
    let options = ServeOptions {
        content_type: surface.content_type,
        head: request.method() == Method::HEAD,
    };
    transfer::serve(&app, &key, request.headers(), options).await
}

/// PUT (or POST) of one artifact.
pub async fn save<R: BlobRoute>(
    State(app): State<AppState>,
    KeyParam(key): KeyParam,
    auth: Authorized<R::Scope>,
    request: Request,
) -> Result<Response, ApiError> {
    let surface = R::SURFACE;
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let key = surface.key(auth.project, key)?;
    // Write-once surfaces refuse an existing key before reading the body.
    if surface.write_mode == WriteMode::WriteOnce && app.store.head(&key)?.is_some() {
        return Err(StoreError::AlreadyExists.into());
    }
    let limit = (surface.limit)(&app.config.limits);
    let committed = if surface.keys == KeyRule::Sha256OfBody {
        let staged = transfer::receive(&app, &headers, body, limit, true).await?;
        if staged.sha256.map(hex::encode).as_deref() != Some(key.key.as_str()) {
            return Err(StoreError::ChecksumMismatch.into());
        }
        transfer::commit(&app, &key, staged, None, surface.write_mode).await?
    } else {
        let staged = transfer::receive(&app, &headers, body, limit, false).await?;
        let content_type = match surface.content_type {
            ContentType::UploadsOr(_) => transfer::content_type(&headers),
            ContentType::Always(_) => None,
        };
        transfer::commit(&app, &key, staged, content_type, surface.write_mode).await?
    };
    let status = match surface.stored {
        Stored::CreatedOrOk if committed.created => StatusCode::CREATED,
        Stored::CreatedOrOk | Stored::Ok => StatusCode::OK,
        Stored::NoContent => StatusCode::NO_CONTENT,
    };
    Ok(status.into_response())
}
