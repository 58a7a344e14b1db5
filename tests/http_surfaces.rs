//! Every cache surface besides Gradle, and the probes, against the real node on 127.0.0.1.

use crate::common;

use common::{Node, NodeOptions, client, payload};

use reqwest::StatusCode;
use serde_json::{Value, json};

fn q(node: &Node, path: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    node.url(&format!("{path}{sep}account_handle=dev&project_handle=ios"))
}

#[tokio::test]
async fn xcode_cas_and_keyvalue() {
    let node = Node::start();
    let http = client();
    let blob = payload(10, 100_000);
    let url = q(&node, "/api/cache/cas/0~abc");
    // '~' is outside the key alphabet.
    assert_eq!(
        http.post(&url).body("x").send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );

    let url = q(&node, "/api/cache/cas/abc123");
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.head(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // Whatever the uploader named (curl's default form type here), reads are octet-stream.
    assert_eq!(
        http.post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(blob.clone())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    let get = http.get(&url).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(get.headers()["content-type"], "application/octet-stream");
    assert_eq!(get.bytes().await.unwrap(), blob);
    assert_eq!(
        http.head(&url).send().await.unwrap().status(),
        StatusCode::OK
    );

    let kv = q(&node, "/api/cache/keyvalue");
    let put = http
        .put(&kv)
        .json(&json!({"cas_id": "abc123", "entries": [{"value": "v1"}, {"value": "v2"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let get = http
        .get(q(&node, "/api/cache/keyvalue/abc123"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(
        get.json::<Value>().await.unwrap(),
        json!({"entries": [{"value": "v1"}, {"value": "v2"}]})
    );
    assert_eq!(
        http.get(q(&node, "/api/cache/keyvalue/nothing"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    for bad in [
        "{not json",
        r#"{"entries": []}"#,
        r#"{"cas_id": "a", "entries": [{"nope": 1}]}"#,
        r#"{"cas_id": "a/b", "entries": []}"#,
    ] {
        let response = http
            .put(&kv)
            .header("content-type", "application/json")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    // Declared over the 1 MiB limit: refused before the body is read.
    let huge = common::raw_exchange(
        node.addr,
        "PUT /api/cache/keyvalue?account_handle=dev HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
}

async fn start_upload(http: &reqwest::Client, node: &Node, hash: &str) -> Value {
    let response = http
        .post(q(
            node,
            &format!("/api/cache/module/start?hash={hash}&name=App.xcframework.zip"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// An upload of `hash` started, with `part` as its part 1; returns its id.
async fn upload_with_one_part(
    http: &reqwest::Client,
    node: &Node,
    hash: &str,
    part: Vec<u8>,
) -> String {
    let id = start_upload(http, node, hash).await["upload_id"]
        .as_str()
        .unwrap()
        .to_string();
    let sent = http
        .post(part_url(node, &id, 1))
        .body(part)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::NO_CONTENT);
    id
}

fn part_url(node: &Node, id: &str, n: u32) -> String {
    q(
        node,
        &format!("/api/cache/module/part?upload_id={id}&part_number={n}"),
    )
}

#[tokio::test]
async fn module_multipart_upload_in_any_order() {
    let node = Node::start();
    let http = client();
    let id = start_upload(&http, &node, "h1").await["upload_id"]
        .as_str()
        .unwrap()
        .to_string();
    let parts: Vec<Vec<u8>> = (0..4)
        .map(|i| payload(20 + i, 300_000 + i as usize))
        .collect();

    // Concurrently, out of order, with one part sent twice (the second replaces the first).
    let wrong = http
        .post(part_url(&node, &id, 3))
        .body("stale")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::NO_CONTENT);
    let sends = [3usize, 1, 0, 2].map(|i| {
        let (http, url, body) = (
            http.clone(),
            part_url(&node, &id, i as u32 + 1),
            parts[i].clone(),
        );
        tokio::spawn(async move { http.post(url).body(body).send().await.unwrap().status() })
    });
    for send in sends {
        assert_eq!(send.await.unwrap(), StatusCode::NO_CONTENT);
    }
    let whole: Vec<u8> = parts.concat();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&whole))
    };
    let complete = http
        .post(q(
            &node,
            &format!("/api/cache/module/complete?upload_id={id}"),
        ))
        .json(&json!({"parts": [1, 2, 3, 4], "checksum_sha256": sha}))
        .send()
        .await
        .unwrap();
    assert_eq!(complete.status(), StatusCode::NO_CONTENT);

    let artifact = q(&node, "/api/cache/module/h1?name=App.xcframework.zip");
    let head = http.head(&artifact).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::NO_CONTENT);
    let get = http.get(&artifact).send().await.unwrap();
    // HEAD carries the validators of every artifact (http-api.md), the same as GET's.
    assert_eq!(head.headers().get("etag"), get.headers().get("etag"));
    assert!(head.headers().contains_key("etag"));
    assert_eq!(head.headers()["accept-ranges"], "bytes");
    assert_eq!(get.bytes().await.unwrap(), whole);
    let ranged = http
        .get(&artifact)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.bytes().await.unwrap(), whole[10..20]);
    let other_category = q(
        &node,
        "/api/cache/module/h1?name=App.xcframework.zip&cache_category=selective_tests",
    );
    assert_eq!(
        http.head(&other_category).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // The upload is gone once completed, and the artifact now exists.
    assert_eq!(
        http.post(part_url(&node, &id, 1))
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        start_upload(&http, &node, "h1").await,
        json!({"upload_id": null})
    );
}

#[tokio::test]
async fn module_upload_failures_publish_nothing() {
    let node = Node::start_with(NodeOptions::default().env("KURA_UPLOADS_MAX_IN_FLIGHT", "2"));
    let http = client();
    let id = upload_with_one_part(&http, &node, "h2", payload(30, 1000)).await;

    let complete_url = q(&node, &format!("/api/cache/module/complete?upload_id={id}"));
    let missing = http
        .post(&complete_url)
        .json(&json!({"parts": [1, 2]}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"],
        "missing_part"
    );
    let garbage = http.post(&complete_url).body("{").send().await.unwrap();
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    let artifact = q(&node, "/api/cache/module/h2?name=App.xcframework.zip");
    assert_eq!(
        http.head(&artifact).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.get(&artifact).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    let bad_number = http
        .post(part_url(&node, &id, 0))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_number.status(), StatusCode::BAD_REQUEST);
    let unknown = http
        .post(part_url(&node, "0123456789abcdef0123456789abcdef", 1))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let traversal = http
        .post(part_url(&node, "..%2F..", 1))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(traversal.status(), StatusCode::NOT_FOUND);
    let other_project = http
        .post(node.url(&format!("/api/cache/module/part?upload_id={id}&part_number=1&account_handle=dev&project_handle=android")))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        other_project.status(),
        StatusCode::NOT_FOUND,
        "an upload belongs to its project"
    );

    // Two uploads in flight is the configured limit: the third gets 429 with Retry-After.
    start_upload(&http, &node, "h3").await;
    let third = http
        .post(q(&node, "/api/cache/module/start?hash=h4&name=n"))
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(third.headers().contains_key("retry-after"));

    // Completing the first with its real part frees a slot.
    let done = http
        .post(&complete_url)
        .json(&json!({"parts": [1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        http.get(&artifact)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        payload(30, 1000)
    );
    let fourth = http
        .post(q(&node, "/api/cache/module/start?hash=h4&name=n"))
        .send()
        .await
        .unwrap();
    assert_eq!(fourth.status(), StatusCode::OK);
}

#[tokio::test]
async fn project_clean_removes_only_that_project() {
    let node = Node::start();
    let http = client();
    let ios = q(&node, "/api/cache/gradle/k");
    let android = node.url("/api/cache/gradle/k?account_handle=dev&project_handle=android");
    http.put(&ios)
        .body(payload(40, 100_000))
        .send()
        .await
        .unwrap();
    http.post(q(&node, "/api/cache/cas/c1"))
        .body("cas")
        .send()
        .await
        .unwrap();
    http.put(&android).body("keep").send().await.unwrap();

    let no_project = http
        .delete(node.url("/api/cache/clean?account_handle=dev"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_project.status(), StatusCode::BAD_REQUEST);
    let clean = http
        .delete(q(&node, "/api/cache/clean"))
        .send()
        .await
        .unwrap();
    assert_eq!(clean.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        http.get(&ios).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.get(q(&node, "/api/cache/cas/c1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.get(&android)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "keep"
    );
    let status = node.status().await;
    assert_eq!(status["artifacts"], 1);
    assert_eq!(
        status["disk"]["used_bytes"],
        common::artifact_charge(4, "android", "gradle", "k")
    );
}

#[tokio::test]
async fn nx_is_write_once_and_metro_streams_chunked() {
    let node = Node::start();
    let http = client();
    let nx = node.url("/v1/cache/123456789");
    assert_eq!(
        http.get(&nx).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.put(&nx).body("first").send().await.unwrap().status(),
        StatusCode::OK
    );
    let again = http.put(&nx).body("second").send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert!(
        again.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(
        http.get(&nx).send().await.unwrap().text().await.unwrap(),
        "first"
    );

    let metro = node.url("/api/metro/cache/bundle-1");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..5).map(|i| Ok(payload(50 + i, 10_000))).collect();
    let expected: Vec<u8> = (0..5).flat_map(|i| payload(50 + i, 10_000)).collect();
    let put = http
        .put(&metro)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(
        http.get(&metro)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        expected
    );
    assert_eq!(
        http.get(node.url("/api/metro/cache/none"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn bazel_http_cache_verifies_cas_digests() {
    let node = Node::start();
    let http = client();
    let blob = payload(60, 5000);
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&blob))
    };
    let cas = node.url(&format!("/bazel/dev/ios/cas/{digest}"));
    assert_eq!(
        http.get(&cas).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.put(&cas)
            .body(blob.clone())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        http.get(&cas).send().await.unwrap().bytes().await.unwrap(),
        blob
    );
    let wrong = node.url(&format!("/bazel/dev/ios/cas/{}", "a".repeat(64)));
    let mismatch = http.put(&wrong).body(blob.clone()).send().await.unwrap();
    assert_eq!(mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        http.get(&wrong).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // AC values are opaque (ccache stores non-protobuf bytes there).
    let ac = node.url(&format!("/bazel/dev/ios/ac/{}", "b".repeat(64)));
    assert_eq!(
        http.put(&ac)
            .body("opaque ccache entry")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        http.get(&ac).send().await.unwrap().text().await.unwrap(),
        "opaque ccache entry"
    );
    let bad_hash = http
        .get(node.url("/bazel/dev/ios/ac/ABC"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_hash.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn probes_and_metrics() {
    let node = Node::start();
    let http = client();
    let up: Value = node.json("/up").await;
    assert_eq!(up["status"], "ok");
    assert_eq!(up["account"], "dev");
    assert!(up["node_id"].as_str().unwrap().starts_with("kura-"));
    assert!(up["version"].is_string() && up["region"].is_string());
    let ready = http.get(node.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    http.put(node.url("/api/cache/gradle/m?account_handle=dev"))
        .body("12345")
        .send()
        .await
        .unwrap();
    http.get(node.url("/api/cache/gradle/m?account_handle=dev"))
        .send()
        .await
        .unwrap();
    http.get(node.url("/api/cache/gradle/none?account_handle=dev"))
        .send()
        .await
        .unwrap();
    let status = node.status().await;
    assert_eq!(status["state"], "serving");
    assert_eq!(status["artifacts"], 1);
    let used = common::artifact_charge(5, "", "gradle", "m");
    assert_eq!(status["disk"]["used_bytes"], used);
    assert_eq!(status["disk"]["background_errors"], 0);
    assert!(status["peers"].is_array());

    let metrics = node.metrics().await;
    let used_line = format!("kura_storage_used_bytes {used}");
    for expected in [
        "kura_http_requests_total{protocol=\"http\",route=\"/api/cache/gradle/{key}\",method=\"PUT\",status=\"201\"} 1",
        "kura_cache_hits_total{kind=\"gradle\"} 1",
        "kura_cache_misses_total{kind=\"gradle\"} 1",
        "kura_storage_bytes_written_total{kind=\"gradle\"} 5",
        used_line.as_str(),
        "kura_storage_artifacts 1",
        "kura_storage_background_errors_total 0",
        "kura_http_request_duration_seconds_bucket",
        "kura_process_resident_memory_bytes",
        "kura_build_info{",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn unfinished_module_uploads_expire_with_their_parts() {
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_UPLOADS_EXPIRY", "1s")
            .env("KURA_UPLOADS_MAX_IN_FLIGHT", "1"),
    );
    let http = client();
    let id = start_upload(&http, &node, "old").await["upload_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        http.post(part_url(&node, &id, 1))
            .body("part")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert!(node.data_dir().join("uploads").join(&id).exists());
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        http.post(part_url(&node, &id, 2))
            .body("late")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert!(
        !node.data_dir().join("uploads").join(&id).exists(),
        "parts are deleted"
    );
    let next = start_upload(&http, &node, "new").await;
    assert!(
        next["upload_id"].is_string(),
        "the expired upload freed its slot"
    );
}

#[tokio::test]
async fn a_module_completion_whose_parts_miss_the_checksum_drops_the_upload_and_its_parts() {
    let node = Node::start();
    let http = client();
    let id = upload_with_one_part(&http, &node, "h9", payload(31, 5000)).await;
    let complete_url = q(&node, &format!("/api/cache/module/complete?upload_id={id}"));

    // A completion body that is too large (refused before it is read), or cut short, is said
    // to be so; the upload stays.
    let path =
        format!("/api/cache/module/complete?upload_id={id}&account_handle=dev&project_handle=ios");
    let raw = |request: String| {
        let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut response = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut response);
        response
    };
    let response = raw(format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
    ));
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("too_large"), "{response}");
    let response = raw(format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"parts\""
    ));
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("truncated_body"), "{response}");
    assert_eq!(node.status().await["uploads_in_flight"], 1);

    // The parts do not hash to the checksum: the client starts a new upload (Tuist does), so
    // this one's slot and parts go now, not at its expiry a day later.
    let mismatch = http
        .post(&complete_url)
        .json(&json!({"parts": [1], "checksum_sha256": "0".repeat(64)}))
        .send()
        .await
        .unwrap();
    assert_eq!(mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let status = node.status().await;
    assert_eq!(status["uploads_in_flight"], 0, "{status}");
    assert_eq!(status["disk"]["staged_bytes"], 0, "{status}");
    let late_part = http
        .post(part_url(&node, &id, 2))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(late_part.status(), StatusCode::NOT_FOUND);
    let artifact = q(&node, "/api/cache/module/h9?name=App.xcframework.zip");
    assert_eq!(
        http.head(&artifact).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_module_head_answers_304_to_the_etag_the_client_holds() {
    let node = Node::start();
    let http = client();
    let id = upload_with_one_part(&http, &node, "h8", payload(32, 3000)).await;
    let done = http
        .post(q(
            &node,
            &format!("/api/cache/module/complete?upload_id={id}"),
        ))
        .json(&json!({"parts": [1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    let artifact = q(&node, "/api/cache/module/h8?name=App.xcframework.zip");
    let head = http.head(&artifact).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::NO_CONTENT);
    let etag = head.headers()["etag"].clone();
    let again = http
        .head(&artifact)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(again.headers()["etag"], etag);
    let other = http
        .head(&artifact)
        .header("if-none-match", "\"0000\"")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NO_CONTENT);
}
