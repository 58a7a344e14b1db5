//! Gradle routes and the common behaviour of every upload/download (http-api.md → Common
//! behaviour), against the real node on 127.0.0.1.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Node, NodeOptions, client, payload};
use reqwest::StatusCode;

fn gradle(node: &Node, key: &str) -> String {
    node.url(&format!("/api/cache/gradle/{key}?account_handle=dev"))
}

#[tokio::test]
async fn gradle_query_form_put_get_head_and_overwrite() {
    let node = Node::start();
    let http = client();
    let body = payload(1, 3 << 20);
    let url = gradle(&node, "0123456789abcdef0123456789abcdef");

    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.head(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let put = http.put(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);

    let get = http.get(&url).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(
        get.headers()["content-type"],
        "application/vnd.gradle.build-cache-artifact.v2"
    );
    assert_eq!(get.headers()["accept-ranges"], "bytes");
    let etag = get.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", blake3::hash(&body).to_hex()));
    assert_eq!(get.bytes().await.unwrap(), body);

    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(head.headers()["etag"], etag.as_str());

    let replacement = payload(2, 1000);
    let put = http
        .put(&url)
        .header(
            "content-type",
            "application/vnd.gradle.build-cache-artifact.v1",
        )
        .body(replacement.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK, "an existing key answers 200");
    let get = http.get(&url).send().await.unwrap();
    assert_eq!(
        get.headers()["content-type"],
        "application/vnd.gradle.build-cache-artifact.v1"
    );
    assert_eq!(get.bytes().await.unwrap(), replacement);
}

#[tokio::test]
async fn the_same_key_in_two_projects_is_two_artifacts() {
    let node = Node::start();
    let http = client();
    let ios = node.url("/api/cache/gradle/k?account_handle=dev&project_handle=ios");
    let android = node.url("/api/cache/gradle/k?tenant_id=dev&namespace_id=android");
    http.put(&ios).body("ios").send().await.unwrap();
    http.put(&android).body("android").send().await.unwrap();
    assert_eq!(
        http.get(&ios).send().await.unwrap().text().await.unwrap(),
        "ios"
    );
    assert_eq!(
        http.get(&android)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "android"
    );
    let path_form = node.url("/api/cache/gradle/dev/ios/k");
    assert_eq!(
        http.get(&path_form)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ios"
    );
}

#[tokio::test]
async fn addressing_errors() {
    let node = Node::start();
    let http = client();
    let missing = http
        .get(node.url("/api/cache/gradle/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(missing.headers()["content-type"], "application/json");
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "missing_account");
    assert!(body["message"].as_str().unwrap().contains("account_handle"));

    let wrong = http
        .get(node.url("/api/cache/gradle/k?account_handle=other"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        wrong.json::<serde_json::Value>().await.unwrap()["error"],
        "wrong_account"
    );

    let path_form_wrong = http
        .put(node.url("/api/cache/gradle/other/ios/k"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(path_form_wrong.status(), StatusCode::FORBIDDEN);

    let bad_project = http
        .get(node.url("/api/cache/gradle/k?account_handle=dev&project_handle=a%2Fb"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_project.status(), StatusCode::BAD_REQUEST);

    let no_route = http.get(node.url("/nothing/here")).send().await.unwrap();
    assert_eq!(no_route.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn path_traversal_is_rejected_and_touches_nothing() {
    let node = Node::start();
    let http = client();
    let outside = node.data_dir().parent().unwrap().join("escaped");
    // Raw requests: URL libraries would normalize the dot segments away before sending.
    for key in [
        "%2e%2e",
        "..",
        "%2E%2E",
        "a%2Fb",
        "%2e%2e%2fescaped",
        "a%00b",
        "a%5Cb",
        ".",
        "%2e",
    ] {
        for method in ["PUT", "GET"] {
            let status = raw_request(
                &node,
                &format!(
                    "{method} /api/cache/gradle/{key}?account_handle=dev HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
                ),
            );
            assert!(
                status.starts_with("HTTP/1.1 400"),
                "{method} key {key}: {status}"
            );
        }
    }
    let named = http.get(gradle(&node, "a%2Fb")).send().await.unwrap();
    assert_eq!(
        named.json::<serde_json::Value>().await.unwrap()["error"],
        "invalid_key"
    );
    for path in [
        "/api/cache/gradle/dev/%2e%2e/k",
        "/api/cache/gradle/dev/../k",
        "/api/cache/cas/%2e%2e?account_handle=dev",
        "/api/cache/keyvalue/%2e%2e?account_handle=dev",
        "/bazel/dev/%2e%2e/ac/0000000000000000000000000000000000000000000000000000000000000000",
        "/api/cache/module/%2e%2e?account_handle=dev&name=x",
        "/api/cache/module/h?account_handle=dev&name=..%2F..%2Fescaped",
    ] {
        let status = raw_request(
            &node,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        assert!(status.starts_with("HTTP/1.1 400"), "{path}: {status}");
    }
    assert!(!outside.exists());
    let long = "a".repeat(513);
    assert_eq!(
        http.get(gradle(&node, &long))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn conditional_and_range_requests() {
    let node = Node::start();
    let http = client();
    let url = gradle(&node, "ranged");
    // Large enough to be a streamed, file-backed body.
    let body = payload(3, 3 << 20);
    http.put(&url).body(body.clone()).send().await.unwrap();
    let etag = format!("\"{}\"", blake3::hash(&body).to_hex());

    let not_modified = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(not_modified.headers()["etag"], etag.as_str());
    let changed = http
        .get(&url)
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);

    let tail = http
        .get(&url)
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        tail.headers()["content-range"],
        format!("bytes 100-{}/{}", body.len() - 1, body.len()).as_str()
    );
    assert_eq!(tail.bytes().await.unwrap(), body[100..]);

    let middle = http
        .get(&url)
        .header("range", "bytes=1048570-1048580")
        .send()
        .await
        .unwrap();
    assert_eq!(middle.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(middle.bytes().await.unwrap(), body[1048570..=1048580]);

    let past_end = http
        .get(&url)
        .header("range", format!("bytes={}-", body.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(past_end.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        past_end.headers()["content-range"],
        format!("bytes */{}", body.len()).as_str()
    );

    for full in ["bytes=0-1,5-6", "bytes=oops", "bytes=9-2"] {
        let response = http.get(&url).header("range", full).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{full}");
        assert_eq!(response.bytes().await.unwrap().len(), body.len());
    }

    let if_range_ok = http
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(if_range_ok.status(), StatusCode::PARTIAL_CONTENT);
    let if_range_stale = http
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", "\"old\"")
        .send()
        .await
        .unwrap();
    assert_eq!(if_range_stale.status(), StatusCode::OK);

    // Small (inline) bodies answer ranges too.
    let small = gradle(&node, "small");
    http.put(&small).body("hello world").send().await.unwrap();
    let part = http
        .get(&small)
        .header("range", "bytes=6-")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.text().await.unwrap(), "world");
}

#[tokio::test]
async fn checksum_header_is_verified_and_returned() {
    let node = Node::start();
    let http = client();
    let body = payload(4, 70_000);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };
    let url = gradle(&node, "checked");
    let bad = http
        .put(&url)
        .header("tuist-checksum-sha256", "0".repeat(64))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        bad.json::<serde_json::Value>().await.unwrap()["error"],
        "checksum_mismatch"
    );
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND,
        "nothing stored on mismatch"
    );

    let malformed = http
        .put(&url)
        .header("tuist-checksum-sha256", "xyz")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        malformed.json::<serde_json::Value>().await.unwrap()["error"],
        "bad_checksum"
    );

    let good = http
        .put(&url)
        .header("tuist-checksum-sha256", &sha)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), StatusCode::CREATED);
    let get = http.get(&url).send().await.unwrap();
    assert_eq!(get.headers()["tuist-checksum-sha256"], sha.as_str());
}

#[tokio::test]
async fn the_keyvalue_upload_verifies_the_checksum_header_too() {
    let node = Node::start();
    let http = client();
    let url = node.url("/api/cache/keyvalue?account_handle=dev&project_handle=ios");
    let document = br#"{"cas_id": "kv1", "entries": [{"value": "abc"}]}"#.to_vec();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&document))
    };
    let put = |checksum: String| {
        http.put(&url)
            .header("content-type", "application/json")
            .header("tuist-checksum-sha256", checksum)
            .body(document.clone())
            .send()
    };
    let stored = || async {
        let url = node.url("/api/cache/keyvalue/kv1?account_handle=dev&project_handle=ios");
        http.get(url).send().await.unwrap().status()
    };
    let bad = put("0".repeat(64)).await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        bad.json::<serde_json::Value>().await.unwrap()["error"],
        "checksum_mismatch"
    );
    let malformed = put("xyz".into()).await.unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(stored().await, StatusCode::NOT_FOUND, "nothing stored");
    assert_eq!(put(sha).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(stored().await, StatusCode::OK);
}

#[tokio::test]
async fn size_limits_answer_413_before_and_while_reading() {
    let node = Node::start_with(NodeOptions::default().env("KURA_LIMITS_GRADLE", "64KiB"));
    let http = client();
    let url = gradle(&node, "big");
    let declared = http
        .put(&url)
        .body(vec![0u8; 65 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        declared.json::<serde_json::Value>().await.unwrap()["error"],
        "too_large"
    );

    // Chunked: the limit is enforced while streaming.
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = "PUT /api/cache/gradle/big?account_handle=dev HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    for _ in 0..20 {
        // The node may answer and close before every chunk is sent.
        let _ = stream.write_all(format!("{:x}\r\n", 8192).as_bytes());
        let _ = stream.write_all(&[1u8; 8192]);
        let _ = stream.write_all(b"\r\n");
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    let exact = http
        .put(&url)
        .body(vec![0u8; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(exact.status(), StatusCode::CREATED);
}

/// Sends raw bytes and returns the status line of the answer.
fn raw_request(node: &Node, request: &str) -> String {
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn truncated_bodies_store_nothing() {
    let node = Node::start();
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = "PUT /api/cache/gradle/cut?account_handle=dev HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&[7u8; 50_000]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("truncated_body"), "{response}");
    let get = client().get(gradle(&node, "cut")).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::NOT_FOUND);
    let leftovers = std::fs::read_dir(node.data_dir().join("tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "the temp file of a cut upload is removed");
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_after_checks() {
    let node = Node::start_with(NodeOptions::default().env("KURA_LIMITS_GRADLE", "1KiB"));
    // Over the limit: the final 413 arrives without a 100 and without sending the body.
    let too_big = raw_request(
        &node,
        "PUT /api/cache/gradle/e?account_handle=dev HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
    );
    assert!(too_big.starts_with("HTTP/1.1 413"), "{too_big}");
    let wrong_account = raw_request(
        &node,
        "PUT /api/cache/gradle/e?account_handle=zzz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
    );
    assert!(wrong_account.starts_with("HTTP/1.1 403"), "{wrong_account}");

    // Acceptable: 100 Continue first, then the body, then 201.
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"PUT /api/cache/gradle/e?account_handle=dev HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut interim = [0u8; 64];
    let n = stream.read(&mut interim).unwrap();
    let interim = String::from_utf8_lossy(&interim[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(b"hello").unwrap();
    let mut rest = String::new();
    let _ = stream.read_to_string(&mut rest);
    assert!(rest.contains("HTTP/1.1 201"), "{rest}");
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_made_otherwise() {
    let node = Node::start();
    let http = client();
    let kept = http
        .get(node.url("/up"))
        .header("x-request-id", "build-42.step:7")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], "build-42.step:7");
    let replaced = http
        .get(node.url("/up"))
        .header("x-request-id", "no spaces <allowed>")
        .send()
        .await
        .unwrap();
    let id = replaced.headers()["x-request-id"].to_str().unwrap();
    assert!(!id.is_empty() && id != "no spaces <allowed>");
    let error = http
        .get(node.url("/api/cache/gradle/k"))
        .send()
        .await
        .unwrap();
    assert!(
        error.headers().contains_key("x-request-id"),
        "errors carry a request id too"
    );
}

#[tokio::test]
async fn full_disk_answers_507_and_reads_go_on() {
    let node = Node::start_with(NodeOptions::default().env("KURA_STORAGE_CAPACITY", "100KiB"));
    let http = client();
    let fits = gradle(&node, "fits");
    assert_eq!(
        http.put(&fits)
            .body(payload(5, 50_000))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    let too_big = http
        .put(gradle(&node, "huge"))
        .body(payload(6, 200_000))
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(
        too_big.json::<serde_json::Value>().await.unwrap()["error"],
        "insufficient_storage"
    );
    assert_eq!(
        http.get(&fits).send().await.unwrap().status(),
        StatusCode::OK,
        "reads go on"
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_works_like_http1() {
    let node = Node::start();
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = gradle(&node, "over-h2");
    let body = payload(9, 2 << 20);
    let put = http.put(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(put.version(), reqwest::Version::HTTP_2);
    assert_eq!(put.status(), StatusCode::CREATED);
    assert_eq!(
        http.get(&url).send().await.unwrap().bytes().await.unwrap(),
        body
    );
}

#[tokio::test]
async fn overload_and_wrong_methods_get_specific_errors() {
    let node =
        Node::start_with(NodeOptions::default().env("KURA_LIMITS_MAX_IN_FLIGHT_REQUESTS", "1"));
    // Hold one request in flight: an upload whose body never finishes.
    let mut slow = TcpStream::connect(node.addr).unwrap();
    slow.write_all(b"PUT /api/cache/gradle/slow?account_handle=dev HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let http = client();
    let shed = http.get(gradle(&node, "k")).send().await.unwrap();
    assert_eq!(shed.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_eq!(
        http.get(node.url("/ready")).send().await.unwrap().status(),
        StatusCode::OK,
        "probes are never shed"
    );
    drop(slow);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        http.get(gradle(&node, "k")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    let wrong_method = http.post(node.url("/up")).send().await.unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        wrong_method.json::<serde_json::Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
}
