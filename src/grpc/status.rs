//! gRPC status codes for what the shared parts of the node answer: store errors and
//! authorization decisions. The HTTP surface maps the same values in `http::error`.

use tonic::{Code, Status};

use crate::auth::Decision;
use crate::storage::StoreError;

/// The status of a store error. Internal faults are logged here and reported without detail.
pub(crate) fn of_store_error(error: StoreError) -> Status {
    match error {
        StoreError::TooLarge { limit } => Status::invalid_argument(format!(
            "the blob is larger than its digest's size or the node's limit ({limit} bytes)"
        )),
        StoreError::ChecksumMismatch => {
            Status::invalid_argument("the bytes do not match the digest; nothing was stored")
        }
        StoreError::AlreadyExists => Status::already_exists("the blob already exists"),
        StoreError::InsufficientStorage => Status::resource_exhausted(
            "disk full: the node cannot free room for this blob; writes fail until space is freed, reads go on",
        ),
        error @ StoreError::DiskFull { .. } => Status::resource_exhausted(format!(
            "disk full: {error}; writes fail until space is freed, reads go on"
        )),
        StoreError::UploadBusy => {
            Status::aborted("another stream is writing this upload; retry, or query its status")
        }
        StoreError::TooManyUploads(limit) => Status::resource_exhausted(format!(
            "too many uploads in flight (limit {limit}); retry shortly"
        )),
        error @ (StoreError::UploadNotFound
        | StoreError::MissingPart(_)
        | StoreError::LostPart(_)
        | StoreError::DuplicatePart(_)
        | StoreError::BadPartNumber(_)) => Status::failed_precondition(error.to_string()),
        error @ StoreError::WritesStopped(_) => {
            tracing::error!(%error, "refusing a gRPC write: the store stopped taking writes");
            Status::unavailable(
                "the node's store stopped taking writes after an error in its background work \
                 (see /status and the node's log); reads go on",
            )
        }
        error @ (StoreError::Locked { .. } | StoreError::Io(_) | StoreError::Db(_)) => {
            tracing::error!(%error, "storage error answering a gRPC call");
            Status::internal("internal storage error; see the node's logs")
        }
    }
}

/// The status of a refusal; `None` for [`Decision::Allow`].
pub(crate) fn of_decision(decision: &Decision) -> Option<Status> {
    let (code, message) = match decision {
        Decision::Allow { .. } => return None,
        Decision::WrongAccount => (
            Code::PermissionDenied,
            "this node serves another account (x-kura-account)",
        ),
        Decision::MissingToken => (
            Code::Unauthenticated,
            "missing credentials: send metadata authorization: Bearer <token>",
        ),
        Decision::InvalidToken => (Code::Unauthenticated, "invalid or expired token"),
        Decision::Forbidden => (
            Code::PermissionDenied,
            "the token has no grant for this project and action",
        ),
        Decision::Unavailable => (
            Code::Unavailable,
            "the auth backend cannot be reached and no cached decision covers this token; retry shortly",
        ),
    };
    Some(Status::new(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_the_code_of_the_spec() {
        let code = |d: Decision| of_decision(&d).map(|s| s.code());
        assert_eq!(
            code(Decision::Allow {
                principal: "p".into()
            }),
            None
        );
        assert_eq!(code(Decision::WrongAccount), Some(Code::PermissionDenied));
        assert_eq!(code(Decision::MissingToken), Some(Code::Unauthenticated));
        assert_eq!(code(Decision::InvalidToken), Some(Code::Unauthenticated));
        assert_eq!(code(Decision::Forbidden), Some(Code::PermissionDenied));
        assert_eq!(code(Decision::Unavailable), Some(Code::Unavailable));
    }

    #[test]
    fn a_full_disk_says_so() {
        let status = of_store_error(StoreError::InsufficientStorage);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("disk full"));
    }
}
