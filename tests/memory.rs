//! Memory stays flat in the size of artifacts: peak RSS of the node (VmHWM) stays under
//! 150 MiB through a 2 GiB upload and download, and 8 concurrent 256 MiB ones.

use crate::common;

use common::{Node, NodeOptions, client, payload};
use futures_util::StreamExt;
use reqwest::StatusCode;

const MIB: usize = 1 << 20;
const LIMIT: u64 = 150 << 20;

fn generated(seed: u64, chunks: usize) -> reqwest::Body {
    let stream = futures_util::stream::iter(0..chunks)
        .map(move |i| Ok::<_, std::io::Error>(payload(seed * 100_000 + i as u64, MIB)));
    reqwest::Body::wrap_stream(stream)
}

fn expected_hash(seed: u64, chunks: usize) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    for i in 0..chunks {
        hasher.update(&payload(seed * 100_000 + i as u64, MIB));
    }
    hasher.finalize()
}

async fn round_trip(http: reqwest::Client, url: String, seed: u64, chunks: usize) {
    let size = (chunks * MIB) as u64;
    let put = http
        .put(&url)
        .header("content-length", size.to_string())
        .body(generated(seed, chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let get = http.get(&url).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    let mut stream = get.bytes_stream();
    let mut hasher = blake3::Hasher::new();
    let mut received = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        received += chunk.len() as u64;
        hasher.update(&chunk);
    }
    assert_eq!(received, size);
    assert_eq!(hasher.finalize(), expected_hash(seed, chunks));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_rss_stays_flat_for_gigabyte_artifacts() {
    let node = Node::start_with(NodeOptions::default().env("KURA_LIMITS_GRADLE", "4GiB"));
    let http = client();
    let url = |key: &str| node.url(&format!("/api/cache/gradle/{key}?account_handle=dev"));

    round_trip(http.clone(), url("two-gib"), 1, 2048).await;
    let after_single = node.peak_rss();

    let tasks: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(round_trip(
                http.clone(),
                url(&format!("quarter-{i}")),
                10 + i,
                256,
            ))
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let peak = node.peak_rss();
    eprintln!(
        "peak RSS: {} MiB after 2 GiB, {} MiB after 8 x 256 MiB",
        after_single >> 20,
        peak >> 20
    );
    assert!(peak > 0, "VmHWM must be readable");
    assert!(
        peak < LIMIT,
        "peak RSS {} MiB is over {} MiB",
        peak >> 20,
        LIMIT >> 20
    );
}
