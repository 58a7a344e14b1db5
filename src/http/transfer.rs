//! Moving bodies: receiving an upload into the store, and serving an artifact back with ETag,
//! conditional and range handling. Every surface's handlers are thin wrappers around these two.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::AppState;
use super::error::ApiError;
use super::range::{self, RangeAnswer};
use crate::memory::MemoryLease;
use crate::storage::{
    ArtifactInfo, ArtifactKey, BodyStream, Committed, NewArtifact, Provenance, StagedBody,
    WriteMode,
};

/// Header carrying a client's SHA-256 of an upload (and returned on later reads).
pub const CHECKSUM_HEADER: &str = "tuist-checksum-sha256";
/// [`CHECKSUM_HEADER`] as a ready header name: inserting by `&str` allocates one per response.
static CHECKSUM_HEADER_NAME: http::HeaderName = http::HeaderName::from_static(CHECKSUM_HEADER);

/// What an upload holds in memory at most: the store's write buffer (256 KiB) and one chunk
/// from the network (hyper reads at most 408 KiB at a time).
const UPLOAD_FOOTPRINT: u64 = 672 * 1024;
/// Bodies up to this size are read and verified whole before sending (the store's rule); larger
/// ones stream with two read chunks in hand.
const WHOLE_READ_MAX: u64 = 1 << 20;

/// Leases room for `bytes` from the node's body memory budget, or answers 429.
async fn lease_memory(app: &AppState, bytes: u64) -> Result<MemoryLease, ApiError> {
    app.body_memory.lease(bytes).await.ok_or_else(|| {
        ApiError::overloaded(
            "The node holds as many transfers in memory as it may; retry shortly",
            1,
        )
    })
}

/// Keeps `guard` alive until the last frame of `body` was sent (or the body was dropped).
/// Generic over the body, so a body of bytes in hand is boxed once, not twice.
fn hold_until_sent<B, G>(body: B, guard: G) -> Body
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
    G: crate::layers::BodyGuard + Send + 'static,
{
    Body::new(crate::layers::GuardedBody::new(body, Some(guard)))
}

/// Rejects an upload whose declared length is over `limit` before a byte of it is read.
pub fn check_declared_length(headers: &HeaderMap, limit: u64) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let length: u64 = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| ApiError::bad_request("bad_content_length", "Malformed Content-Length"))?;
    if length > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(Some(length))
}

/// A small body read whole (a JSON request): 413 `too_large` past `limit`, 400
/// `truncated_body` when it ends before its `Content-Length` or the client goes away. The
/// caller checks the declared length first ([`check_declared_length`]), before anything is read.
pub async fn small_body(body: Body, limit: u64) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                ApiError::too_large(limit)
            } else {
                ApiError::truncated_body()
            }
        })
}

/// The client's SHA-256 of the body, if it sent one; 400 `bad_checksum` when malformed.
pub fn client_checksum(headers: &HeaderMap) -> Result<Option<[u8; 32]>, ApiError> {
    headers
        .get(CHECKSUM_HEADER)
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(crate::names::parse_sha256_hex)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_checksum",
                        format!("{CHECKSUM_HEADER} must be 64 lowercase hex characters"),
                    )
                })
        })
        .transpose()
}

/// Streams a request body into staging, hashing it, enforcing `limit` and the checksum header.
/// `sha256_of_body` forces SHA-256 to be computed (content addressed by SHA-256).
pub async fn receive(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    sha256_of_body: bool,
) -> Result<StagedBody, ApiError> {
    let declared = check_declared_length(headers, limit)?;
    let expected = client_checksum(headers)?;
    // Before the body is read: a disk without room for it answers 507 at once.
    app.store.check_room(declared.unwrap_or(0))?;
    let _lease = lease_memory(app, declared.unwrap_or(limit).min(UPLOAD_FOOTPRINT)).await?;
    let mut writer = app
        .store
        .writer(limit, sha256_of_body || expected.is_some());
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        // hyper reports a body cut short of its Content-Length (or a broken chunked body) here.
        let chunk = chunk.map_err(|_| ApiError::truncated_body())?;
        writer.write(&chunk).await?;
    }
    if declared.is_some_and(|length| length != writer.size()) {
        return Err(ApiError::truncated_body());
    }
    Ok(writer.finish(expected).await?)
}

pub async fn commit(
    app: &AppState,
    key: &ArtifactKey,
    staged: StagedBody,
    content_type: Option<String>,
    mode: WriteMode,
) -> Result<Committed, ApiError> {
    let committed = app
        .store
        .commit(
            key,
            staged,
            NewArtifact { content_type },
            mode,
            Provenance::local(&app.store),
        )
        .await?;
    app.counters.written(key.kind, committed.info.size);
    Ok(committed)
}

/// The content type an upload names, if it is one a response header can carry back.
pub fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_owned)
}

/// The content type reads of a surface answer.
#[derive(Clone, Copy)]
pub enum ContentType {
    /// The one the upload named, else this one.
    UploadsOr(&'static str),
    /// Always this one, whatever the upload named (the Xcode CAS, http-api.md).
    Always(&'static str),
}

/// How to answer a read.
pub struct ServeOptions {
    pub content_type: ContentType,
    /// HEAD: headers only, without opening the body.
    pub head: bool,
}

/// Answers GET/HEAD for `key`: 200/206/304/404/416 with ETag, ranges and the checksum header.
///
/// HEAD and a matching `If-None-Match` are answered from metadata alone: a client that holds
/// the bytes of that ETag needs none from disk. Only a body read verifies the body; when it
/// finds it corrupt the artifact is dropped, so HEAD misses from then on too.
pub async fn serve(
    app: &AppState,
    key: &ArtifactKey,
    headers: &HeaderMap,
    options: ServeOptions,
) -> Result<Response, ApiError> {
    let Some(found) = app.store.lookup(key)? else {
        app.counters.miss(key.kind);
        return Err(ApiError::not_found());
    };
    let info = &found.info;
    let mut etag = ETag::of(&info.blake3);
    if unchanged_for(headers, &etag) {
        app.counters.hit(key.kind);
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        set_artifact_headers(response.headers_mut(), info, &etag, options.content_type);
        return Ok(response);
    }
    if options.head {
        app.counters.hit(key.kind);
        let mut response = StatusCode::OK.into_response();
        set_artifact_headers(response.headers_mut(), info, &etag, options.content_type);
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
        return Ok(response);
    }
    let footprint = if info.size <= WHOLE_READ_MAX {
        info.size
    } else {
        2 * crate::storage::bodies::READ_CHUNK as u64
    };
    let lease = lease_memory(app, footprint).await?;
    // The artifact may have been replaced since the metadata above: serve what is read now.
    let stored_blake3 = info.blake3;
    let Some(artifact) = app.store.open_found(key, found).await? else {
        app.counters.miss(key.kind);
        return Err(ApiError::not_found());
    };
    app.counters.hit(key.kind);
    let info = artifact.info.clone();
    if info.blake3 != stored_blake3 {
        etag = ETag::of(&info.blake3);
    }
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // If-Range: honour the range only while the client's validator is still current.
    let range_header = match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        Some(validator) if validator.trim() != etag.as_str() => None,
        _ => range_header,
    };
    let (status, start, end) = match range::answer(range_header, info.size) {
        RangeAnswer::Full => (StatusCode::OK, 0, info.size),
        RangeAnswer::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
        RangeAnswer::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("The artifact is {} bytes long", info.size),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{}", info.size))
                    .unwrap_or(HeaderValue::from_static("bytes */0")),
            );
            return Ok(response);
        }
    };
    app.counters.read(key.kind, end - start);
    let body = match artifact.into_body(start, end) {
        BodyStream::Bytes(bytes) => hold_until_sent(http_body_util::Full::new(bytes), lease),
        BodyStream::Stream(stream) => hold_until_sent(Body::from_stream(stream), lease),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    // Room for every header this answer and the layers add, so the map never grows.
    *response.headers_mut() = HeaderMap::with_capacity(12);
    let response_headers = response.headers_mut();
    set_artifact_headers(response_headers, &info, &etag, options.content_type);
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(value) =
            HeaderValue::from_str(&format!("bytes {}-{}/{}", start, end - 1, info.size))
    {
        response_headers.insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

/// An artifact's entity tag: the hex of its BLAKE3 in quotes, formatted without allocating.
struct ETag([u8; 66]);

impl ETag {
    fn of(blake3: &[u8; 32]) -> ETag {
        let mut tag = [b'"'; 66];
        // 32 bytes always fill the 64 hex digits between the quotes.
        let _ = hex::encode_to_slice(blake3, &mut tag[1..65]);
        ETag(tag)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// 204 for an artifact that exists, with its `ETag` and `Accept-Ranges` (the module API's
/// HEAD); 304 when the request's `If-None-Match` names that `ETag`.
pub fn exists(info: &ArtifactInfo, headers: &HeaderMap) -> Response {
    let etag = ETag::of(&info.blake3);
    let status = match unchanged_for(headers, &etag) {
        true => StatusCode::NOT_MODIFIED,
        false => StatusCode::NO_CONTENT,
    };
    let mut response = status.into_response();
    set_validators(response.headers_mut(), &etag);
    response
}

/// Whether the request's `If-None-Match` names `etag`: the client holds these bytes (304).
fn unchanged_for(headers: &HeaderMap, etag: &ETag) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| etag_matches(v, etag.as_str()))
}

/// `ETag` and `Accept-Ranges`: what every answer about an artifact carries.
fn set_validators(headers: &mut HeaderMap, etag: &ETag) {
    if let Ok(etag) = HeaderValue::from_bytes(&etag.0) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

fn set_artifact_headers(
    headers: &mut HeaderMap,
    info: &ArtifactInfo,
    etag: &ETag,
    content_type: ContentType,
) {
    set_validators(headers, etag);
    // Anyone with a write grant chooses the content type: never let a browser sniff or run an
    // artifact as active content on the cache's origin.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    let content_type = match content_type {
        ContentType::UploadsOr(default) => info
            .content_type
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .unwrap_or(HeaderValue::from_static(default)),
        ContentType::Always(always) => HeaderValue::from_static(always),
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Some(sha) = info.sha256
        && let Ok(value) = HeaderValue::from_str(&hex::encode(sha))
    {
        headers.insert(CHECKSUM_HEADER_NAME.clone(), value);
    }
}

/// `If-None-Match`: `*`, or a list of (possibly weak) entity tags.
fn etag_matches(header_value: &str, etag: &str) -> bool {
    header_value
        .split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_lists() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches("\"b\", W/\"a\"", "\"a\""));
        assert!(etag_matches("*", "\"a\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
    }

    #[test]
    fn declared_length_over_the_limit_is_refused_up_front() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(11u64));
        assert_eq!(
            check_declared_length(&headers, 10).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(check_declared_length(&headers, 11).unwrap(), Some(11));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("ten"));
        assert_eq!(
            check_declared_length(&headers, 10).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
