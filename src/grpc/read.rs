//! `ByteStream.Read` answered without copying a blob's bytes.
//!
//! tonic encodes every response message into its own buffer: for a `ReadResponse`, a copy of
//! each chunk of the blob, which was a fifth of the node's CPU when serving 128 KiB blobs
//! (`docs/benchmarks.md`). A `ReadResponse` is a single `bytes` field, so its wire form is a
//! few bytes of framing followed by the chunk as it is: this route sends the framing as one
//! small buffer and the chunk's own `Bytes` behind it, and leaves the rest to tonic. The request
//! is decoded by tonic's decoder, the call is [`ByteStreamService`]'s own `read` (parsing,
//! authorization, the verified body, the memory lease), and its status ends the stream in
//! trailers as tonic would send it. The route shadows the generated server's `Read`; `Write`
//! and `QueryWriteStatus` stay with it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Frame;
use tonic::codec::Streaming;
use tonic::{Code, Status};
use tonic_prost::ProstDecoder;

use super::bytestream::{ByteStreamService, ReadStream};
use super::proto::bytestream::ReadRequest;
use super::proto::bytestream::byte_stream_server::ByteStream;

/// The method's path, as the generated server routes it.
pub(super) const PATH: &str = "/google.bytestream.ByteStream/Read";

/// The tag of `ReadResponse.data`: field 10, length-delimited.
const DATA_TAG: u8 = 10 << 3 | 2;

/// The most a message's field header takes beside its data: the tag, and a length of at most
/// 10 varint bytes, rounded up.
const FIELD_HEADER_MAX: usize = 16;

/// The route's handler; `message_limit` bounds the request and every response message, as the
/// generated servers are bounded.
pub(super) fn route(
    service: ByteStreamService,
    message_limit: usize,
) -> axum::routing::MethodRouter {
    axum::routing::post(move |request: Request<Body>| {
        let service = service.clone();
        async move { answer(&service, request, message_limit).await }
    })
}

async fn answer(
    service: &ByteStreamService,
    request: Request<Body>,
    message_limit: usize,
) -> Response<Body> {
    let response = match decode(request, message_limit).await {
        Ok(request) => service.read(request).await,
        Err(status) => Err(status),
    };
    match response {
        Ok(response) => {
            let (metadata, responses, extensions) = response.into_parts();
            let body = ReadBody::new(responses, message_limit);
            let mut response = Response::new(Body::new(body));
            *response.headers_mut() = metadata.into_headers();
            *response.extensions_mut() = extensions;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// The call's one `ReadRequest`, with its metadata, as tonic hands it to a service.
async fn decode(
    request: Request<Body>,
    message_limit: usize,
) -> Result<tonic::Request<ReadRequest>, Status> {
    // The node accepts no compressed requests (none of its services does), and says which
    // encoding it takes, as tonic does.
    if let Some(encoding) = request.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        let mut status = Status::unimplemented(format!(
            "the request is compressed with {encoding:?}, which this node does not accept"
        ));
        status.metadata_mut().insert(
            "grpc-accept-encoding",
            tonic::metadata::MetadataValue::from_static("identity"),
        );
        return Err(status);
    }
    let (mut parts, body) = request.into_parts();
    let mut messages = Streaming::new_request(
        ProstDecoder::<ReadRequest>::default(),
        body,
        None,
        Some(message_limit),
    );
    // A call without its one message is the client's mistake (tonic says INTERNAL).
    let message = messages
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the call carried no ReadRequest"))?;
    // Read to the end of the request (its END_STREAM often comes in a frame of its own): a
    // body dropped unread would be drained in the background (`listener::RequestBody`).
    // Request trailers, if any, join the metadata, as tonic merges them.
    if let Some(trailers) = messages.trailers().await? {
        parts.headers.extend(trailers.into_headers());
    }
    Ok(tonic::Request::from_http(Request::from_parts(
        parts, message,
    )))
}

/// The response stream as gRPC frames: each chunk's framing, then the chunk itself, then the
/// status in trailers. The framing and the chunk go out as two DATA frames (h2 does not merge
/// a body's frames): 9 bytes more per message of up to 1 MiB, and the listener sends both in
/// one socket write.
struct ReadBody {
    responses: ReadStream,
    /// Data of the current chunk not yet framed.
    rest: Bytes,
    /// Data whose framing went out just before: the next frame.
    framed: Option<Bytes>,
    /// The most data one message carries (the message limit less its framing).
    most_per_message: usize,
    ended: bool,
}

impl ReadBody {
    fn new(responses: ReadStream, message_limit: usize) -> ReadBody {
        ReadBody {
            responses,
            rest: Bytes::new(),
            framed: None,
            most_per_message: message_limit.saturating_sub(FIELD_HEADER_MAX).max(1),
            ended: false,
        }
    }

    /// Frames the next message of the current chunk; its data is sent next.
    fn frame_next(&mut self) -> Bytes {
        let data = self
            .rest
            .split_to(self.rest.len().min(self.most_per_message));
        let framing = framing(data.len());
        self.framed = Some(data);
        framing
    }
}

/// The gRPC message prefix and the field header of a `ReadResponse` carrying `len` bytes of
/// data. An empty chunk is an empty message, as prost encodes it.
fn framing(len: usize) -> Bytes {
    let field_header = match len {
        0 => 0,
        len => 1 + prost::encoding::encoded_len_varint(len as u64),
    };
    let mut out = BytesMut::with_capacity(5 + field_header);
    out.put_u8(0); // not compressed
    out.put_u32((field_header + len) as u32);
    if len > 0 {
        out.put_u8(DATA_TAG);
        prost::encoding::encode_varint(len as u64, &mut out);
    }
    out.freeze()
}

/// The trailers that end a call with `status`.
fn trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message that no header can carry fails; the code alone still goes out.
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    trailers
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.framed.take() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if !this.rest.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(this.frame_next()))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(this.responses.as_mut().poll_next(cx)) {
                Some(Ok(response)) if response.data.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(framing(0)))));
                }
                Some(Ok(response)) => this.rest = response.data,
                Some(Err(status)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
                }
                None => {
                    this.ended = true;
                    let ok = Status::new(Code::Ok, "");
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&ok)))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use http_body_util::BodyExt;
    use prost::Message;

    use super::super::proto::bytestream::ReadResponse;

    /// Everything a body sends: its data, and its trailers.
    async fn collect(
        responses: Vec<Result<ReadResponse, Status>>,
        limit: usize,
    ) -> (Bytes, HeaderMap) {
        let body = ReadBody::new(Box::pin(stream::iter(responses)), limit);
        let collected = body.collect().await.unwrap_or_else(|never| match never {});
        let trailers = collected.trailers().cloned().unwrap_or_default();
        (collected.to_bytes(), trailers)
    }

    /// The messages in gRPC framing, decoded as a client does.
    fn messages(mut wire: Bytes) -> Vec<ReadResponse> {
        let mut out = Vec::new();
        while !wire.is_empty() {
            assert_eq!(wire[0], 0, "never compressed");
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            let message = wire.slice(5..5 + len);
            out.push(ReadResponse::decode(message).unwrap());
            wire = wire.slice(5 + len..);
        }
        out
    }

    fn response(data: &[u8]) -> Result<ReadResponse, Status> {
        Ok(ReadResponse {
            data: Bytes::copy_from_slice(data),
        })
    }

    #[tokio::test]
    async fn chunks_arrive_as_the_messages_prost_would_encode() {
        let large = vec![7u8; 300];
        let (wire, trailers) = collect(vec![response(b"abc"), response(&large)], 1 << 20).await;
        let mut expected = Vec::new();
        for data in [b"abc".as_slice(), &large] {
            let message = ReadResponse {
                data: Bytes::copy_from_slice(data),
            }
            .encode_to_vec();
            expected.push(0);
            expected.extend_from_slice(&(message.len() as u32).to_be_bytes());
            expected.extend_from_slice(&message);
        }
        assert_eq!(wire, expected, "byte for byte what tonic sends");
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn an_empty_chunk_is_an_empty_message() {
        let (wire, _) = collect(vec![response(b"")], 1 << 20).await;
        assert_eq!(wire, Bytes::from_static(&[0, 0, 0, 0, 0]));
        assert_eq!(messages(wire), vec![ReadResponse::default()]);
    }

    #[tokio::test]
    async fn a_chunk_over_the_message_limit_is_split_into_messages_within_it() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (wire, _) = collect(vec![response(&data)], 116).await;
        let received = messages(wire.clone());
        assert_eq!(received.len(), 10, "100 bytes per message");
        let mut rest = wire;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            assert!(len <= 116, "a message of {len} bytes, over the limit");
            rest = rest.slice(5 + len..);
        }
        let joined: Vec<u8> = received.iter().flat_map(|m| m.data.to_vec()).collect();
        assert_eq!(joined, data);
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_with_its_status_after_what_was_sent() {
        let (wire, trailers) = collect(
            vec![
                response(b"verified"),
                Err(Status::data_loss("the body is damaged")),
            ],
            1 << 20,
        )
        .await;
        assert_eq!(messages(wire)[0].data, Bytes::from_static(b"verified"));
        assert_eq!(
            trailers["grpc-status"],
            (Code::DataLoss as i32).to_string().as_str()
        );
        assert_eq!(trailers["grpc-message"], "the%20body%20is%20damaged");
    }

    fn call(headers: &[(&str, &str)], body: Vec<u8>) -> Request<Body> {
        let mut request = Request::post(PATH);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(Body::from(body)).unwrap()
    }

    fn framed(message: &ReadRequest) -> Vec<u8> {
        let encoded = message.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
        out
    }

    #[tokio::test]
    async fn a_request_is_decoded_with_its_metadata() {
        let message = ReadRequest {
            resource_name: "ios/blobs/abc/3".into(),
            read_offset: 1,
            read_limit: 2,
        };
        let request = call(&[("authorization", "Bearer t")], framed(&message));
        let decoded = decode(request, 1 << 20).await.unwrap();
        assert_eq!(decoded.metadata().get("authorization").unwrap(), "Bearer t");
        assert_eq!(decoded.into_inner(), message);
    }

    #[tokio::test]
    async fn a_compressed_request_is_refused_with_the_encoding_the_node_takes() {
        let request = call(
            &[("grpc-encoding", "gzip")],
            framed(&ReadRequest::default()),
        );
        let status = decode(request, 1 << 20).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(
            status.metadata().get("grpc-accept-encoding").unwrap(),
            "identity"
        );
    }

    #[tokio::test]
    async fn a_call_without_its_message_is_invalid() {
        let status = decode(call(&[], Vec::new()), 1 << 20).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_request_over_the_message_limit_is_refused() {
        let message = ReadRequest {
            resource_name: "x".repeat(2000),
            ..ReadRequest::default()
        };
        let status = decode(call(&[], framed(&message)), 1000).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange);
    }
}
