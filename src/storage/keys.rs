//! Artifact addressing: which project, which kind of cache, which key.
//!
//! One key type serves every protocol surface: Gradle entries, Xcode CAS blobs, REAPI blobs and
//! the rest differ only in their [`Kind`]. The account is not part of the key because a node
//! serves exactly one account.

use std::fmt;

/// The cache a key belongs to. The same key under two kinds is two artifacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Gradle,
    XcodeCas,
    KeyValue,
    Module,
    Nx,
    Metro,
    /// Action cache entries (Bazel HTTP `/ac/` and REAPI `ActionCache`).
    ActionCache,
    /// Content-addressed blobs keyed by SHA-256 (Bazel HTTP `/cas/` and REAPI SHA-256).
    CasSha256,
    /// Content-addressed blobs keyed by BLAKE3 (REAPI with `digest_function = BLAKE3`).
    CasBlake3,
}

impl Kind {
    /// Every kind, for metrics registration and exhaustive tests.
    pub const ALL: [Kind; 9] = [
        Kind::Gradle,
        Kind::XcodeCas,
        Kind::KeyValue,
        Kind::Module,
        Kind::Nx,
        Kind::Metro,
        Kind::ActionCache,
        Kind::CasSha256,
        Kind::CasBlake3,
    ];

    /// Stable name: used in the on-disk key encoding and as a metrics label, so never rename one.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gradle => "gradle",
            Kind::XcodeCas => "cas",
            Kind::KeyValue => "keyvalue",
            Kind::Module => "module",
            Kind::Nx => "nx",
            Kind::Metro => "metro",
            Kind::ActionCache => "ac",
            Kind::CasSha256 => "cas-sha256",
            Kind::CasBlake3 => "cas-blake3",
        }
    }

    fn from_str(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The full address of one artifact on this node.
///
/// `project` is empty for account-scoped artifacts. Neither `project` nor `key` may contain NUL:
/// the HTTP and gRPC layers validate keys before building one of these.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ArtifactKey {
    pub project: String,
    pub kind: Kind,
    pub key: String,
}

impl ArtifactKey {
    pub fn new(project: impl Into<String>, kind: Kind, key: impl Into<String>) -> Self {
        ArtifactKey {
            project: project.into(),
            kind,
            key: key.into(),
        }
    }

    /// [`ArtifactKey::new`] of parts from outside this node's validation (a peer's log, a
    /// stored key): `None` when the project or the key contains NUL, which would make two
    /// different keys encode alike.
    pub fn new_checked(project: &str, kind: Kind, key: &str) -> Option<ArtifactKey> {
        (!project.contains('\0') && !key.contains('\0'))
            .then(|| ArtifactKey::new(project, kind, key))
    }

    /// Encoding used as the RocksDB key: `project \0 kind \0 key`. Project first, so deleting a
    /// project is one prefix range.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// [`ArtifactKey::encode`] appended to `out`: many keys share one buffer.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        ArtifactKey::encode_parts_into(&self.project, self.kind, &self.key, out);
    }

    /// [`ArtifactKey::encode_into`] of a key given by its parts (no `ArtifactKey` built).
    pub(crate) fn encode_parts_into(project: &str, kind: Kind, key: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(project.as_bytes());
        out.push(0);
        out.extend_from_slice(kind.as_str().as_bytes());
        out.push(0);
        out.extend_from_slice(key.as_bytes());
    }

    /// Length of [`ArtifactKey::encode`].
    pub(crate) fn encoded_len(&self) -> usize {
        self.project.len() + self.kind.as_str().len() + self.key.len() + 2
    }

    /// Inverse of [`ArtifactKey::encode`]; `None` for bytes this version did not write.
    pub fn decode(bytes: &[u8]) -> Option<ArtifactKey> {
        let mut parts = bytes.splitn(3, |b| *b == 0);
        let project = std::str::from_utf8(parts.next()?).ok()?;
        let kind = Kind::from_str(std::str::from_utf8(parts.next()?).ok()?)?;
        let key = std::str::from_utf8(parts.next()?).ok()?;
        ArtifactKey::new_checked(project, kind, key)
    }
}

/// The RocksDB key prefix shared by every artifact of `project`.
pub fn project_prefix(project: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(project.len() + 64);
    out.extend_from_slice(project.as_bytes());
    out.push(0);
    out
}

/// The project of an encoded key, without decoding the rest.
pub fn project_of(encoded: &[u8]) -> Option<&str> {
    let end = encoded.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&encoded[..end]).ok()
}

impl fmt::Display for ArtifactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.project, self.kind, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_for_every_kind() {
        for kind in Kind::ALL {
            let key = ArtifactKey::new("ios", kind, "a:b=c");
            assert_eq!(ArtifactKey::decode(&key.encode()), Some(key));
        }
        let account_scoped = ArtifactKey::new("", Kind::Gradle, "k");
        assert_eq!(
            ArtifactKey::decode(&account_scoped.encode()),
            Some(account_scoped)
        );
    }

    #[test]
    fn keys_from_outside_with_a_nul_are_refused() {
        assert!(ArtifactKey::new_checked("p", Kind::CasSha256, "a\0b").is_none());
        assert!(ArtifactKey::new_checked("p\0q", Kind::Gradle, "k").is_none());
        assert!(ArtifactKey::decode(b"p\0gradle\0k\0more").is_none());
        assert_eq!(
            ArtifactKey::decode(b"p\0gradle\0k"),
            Some(ArtifactKey::new("p", Kind::Gradle, "k"))
        );
    }

    #[test]
    fn project_prefix_does_not_match_a_longer_project() {
        let key = ArtifactKey::new("ios-app", Kind::Gradle, "k").encode();
        assert!(!key.starts_with(&project_prefix("ios")));
        assert!(key.starts_with(&project_prefix("ios-app")));
        assert_eq!(project_of(&key), Some("ios-app"));
    }
}
