//! ByteStream resource names, as REAPI defines them:
//!
//! - read:  `{instance}/blobs/[blake3/]{hash}/{size}` and
//!   `{instance}/compressed-blobs/zstd/[blake3/]{hash}/{size}`;
//! - write: `{instance}/uploads/{uuid}/` followed by the same, then optional metadata segments
//!   (ignored).
//!
//! The instance (empty, or one segment) is the project. Nothing here trusts its input: every
//! segment is checked and every fault is an `INVALID_ARGUMENT` that says what is wrong.

use tonic::Status;

use super::digest::{BlobDigest, HashFunction, truncated};
use crate::names;

/// The project an empty instance name means.
pub(crate) const DEFAULT_PROJECT: &str = "default";

/// A blob named for reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlobName {
    pub project: String,
    pub digest: BlobDigest,
    /// `compressed-blobs/zstd`: the bytes travel zstd-compressed.
    pub compressed: bool,
}

/// A blob named for writing: the blob, and the client's upload id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UploadName {
    pub blob: BlobName,
    pub upload_id: String,
}

impl UploadName {
    /// The name the store keeps a resumable upload under: everything that identifies it, and
    /// nothing the client may vary between attempts (the ignored metadata segments).
    pub(crate) fn staging_name(&self) -> String {
        let function = match self.blob.digest.function {
            HashFunction::Sha256 => "sha256",
            HashFunction::Blake3 => "blake3",
        };
        format!(
            "reapi\0{}\0{}\0{}\0{}\0{}\0{}",
            self.blob.project,
            self.upload_id,
            function,
            self.blob.digest.hash,
            self.blob.digest.size,
            self.blob.compressed
        )
    }
}

/// The project an instance name names: empty means [`DEFAULT_PROJECT`].
pub(crate) fn project_of_instance(instance: &str) -> Result<String, Status> {
    if instance.is_empty() {
        return Ok(DEFAULT_PROJECT.to_string());
    }
    names::normalize_handle(instance).ok_or_else(|| {
        Status::invalid_argument(format!(
            "instance name {:?} is not a project: use 1-128 characters of a-z, 0-9, '.', '_' or '-' (or leave it empty for {DEFAULT_PROJECT:?})",
            truncated(instance)
        ))
    })
}

/// Parses a `Read` resource name.
pub(crate) fn parse_read(name: &str) -> Result<BlobName, Status> {
    let segments: Vec<&str> = name.split('/').collect();
    let is_blobs = |at: usize| matches!(segments.get(at), Some(&("blobs" | "compressed-blobs")));
    let at = keyword_at(&segments, is_blobs)
        .ok_or_else(|| bad(name, "expected {instance}/blobs/{hash}/{size}"))?;
    let (blob, rest) = parse_blob(name, &segments[..at], &segments[at..])?;
    if !rest.is_empty() {
        return Err(bad(name, "unexpected segments after the size"));
    }
    Ok(blob)
}

/// Parses a `Write` (or `QueryWriteStatus`) resource name.
pub(crate) fn parse_write(name: &str) -> Result<UploadName, Status> {
    let segments: Vec<&str> = name.split('/').collect();
    // `uploads/{uuid}/[compressed-]blobs`: a project or an upload id may itself be "uploads".
    let is_upload = |at: usize| {
        segments.get(at) == Some(&"uploads")
            && matches!(segments.get(at + 2), Some(&("blobs" | "compressed-blobs")))
    };
    let at = keyword_at(&segments, is_upload)
        .or_else(|| segments.iter().position(|s| *s == "uploads"))
        .ok_or_else(|| {
            bad(
                name,
                "expected {instance}/uploads/{uuid}/blobs/{hash}/{size}",
            )
        })?;
    let upload_id = *segments
        .get(at + 1)
        .ok_or_else(|| bad(name, "the upload id is missing"))?;
    if !names::valid_key(upload_id) || upload_id.len() > 128 {
        return Err(bad(
            name,
            "the upload id must be 1-128 characters of [A-Za-z0-9._:+=-]",
        ));
    }
    // Anything after the size is metadata the client may attach; it is ignored.
    let (blob, _metadata) = parse_blob(name, &segments[..at], &segments[at + 2..])?;
    Ok(UploadName {
        blob,
        upload_id: upload_id.to_string(),
    })
}

/// Where the instance name ends: the keyword after a one-segment instance (a project may be
/// named like a keyword, "blobs" or "uploads"), else the keyword starting the name (the empty
/// instance), else the first segment that matches anywhere, so that a multi-segment instance is
/// refused as "not a project" rather than as a malformed name.
fn keyword_at(segments: &[&str], is_keyword: impl Fn(usize) -> bool) -> Option<usize> {
    [1, 0]
        .into_iter()
        .chain(2..segments.len())
        .find(|&at| is_keyword(at))
}

/// `instance` and `[compressed-]blobs/...`; returns the segments after the size.
fn parse_blob<'a>(
    name: &str,
    instance: &[&str],
    blob: &'a [&'a str],
) -> Result<(BlobName, &'a [&'a str]), Status> {
    let project = project_of_instance(&instance.join("/"))?;
    let mut rest = blob;
    let compressed = match rest.first() {
        Some(&"blobs") => {
            rest = &rest[1..];
            false
        }
        Some(&"compressed-blobs") => {
            match rest.get(1) {
                Some(&"zstd") => {}
                Some(other) => {
                    return Err(bad(
                        name,
                        &format!(
                            "compressor {:?} is not supported; use zstd",
                            truncated(other)
                        ),
                    ));
                }
                None => return Err(bad(name, "the compressor is missing")),
            }
            rest = &rest[2..];
            true
        }
        _ => return Err(bad(name, "expected blobs/ or compressed-blobs/zstd/")),
    };
    let function = match rest.first() {
        Some(&"blake3") => {
            rest = &rest[1..];
            HashFunction::Blake3
        }
        Some(segment) if !names::is_lower_hex(segment, 64) && segment.len() < 64 => {
            return Err(bad(
                name,
                &format!(
                    "digest function {:?} is not supported; use SHA-256 (no segment) or blake3",
                    truncated(segment)
                ),
            ));
        }
        _ => HashFunction::Sha256,
    };
    let (Some(hash), Some(size)) = (rest.first(), rest.get(1)) else {
        return Err(bad(name, "expected {hash}/{size}"));
    };
    let size: i64 = size
        .parse()
        .map_err(|_| bad(name, "the size is not a decimal number"))?;
    let digest = BlobDigest::parse(function, hash, size).map_err(|fault| bad(name, &fault))?;
    Ok((
        BlobName {
            project,
            digest,
            compressed,
        },
        &rest[2..],
    ))
}

fn bad(name: &str, why: &str) -> Status {
    Status::invalid_argument(format!("bad resource name {:?}: {why}", truncated(name)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sha(bytes: &[u8]) -> String {
        HashFunction::Sha256.hash_hex(bytes)
    }

    #[test]
    fn read_names_of_every_form_parse() {
        let hash = sha(b"abc");
        let plain = parse_read(&format!("ios/blobs/{hash}/3")).unwrap();
        assert_eq!(plain.project, "ios");
        assert_eq!(plain.digest.function, HashFunction::Sha256);
        assert!(!plain.compressed);
        let unnamed = parse_read(&format!("blobs/{hash}/3")).unwrap();
        assert_eq!(unnamed.project, DEFAULT_PROJECT);
        let b3 = HashFunction::Blake3.hash_hex(b"abc");
        let blake = parse_read(&format!("ios/compressed-blobs/zstd/blake3/{b3}/3")).unwrap();
        assert_eq!(blake.digest.function, HashFunction::Blake3);
        assert!(blake.compressed);
    }

    #[test]
    fn write_names_ignore_trailing_metadata_but_not_a_bad_upload_id() {
        let hash = sha(b"abc");
        let name = format!("ios/uploads/7f1c-2a/blobs/{hash}/3/some/metadata");
        let upload = parse_write(&name).unwrap();
        assert_eq!(upload.upload_id, "7f1c-2a");
        assert_eq!(upload.blob.digest.size, 3);
        let without = parse_write(&format!("ios/uploads/7f1c-2a/blobs/{hash}/3")).unwrap();
        assert_eq!(upload.staging_name(), without.staging_name());
        assert!(parse_write(&format!("ios/uploads/../blobs/{hash}/3")).is_err());
        assert!(parse_write(&format!("ios/uploads//blobs/{hash}/3")).is_err());
    }

    #[test]
    fn projects_and_upload_ids_named_like_keywords_parse() {
        let hash = sha(b"abc");
        for project in ["blobs", "compressed-blobs", "uploads"] {
            let read = parse_read(&format!("{project}/blobs/{hash}/3")).unwrap();
            assert_eq!(read.project, project);
            let zstd = parse_read(&format!("{project}/compressed-blobs/zstd/{hash}/3")).unwrap();
            assert_eq!((zstd.project.as_str(), zstd.compressed), (project, true));
            let write = parse_write(&format!("{project}/uploads/u1/blobs/{hash}/3")).unwrap();
            assert_eq!(
                (write.blob.project.as_str(), write.upload_id.as_str()),
                (project, "u1")
            );
        }
        let id = parse_write(&format!("uploads/uploads/blobs/{hash}/3")).unwrap();
        assert_eq!(
            (id.blob.project.as_str(), id.upload_id.as_str()),
            (DEFAULT_PROJECT, "uploads")
        );
        let both = parse_write(&format!("uploads/uploads/uploads/blobs/{hash}/3")).unwrap();
        assert_eq!(
            (both.blob.project.as_str(), both.upload_id.as_str()),
            ("uploads", "uploads")
        );
    }

    #[test]
    fn malformed_names_are_invalid_arguments() {
        let hash = sha(b"abc");
        for name in [
            String::new(),
            "blobs".into(),
            format!("ios/blobs/{hash}"),
            format!("ios/blobs/{hash}/x"),
            format!("ios/blobs/{hash}/-3"),
            format!("ios/blobs/{}/3", hash.to_uppercase()),
            format!("ios/blobs/md5/{hash}/3"),
            format!("ios/compressed-blobs/gzip/{hash}/3"),
            format!("Not A Project!/blobs/{hash}/3"),
            format!("a/b/blobs/{hash}/3"),
            format!("ios/blobs/{hash}/3/extra"),
        ] {
            let status = parse_read(&name).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
        }
    }

    #[test]
    fn a_64_hex_hash_never_means_blake3() {
        let b3 = HashFunction::Blake3.hash_hex(b"abc");
        let parsed = parse_read(&format!("ios/blobs/{b3}/3")).unwrap();
        assert_eq!(parsed.digest.function, HashFunction::Sha256);
    }

    proptest! {
        #[test]
        fn arbitrary_names_never_panic(name in "\\PC{0,200}") {
            let _ = parse_read(&name);
            let _ = parse_write(&name);
        }

        #[test]
        fn arbitrary_segments_never_panic(segments in proptest::collection::vec(
            prop_oneof![
                Just("blobs".to_string()), Just("uploads".to_string()),
                Just("compressed-blobs".to_string()), Just("zstd".to_string()),
                Just("blake3".to_string()), "[0-9a-f]{64}", "[0-9]{1,20}", "\\PC{0,10}",
            ], 0..10)) {
            let name = segments.join("/");
            let _ = parse_read(&name);
            let _ = parse_write(&name);
        }
    }
}
