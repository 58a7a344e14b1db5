//! REAPI over gRPC against the same node's HTTP, from one client binary (this one, not the
//! server's code): the same payloads, concurrency and duration on both sides, alternating, the
//! median of 3 runs. Run with `benches/grpc.sh` (or `cargo bench --bench reapi`); results in
//! `docs/benchmarks.md`.
//!
//! Scenarios (32 concurrent streams, each on its own connection on both sides):
//! - `write-4k`, `write-128k`: ByteStream Write of new 4 KiB (most of a build's blobs) and
//!   128 KiB blobs / HTTP PUT to `/bazel/.../cas/`;
//! - `read-128k`: ByteStream Read / HTTP GET of 1,000 stored 128 KiB blobs;
//! - `batch-read-4k`: BatchReadBlobs of 100 × 4 KiB / 100 HTTP GETs of the same blobs;
//! - `read-256m`: ByteStream Read / HTTP GET of one 256 MiB blob (4 streams);
//! - `find-missing-10k`: FindMissingBlobs of 10,000 digests, half present (latency, 1 stream);
//! - `tiny-unary`: GetCapabilities on a warm connection (latency, 1 stream: Nagle shows here).
//!
//! Environment: `KURA_BENCH_DURATION` (seconds per side per run, default 10), `KURA_BENCH_RUNS`
//! (default 3), `KURA_BENCH_ONLY` (comma-separated scenarios), `KURA_BENCH_DISK_DIR` (where the node's data dir goes; default a temp dir under
//! the target dir, on disk).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use kura::grpc::proto::bytestream::byte_stream_client::ByteStreamClient;
use kura::grpc::proto::bytestream::{ReadRequest, WriteRequest};
use kura::grpc::proto::reapi::capabilities_client::CapabilitiesClient;
use kura::grpc::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kura::grpc::proto::reapi::{
    BatchReadBlobsRequest, Digest, FindMissingBlobsRequest, GetCapabilitiesRequest,
};
use sha2::Digest as _;
use tonic::transport::{Channel, Endpoint};

const PROJECT: &str = "bench";
const STREAMS: usize = 32;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

struct Node {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node() -> Node {
    let parent = std::env::var("KURA_BENCH_DISK_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    std::fs::create_dir_all(&parent).expect("bench dir");
    let dir = tempfile::tempdir_in(parent).expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("serve")
        .env("KURA_SERVER_HTTP", "127.0.0.1:0")
        .env("KURA_SERVER_GRPC", "127.0.0.1:0")
        .env("KURA_STORAGE_DATA_DIR", dir.path().join("data"))
        .env("KURA_LOG_FORMAT", "json")
        .env("KURA_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kura");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let (http, grpc) = loop {
        let line = lines
            .next()
            .expect("kura exited before serving")
            .expect("log line");
        if line.contains("kura is serving") {
            let value: serde_json::Value = serde_json::from_str(&line).expect("json log");
            let field = |name: &str| -> SocketAddr {
                value["fields"][name]
                    .as_str()
                    .expect("address")
                    .parse()
                    .expect("address")
            };
            break (field("address"), field("grpc_address"));
        }
    };
    // Keep draining the log so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Node {
        child,
        http,
        grpc,
        _dir: dir,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    // The flow-control windows of grpc-java (Bazel's client): 1 MiB per stream. h2's default
    // of 64 KiB would make every 128 KiB read wait for a window update.
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect")
}

/// A blob numbered `n` of `size` bytes: distinct for every `n`, cheap to make.
fn blob(n: u64, size: usize) -> Bytes {
    let mut data = vec![0u8; size];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        let word = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    Bytes::from(data)
}

fn digest(data: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(sha2::Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

/// What one side of one scenario achieved in one run.
#[derive(Clone, Copy, Default)]
struct Measure {
    ops_per_s: f64,
    mb_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Cores this client process used meanwhile: what it took from the node on the shared
    /// machine.
    client_cores: f64,
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage(2) with a valid out-pointer.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Runs `op` on `streams` workers for `duration`; each op returns the bytes it moved.
async fn drive<F, Fut>(streams: usize, duration: Duration, op: F) -> Measure
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|worker| {
            let (op, counter) = (op.clone(), counter.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut bytes = 0u64;
                while started.elapsed() < duration {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    bytes += op(worker, n).await;
                    latencies.push(t.elapsed());
                }
                (latencies, bytes)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut bytes = 0;
    for worker in workers {
        let (l, b) = worker.await.expect("worker");
        latencies.extend(l);
        bytes += b;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let client_cores = (cpu_seconds() - cpu_before) / elapsed;
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Measure {
        ops_per_s: latencies.len() as f64 / elapsed,
        mb_per_s: bytes as f64 / elapsed / 1e6,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        client_cores,
    }
}

fn median(mut values: Vec<Measure>) -> Measure {
    let pick = |values: &mut Vec<Measure>, key: fn(&Measure) -> f64| {
        values.sort_by(|a, b| key(a).total_cmp(&key(b)));
        key(&values[values.len() / 2])
    };
    Measure {
        ops_per_s: pick(&mut values, |m| m.ops_per_s),
        mb_per_s: pick(&mut values, |m| m.mb_per_s),
        p50_ms: pick(&mut values, |m| m.p50_ms),
        p99_ms: pick(&mut values, |m| m.p99_ms),
        client_cores: pick(&mut values, |m| m.client_cores),
    }
}

/// What every scenario runs against: the clients and the digests of the preloaded blobs.
struct Workload {
    clients: Arc<Clients>,
    reads: Arc<Vec<Digest>>,
    smalls: Arc<Vec<Digest>>,
    huge: Digest,
}

struct Clients {
    http: reqwest::Client,
    http_base: String,
    grpc: Vec<Channel>,
}

async fn preload(clients: &Clients, blobs: &[Bytes]) {
    for chunk in blobs.chunks(STREAMS) {
        let puts = chunk.iter().map(|data| {
            let url = format!("{}/cas/{}", clients.http_base, digest(data).hash);
            clients.http.put(url).body(data.clone()).send()
        });
        for put in futures_util::future::join_all(puts).await {
            assert!(put.expect("preload").status().is_success());
        }
    }
}

async fn grpc_read(channel: Channel, name: String) -> u64 {
    let request = ReadRequest {
        resource_name: name,
        read_offset: 0,
        read_limit: 0,
    };
    let mut stream = ByteStreamClient::new(channel)
        .read(request)
        .await
        .expect("read")
        .into_inner();
    let mut bytes = 0;
    while let Some(message) = stream.message().await.expect("read stream") {
        bytes += message.data.len() as u64;
    }
    bytes
}

async fn grpc_write(channel: Channel, data: Bytes, upload: u64) -> u64 {
    let d = digest(&data);
    let name = format!(
        "{PROJECT}/uploads/{upload}/blobs/{}/{}",
        d.hash, d.size_bytes
    );
    let chunk = 64 * 1024;
    let messages: Vec<WriteRequest> = (0..data.len())
        .step_by(chunk)
        .map(|at| WriteRequest {
            resource_name: if at == 0 { name.clone() } else { String::new() },
            write_offset: at as i64,
            finish_write: at + chunk >= data.len(),
            data: data.slice(at..(at + chunk).min(data.len())),
        })
        .collect();
    let response = ByteStreamClient::new(channel)
        .write(futures_util::stream::iter(messages))
        .await
        .expect("write");
    assert_eq!(response.into_inner().committed_size, d.size_bytes);
    data.len() as u64
}

/// Streams the body through, as the gRPC reads do (never collected whole).
async fn http_get(client: reqwest::Client, url: String) -> u64 {
    let mut response = client.get(url).send().await.expect("get");
    assert!(response.status().is_success());
    let mut bytes = 0;
    while let Some(chunk) = response.chunk().await.expect("body") {
        bytes += chunk.len() as u64;
    }
    bytes
}

async fn run() {
    let seconds: u64 = std::env::var("KURA_BENCH_DURATION")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let runs: usize = std::env::var("KURA_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let duration = Duration::from_secs(seconds);
    let node = start_node();
    let mut grpc = Vec::new();
    for _ in 0..STREAMS {
        grpc.push(channel(node.grpc).await);
    }
    let clients = Arc::new(Clients {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(STREAMS)
            .build()
            .expect("client"),
        http_base: format!("http://{}/bazel/dev/{PROJECT}", node.http),
        grpc,
    });
    println!("preloading...");
    let reads: Arc<Vec<Bytes>> =
        Arc::new((0..1000).map(|n| blob(1 << 40 | n, 128 * 1024)).collect());
    preload(&clients, &reads).await;
    let smalls: Arc<Vec<Bytes>> = Arc::new((0..10_000).map(|n| blob(2 << 40 | n, 4096)).collect());
    preload(&clients, &smalls).await;
    let huge = blob(3 << 40, 256 << 20);
    let huge_digest = digest(&huge);
    preload(&clients, std::slice::from_ref(&huge)).await;
    drop(huge);

    // Digests are computed once here, so no measured operation pays for client-side hashing
    // of blobs it only names.
    let reads: Arc<Vec<Digest>> = Arc::new(reads.iter().map(|b| digest(b)).collect());
    let smalls: Arc<Vec<Digest>> = Arc::new(smalls.iter().map(|b| digest(b)).collect());
    let workload = Workload {
        clients,
        reads,
        smalls,
        huge: huge_digest,
    };
    let mut results: Vec<(&str, Vec<Measure>, Vec<Measure>)> = Vec::new();
    let scenarios = [
        "write-4k",
        "write-128k",
        "read-128k",
        "batch-read-4k",
        "read-256m",
        "find-missing-10k",
        "tiny-unary",
    ];
    // `KURA_BENCH_ONLY=read-128k,tiny-unary` runs just those (for profiling one of them).
    let only = std::env::var("KURA_BENCH_ONLY").unwrap_or_default();
    let chosen = |scenario: &str| only.is_empty() || only.split(',').any(|s| s == scenario);
    for scenario in scenarios.into_iter().filter(|s| chosen(s)) {
        let (mut http_runs, mut grpc_runs) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let base = (run as u64 + 1) << 32;
            let (g, h) = measure(scenario, &workload, duration, base, run % 2 == 1).await;
            grpc_runs.push(g);
            if let Some(h) = h {
                http_runs.push(h);
            }
            println!("{scenario} run {run}: grpc {}", line(&g));
            if let Some(h) = h {
                println!("{scenario} run {run}: http {}", line(&h));
            }
        }
        results.push((scenario, grpc_runs, http_runs));
    }
    println!(
        "\n| scenario | gRPC ops/s | gRPC MB/s | gRPC p50 / p99 ms | HTTP ops/s | HTTP MB/s | HTTP p50 / p99 ms | gRPC/HTTP MB/s | client cores gRPC / HTTP |"
    );
    println!("| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | --- |");
    for (scenario, grpc_runs, http_runs) in results {
        let g = median(grpc_runs);
        let h = (!http_runs.is_empty()).then(|| median(http_runs));
        let (http_ops, http_mb, http_latency, ratio, http_cores) = match h {
            Some(h) => (
                format!("{:.0}", h.ops_per_s),
                format!("{:.1}", h.mb_per_s),
                format!("{:.2} / {:.2}", h.p50_ms, h.p99_ms),
                format!("{:.2}", g.mb_per_s / h.mb_per_s),
                format!("{:.2}", h.client_cores),
            ),
            None => Default::default(),
        };
        println!(
            "| {scenario} | {:.0} | {:.1} | {:.2} / {:.2} | {http_ops} | {http_mb} | {http_latency} | {ratio} | {:.2} / {http_cores} |",
            g.ops_per_s, g.mb_per_s, g.p50_ms, g.p99_ms, g.client_cores,
        );
    }
}

fn line(m: &Measure) -> String {
    format!(
        "{:.0} ops/s {:.1} MB/s p50 {:.2} ms p99 {:.2} ms, client {:.2} cores",
        m.ops_per_s, m.mb_per_s, m.p50_ms, m.p99_ms, m.client_cores
    )
}

type Side = std::pin::Pin<Box<dyn std::future::Future<Output = Measure> + Send>>;

/// Runs the two sides one after the other, in the order given: runs alternate which goes
/// first, so neither always inherits the other's dirty pages or warm caches.
async fn both(grpc: Side, http: Option<Side>, http_first: bool) -> (Measure, Option<Measure>) {
    match (http, http_first) {
        (Some(http), true) => {
            let h = http.await;
            (grpc.await, Some(h))
        }
        (Some(http), false) => {
            let g = grpc.await;
            (g, Some(http.await))
        }
        (None, _) => (grpc.await, None),
    }
}

/// One run of `scenario`: the gRPC and HTTP sides (if it has one), in the order given.
async fn measure(
    scenario: &str,
    workload: &Workload,
    duration: Duration,
    base: u64,
    http_first: bool,
) -> (Measure, Option<Measure>) {
    let (clients, reads, smalls, huge) = (
        &workload.clients,
        &workload.reads,
        &workload.smalls,
        &workload.huge,
    );
    let name_of = |d: &Digest| format!("{PROJECT}/blobs/{}/{}", d.hash, d.size_bytes);
    match scenario {
        "write-128k" | "write-4k" => {
            let size = if scenario == "write-4k" {
                4096
            } else {
                128 * 1024
            };
            // Each size writes blobs of its own (distinct numbers), so none exists already.
            let base = base | (size as u64) << 40;
            let c = clients.clone();
            let grpc = drive(STREAMS, duration, move |w, n| {
                grpc_write(c.grpc[w].clone(), blob(base | n, size), base | n)
            })
            .boxed();
            let c = clients.clone();
            let http = drive(STREAMS, duration, move |_, n| {
                let data = blob(base | 1 << 31 | n, size);
                let url = format!("{}/cas/{}", c.http_base, digest(&data).hash);
                let request = c.http.put(url).body(data.clone());
                async move {
                    assert!(request.send().await.expect("put").status().is_success());
                    data.len() as u64
                }
            })
            .boxed();
            both(grpc, Some(http), http_first).await
        }
        "read-128k" => {
            let (c, r) = (clients.clone(), reads.clone());
            let grpc = drive(STREAMS, duration, move |w, n| {
                grpc_read(c.grpc[w].clone(), name_of(&r[n as usize % r.len()]))
            })
            .boxed();
            let (c, r) = (clients.clone(), reads.clone());
            let http = drive(STREAMS, duration, move |_, n| {
                let url = format!("{}/cas/{}", c.http_base, r[n as usize % r.len()].hash);
                http_get(c.http.clone(), url)
            })
            .boxed();
            both(grpc, Some(http), http_first).await
        }
        "batch-read-4k" => {
            let (c, s) = (clients.clone(), smalls.clone());
            let grpc = drive(STREAMS, duration, move |w, n| {
                let digests: Vec<Digest> = (0..100)
                    .map(|i| s[(n as usize * 100 + i) % s.len()].clone())
                    .collect();
                let mut client = ContentAddressableStorageClient::new(c.grpc[w].clone());
                async move {
                    let request = BatchReadBlobsRequest {
                        instance_name: PROJECT.into(),
                        digests,
                        ..Default::default()
                    };
                    let response = client
                        .batch_read_blobs(request)
                        .await
                        .expect("batch read")
                        .into_inner();
                    response.responses.iter().map(|r| r.data.len() as u64).sum()
                }
            })
            .boxed();
            let (c, s) = (clients.clone(), smalls.clone());
            let http = drive(STREAMS, duration, move |_, n| {
                let urls: Vec<String> = (0..100)
                    .map(|i| {
                        format!(
                            "{}/cas/{}",
                            c.http_base,
                            s[(n as usize * 100 + i) % s.len()].hash
                        )
                    })
                    .collect();
                let client = c.http.clone();
                async move {
                    let mut bytes = 0;
                    for url in urls {
                        bytes += http_get(client.clone(), url).await;
                    }
                    bytes
                }
            })
            .boxed();
            both(grpc, Some(http), http_first).await
        }
        "read-256m" => {
            let (c, name) = (clients.clone(), name_of(huge));
            let grpc = drive(4, duration, move |w, _| {
                grpc_read(c.grpc[w].clone(), name.clone())
            })
            .boxed();
            let (c, url) = (
                clients.clone(),
                format!("{}/cas/{}", clients.http_base, huge.hash),
            );
            let http = drive(4, duration, move |_, _| {
                http_get(c.http.clone(), url.clone())
            })
            .boxed();
            both(grpc, Some(http), http_first).await
        }
        "find-missing-10k" => {
            let (c, s) = (clients.clone(), smalls.clone());
            let grpc = drive(1, duration, move |w, n| {
                // Half stored, half not.
                let digests: Vec<Digest> = (0..10_000u64)
                    .map(|i| match i % 2 {
                        0 => s[i as usize % s.len()].clone(),
                        // A made-up hash: never stored.
                        _ => Digest {
                            hash: format!("{:032x}{:032x}", base | n, i),
                            size_bytes: 64,
                        },
                    })
                    .collect();
                let mut client = ContentAddressableStorageClient::new(c.grpc[w].clone());
                async move {
                    let request = FindMissingBlobsRequest {
                        instance_name: PROJECT.into(),
                        blob_digests: digests,
                        digest_function: 0,
                    };
                    let missing = client
                        .find_missing_blobs(request)
                        .await
                        .expect("find")
                        .into_inner();
                    assert_eq!(missing.missing_blob_digests.len(), 5000);
                    0
                }
            })
            .boxed();
            both(grpc, None, http_first).await
        }
        _ => {
            let c = clients.clone();
            let grpc = drive(1, duration, move |w, _| {
                let mut client = CapabilitiesClient::new(c.grpc[w].clone());
                async move {
                    client
                        .get_capabilities(GetCapabilitiesRequest::default())
                        .await
                        .expect("capabilities");
                    0
                }
            })
            .boxed();
            both(grpc, None, http_first).await
        }
    }
}
