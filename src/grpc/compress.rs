//! zstd for `compressed-blobs` and the batch calls. Digests always name the uncompressed bytes,
//! so compressed input is decoded (bounded by the size its digest names) and verified like any
//! other; compressed output is encoded on the fly from the verified stored bytes.
//!
//! Both directions work in bounded pieces: a small compressed message that expands to
//! gigabytes is decoded one buffer at a time and refused once it passes the expected size.

use std::io;

use bytes::Bytes;
use zstd::stream::raw::{DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// zstd level of what the node sends: fast, since the bytes go out as they are read.
const LEVEL: i32 = 1;
/// Output produced per step.
const PIECE: usize = 256 * 1024;
/// The largest window (as a power of two) a compressed upload may use: 8 MiB, the most zstd's
/// levels up to 19 use (Bazel's default level 3 uses 2 MiB; only the ultra levels and long
/// mode go further). A decoder holds its frame's window in memory, and zstd's own limit is
/// 128 MiB: a few kilobytes of a crafted frame could otherwise hold that much per stream.
const WINDOW_LOG_MAX: u32 = 23;

/// What one decoder of a compressed upload may hold beside its output: its window and a block.
/// A frame whose header names no content size has the decoder allocate its whole window however
/// small the blob, and honest streaming compressors write such frames (2 MiB at zstd's level
/// 3), so the lease counts the most a frame may ask for, not the blob's size.
pub(crate) const DECODER_FOOTPRINT: u64 = (1 << WINDOW_LOG_MAX) + (128 << 10);

/// Compresses a whole small buffer (a batch item).
pub(crate) fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    zstd::bulk::compress(data, LEVEL)
}

/// Decompresses a whole small buffer that must expand to exactly `size` bytes.
pub(crate) fn decompress_exact(data: &[u8], size: u64) -> io::Result<Vec<u8>> {
    let capacity = usize::try_from(size).map_err(io::Error::other)?;
    let out = zstd::bulk::Decompressor::new()?.decompress(data, capacity)?;
    if out.len() as u64 != size {
        return Err(io::Error::other(format!(
            "decompressed to {} bytes, the digest says {size}",
            out.len()
        )));
    }
    Ok(out)
}

/// Compresses a stream of chunks into one zstd frame.
pub(crate) struct StreamEncoder {
    raw: Encoder<'static>,
    scratch: Vec<u8>,
}

impl StreamEncoder {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(StreamEncoder {
            raw: Encoder::new(LEVEL)?,
            scratch: vec![0; PIECE],
        })
    }

    /// Compresses `input`; returns what the encoder let out (often nothing for small input).
    pub(crate) fn push(&mut self, input: &[u8]) -> io::Result<Bytes> {
        let mut produced = Vec::new();
        let mut source = InBuffer::around(input);
        while source.pos() < input.len() {
            let mut out = OutBuffer::around(&mut self.scratch[..]);
            self.raw.run(&mut source, &mut out)?;
            let written = out.pos();
            produced.extend_from_slice(&self.scratch[..written]);
        }
        Ok(Bytes::from(produced))
    }

    /// Ends the frame; returns its last bytes.
    pub(crate) fn finish(&mut self) -> io::Result<Bytes> {
        let mut produced = Vec::new();
        loop {
            let mut out = OutBuffer::around(&mut self.scratch[..]);
            let remaining = self.raw.finish(&mut out, true)?;
            let written = out.pos();
            produced.extend_from_slice(&self.scratch[..written]);
            if remaining == 0 {
                return Ok(Bytes::from(produced));
            }
        }
    }
}

/// Decompresses a stream fed one message at a time, handing out at most [`PIECE`] bytes per
/// step and refusing to produce more than `limit` bytes in total.
pub(crate) struct StreamDecoder {
    raw: Decoder<'static>,
    scratch: Vec<u8>,
    input: Bytes,
    consumed: usize,
    produced: u64,
    limit: u64,
    /// The last step ended a frame (zstd's hint was 0): the stream may end here.
    at_frame_end: bool,
}

impl StreamDecoder {
    pub(crate) fn new(limit: u64) -> io::Result<Self> {
        let mut raw = Decoder::new()?;
        raw.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
        Ok(StreamDecoder {
            raw,
            scratch: vec![0; PIECE],
            input: Bytes::new(),
            consumed: 0,
            produced: 0,
            limit,
            at_frame_end: false,
        })
    }

    /// Hands over the next compressed message; call once [`StreamDecoder::next`] said `None`.
    pub(crate) fn feed(&mut self, input: Bytes) {
        self.input = input;
        self.consumed = 0;
    }

    /// The next piece of decompressed output, or `None` once everything fed is decoded.
    pub(crate) fn next(&mut self) -> io::Result<Option<Bytes>> {
        let mut source = InBuffer::around(&self.input[self.consumed..]);
        let mut out = OutBuffer::around(&mut self.scratch[..]);
        let hint = self.raw.run(&mut source, &mut out)?;
        let written = out.pos();
        self.consumed += source.pos();
        if written == 0 && source.pos() == 0 {
            return Ok(None);
        }
        self.at_frame_end = hint == 0;
        self.produced += written as u64;
        if self.produced > self.limit {
            return Err(io::Error::other(format!(
                "the compressed data expands past the {} bytes its digest names",
                self.limit
            )));
        }
        Ok(Some(Bytes::copy_from_slice(&self.scratch[..written])))
    }

    /// Whether the input so far ends with a complete frame.
    pub(crate) fn complete(&self) -> bool {
        self.at_frame_end && self.consumed == self.input.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame that asks for a window past [`WINDOW_LOG_MAX`] is refused before its window is
    /// allocated; one within it decodes.
    #[test]
    fn a_frame_asking_for_a_window_past_the_limit_is_refused() {
        let frame = |window_log: u32| {
            let mut encoder = Encoder::new(3).unwrap();
            encoder
                .set_parameter(zstd::stream::raw::CParameter::WindowLog(window_log))
                .unwrap();
            let data = vec![7u8; 1000];
            let mut out = vec![0; 4096];
            let mut output = OutBuffer::around(&mut out[..]);
            encoder
                .run(&mut InBuffer::around(&data), &mut output)
                .unwrap();
            encoder.finish(&mut output, true).unwrap();
            let written = output.pos();
            out.truncate(written);
            out
        };
        let mut decoder = StreamDecoder::new(1000).unwrap();
        let error = decode_all(&mut decoder, &[&frame(27)]).unwrap_err();
        assert!(error.to_string().contains("memory"), "{error}");
        let mut decoder = StreamDecoder::new(1000).unwrap();
        assert_eq!(
            decode_all(&mut decoder, &[&frame(WINDOW_LOG_MAX)]).unwrap(),
            vec![7u8; 1000]
        );
    }

    fn decode_all(decoder: &mut StreamDecoder, pieces: &[&[u8]]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for piece in pieces {
            decoder.feed(Bytes::copy_from_slice(piece));
            while let Some(bytes) = decoder.next()? {
                out.extend_from_slice(&bytes);
            }
        }
        Ok(out)
    }

    #[test]
    fn streamed_frames_round_trip_through_any_split() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut encoder = StreamEncoder::new().unwrap();
        let mut compressed = Vec::new();
        for chunk in data.chunks(100_000) {
            compressed.extend_from_slice(&encoder.push(chunk).unwrap());
        }
        compressed.extend_from_slice(&encoder.finish().unwrap());
        assert_eq!(
            decompress_exact(&compressed, data.len() as u64).unwrap(),
            data
        );

        let mut decoder = StreamDecoder::new(data.len() as u64).unwrap();
        let pieces: Vec<&[u8]> = compressed.chunks(777).collect();
        assert_eq!(decode_all(&mut decoder, &pieces).unwrap(), data);
        assert!(decoder.complete());
    }

    #[test]
    fn a_bomb_is_refused_once_it_passes_the_expected_size() {
        let zeros = vec![0u8; 64 << 20];
        let compressed = compress(&zeros).unwrap();
        assert!(compressed.len() < 64 << 10);
        let mut decoder = StreamDecoder::new(1 << 20).unwrap();
        assert!(decode_all(&mut decoder, &[&compressed]).is_err());
        assert!(decompress_exact(&compressed, 1 << 20).is_err());
    }

    #[test]
    fn a_truncated_stream_is_not_complete() {
        let compressed = compress(&[7u8; 100_000]).unwrap();
        let mut decoder = StreamDecoder::new(100_000).unwrap();
        let cut = &compressed[..compressed.len() - 3];
        let _ = decode_all(&mut decoder, &[cut]);
        assert!(!decoder.complete());
    }
}
