//! The one place where failures become HTTP responses.
//!
//! Bodies are `{"error": "<machine_code>", "message": "<human text>"}` (overview.md → Errors).
//! Store errors and auth decisions map to statuses here and nowhere else.

use std::borrow::Cow;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::auth::Decision;
use crate::storage::StoreError;

/// An error answer: status, machine code and a message for humans.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: Cow<'static, str>,
    retry_after: Option<u64>,
}

/// Attached to error responses so a layer can re-render them (Nx wants `text/plain`).
#[derive(Clone, Debug)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "No artifact under this key",
        )
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("Body exceeds the limit of {limit} bytes for this route"),
        )
    }

    pub fn truncated_body() -> Self {
        Self::bad_request(
            "truncated_body",
            "The request body ended before its declared length",
        )
    }

    pub fn draining() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "The node is shutting down",
        )
    }

    pub fn overloaded(message: impl Into<Cow<'static, str>>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error; see the node's logs",
        )
    }

    /// The error for a decision that does not allow the request; `None` for `Allow`.
    pub fn from_decision(decision: &Decision, node_account: &str) -> Option<ApiError> {
        Some(match decision {
            Decision::Allow { .. } => return None,
            Decision::WrongAccount => Self::new(
                StatusCode::FORBIDDEN,
                "wrong_account",
                format!("This node serves account {node_account:?}"),
            ),
            Decision::MissingToken => Self::new(
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "A token is required (Authorization: Bearer <token>, or Basic with the token as password)",
            ),
            Decision::InvalidToken => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "Invalid or expired token",
            ),
            Decision::Forbidden => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "The token has no grant for this account/project and action",
            ),
            Decision::Unavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                "Authentication backend unavailable",
            ),
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::TooLarge { limit } => ApiError::too_large(limit),
            StoreError::ChecksumMismatch => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "checksum_mismatch",
                "The body does not match its SHA-256 checksum",
            ),
            StoreError::AlreadyExists => ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                "An artifact already exists under this key",
            ),
            StoreError::InsufficientStorage => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                "The node's storage is full and eviction cannot free room",
            ),
            StoreError::DiskFull { .. } => {
                tracing::error!(%error, "refusing writes: the data dir's disk is nearly full");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    "The node's disk is nearly full; writes resume once space is freed",
                )
            }
            StoreError::DuplicatePart(n) => ApiError::bad_request(
                "duplicate_part",
                format!("Part {n} is listed more than once"),
            ),
            StoreError::BadPartNumber(max) => ApiError::bad_request(
                "bad_part_number",
                format!("part_number must be an integer from 1 to {max}"),
            ),
            StoreError::UploadBusy => ApiError::new(
                StatusCode::CONFLICT,
                "upload_busy",
                "Another request is writing this upload",
            ),
            StoreError::UploadNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "upload_not_found",
                "Unknown or expired upload",
            ),
            StoreError::MissingPart(n) => ApiError::bad_request(
                "missing_part",
                format!("Part {n} is listed but was not uploaded"),
            ),
            StoreError::LostPart(n) => ApiError::bad_request(
                "missing_part",
                format!("Part {n} was lost by the node after it was acknowledged; upload it again"),
            ),
            StoreError::TooManyUploads(limit) => ApiError::overloaded(
                format!("Too many uploads in flight (limit {limit}); retry later"),
                5,
            ),
            StoreError::WritesStopped(_) => {
                tracing::error!(%error, "refusing a write: the store stopped taking writes");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "The node's store stopped taking writes after an error in its background work \
                     (/status: disk.background_errors; the node's log names the cause); reads go on",
                )
            }
            StoreError::Locked { .. } | StoreError::Io(_) | StoreError::Db(_) => {
                tracing::error!(%error, "storage failure");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, Basic realm=\"kura\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.code == "draining" {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response.extensions_mut().insert(ErrorBody {
            code: self.code,
            message: self.message.into_owned(),
        });
        response
    }
}
