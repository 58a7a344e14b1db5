//! The peer plane's body format: a stream of frames, each an [`Entry`] and, for an upsert, the
//! artifact's bytes.
//!
//! ```text
//! frame := header_len (u32, big-endian) ++ header (postcard Entry) ++ body (Entry::Upsert.size bytes)
//! ```
//!
//! One format for both write endpoints: a batch of small artifacts is many frames in one
//! request, a large artifact is one frame whose body streams from disk to disk. Neither side
//! ever holds more than a header and one chunk of a body: the reader hands bodies out piece by
//! piece as they arrive.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::storage::{ArtifactInfo, ArtifactKey};

/// Largest header accepted: a key (512 bytes), a project, a content type and fixed fields fit
/// many times over.
pub const MAX_HEADER: usize = 16 << 10;

/// What one frame carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// An artifact version; `size` bytes of body follow the header.
    Upsert {
        /// `Kind::as_str` of the artifact's kind.
        kind: String,
        project: String,
        key: String,
        size: u64,
        blake3: [u8; 32],
        sha256: Option<[u8; 32]>,
        content_type: Option<String>,
        version_ms: u64,
        /// The node the write was made on.
        origin: String,
    },
    /// A project clean made at `version_ms` on `origin`.
    DeleteProject {
        project: String,
        version_ms: u64,
        origin: String,
    },
}

impl Entry {
    /// The upsert of `key` at the version `info` describes, written on `origin`.
    pub fn upsert(key: &ArtifactKey, info: &ArtifactInfo, origin: String) -> Entry {
        Entry::Upsert {
            kind: key.kind.as_str().to_owned(),
            project: key.project.clone(),
            key: key.key.clone(),
            size: info.size,
            blake3: info.blake3,
            sha256: info.sha256,
            content_type: info.content_type.clone(),
            version_ms: info.version_ms,
            origin,
        }
    }

    /// Bytes of body that follow the header.
    pub fn body_len(&self) -> u64 {
        match self {
            Entry::Upsert { size, .. } => *size,
            Entry::DeleteProject { .. } => 0,
        }
    }

    /// The frame's header: length prefix and encoded entry.
    pub fn encode_header(&self) -> Bytes {
        let encoded = postcard::to_allocvec(self).unwrap_or_default();
        let mut out = BytesMut::with_capacity(4 + encoded.len());
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
        out.freeze()
    }
}

/// Why a frame stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the body ended inside a frame")]
    Truncated,
    #[error("a frame header of {0} bytes is over the {MAX_HEADER}-byte limit")]
    HeaderTooLarge(usize),
    #[error("a frame header could not be decoded")]
    BadHeader,
    #[error("reading the body failed: {0}")]
    Body(String),
}

/// Reads frames from a body stream, one header and one body piece at a time.
pub struct FrameReader<S> {
    stream: S,
    /// Bytes received and not yet handed out.
    pending: Bytes,
    /// Body bytes of the current frame not yet handed out.
    remaining: u64,
}

impl<S, E> FrameReader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(stream: S) -> Self {
        FrameReader {
            stream,
            pending: Bytes::new(),
            remaining: 0,
        }
    }

    /// The next frame's entry, `None` at the clean end of the stream. The previous frame's body
    /// must have been read whole.
    pub async fn next_entry(&mut self) -> Result<Option<Entry>, WireError> {
        debug_assert_eq!(self.remaining, 0, "previous body not consumed");
        if self.pending.is_empty() && !self.fill().await? {
            return Ok(None);
        }
        let prefix = self.take_exact(4).await?;
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_HEADER {
            return Err(WireError::HeaderTooLarge(len));
        }
        let header = self.take_exact(len).await?;
        let entry: Entry = postcard::from_bytes(&header).map_err(|_| WireError::BadHeader)?;
        self.remaining = entry.body_len();
        Ok(Some(entry))
    }

    /// The next piece of the current frame's body; `None` once it is all read.
    pub async fn body_chunk(&mut self) -> Result<Option<Bytes>, WireError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        if self.pending.is_empty() && !self.fill().await? {
            return Err(WireError::Truncated);
        }
        let take = self.pending.len().min(self.remaining as usize);
        self.remaining -= take as u64;
        Ok(Some(self.pending.split_to(take)))
    }

    /// Reads the next chunk of the stream into `pending`; `false` at its end.
    async fn fill(&mut self) -> Result<bool, WireError> {
        loop {
            match self.stream.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    self.pending = chunk;
                    return Ok(true);
                }
                Some(Err(error)) => return Err(WireError::Body(error.to_string())),
                None => return Ok(false),
            }
        }
    }

    /// Exactly `len` bytes, across chunks if need be.
    async fn take_exact(&mut self, len: usize) -> Result<Bytes, WireError> {
        if self.pending.len() >= len {
            return Ok(self.pending.split_to(len));
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            if self.pending.is_empty() && !self.fill().await? {
                return Err(WireError::Truncated);
            }
            let take = self.pending.len().min(len - out.len());
            out.extend_from_slice(&self.pending[..take]);
            self.pending.advance(take);
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn upsert(size: u64) -> Entry {
        Entry::Upsert {
            kind: "gradle".into(),
            project: "ios".into(),
            key: "k".into(),
            size,
            blake3: [7; 32],
            sha256: None,
            content_type: Some("application/octet-stream".into()),
            version_ms: 42,
            origin: "node-a".into(),
        }
    }

    /// Frames (entries and bodies) encoded into one buffer.
    fn encode(frames: &[(Entry, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (entry, body) in frames {
            out.extend_from_slice(&entry.encode_header());
            out.extend_from_slice(body);
        }
        out
    }

    /// Everything a reader yields from `bytes` cut into pieces of `piece` bytes.
    fn decode(bytes: &[u8], piece: usize) -> Result<Vec<(Entry, Vec<u8>)>, WireError> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(piece.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut reader = FrameReader::new(futures_util::stream::iter(chunks));
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| WireError::Body(e.to_string()))?
            .block_on(async {
                let mut frames = Vec::new();
                while let Some(entry) = reader.next_entry().await? {
                    let mut body = Vec::new();
                    while let Some(chunk) = reader.body_chunk().await? {
                        body.extend_from_slice(&chunk);
                    }
                    frames.push((entry, body));
                }
                Ok(frames)
            })
    }

    proptest! {
        #[test]
        fn frames_survive_any_chunking(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            piece in 1usize..64,
        ) {
            let mut frames: Vec<(Entry, Vec<u8>)> = bodies
                .into_iter()
                .map(|body| (upsert(body.len() as u64), body))
                .collect();
            frames.push((
                Entry::DeleteProject { project: "ios".into(), version_ms: 9, origin: "a".into() },
                Vec::new(),
            ));
            let decoded = decode(&encode(&frames), piece).unwrap();
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn a_cut_stream_is_truncated_never_a_shorter_body(cut in 0usize..40) {
            let frames = vec![(upsert(20), vec![1u8; 20])];
            let bytes = encode(&frames);
            let cut = cut.min(bytes.len() - 1).max(1);
            let result = decode(&bytes[..cut], 7);
            prop_assert!(result.is_err(), "a stream cut at {} decoded", cut);
        }
    }

    #[test]
    fn an_oversized_header_is_refused_before_it_is_read() {
        let mut bytes = ((MAX_HEADER + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode(&bytes, 64),
            Err(WireError::HeaderTooLarge(_))
        ));
    }

    #[test]
    fn garbage_is_a_bad_header() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(decode(&bytes, 64), Err(WireError::BadHeader)));
    }
}
