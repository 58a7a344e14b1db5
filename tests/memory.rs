//! Memory stays flat in the size and number of transfers: peak RSS of the node (VmHWM) stays
//! under 150 MiB while 64 uploads and downloads of 64 MiB and two of 1 GiB run at once.

use crate::common;

use common::{Node, NodeOptions, StatusOf, client, payload};
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
async fn peak_rss_stays_flat_for_64_concurrent_transfers_and_gigabyte_ones() {
    let node = Node::start_with(NodeOptions::default().env("KURA_LIMITS_GRADLE", "2GiB"));
    let http = client();
    let url = |key: &str| node.url(&format!("/api/cache/gradle/{key}?account_handle=dev"));

    let mut transfers: Vec<_> = (0..64)
        .map(|i| {
            tokio::spawn(round_trip(
                http.clone(),
                url(&format!("m64-{i}")),
                10 + i,
                64,
            ))
        })
        .collect();
    transfers.extend((0..2).map(|i| {
        tokio::spawn(round_trip(
            http.clone(),
            url(&format!("g1-{i}")),
            1000 + i,
            1024,
        ))
    }));
    for transfer in transfers {
        transfer.await.unwrap();
    }
    let peak = node.peak_rss();
    eprintln!("peak RSS: {} MiB", peak >> 20);
    assert!(peak > 0, "VmHWM must be readable");
    assert!(
        peak < LIMIT,
        "peak RSS {} MiB is over {} MiB",
        peak >> 20,
        LIMIT >> 20
    );
}

/// Transfers lease what they hold in memory from `limits.body_memory`: with the budget spent by
/// stalled uploads, a new upload waits `limits.body_memory_wait` and then gets 429 with
/// `Retry-After`; small transfers that still fit go on, and the room comes back when an upload
/// ends.
#[tokio::test]
async fn a_spent_body_memory_budget_makes_new_transfers_wait_then_429() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_LIMITS_BODY_MEMORY", "64MiB")
            .env("KURA_LIMITS_BODY_MEMORY_WAIT", "1s"),
    );
    let http = client();
    let small = node.url("/api/cache/gradle/small?account_handle=dev");
    http.put(&small).body("fits").send().await.unwrap();
    // An upload that declared 2 MiB and sends its first KiB, then nothing.
    let stalled_upload = |key: &str| {
        let mut stream = TcpStream::connect(node.addr).unwrap();
        let head = format!(
            "PUT /api/cache/gradle/{key}?account_handle=dev HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            2 * MIB
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&[7u8; 1024]).unwrap();
        stream
    };
    // Each upload leases 672 KiB (the node's UPLOAD_FOOTPRINT): 97 of them spend 63.7 MiB of
    // the 64.
    let lease = 672 * 1024;
    let fitting = 64 * MIB as u64 / lease;
    let mut uploads: Vec<TcpStream> = (0..fitting)
        .map(|i| stalled_upload(&format!("s{i}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.metric("kura_body_memory_bytes").await < fitting * lease {
        assert!(
            Instant::now() < deadline,
            "the uploads never leased their memory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut refused = stalled_upload("one-too-many");
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut answer = [0u8; 512];
    let n = refused.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 429"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered before waiting for room"
    );
    // Small transfers still fit in what is left.
    assert_eq!(http.get(&small).status_of().await, StatusCode::OK);
    // One upload ends (its client goes away): its room serves the next one.
    drop(uploads.pop());
    let next = http
        .put(node.url("/api/cache/gradle/next?account_handle=dev"))
        .body(payload(3, 2 * MIB))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), StatusCode::CREATED);
}
