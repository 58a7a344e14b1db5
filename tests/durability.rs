//! What survives: kill -9 during concurrent uploads loses nothing acknowledged and exposes
//! nothing partial; a body damaged on disk is never served.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Node, NodeOptions, body_files, client, flip_byte, payload};
use reqwest::StatusCode;

const ROUNDS: u64 = 10;
const UPLOADS: u64 = 32;
const MIB: usize = 1 << 20;

fn key_url(node: &Node, key: &str) -> String {
    node.url(&format!("/api/cache/gradle/{key}?account_handle=dev"))
}

/// Size and content seed of upload `i` of `round`: 1–8 MiB, never a whole number of MiB.
fn upload(round: u64, i: u64) -> (String, u64, usize) {
    let seed = round * 1000 + i;
    let size = MIB * (1 + (seed * 7 % 8) as usize) - (seed as usize % 977);
    (format!("crash-{round}-{i}"), seed, size)
}

/// `Some(true)` identical, `Some(false)` different, `None` missing.
async fn matches(
    http: &reqwest::Client,
    node: &Node,
    key: &str,
    seed: u64,
    size: usize,
) -> Option<bool> {
    let response = http.get(key_url(node, key)).send().await.unwrap();
    if response.status() == StatusCode::NOT_FOUND {
        return None;
    }
    assert_eq!(response.status(), StatusCode::OK, "{key}");
    let body = response.bytes().await.unwrap();
    Some(body.len() == size && blake3::hash(&body) == blake3::hash(&payload(seed, size)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_uploads_loses_nothing_acknowledged() {
    // fsync is not needed for a process crash: the default `process` durability is under test.
    let mut node = Node::start();
    let http = client();
    let mut acknowledged: HashMap<String, (u64, usize)> = HashMap::new();
    let mut interrupted = 0;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for i in 0..UPLOADS {
            let (key, seed, size) = upload(round, i);
            let (http, url) = (http.clone(), key_url(&node, &key));
            tasks.push(tokio::spawn(async move {
                let status = http
                    .put(url)
                    .body(payload(seed, size))
                    .send()
                    .await
                    .map(|r| r.status());
                (key, seed, size, status)
            }));
        }
        // Kill somewhere in the middle of the uploads (the delay varies per round).
        tokio::time::sleep(Duration::from_millis(60 + round * 37 % 300)).await;
        node.kill9();
        let mut unacknowledged = Vec::new();
        for task in tasks {
            let (key, seed, size, status) = task.await.unwrap();
            match status {
                Ok(StatusCode::CREATED) => {
                    acknowledged.insert(key, (seed, size));
                }
                _ => unacknowledged.push((key, seed, size)),
            }
        }
        eprintln!(
            "round {round}: {} uploads interrupted by kill -9",
            unacknowledged.len()
        );
        interrupted += unacknowledged.len();
        node.restart();
        let leftovers = std::fs::read_dir(node.data_dir().join("tmp"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0, "round {round}: temp debris removed on start");
        for (key, (seed, size)) in &acknowledged {
            if key.starts_with(&format!("crash-{round}-")) {
                assert_eq!(
                    matches(&http, &node, key, *seed, *size).await,
                    Some(true),
                    "round {round}: acknowledged {key}"
                );
            }
        }
        for (key, seed, size) in &unacknowledged {
            let found = matches(&http, &node, key, *seed, *size).await;
            assert_ne!(
                found,
                Some(false),
                "round {round}: unacknowledged {key} visible but not complete"
            );
        }
    }
    assert!(
        acknowledged.len() >= 10,
        "the test must acknowledge some uploads ({} were)",
        acknowledged.len()
    );
    assert!(
        interrupted as u64 >= ROUNDS,
        "the kills must interrupt uploads ({interrupted} were)"
    );
    for (key, (seed, size)) in &acknowledged {
        assert_eq!(
            matches(&http, &node, key, *seed, *size).await,
            Some(true),
            "after all rounds: {key}"
        );
    }
    let status = node.status().await;
    assert!(status["artifacts"].as_u64().unwrap() >= acknowledged.len() as u64);
}

/// Waits until the node has logged `count` finished orphan sweeps (over all its starts).
async fn wait_for_sweeps(node: &Node, count: usize) {
    for _ in 0..300 {
        if node.logs().matches("orphan sweep finished").count() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no orphan sweep finished; logs:\n{}", node.logs());
}

/// kill -9 at random points of uploads (staged, mid-publish, published), round after round, with
/// the orphan sweep's grace period at zero: after each restart and its sweep, no body file is
/// left that no record references (one planted per round, as a crash between the rename and the
/// publish batch leaves it, goes too), and every acknowledged artifact is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_kill_9_and_a_sweep_every_body_file_belongs_to_an_artifact() {
    const ROUNDS: u64 = 6;
    const UPLOADS: u64 = 16;
    let mut node = Node::start_with(NodeOptions::default().env("KURA_STORAGE_ORPHAN_GRACE", "0s"));
    wait_for_sweeps(&node, 1).await;
    let http = client();
    let mut acknowledged: HashMap<String, (u64, usize)> = HashMap::new();
    let mut interrupted = 0;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        let (finished, mut first_finished) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..UPLOADS {
            // 40 KiB to 4 MiB: every body is a file (inline_max is 32 KiB).
            let seed = 50_000 + round * 1000 + i;
            let size = 40 * 1024 + (seed as usize * 7919) % (4 * MIB);
            let key = format!("sweep-{round}-{i}");
            let (http, url, finished) = (http.clone(), key_url(&node, &key), finished.clone());
            tasks.push(tokio::spawn(async move {
                let status = http
                    .put(url)
                    .body(payload(seed, size))
                    .send()
                    .await
                    .map(|r| r.status());
                let _ = finished.send(());
                (key, seed, size, status)
            }));
        }
        // Kill once the first upload is answered, so the others are at every stage: streaming,
        // publishing, just published.
        first_finished.recv().await;
        tokio::time::sleep(Duration::from_millis(round % 3 * 4)).await;
        node.kill9();
        let mut cut = 0;
        for task in tasks {
            let (key, seed, size, status) = task.await.unwrap();
            match status {
                Ok(StatusCode::CREATED) => {
                    acknowledged.insert(key, (seed, size));
                }
                _ => cut += 1,
            }
        }
        eprintln!("round {round}: {cut} uploads interrupted by kill -9");
        interrupted += cut;
        let planted = node
            .data_dir()
            .join("bodies/ab")
            .join(format!("ab{:030x}", 7 + round));
        std::fs::write(&planted, b"renamed into place, never published").unwrap();

        node.restart();
        wait_for_sweeps(&node, round as usize + 2).await;
        assert!(
            !planted.exists(),
            "round {round}: the planted orphan is swept"
        );
        assert!(
            node.metric("kura_storage_orphans_removed_total").await >= 1,
            "round {round}: sweeps are counted"
        );
        let artifacts = node.status().await["artifacts"].as_u64().unwrap();
        assert_eq!(
            body_files(&node).len() as u64,
            artifacts,
            "round {round}: one body file per artifact, none unreferenced"
        );
        for (key, (seed, size)) in &acknowledged {
            if key.starts_with(&format!("sweep-{round}-")) {
                assert_eq!(
                    matches(&http, &node, key, *seed, *size).await,
                    Some(true),
                    "round {round}: acknowledged {key}"
                );
            }
        }
    }
    assert!(
        !acknowledged.is_empty() && interrupted > 0,
        "the kills must land among the uploads ({} acknowledged, {interrupted} interrupted)",
        acknowledged.len()
    );
    for (key, (seed, size)) in &acknowledged {
        assert_eq!(
            matches(&http, &node, key, *seed, *size).await,
            Some(true),
            "after all rounds: {key}"
        );
    }
    assert_eq!(
        node.metric("kura_storage_corrupt_bodies_total").await,
        0,
        "no referenced body was swept"
    );
}

#[tokio::test]
async fn a_small_corrupted_body_is_a_miss() {
    let node = Node::start();
    let http = client();
    let url = key_url(&node, "small-damaged");
    let body = payload(7, 100_000);
    http.put(&url).body(body.clone()).send().await.unwrap();
    let files = body_files(&node);
    assert_eq!(files.len(), 1);
    flip_byte(&files[0], 5_000);
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(node.metric("kura_storage_corrupt_bodies_total").await, 1);
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND,
        "dropped, not retried"
    );
    assert!(body_files(&node).is_empty(), "the damaged body is deleted");
    // The key works again after a fresh upload.
    http.put(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(
        http.get(&url).send().await.unwrap().bytes().await.unwrap(),
        body
    );
}

#[tokio::test]
async fn a_large_corrupted_body_is_never_delivered_complete() {
    let node = Node::start();
    let http = client();
    let url = key_url(&node, "large-damaged");
    let body = payload(8, 5 * MIB + 3);
    http.put(&url).body(body.clone()).send().await.unwrap();
    let files = body_files(&node);
    flip_byte(&files[0], (5 * MIB) as u64);
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "large bodies stream before the end is verified"
    );
    let received = response.bytes().await;
    assert!(
        received.is_err(),
        "the response must be aborted, not completed"
    );
    assert_eq!(node.metric("kura_storage_corrupt_bodies_total").await, 1);
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // A body whose file vanished is a miss as well.
    http.put(&url).body(body.clone()).send().await.unwrap();
    for file in body_files(&node) {
        std::fs::remove_file(file).unwrap();
    }
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

/// A file body that verified against its BLAKE3 is checked on later reads by a checksum of
/// those bytes (`storage::checksums`): damage after that first read is caught all the same, for
/// bodies verified before they are sent and for bodies verified while they stream.
#[tokio::test]
async fn a_body_damaged_after_it_was_read_is_still_never_served() {
    let node = Node::start();
    let http = client();
    let small = (
        key_url(&node, "read-then-damaged-small"),
        payload(9, 200_000),
    );
    let large = (
        key_url(&node, "read-then-damaged-large"),
        payload(10, 3 * MIB + 5),
    );
    for (url, body) in [&small, &large] {
        http.put(url).body(body.clone()).send().await.unwrap();
        for _ in 0..2 {
            let served = http.get(url).send().await.unwrap().bytes().await.unwrap();
            assert!(served == body[..], "intact bytes are served");
        }
    }
    let checked =
        |against: &str| format!("kura_storage_body_checks_total{{against=\"{against}\"}}");
    assert_eq!(
        node.metric(&checked("blake3")).await,
        2,
        "each body's first read"
    );
    assert_eq!(
        node.metric(&checked("checksum")).await,
        2,
        "each body's second read"
    );
    for file in body_files(&node) {
        flip_byte(&file, 100_001);
    }
    assert_eq!(
        http.get(&small.0).send().await.unwrap().status(),
        StatusCode::NOT_FOUND,
        "a damaged small body is a miss"
    );
    let response = http.get(&large.0).send().await.unwrap();
    assert!(
        response.bytes().await.is_err(),
        "a damaged large body is aborted, not completed"
    );
    assert_eq!(node.metric("kura_storage_corrupt_bodies_total").await, 2);
    assert!(
        body_files(&node).is_empty(),
        "both damaged bodies are deleted"
    );
}

/// A module multipart upload is state on disk, not in the process: parts acknowledged before a
/// kill -9 are still there after the restart, and the upload completes with the right bytes.
#[tokio::test]
async fn a_module_upload_survives_kill_9_and_completes_after_the_restart() {
    let mut node = Node::start();
    let http = client();
    let url = |node: &Node, path: &str| {
        let sep = if path.contains('?') { '&' } else { '?' };
        node.url(&format!("{path}{sep}account_handle=dev&project_handle=ios"))
    };
    let started: serde_json::Value = http
        .post(url(&node, "/api/cache/module/start?hash=k9&name=Lib.zip"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["upload_id"].as_str().unwrap().to_string();
    let parts = [payload(901, 700_000), payload(902, 300_000)];
    let part = |node: &Node, n: usize| {
        let (url, body) = (
            url(
                node,
                &format!("/api/cache/module/part?upload_id={id}&part_number={n}"),
            ),
            parts[n - 1].clone(),
        );
        let http = http.clone();
        async move { http.post(url).body(body).send().await.unwrap().status() }
    };
    assert_eq!(part(&node, 1).await, StatusCode::NO_CONTENT);

    node.restart(); // kill -9, then start on the same data dir
    assert_eq!(part(&node, 2).await, StatusCode::NO_CONTENT);
    let whole = parts.concat();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&whole))
    };
    let complete = http
        .post(url(
            &node,
            &format!("/api/cache/module/complete?upload_id={id}"),
        ))
        .json(&serde_json::json!({"parts": [1, 2], "checksum_sha256": sha}))
        .send()
        .await
        .unwrap();
    assert_eq!(complete.status(), StatusCode::NO_CONTENT);
    let artifact = http
        .get(url(&node, "/api/cache/module/k9?name=Lib.zip"))
        .send()
        .await
        .unwrap();
    assert_eq!(artifact.status(), StatusCode::OK);
    assert_eq!(artifact.bytes().await.unwrap(), whole);
}
