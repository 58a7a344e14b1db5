//! Capacity: usage stays within `storage.capacity`, and eviction takes the least recently
//! accessed artifacts first.

use crate::common;

use std::time::Duration;

use common::{Node, NodeOptions, client, payload};
use reqwest::StatusCode;

const MIB: usize = 1 << 20;
const CAPACITY: u64 = 64 << 20;

/// The cache turns over eight times within seconds here, so access times are kept exact
/// (`storage.access_time_resolution` 0) instead of to the default minute.
#[tokio::test]
async fn writing_512_mib_into_64_mib_keeps_recently_read_artifacts() {
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_STORAGE_CAPACITY", "64MiB")
            .env("KURA_STORAGE_ACCESS_TIME_RESOLUTION", "0s"),
    );
    let http = client();
    let url = |key: &str| node.url(&format!("/api/cache/gradle/{key}?account_handle=dev"));
    for i in 0..8 {
        assert_eq!(
            http.put(url(&format!("hot-{i}")))
                .body(payload(i, MIB))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::CREATED
        );
        assert_eq!(
            http.put(url(&format!("cold-{i}")))
                .body(payload(100 + i, MIB))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::CREATED
        );
    }
    let mut max_used = 0;
    for n in 0..512u64 {
        if n % 4 == 0 {
            for i in 0..8 {
                let hot = http.get(url(&format!("hot-{i}"))).send().await.unwrap();
                assert_eq!(
                    hot.status(),
                    StatusCode::OK,
                    "hot-{i} evicted after {n} MiB of writes"
                );
                assert_eq!(hot.bytes().await.unwrap().len(), MIB);
            }
        }
        let put = http
            .put(url(&format!("filler-{n}")))
            .body(payload(1000 + n, MIB))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::CREATED, "write {n}");
        let status = node.status().await;
        let used = status["disk"]["used_bytes"].as_u64().unwrap();
        assert!(
            used <= CAPACITY,
            "usage {used} over capacity after write {n}"
        );
        max_used = max_used.max(used);
        // Pace the writes: the eviction order is kept to a quarter second.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert!(
        max_used > CAPACITY / 2,
        "the test must actually fill the store"
    );
    for i in 0..8 {
        assert_eq!(
            http.get(url(&format!("cold-{i}")))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::NOT_FOUND,
            "cold-{i} must go"
        );
        assert_eq!(
            http.get(url(&format!("hot-{i}")))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
            payload(i, MIB)
        );
    }
    let evictions = node.metric("kura_storage_evictions_total").await;
    assert!(evictions >= 450, "evictions counted: {evictions}");
    let bodies: usize = std::fs::read_dir(node.data_dir().join("bodies"))
        .unwrap()
        .map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count())
        .sum();
    assert!(
        bodies <= 64,
        "evicted bodies are deleted from disk ({bodies} files left)"
    );
}
