//! REAPI digests: which hash function a request uses, and a checked `(hash, size)` pair that
//! names a blob in the store.
//!
//! The hash function comes from a request's `digest_function` field or a ByteStream name's
//! `blake3` segment, never from the hash itself: a 64-hex hash is SHA-256 unless the request
//! says BLAKE3 (both are 64 hex characters).

use tonic::Status;

use super::proto::reapi::{Digest, digest_function};
use crate::names;
use crate::storage::{ArtifactKey, Kind, StagedBody};

/// SHA-256 of no bytes.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// BLAKE3 of no bytes.
const EMPTY_BLAKE3: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

/// The digest functions this node serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HashFunction {
    Sha256,
    Blake3,
}

impl HashFunction {
    /// Both, as advertised in the capabilities.
    pub(crate) const ALL: [HashFunction; 2] = [HashFunction::Sha256, HashFunction::Blake3];

    /// From a request's `digest_function` field; unset (0) means SHA-256.
    pub(crate) fn from_field(value: i32) -> Result<HashFunction, Status> {
        match digest_function::Value::try_from(value) {
            Ok(digest_function::Value::Unknown | digest_function::Value::Sha256) => {
                Ok(HashFunction::Sha256)
            }
            Ok(digest_function::Value::Blake3) => Ok(HashFunction::Blake3),
            Ok(other) => Err(Status::invalid_argument(format!(
                "digest function {} is not supported; use SHA256 or BLAKE3",
                other.as_str_name()
            ))),
            Err(_) => Err(Status::invalid_argument(format!(
                "unknown digest function {value}; use SHA256 or BLAKE3"
            ))),
        }
    }

    pub(crate) fn field(self) -> digest_function::Value {
        match self {
            HashFunction::Sha256 => digest_function::Value::Sha256,
            HashFunction::Blake3 => digest_function::Value::Blake3,
        }
    }

    /// The store kind of CAS blobs under this function (SHA-256 blobs are shared with the Bazel
    /// HTTP `/cas/` routes).
    pub(crate) fn cas_kind(self) -> Kind {
        match self {
            HashFunction::Sha256 => Kind::CasSha256,
            HashFunction::Blake3 => Kind::CasBlake3,
        }
    }

    fn empty_hash(self) -> &'static str {
        match self {
            HashFunction::Sha256 => EMPTY_SHA256,
            HashFunction::Blake3 => EMPTY_BLAKE3,
        }
    }

    /// The hash of `bytes`, lowercase hex.
    pub(crate) fn hash_hex(self, bytes: &[u8]) -> String {
        use sha2::Digest as _;
        match self {
            HashFunction::Sha256 => hex::encode(sha2::Sha256::digest(bytes)),
            HashFunction::Blake3 => blake3::hash(bytes).to_hex().to_string(),
        }
    }
}

/// A well-formed digest under a known hash function: 64 lowercase hex characters and a
/// non-negative size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BlobDigest {
    pub function: HashFunction,
    pub hash: String,
    pub size: u64,
}

impl BlobDigest {
    /// Checks a digest from a request; `what` names the field in the error.
    pub(crate) fn from_proto(
        function: HashFunction,
        digest: Option<&Digest>,
        what: &str,
    ) -> Result<BlobDigest, Status> {
        let digest =
            digest.ok_or_else(|| Status::invalid_argument(format!("{what} is missing")))?;
        BlobDigest::parse(function, &digest.hash, digest.size_bytes)
            .map_err(|fault| Status::invalid_argument(format!("{what}: {fault}")))
    }

    /// Checks a hash and size; the error says what is wrong with them.
    pub(crate) fn parse(
        function: HashFunction,
        hash: &str,
        size: i64,
    ) -> Result<BlobDigest, String> {
        let size = BlobDigest::check(function, hash, size)?;
        Ok(BlobDigest {
            function,
            hash: hash.to_string(),
            size,
        })
    }

    /// [`BlobDigest::parse`] without keeping a copy of the hash: the checked size.
    pub(crate) fn check(function: HashFunction, hash: &str, size: i64) -> Result<u64, String> {
        if !names::is_lower_hex(hash, 64) {
            return Err(format!(
                "hash {:?} is not 64 lowercase hex characters",
                truncated(hash)
            ));
        }
        let size = u64::try_from(size).map_err(|_| format!("size {size} is negative"))?;
        if size == 0 && hash != function.empty_hash() {
            return Err("a blob of size 0 must have the hash of the empty blob".into());
        }
        Ok(size)
    }

    /// The empty blob: always present, never stored.
    pub(crate) fn is_empty_blob(&self) -> bool {
        self.size == 0
    }

    /// Where the blob lives in `project`.
    pub(crate) fn cas_key(&self, project: &str) -> ArtifactKey {
        ArtifactKey::new(project, self.function.cas_kind(), self.hash.clone())
    }

    /// Where an action result keyed by this (action) digest lives in `project`. SHA-256 keys
    /// are the Bazel HTTP `/ac/` keys; BLAKE3 ones carry a prefix so the two never collide.
    pub(crate) fn action_key(&self, project: &str) -> ArtifactKey {
        let key = match self.function {
            HashFunction::Sha256 => self.hash.clone(),
            HashFunction::Blake3 => format!("blake3:{}", self.hash),
        };
        ArtifactKey::new(project, Kind::ActionCache, key)
    }

    /// Whether `staged` holds exactly the bytes this digest names.
    pub(crate) fn matches(&self, staged: &StagedBody) -> bool {
        let mut expected = [0u8; 32];
        if staged.size != self.size || hex::decode_to_slice(&self.hash, &mut expected).is_err() {
            return false;
        }
        match self.function {
            HashFunction::Sha256 => staged.sha256 == Some(expected),
            HashFunction::Blake3 => staged.blake3 == expected,
        }
    }

    pub(crate) fn to_proto(&self) -> Digest {
        Digest {
            hash: self.hash.clone(),
            size_bytes: self.size as i64,
        }
    }
}

/// At most 80 characters of client input, for error messages.
pub(crate) fn truncated(text: &str) -> &str {
    match text.char_indices().nth(80) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn unset_digest_function_is_sha256_and_others_are_refused() {
        assert_eq!(HashFunction::from_field(0).unwrap(), HashFunction::Sha256);
        assert_eq!(HashFunction::from_field(1).unwrap(), HashFunction::Sha256);
        assert_eq!(HashFunction::from_field(9).unwrap(), HashFunction::Blake3);
        for refused in [2, 3, 4, 5, 6, 7, 8, 10, -1] {
            let status = HashFunction::from_field(refused).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn empty_hashes_are_the_hashes_of_no_bytes() {
        for function in HashFunction::ALL {
            assert_eq!(function.hash_hex(b""), function.empty_hash());
            assert!(BlobDigest::parse(function, function.empty_hash(), 0).is_ok());
            let other = function.hash_hex(b"x");
            assert!(BlobDigest::parse(function, &other, 0).is_err());
        }
    }

    #[test]
    fn malformed_digests_say_what_is_wrong() {
        let hash = HashFunction::Sha256.hash_hex(b"x");
        assert!(
            BlobDigest::parse(HashFunction::Sha256, &hash, -1)
                .unwrap_err()
                .contains("negative")
        );
        let upper = hash.to_uppercase();
        assert!(BlobDigest::parse(HashFunction::Sha256, &upper, 1).is_err());
        assert!(BlobDigest::parse(HashFunction::Sha256, &hash[..40], 1).is_err());
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_digests_never_panics(hash in ".{0,100}", size in any::<i64>()) {
            for function in HashFunction::ALL {
                let _ = BlobDigest::parse(function, &hash, size);
            }
        }

        #[test]
        fn hex_digests_parse_to_themselves(bytes in proptest::collection::vec(any::<u8>(), 1..64)) {
            for function in HashFunction::ALL {
                let hash = function.hash_hex(&bytes);
                let digest = BlobDigest::parse(function, &hash, bytes.len() as i64).unwrap();
                prop_assert_eq!(digest.hash, hash);
                prop_assert_eq!(digest.size, bytes.len() as u64);
            }
        }
    }
}
